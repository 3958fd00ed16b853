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
//!
//! Where live frames are unavailable (an older kernel, a missing capability), the
//! generator falls back to an `AF_PACKET` socket in userspace that writes the same
//! frames with the same flow rotation, one `sendto` per frame: slower, and its own cost
//! is then part of every figure, so [`select`] records which one ran ([`kind`]).
//!
//! Beyond one address's source ports, [`Generator::send_for_each`] spreads flows over
//! several templates (one source address each): every run sends whole cycles of the
//! source ports with one template, the next run the next template.
use std::{
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::OnceLock,
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

/// How frames are generated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `traffic_gen` in a live-frames test run: no syscall or copy per frame.
    LiveFrames,
    /// An `AF_PACKET` socket, one `sendto` per frame.
    PacketSocket,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::LiveFrames => "xdp-live-frames",
            Kind::PacketSocket => "af-packet",
        }
    }
}

static KIND: OnceLock<Kind> = OnceLock::new();

/// Fixes the kind every later [`Generator`] of this process uses (first call wins).
pub fn select(kind: Kind) -> Kind {
    *KIND.get_or_init(|| kind)
}

/// The kind generators use: the selected one, else live frames.
pub fn kind() -> Kind {
    *KIND.get_or_init(|| Kind::LiveFrames)
}

/// Whether a live-frames run can send out of `ifindex` from the calling thread's
/// namespace: one frame, sent for real.
pub fn live_frames_work(ifindex: u32, frame: &[u8]) -> bool {
    load_live(ifindex, 1, 1024)
        .and_then(|mut ebpf| send_live(&mut ebpf, frame, 1))
        .is_ok()
}

enum Backend {
    Live(Ebpf),
    /// The socket is opened at the first send, in the namespace of the thread that
    /// sends (as a live-frames run resolves its device there).
    Socket {
        ifindex: u32,
        socket: Option<OwnedFd>,
    },
}

/// `traffic_gen`, loaded for one target device and flow set, or its userspace
/// fallback (see [`select`]).
pub struct Generator {
    backend: Backend,
    flows: u32,
    first_port: u16,
    /// Frames sent by the fallback, which drives its flow rotation.
    seq: u64,
}

fn load_live(ifindex: u32, flows: u32, first_port: u16) -> Result<Ebpf> {
    let first = u32::from(first_port);
    let mut ebpf = EbpfLoader::new()
        .override_global(traffic_globals::GEN_IFINDEX, &ifindex, true)
        .override_global(traffic_globals::GEN_FLOWS, &flows, true)
        .override_global(traffic_globals::GEN_FIRST_PORT, &first, true)
        .load(TRAFFIC_OBJECT)
        .context("loading the traffic object")?;
    xdp_program(&mut ebpf, traffic_programs::GEN)?.load()?;
    Ok(ebpf)
}

