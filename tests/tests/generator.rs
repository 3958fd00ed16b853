//! The benchmark's traffic generator and sink (`dataplane_tests::generator`): frames
//! really leave by the device, each flow's source port in turn, with valid checksums,
//! and the sink counts exactly what arrives. Needs root.
use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use anyhow::{ensure, Result};
use dataplane_tests::{
    frames::{self, offsets, proto, ETH_HLEN, IPV4_HLEN, IPV6_HLEN},
    generator::{udp_frame, Generator, Sink},
    netns::NetNs,
    topology::{Vm, VM_DEV},
};

const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const RECEIVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const DEVICE: &str = "gen0";

/// A sender namespace with `gen0`, whose other end is the receiver VM's `eth0`, with
/// GRO on so that it takes XDP frames.
fn pair(tag: &str) -> Result<(NetNs, Vm, u32)> {
    let sender = NetNs::new(tag)?;
    let receiver = Vm::create(&sender, tag, DEVICE, RECEIVER_MAC, &[])?;
    receiver
        .ns
        .exec_ok(&["ethtool", "-K", VM_DEV, "gro", "on"])?;
    let ifindex = sender.ifindex(DEVICE)?;
    Ok((sender, receiver, ifindex))
}

fn addresses(v6: bool) -> (IpAddr, IpAddr) {
    if v6 {
        ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap())
    } else {
        ("10.9.0.1".parse().unwrap(), "10.9.0.2".parse().unwrap())
    }
}

#[test]
fn the_sink_counts_every_generated_frame() -> Result<()> {
    let (sender, receiver, ifindex) = pair("gen-count")?;
    let sink = Sink::attach(&receiver.ns, VM_DEV)?;
    let (src, dst) = addresses(false);
    let frame = udp_frame(SENDER_MAC, RECEIVER_MAC, src, dst, 9, 60);
    let mut generator = Generator::new(ifindex, 16, 2000)?;
    sender.run(|| generator.send(&frame, 10_000))??;
    // The receiving side may still be working through its queue.
    let mut count = (0, 0);
    for _ in 0..50 {
        count = sink.count()?;
        if count.0 >= 10_000 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(count == (10_000, 600_000), "sink counted {count:?}");

    // Timed sending stops by itself, near the time asked for.
    let sent = sender.run(|| generator.send_for(&frame, Duration::from_millis(200)))??;
    ensure!(
        sent.elapsed >= Duration::from_millis(200) && sent.elapsed < Duration::from_secs(2),
        "sent for {:?}",
        sent.elapsed
    );
    ensure!(sent.packets > 10_000, "only {} frames", sent.packets);
    Ok(())
}

#[test]
fn frames_cycle_through_the_flows_with_valid_checksums() -> Result<()> {
    for v6 in [false, true] {
        let (sender, receiver, ifindex) = pair("gen-flows")?;
        let (src, dst) = addresses(v6);
        let frame = udp_frame(SENDER_MAC, RECEIVER_MAC, src, dst, 9, 128);
        let mut generator = Generator::new(ifindex, 5, 3000)?;
        let (_, captured) = receiver.capture_while(Duration::from_millis(500), || {
            sender.run(|| generator.send(&frame, 20))?
        })?;
        let udp_at = ETH_HLEN + if v6 { IPV6_HLEN } else { IPV4_HLEN };
        let mut ports = Vec::new();
        for f in captured.iter().filter(|f| f.len() == frame.len()) {
            let sport = u16::from_be_bytes([f[udp_at], f[udp_at + 1]]);
            ports.push(sport);
            let (src_at, addr_len) = if v6 {
                (offsets::IPV6_SRC, 16)
            } else {
                (offsets::IPV4_SRC, 4)
            };
            let udp_len = (f.len() - udp_at) as u16;
            let pseudo = [
                &f[src_at..src_at + 2 * addr_len],
                &[0, proto::UDP],
                &udp_len.to_be_bytes(),
                &f[udp_at..],
            ];
            ensure!(
                frames::checksum(&pseudo) == 0,
                "v6={v6}: bad UDP checksum on source port {sport}"
            );
        }
        ensure!(
            ports.len() == 20,
            "v6={v6}: captured {} frames",
            ports.len()
        );
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        ensure!(
            distinct == (3000..3005).collect(),
            "v6={v6}: source ports {ports:?}"
        );
    }
    Ok(())
}
