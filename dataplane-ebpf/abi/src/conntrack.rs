//! Connection tracking for stateful security groups.
//!
//! One entry per connection and port (zone = port slot), keyed by the connection's
//! endpoints in a canonical order, so both directions find it with one lookup.
//! Unconfirmed connections (no reply yet: a SYN, a first datagram, an echo request) live
//! in `CT_NEW`, an LRU map with a short timeout, and move to `CT` when the reply comes:
//! a SYN flood churns `CT_NEW` and cannot push out established connections. `CT` is a
//! plain hash: when it is full a new connection is dropped (`CtTableFull`), established
//! ones are unaffected; the agent removes expired entries.

/// Key of `CT` and `CT_NEW`. The endpoint (address, port) that sorts first
/// (address bytes, then port) is `lo`. ICMP echo uses the identifier as both ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Slot of the port whose policy admitted the connection.
    pub zone: u32,
    /// IPv4 addresses fill the first 4 bytes, the rest is zero.
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
    /// Host byte order.
    pub port_lo: u16,
    pub port_hi: u16,
    /// 4 or 6.
    pub family: u8,
    pub protocol: u8,
    pub _pad: [u8; 2],
}

/// `CtEntry::flags`.
pub mod ct_flags {
    /// The connection's first packet came from the VM (egress); else towards it.
    pub const ORIG_EGRESS: u8 = 1 << 0;
    /// The connection's first packet was sent from the `lo` endpoint.
    pub const ORIG_FROM_LO: u8 = 1 << 1;
    /// A packet in the reply direction was seen (the entry is in `CT`).
    pub const REPLIED: u8 = 1 << 2;
    /// A FIN was seen from the `lo` / `hi` endpoint.
    pub const FIN_LO: u8 = 1 << 3;
    pub const FIN_HI: u8 = 1 << 4;
}

/// `CtEntry::state`.
pub mod ct_state {
    /// UDP, ICMP and other protocols: a datagram "connection".
    pub const OPEN: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const ESTABLISHED: u8 = 4;
    /// FIN seen from one or both ends.
    pub const CLOSING: u8 = 5;
    /// RST seen, or FIN from both ends acknowledged.
    pub const CLOSED: u8 = 6;
}

/// Value of `CT` and `CT_NEW`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC, tick resolution) of the last packet.
    pub last_seen_ns: u64,
    /// `PortInfo::policy_revision` the connection was last admitted under.
    pub policy_revision: u32,
    pub state: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// Seconds an entry lives after its last packet, by state.
pub mod ct_timeout {
    /// Unconfirmed entries (`CT_NEW`), whatever the protocol.
    pub const NEW_SECS: u64 = 30;
    pub const TCP_ESTABLISHED_SECS: u64 = 7200;
    pub const TCP_CLOSING_SECS: u64 = 120;
    pub const TCP_CLOSED_SECS: u64 = 10;
    /// UDP and other datagram protocols once a reply was seen.
    pub const DATAGRAM_SECS: u64 = 180;
    pub const ICMP_SECS: u64 = 30;
}

/// Index of the per-CPU `CT_STATS` counters.
pub mod ct_stat {
    /// Entries created in `CT_NEW`.
    pub const NEW_INSERTS: u32 = 0;
    /// Entries moved to `CT` (connections confirmed).
    pub const CONFIRMED: u32 = 1;
    /// Connections refused because `CT` was full.
    pub const TABLE_FULL: u32 = 2;
    /// Entries deleted by the datapath (policy revoked, RST, expiry found on lookup).
    pub const DELETES: u32 = 3;
    /// ICMP errors passed as related to a tracked connection.
    pub const RELATED: u32 = 4;
    pub const COUNT: u32 = 5;
}

const _: () = assert!(core::mem::size_of::<CtKey>() == 44);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 16);

/// Seconds an entry lives after its last packet: the one rule the datapath (which treats
/// an older entry as absent) and the agent's expiry sweep both apply. `confirmed`: the
/// entry is in `CT` (a reply was seen), not `CT_NEW`.
pub const fn timeout_secs(protocol: u8, state: u8, confirmed: bool) -> u64 {
    if !confirmed {
        return ct_timeout::NEW_SECS;
    }
    match (protocol, state) {
        (6, ct_state::ESTABLISHED) => ct_timeout::TCP_ESTABLISHED_SECS,
        (6, ct_state::CLOSING) => ct_timeout::TCP_CLOSING_SECS,
        (6, ct_state::CLOSED) => ct_timeout::TCP_CLOSED_SECS,
        (6, _) => ct_timeout::NEW_SECS,
        (1 | 58, _) => ct_timeout::ICMP_SECS,
        _ => ct_timeout::DATAGRAM_SECS,
    }
}
