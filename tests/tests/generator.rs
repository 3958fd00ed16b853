//! The benchmark's traffic generator and sink (`dataplane_tests::generator`): frames
//! really leave by the device, each flow's source port in turn, with valid checksums,
//! from live frames and from the `AF_PACKET` fallback alike; flows spread over several
//! templates reach every (source, port); and the sink counts exactly what arrives.
//! Needs root.
use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use anyhow::{ensure, Result};
use dataplane_tests::{
    frames::{self, offsets, proto, ETH_HLEN, IPV4_HLEN, IPV6_HLEN},
    generator::{udp_frame, Generator, Kind, Sink},
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

/// Both kinds: live frames and the `AF_PACKET` fallback write the same frames.
#[test]
fn frames_cycle_through_the_flows_with_valid_checksums() -> Result<()> {
    for (kind, v6) in [
        (Kind::LiveFrames, false),
        (Kind::LiveFrames, true),
        (Kind::PacketSocket, false),
        (Kind::PacketSocket, true),
    ] {
        let (sender, receiver, ifindex) = pair("gen-flows")?;
        let (src, dst) = addresses(v6);
        let frame = udp_frame(SENDER_MAC, RECEIVER_MAC, src, dst, 9, 128);
        let mut generator = Generator::with_kind(kind, ifindex, 5, 3000)?;
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
                "{kind:?} v6={v6}: bad UDP checksum on source port {sport}"
            );
        }
        ensure!(
            ports.len() == 20,
            "{kind:?} v6={v6}: captured {} frames",
            ports.len()
        );
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        ensure!(
            distinct == (3000..3005).collect(),
            "{kind:?} v6={v6}: source ports {ports:?}"
        );
    }
    Ok(())
}

/// Over several templates, every run is whole cycles of the ports with one template,
/// and every template gets its runs: sources x ports flows.
#[test]
fn flows_spread_over_templates() -> Result<()> {
    let (sender, receiver, ifindex) = pair("gen-spread")?;
    let dst: IpAddr = "10.9.0.2".parse()?;
    let templates: Vec<Vec<u8>> = ["10.9.1.1", "10.9.1.2", "10.9.1.3"]
        .iter()
        .map(|src| {
            let src: IpAddr = src.parse().expect("an address");
            udp_frame(SENDER_MAC, RECEIVER_MAC, src, dst, 9, 60)
        })
        .collect();
    let mut generator = Generator::new(ifindex, 4, 4000)?;
    let (sent, captured) = receiver.capture_while(Duration::from_millis(800), || {
        sender.run(|| generator.send_for_each(&templates, Duration::from_millis(1)))?
    })?;
    ensure!(
        sent.packets % 4 == 0,
        "{} frames: not whole cycles",
        sent.packets
    );
    let udp_at = ETH_HLEN + IPV4_HLEN;
    let flows: BTreeSet<([u8; 4], u16)> = captured
        .iter()
        .filter(|f| f.len() == 60)
        .map(|f| {
            let src = offsets::IPV4_SRC;
            (
                [f[src], f[src + 1], f[src + 2], f[src + 3]],
                u16::from_be_bytes([f[udp_at], f[udp_at + 1]]),
            )
        })
        .collect();
    let expected: BTreeSet<([u8; 4], u16)> = (1..=3)
        .flat_map(|host| (4000..4004).map(move |port| ([10, 9, 1, host], port)))
        .collect();
    ensure!(flows == expected, "flows {flows:?}");
    Ok(())
}
