//! The packet monitor: reads the programs' `EVENTS` ring buffer, decodes each record
//! into a [`PacketEvent`] and hands it to every subscriber. The programs emit only while
//! someone subscribes: drops for any subscriber, deliveries (traces) only while one of
//! them asked for them (`MONITOR_CONFIG`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use aya::maps::{Array, MapData, MapError, PerCpuArray, RingBuf};
use dataplane_abi::{
    map_names, monitor_hook, monitor_kind, monitor_mode, DropReason, MonitorEvent as RawEvent,
    MONITOR_HEADER_BYTES,
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::broadcast,
    task::JoinHandle,
};
use tracing::{debug, warn};

use crate::core::model::MacAddr;

/// Subscribers that fall this far behind are told how many events they missed.
const BACKLOG: usize = 4096;

/// The monitor's maps, taken from the loaded object (`Datapath::take_monitor_maps`).
pub struct MonitorMaps {
    pub events: RingBuf<MapData>,
    pub lost: PerCpuArray<MapData, u64>,
    pub config: Array<MapData, u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("waiting on the {} ring buffer", map_names::EVENTS)]
    Poll(#[source] std::io::Error),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("a record of {0} bytes, not one event")]
    Size(usize),
    #[error("event kind {0} is unknown")]
    Kind(u32),
    #[error("hook {0} is unknown")]
    Hook(u32),
    #[error("drop reason {0} is unknown")]
    Reason(u32),
}

/// What happened to the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Dropped(DropReason),
    /// Delivered to the port's VM (a trace).
    Delivered,
}

/// Where the frame was (see `dataplane_abi::monitor_hook`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    FromPort,
    ToPort,
    Uplink,
}

impl Hook {
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::FromPort => "from-port",
            Hook::ToPort => "to-port",
            Hook::Uplink => "uplink",
        }
    }
}

/// The headers of a captured frame, as far as its first bytes show them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PacketSummary {
    pub source_mac: MacAddr,
    pub destination_mac: MacAddr,
    /// After any VLAN tag.
    pub ethertype: u16,
    pub vlan: Option<u16>,
    /// IP source and destination; for ARP, the sender's and target's addresses.
    pub addresses: Option<(IpAddr, IpAddr)>,
    /// IP protocol number.
    pub protocol: Option<u8>,
    /// TCP, UDP, UDP-Lite and SCTP.
    pub ports: Option<(u16, u16)>,
    /// ICMP and ICMPv6 type and code.
    pub icmp: Option<(u8, u8)>,
    pub arp_operation: Option<u16>,
}

/// One event of the datapath, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketEvent {
    pub time: SystemTime,
    pub verdict: Verdict,
    pub hook: Hook,
    pub ifindex: u32,
    /// The port of the device then; `None` for the uplink or a device of no port.
    pub port_id: Option<String>,
    pub original_length: u32,
    /// The frame's first bytes (at most `MONITOR_HEADER_BYTES`).
    pub header: Vec<u8>,
    pub summary: PacketSummary,
}

#[derive(Clone, Debug)]
pub enum MonitorEvent {
    Packet(Arc<PacketEvent>),
    /// Events the ring buffer had no room for since the last report.
    Lost(u64),
}

/// Which events a subscriber wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MonitorFilter {
    /// Only this port's events.
    pub port_id: Option<String>,
    /// Deliveries too, not only drops.
    pub trace: bool,
    /// Only drops for these reasons (traces are not filtered by it); empty: every reason.
    pub reasons: Vec<DropReason>,
}

impl MonitorFilter {
    pub fn matches(&self, event: &PacketEvent) -> bool {
        if self
            .port_id
            .as_ref()
            .is_some_and(|wanted| event.port_id.as_ref() != Some(wanted))
        {
            return false;
        }
        match event.verdict {
            Verdict::Delivered => self.trace,
            Verdict::Dropped(reason) => self.reasons.is_empty() || self.reasons.contains(&reason),
        }
    }
}

/// The reader of the ring buffer and its subscribers. Stops reading when dropped.
pub struct Monitor {
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
}

struct Shared {
    events: broadcast::Sender<MonitorEvent>,
    control: Mutex<Control>,
    lost: PerCpuArray<MapData, u64>,
    /// Port id of each port slot, as the node last programmed them.
    ports: RwLock<BTreeMap<u32, String>>,
}

