//! Traffic at a rate the datapath, not the source, limits: XDP live frames.
//!
//! [`Generator`] runs `traffic_gen` with BPF_PROG_TEST_RUN in live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`): the kernel builds real frames from one template, the
//! program gives each the next flow's UDP source port and redirects it out of a device,
//! which transmits it like any other frame. No socket, no copy from userspace, no
//! syscall per packet. [`Sink`] is `traffic_sink` at the receiving device's tc ingress:
//! it counts the UDP frames that arrive and drops them, so what a benchmark reports is
//! what was delivered, not what was sent.
//!
//! Both must act from inside the right namespace: the generator's target device is
//! looked up in the namespace of the thread that calls [`Generator::send`], the sink is
//! attached by name in the namespace [`Sink::attach`] enters. A veth passes XDP frames
//! on to its peer only when the peer has NAPI on: GRO on, or an XDP program, which
//! [`Receiver::attach`] provides without GRO's per-packet cost.
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use aya::{
    maps::{Array, PerCpuArray},
    programs::{
        tc::{SchedClassifierLinkId, TcAttachOptions},
        xdp::{XdpLinkId, XdpMode},
        LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunAttrs, TestRunOptions, Xdp,
    },
    Ebpf, EbpfLoader,
};
use dataplane_abi::{
    sink_stat, traffic_globals, traffic_maps, traffic_programs, GenTemplate, GEN_TEMPLATE_LEN,
};
use dataplane_agent::kernel::TRAFFIC_OBJECT;

use crate::{
    frames::{self, ethertype, proto, Mac, ETH_HLEN, IPV4_HLEN, IPV6_HLEN},
    netns::NetNs,
};

/// Frames the kernel processes per batch of a live-frames run (its own default).
const LIVE_BATCH: u32 = 64;
/// How long one live-frames run of [`Generator::send_for`] lasts, once sized.
pub const RUN_TIME: Duration = Duration::from_millis(250);

/// The generator's template: a UDP frame from `src` to `dst:dport` of `len` bytes
/// without the FCS (60 is a 64-byte frame on the wire), with valid checksums. Its
/// source port is the generator's to set.
pub fn udp_frame(
    src_mac: Mac,
    dst_mac: Mac,
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
    len: usize,
) -> Vec<u8> {
    let headers = ETH_HLEN + 8 + if src.is_ipv4() { IPV4_HLEN } else { IPV6_HLEN };
    let payload = vec![0u8; len.saturating_sub(headers)];
    let udp = frames::udp(0, dport, &payload);
    let (kind, packet) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (ethertype::IPV4, frames::ipv4(s, d, proto::UDP, &udp)),
        (IpAddr::V6(s), IpAddr::V6(d)) => (ethertype::IPV6, frames::ipv6(s, d, proto::UDP, &udp)),
        _ => panic!("udp_frame: {src} and {dst} are of different families"),
    };
    let mut frame = frames::ethernet(dst_mac, src_mac, kind, &packet);
    frame.resize(frame.len().max(len), 0);
    frame
}

/// What one [`Generator::send_for`] did.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub packets: u64,
    pub elapsed: Duration,
}

/// `traffic_gen`, loaded for one target device and flow set.
pub struct Generator {
    ebpf: Ebpf,
}

impl Generator {
    /// Frames leave by `ifindex` (in the namespace of the thread that sends), UDP
    /// source ports `first_port ..first_port + flows` in turn.
    pub fn new(ifindex: u32, flows: u32, first_port: u16) -> Result<Self> {
        ensure!(flows >= 1, "a generator needs at least one flow");
        let first = u32::from(first_port);
        let mut ebpf = EbpfLoader::new()
            .override_global(traffic_globals::GEN_IFINDEX, &ifindex, true)
            .override_global(traffic_globals::GEN_FLOWS, &flows, true)
            .override_global(traffic_globals::GEN_FIRST_PORT, &first, true)
            .load(TRAFFIC_OBJECT)
            .context("loading the traffic object")?;
        xdp_program(&mut ebpf, traffic_programs::GEN)?.load()?;
        Ok(Self { ebpf })
    }

