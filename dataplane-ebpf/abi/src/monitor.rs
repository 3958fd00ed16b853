//! The packet monitor (`ctl monitor`): events the programs put into the `EVENTS` ring
//! buffer while the agent has switched them on in `MONITOR_CONFIG`.

/// Bytes of each packet an event carries from the frame's start: Ethernet, an IPv6
/// header with room for extension headers, and the transport header.
pub const MONITOR_HEADER_BYTES: usize = 128;

/// `MONITOR_CONFIG[0]`: which events the programs emit. Each level includes the ones
/// below it, so a program compares with the kind of its event ([`monitor_kind`]).
pub mod monitor_mode {
    pub const OFF: u32 = 0;
    pub const DROPS: u32 = 1;
    /// Drops and every frame delivered to a port.
    pub const TRACE: u32 = 2;
}

/// `MonitorEvent::kind`; equal to the lowest [`monitor_mode`] that emits it.
pub mod monitor_kind {
    pub const DROP: u32 = 1;
    pub const TRACE: u32 = 2;
}

/// `MonitorEvent::hook`: where the frame was when the event was taken.
pub mod monitor_hook {
    /// Sent by the VM of the port on `ifindex` (`port_ingress`).
    pub const FROM_PORT: u32 = 1;
    /// On its way to the VM of the port on `ifindex` (`port_egress`, or `port_ingress`
    /// handing it straight to the VM's end of a veth).
    pub const TO_PORT: u32 = 2;
    /// Arrived on the uplink NIC (`uplink_ingress`).
    pub const UPLINK: u32 = 3;
}

/// One entry of `EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MonitorEvent {
    /// `bpf_ktime_get_ns`: CLOCK_MONOTONIC.
    pub timestamp_ns: u64,
    /// [`monitor_kind`].
    pub kind: u32,
    /// [`monitor_hook`].
    pub hook: u32,
    pub ifindex: u32,
    /// The port of `ifindex` when the event was taken; `NO_SLOT` for none.
    pub port_slot: u32,
    /// `DropReason` of a drop; 0 for a trace.
    pub reason: u32,
    /// Length of the whole frame.
    pub original_len: u32,
    /// Bytes of `header` that hold the frame's first bytes; the rest is not written.
    pub captured_len: u32,
    pub _pad: u32,
    pub header: [u8; MONITOR_HEADER_BYTES],
}

impl Default for MonitorEvent {
    fn default() -> Self {
        Self {
            timestamp_ns: 0,
            kind: 0,
            hook: 0,
            ifindex: 0,
            port_slot: 0,
            reason: 0,
            original_len: 0,
            captured_len: 0,
            _pad: 0,
            header: [0; MONITOR_HEADER_BYTES],
        }
    }
}

const _: () = assert!(core::mem::size_of::<MonitorEvent>() == 40 + MONITOR_HEADER_BYTES);
// The ring buffer hands out 8-byte aligned records.
const _: () = assert!(core::mem::align_of::<MonitorEvent>() <= 8);
// A mode emits the kinds up to its own value, and no more.
const _: () = assert!(monitor_mode::DROPS == monitor_kind::DROP);
const _: () = assert!(monitor_mode::TRACE == monitor_kind::TRACE);