/// How many subscribers want what, and the mode the programs were set to for them.
struct Control {
    config: Array<MapData, u32>,
    subscribers: usize,
    tracing: usize,
}

impl Monitor {
    /// Starts reading `maps.events` on a task of the current tokio runtime, with the
    /// programs' emission off until someone subscribes.
    pub fn start(maps: MonitorMaps) -> Result<Self, MonitorError> {
        let mut control = Control {
            config: maps.config,
            subscribers: 0,
            tracing: 0,
        };
        control.apply()?;
        // SAFETY: the ring buffer's fd stays open while registered: the `AsyncFd` owns it.
        let ring = unsafe { AsyncFd::register_with_interest(maps.events, Interest::READABLE) }
            .map_err(|e| MonitorError::Poll(e.into()))?;
        let shared = Arc::new(Shared {
            events: broadcast::channel(BACKLOG).0,
            control: Mutex::new(control),
            lost: maps.lost,
            ports: RwLock::new(BTreeMap::new()),
        });
        let reader = tokio::spawn(read(ring, shared.clone()));
        Ok(Self { shared, reader })
    }

    /// Events from now on, while the subscription lives; `trace` asks the programs for
    /// deliveries too.
    pub fn subscribe(&self, trace: bool) -> Result<Subscription, MonitorError> {
        // The receiver first: nothing emitted for this subscriber falls before it.
        let events = self.shared.events.subscribe();
        self.shared.change(true, trace)?;
        Ok(Subscription {
            events,
            emitting: Emitting {
                shared: self.shared.clone(),
                trace,
            },
        })
    }

    /// The port id of each port slot, for the events to come.
    pub fn set_ports(&self, ports: BTreeMap<u32, String>) {
        *self
            .shared
            .ports
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = ports;
    }

