//! Security groups, compiled into two lookups whose cost does not grow with the number
//! of rules:
//!
//! 1. The remote address (destination of what the VM sends, source of what it
//!    receives) goes through `SG_REMOTE4`/`SG_REMOTE6`, LPM tries keyed by (policy,
//!    direction, address). Every prefix the policy's rules name — a remote_ip_prefix,
//!    each address of a remote group's members, `/0` for rules without a remote — is an
//!    entry whose value is an *address class*: the id of the exact set of rules whose
//!    remote contains that prefix. Prefixes nest, so the longest match's class is
//!    precisely the set of rules whose remote contains the address.
//! 2. `SG_RULES`, an LPM trie keyed by (class, protocol, port), answers whether a rule
//!    of the class allows the protocol and destination port (ICMP: type and code).
//!    Port ranges are split into aligned power-of-two blocks, each one trie entry; a
//!    rule for any protocol stops its prefix before the protocol, one for a protocol
//!    without ports (or ICMP without type) before the port.
//!
//! A miss in either trie is a drop (`DropReason::PolicyDenied`): rules only allow.
//!
//! Each trie's full-length entries (a remote host, a rule's single port) live in a hash
//! map of their own, `SG_HOST4`, `SG_HOST6` and `SG_RULE_PORTS`, keyed by the same data,
//! and the trie holds the others. A lookup tries the hash map first: a full-length
//! entry is the longest match there can be, so the answer is the trie's over both. Most
//! entries are full-length, and a hash map writes several times faster than a trie,
//! which is most of a large commit.

/// `direction` of a remote key.
pub mod sg_direction {
    /// Traffic the VM receives (`port_egress`); the remote is the source.
    pub const INGRESS: u8 = 1;
    /// Traffic the VM sends (`port_ingress`); the remote is the destination.
    pub const EGRESS: u8 = 2;
}

/// Bits of (policy, direction, padding) at the front of a remote key: an entry's prefix
/// length is `REMOTE_FIXED_BITS + address prefix length`.
pub const REMOTE_FIXED_BITS: u32 = 64;
/// Prefix length of a whole `RemoteKey4` (an entry of `SG_HOST4`, and every lookup).
pub const REMOTE4_FULL_BITS: u32 = REMOTE_FIXED_BITS + 32;
/// Prefix length of a whole `RemoteKey6` (an entry of `SG_HOST6`, and every lookup).
pub const REMOTE6_FULL_BITS: u32 = REMOTE_FIXED_BITS + 128;

/// Data of the `SG_REMOTE4` LPM trie key. Value: `u32` address class.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteKey4 {
    pub policy_id: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
    /// Network byte order.
    pub addr: [u8; 4],
}

/// Data of the `SG_REMOTE6` LPM trie key. Value: `u32` address class.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteKey6 {
    pub policy_id: u32,
    pub direction: u8,
    pub _pad: [u8; 3],
    /// Network byte order.
    pub addr: [u8; 16],
}

/// Data of the `SG_RULES` LPM trie key: an entry's prefix length is
/// `RULE_CLASS_BITS` (any protocol), `RULE_PROTOCOL_BITS` (a protocol, any port), or
/// `RULE_PROTOCOL_BITS + n` for the first `n` bits of `port` (ICMP: 8 for a type, 16
/// for a type and code). Value: [`RuleValue`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    pub class: u32,
    pub protocol: u8,
    /// Destination port, big-endian (ICMP and ICMPv6: `[type, code]`), so the trie's
    /// bit order is the port's.
    pub port: [u8; 2],
    pub _pad: u8,
}

pub const RULE_CLASS_BITS: u32 = 32;
pub const RULE_PROTOCOL_BITS: u32 = 40;
/// Prefix length of a lookup: every bit of class, protocol and port (the entries of
/// `SG_RULE_PORTS`; `_pad` is zero).
pub const RULE_LOOKUP_BITS: u32 = 56;

/// Value of `SG_RULES`: the rule an entry stands for (the lowest-slot rule allowing
/// it), whose counters the packet is charged to.
pub type RuleValue = u32;

/// `RULE_STATS`: per-CPU array indexed by rule slot: what each rule let in or out. In a
/// stateful group only a connection's first packet is matched against rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<RemoteKey4>() == 12);
const _: () = assert!(core::mem::size_of::<RemoteKey6>() == 24);
const _: () = assert!(core::mem::size_of::<RuleKey>() == 8);
const _: () = assert!(core::mem::size_of::<RuleStats>() == 16);
const _: () = assert!(REMOTE_FIXED_BITS as usize == 8 * 8);
const _: () = assert!(REMOTE4_FULL_BITS as usize == 8 * core::mem::size_of::<RemoteKey4>());
const _: () = assert!(REMOTE6_FULL_BITS as usize == 8 * core::mem::size_of::<RemoteKey6>());
const _: () = assert!(RULE_LOOKUP_BITS as usize == 8 * 7);