    /// Sends `packets` copies of `frame` (each with its flow's source port), in one
    /// test run. Call from a thread inside the target device's namespace.
    pub fn send(&mut self, frame: &[u8], packets: u32) -> Result<Duration> {
        let mut template = GenTemplate {
            bytes: [0; GEN_TEMPLATE_LEN],
        };
        let n = frame.len().min(GEN_TEMPLATE_LEN);
        template.bytes[..n].copy_from_slice(&frame[..n]);
        let mut templates: Array<_, GenTemplate> = Array::try_from(
            self.ebpf
                .map_mut(traffic_maps::GEN_TEMPLATE)
                .context("no template map in the traffic object")?,
        )?;
        templates.set(0, template, 0)?;
        let prog = xdp_program(&mut self.ebpf, traffic_programs::GEN)?;
        let start = Instant::now();
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat: packets,
            attrs: TestRunAttrs::new().xdp_live_frames(LIVE_BATCH),
            ..TestRunOptions::default()
        })
        .context("live-frames test run")?;
        Ok(start.elapsed())
    }

    /// Sends for at least `duration`, in runs of about [`RUN_TIME`] each (the first few
    /// shorter, to size them), so the end is bounded by `duration` plus one run. Long
    /// runs matter: each run sets up a page pool of its own, and frames still in flight
    /// when it ends cost the receiving side extra work to release.
    pub fn send_for(&mut self, frame: &[u8], duration: Duration) -> Result<Sent> {
        let mut chunk: u32 = 4096;
        let mut sent = Sent {
            packets: 0,
            elapsed: Duration::ZERO,
        };
        // Bounded: once sized, every run takes about `RUN_TIME`; before that the
        // size grows geometrically.
        for _ in 0..1000 {
            if sent.elapsed >= duration {
                break;
            }
            let took = self.send(frame, chunk)?;
            sent.packets += u64::from(chunk);
            sent.elapsed += took;
            let per_packet = took.as_secs_f64() / f64::from(chunk);
            let left = duration.saturating_sub(sent.elapsed).min(RUN_TIME);
            let target = (left.as_secs_f64() / per_packet.max(1e-9)) as u64;
            chunk = target
                .clamp(1024, u64::from(chunk) * 16)
                .min(u64::from(u32::MAX)) as u32;
        }
        Ok(sent)
    }
}

/// `traffic_sink` attached to a device (tcx ingress); detached when dropped.
pub struct Sink {
    ebpf: Ebpf,
    _link: SchedClassifierLinkId,
}

impl Sink {
    /// Attaches the sink to `dev` in `ns`.
    pub fn attach(ns: &NetNs, dev: &str) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .load(TRAFFIC_OBJECT)
            .context("loading the traffic object")?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(traffic_programs::SINK)
            .context("no sink program")?
            .try_into()?;
        prog.load()?;
        let dev_name = dev.to_owned();
        let link = ns.run(move || {
            prog.attach_with_options(
                &dev_name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
        })??;
        Ok(Self { ebpf, _link: link })
    }

    /// (packets, bytes) received so far.
    pub fn count(&self) -> Result<(u64, u64)> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map(traffic_maps::SINK_STATS)
                .context("no SINK_STATS map")?,
        )?;
        let sum = |index| -> Result<u64> { Ok(stats.get(&index, 0)?.iter().sum()) };
        Ok((sum(sink_stat::PACKETS)?, sum(sink_stat::BYTES)?))
    }
}

/// `traffic_pass` on the device the generator's frames arrive at; detached when
/// dropped.
pub struct Receiver {
    _ebpf: Ebpf,
    _link: XdpLinkId,
}

impl Receiver {
    /// Makes `dev` in `ns` take XDP frames from its peer.
    pub fn attach(ns: &NetNs, dev: &str) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .load(TRAFFIC_OBJECT)
            .context("loading the traffic object")?;
        let prog = xdp_program(&mut ebpf, traffic_programs::PASS)?;
        prog.load()?;
        let dev_name = dev.to_owned();
        let link = ns.run(move || prog.attach(&dev_name, XdpMode::Driver))??;
        Ok(Self {
            _ebpf: ebpf,
            _link: link,
        })
    }
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name} in the traffic object"))?
        .try_into()?)
}