    /// Events the programs could not put into the full ring buffer, since load.
    pub fn lost(&self) -> Result<u64, MonitorError> {
        self.shared.lost_total()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

pub struct Subscription {
    pub events: broadcast::Receiver<MonitorEvent>,
    pub emitting: Emitting,
}

/// Keeps the programs emitting what its subscriber asked for, until dropped.
pub struct Emitting {
    shared: Arc<Shared>,
    trace: bool,
}

impl Drop for Emitting {
    fn drop(&mut self) {
        if let Err(e) = self.shared.change(false, self.trace) {
            warn!(error = ?e, "switching the monitor's events back failed");
        }
    }
}

/// The mode that serves `subscribers`, `tracing` of whom want deliveries too.
fn mode_for(subscribers: usize, tracing: usize) -> u32 {
    if tracing > 0 {
        monitor_mode::TRACE
    } else if subscribers > 0 {
        monitor_mode::DROPS
    } else {
        monitor_mode::OFF
    }
}

impl Control {
    fn mode(&self) -> u32 {
        mode_for(self.subscribers, self.tracing)
    }

    fn apply(&mut self) -> Result<(), MonitorError> {
        let mode = self.mode();
        self.config
            .set(0, mode, 0)
            .map_err(|source| MonitorError::Map {
                map: map_names::MONITOR_CONFIG,
                source,
            })?;
        debug!(mode, "monitor mode");
        Ok(())
    }
}

impl Shared {
    /// Counts a subscriber in or out and sets the mode that serves them all.
    fn change(&self, joining: bool, trace: bool) -> Result<(), MonitorError> {
        let step = |count: usize| if joining { count + 1 } else { count - 1 };
        let mut control = self
            .control
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = control.mode();
        control.subscribers = step(control.subscribers);
        if trace {
            control.tracing = step(control.tracing);
        }
        if control.mode() != before {
            control.apply()?;
        }
        Ok(())
    }

    fn lost_total(&self) -> Result<u64, MonitorError> {
        let per_cpu = self.lost.get(&0, 0).map_err(|source| MonitorError::Map {
            map: map_names::EVENTS_LOST,
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }

    fn publish(&self, raw: &RawEvent, now: Clock) {
        let port_id = self
            .ports
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&raw.port_slot)
            .cloned();
        match decode(raw, port_id, now) {
            // No subscriber left: nothing to do.
            Ok(event) => {
                let _ = self.events.send(MonitorEvent::Packet(Arc::new(event)));
            }
            Err(e) => debug!(error = %e, "monitor event skipped"),
        }
    }
}

async fn read(mut ring: AsyncFd<RingBuf<MapData>>, shared: Arc<Shared>) {
    let mut reported_lost = shared.lost_total().unwrap_or_default();
    loop {
        let mut ready = match ring.readable_mut().await {
            Ok(ready) => ready,
            Err(e) => {
                warn!(error = %e, "monitor ring buffer: no more events");
                return;
            }
        };
        let now = Clock::now();
        let events = ready.get_inner_mut();
        while let Some(record) = events.next() {
            match raw_event(&record) {
                Ok(raw) => shared.publish(&raw, now),
                Err(e) => debug!(error = %e, "monitor record skipped"),
            }
        }
        ready.clear_ready();
        match shared.lost_total() {
            Ok(lost) if lost > reported_lost => {
                let _ = shared.events.send(MonitorEvent::Lost(lost - reported_lost));
                reported_lost = lost;
            }
            Ok(_) => {}
            Err(e) => debug!(error = ?e, "reading the monitor's lost events"),
        }
    }
}

/// Both clocks read at once: events carry the monotonic time of `bpf_ktime_get_ns`.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub wall: SystemTime,
    pub monotonic_ns: u64,
}

impl Clock {
    fn now() -> Self {
        let monotonic = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .expect("CLOCK_MONOTONIC is always available");
        Self {
            wall: SystemTime::now(),
            monotonic_ns: monotonic.tv_sec() as u64 * 1_000_000_000 + monotonic.tv_nsec() as u64,
        }
    }

    fn wall_time_of(self, monotonic_ns: u64) -> SystemTime {
        let ago = Duration::from_nanos(self.monotonic_ns.saturating_sub(monotonic_ns));
        self.wall.checked_sub(ago).unwrap_or(self.wall)
    }
}

/// One ring buffer record as the ABI's event.
pub fn raw_event(record: &[u8]) -> Result<RawEvent, DecodeError> {
    if record.len() != size_of::<RawEvent>() {
        return Err(DecodeError::Size(record.len()));
    }
    // SAFETY: the length is checked; `RawEvent` is plain old data (any bytes are valid)
    // and the read does not need alignment.
    Ok(unsafe { record.as_ptr().cast::<RawEvent>().read_unaligned() })
}

/// The event in `raw`, taken at `now`, of the port `port_id`.
pub fn decode(
    raw: &RawEvent,
    port_id: Option<String>,
    now: Clock,
) -> Result<PacketEvent, DecodeError> {
    let verdict = match raw.kind {
        monitor_kind::DROP => Verdict::Dropped(
            DropReason::from_u32(raw.reason).ok_or(DecodeError::Reason(raw.reason))?,
        ),
        monitor_kind::TRACE => Verdict::Delivered,
        other => return Err(DecodeError::Kind(other)),
    };
    let hook = match raw.hook {
        monitor_hook::FROM_PORT => Hook::FromPort,
        monitor_hook::TO_PORT => Hook::ToPort,
        monitor_hook::UPLINK => Hook::Uplink,
        other => return Err(DecodeError::Hook(other)),
    };
    let captured = (raw.captured_len as usize).min(MONITOR_HEADER_BYTES);
    let header = raw.header[..captured].to_vec();
    Ok(PacketEvent {
        time: now.wall_time_of(raw.timestamp_ns),
        verdict,
        hook,
        ifindex: raw.ifindex,
        port_id,
        original_length: raw.original_len,
        summary: summarize(&header),
        header,
    })
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// What the first bytes of a frame say: as much as they hold, nothing past them.
pub fn summarize(frame: &[u8]) -> PacketSummary {
    let mut summary = PacketSummary::default();
    let (Some(destination), Some(source), Some(mut ethertype)) =
        (bytes::<6>(frame, 0), bytes::<6>(frame, 6), be16(frame, 12))
    else {
        return summary;
    };
    summary.destination_mac = MacAddr(destination);
    summary.source_mac = MacAddr(source);
    let mut offset = 14;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        summary.vlan = be16(frame, 14).map(|tci| tci & 0x0fff);
        match be16(frame, 16) {
            Some(inner) => ethertype = inner,
            None => {
                summary.ethertype = ethertype;
                return summary;
            }
        }
        offset = 18;
    }
    summary.ethertype = ethertype;
    let l3 = &frame[offset..];
    match ethertype {
        ETH_P_IP => ipv4(l3, &mut summary),
        ETH_P_IPV6 => ipv6(l3, &mut summary),
        ETH_P_ARP => arp(l3, &mut summary),
        _ => {}
    }
    summary
}

fn ipv4(packet: &[u8], summary: &mut PacketSummary) {
    let (Some(&version_ihl), Some(flags_fragment), Some(&protocol), Some(source), Some(dest)) = (
        packet.first(),
        be16(packet, 6),
        packet.get(9),
        bytes::<4>(packet, 12),
        bytes::<4>(packet, 16),
    ) else {
        return;
    };
    if version_ihl >> 4 != 4 {
        return;
    }
    summary.addresses = Some((Ipv4Addr::from(source).into(), Ipv4Addr::from(dest).into()));
    summary.protocol = Some(protocol);
    // Later fragments carry no transport header.
    if flags_fragment & 0x1fff == 0 {
        let header_len = usize::from(version_ihl & 0x0f) * 4;
        if let Some(l4) = packet.get(header_len..) {
            transport(protocol, l4, summary);
        }
    }
}

fn ipv6(packet: &[u8], summary: &mut PacketSummary) {
    let (Some(&version), Some(&next), Some(source), Some(dest)) = (
        packet.first(),
        packet.get(6),
        bytes::<16>(packet, 8),
        bytes::<16>(packet, 24),
    ) else {
        return;
    };
    if version >> 4 != 6 {
        return;
    }
    summary.addresses = Some((Ipv6Addr::from(source).into(), Ipv6Addr::from(dest).into()));
    let (mut protocol, mut offset) = (next, 40);
    // Hop-by-hop, routing, destination options and the first fragment's header lead to
    // the transport header; the captured bytes bound the walk.
    loop {
        match protocol {
            0 | 43 | 60 => {
                let (Some(&following), Some(&len)) = (packet.get(offset), packet.get(offset + 1))
                else {
                    break;
                };
                protocol = following;
                offset += (usize::from(len) + 1) * 8;
            }
            44 => {
                let (Some(&following), Some(fragment)) =
                    (packet.get(offset), be16(packet, offset + 2))
                else {
                    break;
                };
                protocol = following;
                offset += 8;
                if fragment & 0xfff8 != 0 {
                    summary.protocol = Some(protocol);
                    return;
                }
            }
            _ => break,
        }
    }
    summary.protocol = Some(protocol);
    if let Some(l4) = packet.get(offset..) {
        transport(protocol, l4, summary);
    }
}

fn transport(protocol: u8, l4: &[u8], summary: &mut PacketSummary) {
    match protocol {
        // TCP, UDP, SCTP, UDP-Lite: the ports lead.
        6 | 17 | 132 | 136 => {
            if let (Some(source), Some(destination)) = (be16(l4, 0), be16(l4, 2)) {
                summary.ports = Some((source, destination));
            }
        }
        // ICMP, ICMPv6.
        1 | 58 => {
            if let (Some(&kind), Some(&code)) = (l4.first(), l4.get(1)) {
                summary.icmp = Some((kind, code));
            }
        }
        _ => {}
    }
}

fn arp(packet: &[u8], summary: &mut PacketSummary) {
    // Ethernet/IPv4 ARP: sender protocol address at 14, target's at 24.
    let (Some(operation), Some(sender), Some(target)) = (
        be16(packet, 6),
        bytes::<4>(packet, 14),
        bytes::<4>(packet, 24),
    ) else {
        return;
    };
    summary.arp_operation = Some(operation);
    summary.addresses = Some((Ipv4Addr::from(sender).into(), Ipv4Addr::from(target).into()));
}

fn bytes<const N: usize>(data: &[u8], offset: usize) -> Option<[u8; N]> {
    data.get(offset..offset.checked_add(N)?)?.try_into().ok()
}

fn be16(data: &[u8], offset: usize) -> Option<u16> {
    bytes::<2>(data, offset).map(u16::from_be_bytes)
}

#[cfg(test)]
mod tests;