fn send_live(ebpf: &mut Ebpf, frame: &[u8], packets: u32) -> Result<Duration> {
    let mut template = GenTemplate {
        bytes: [0; GEN_TEMPLATE_LEN],
    };
    let n = frame.len().min(GEN_TEMPLATE_LEN);
    template.bytes[..n].copy_from_slice(&frame[..n]);
    let mut templates: Array<_, GenTemplate> = Array::try_from(
        ebpf.map_mut(traffic_maps::GEN_TEMPLATE)
            .context("no template map in the traffic object")?,
    )?;
    templates.set(0, template, 0)?;
    let prog = xdp_program(ebpf, traffic_programs::GEN)?;
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

/// Offset of the UDP header in `frame` (IPv4 any header length, IPv6 without extension
/// headers), as `traffic_gen` finds it.
fn udp_offset(frame: &[u8]) -> Option<usize> {
    let kind = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let off = match kind {
        ethertype::IPV4 if *frame.get(ETH_HLEN + 9)? == proto::UDP => {
            ETH_HLEN + usize::from(frame.get(ETH_HLEN)? & 0x0f) * 4
        }
        ethertype::IPV6 if *frame.get(ETH_HLEN + 6)? == proto::UDP => ETH_HLEN + IPV6_HLEN,
        _ => return None,
    };
    (off + 8 <= frame.len()).then_some(off)
}

/// One's-complement update of a checksum for a 16-bit field going from `old` to `new`
/// (RFC 1624, eqn. 3), as `traffic_gen` does it.
fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

fn packet_socket() -> Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right away. Protocol 0: send only.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

impl Generator {
    /// Frames leave by `ifindex` (in the namespace of the thread that sends), UDP
    /// source ports `first_port ..first_port + flows` in turn.
    pub fn new(ifindex: u32, flows: u32, first_port: u16) -> Result<Self> {
        Self::with_kind(kind(), ifindex, flows, first_port)
    }

    /// As [`Generator::new`], of `kind` whatever [`select`] chose.
    pub fn with_kind(kind: Kind, ifindex: u32, flows: u32, first_port: u16) -> Result<Self> {
        ensure!(flows >= 1, "a generator needs at least one flow");
        let backend = match kind {
            Kind::LiveFrames => Backend::Live(load_live(ifindex, flows, first_port)?),
            Kind::PacketSocket => Backend::Socket {
                ifindex,
                socket: None,
            },
        };
        Ok(Self {
            backend,
            flows,
            first_port,
            seq: 0,
        })
    }

    /// Sends `packets` copies of `frame` (each with its flow's source port). Call
    /// from a thread inside the target device's namespace.
    pub fn send(&mut self, frame: &[u8], packets: u32) -> Result<Duration> {
        let (ifindex, socket) = match &mut self.backend {
            Backend::Live(ebpf) => return send_live(ebpf, frame, packets),
            Backend::Socket { ifindex, socket } => (*ifindex, socket),
        };
        if socket.is_none() {
            *socket = Some(packet_socket()?);
        }
        let fd = socket.as_ref().expect("opened above").as_raw_fd();
        let off = udp_offset(frame).context("the generator's template is no UDP frame")?;
        let mut buf = frame.to_vec();
        let (template_port, template_check) = (
            u16::from_be_bytes([frame[off], frame[off + 1]]),
            u16::from_be_bytes([frame[off + 6], frame[off + 7]]),
        );
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set are plain integers.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        let start = Instant::now();
        for _ in 0..packets {
            let port = self
                .first_port
                .wrapping_add((self.seq % u64::from(self.flows)) as u16);
            self.seq += 1;
            buf[off..off + 2].copy_from_slice(&port.to_be_bytes());
            if template_check != 0 {
                let mut check = csum_replace(template_check, template_port, port);
                if check == 0 {
                    check = 0xffff;
                }
                buf[off + 6..off + 8].copy_from_slice(&check.to_be_bytes());
            }
            // SAFETY: `buf` and `addr` outlive the call; their sizes are passed.
            let sent = unsafe {
                libc::sendto(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    0,
                    std::ptr::from_ref(&addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            // A full queue drops the frame, as a full veth does live frames': the
            // sink counts what arrived either way.
            if sent < 0 {
                let error = std::io::Error::last_os_error();
                if error.raw_os_error() != Some(libc::ENOBUFS) {
                    return Err(error).context("sendto(AF_PACKET)");
                }
            }
        }
        Ok(start.elapsed())
    }

    /// Sends for at least `duration`, in runs of about [`RUN_TIME`] each (the first few
    /// shorter, to size them), so the end is bounded by `duration` plus one run. Long
    /// runs matter: each run sets up a page pool of its own, and frames still in flight
    /// when it ends cost the receiving side extra work to release.
    pub fn send_for(&mut self, frame: &[u8], duration: Duration) -> Result<Sent> {
        self.send_for_each(std::slice::from_ref(&frame.to_vec()), duration)
    }

    /// As [`Generator::send_for`], over `templates` in turn, one per run; with more
    /// than one, every run is a whole number of cycles of the source ports (each
    /// template's flows all sent), and the sending goes on until every template has
    /// had a run. `templates.len() * flows` flows in all.
    pub fn send_for_each(&mut self, templates: &[Vec<u8>], duration: Duration) -> Result<Sent> {
        ensure!(!templates.is_empty(), "no template to send");
        let cycle = if templates.len() > 1 {
            u64::from(self.flows)
        } else {
            1
        };
        let mut chunk: u64 = 4096u64.div_ceil(cycle) * cycle;
        let mut sent = Sent {
            packets: 0,
            elapsed: Duration::ZERO,
        };
        // Bounded: once sized, every run takes about `RUN_TIME` (or one cycle);
        // before that the size grows geometrically.
        for run in 0..100_000 {
            if sent.elapsed >= duration && run >= templates.len() {
                break;
            }
            let took = self.send(&templates[run % templates.len()], chunk as u32)?;
            sent.packets += chunk;
            sent.elapsed += took;
            let per_packet = took.as_secs_f64() / chunk as f64;
            let left = duration.saturating_sub(sent.elapsed).min(RUN_TIME);
            let target = (left.as_secs_f64() / per_packet.max(1e-9)) as u64;
            chunk = target.clamp(1024, chunk * 16).min(u64::from(u32::MAX) / 2);
            chunk = chunk.div_ceil(cycle).max(1) * cycle;
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
