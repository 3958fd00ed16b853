//! Connection tracking of stateful security groups (see `dataplane_abi::conntrack`):
//! a connection's first packet is judged by the rules and opens an entry in `CT_NEW`;
//! its reply moves the entry to `CT`; every later packet of the connection, either way,
//! passes on the entry. Zone = the port's slot; the canonical key (endpoints sorted)
//! serves both directions with one lookup.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_coarse_ns};
use dataplane_abi::{
    ct_flags, ct_stat, ct_state, sg_direction, timeout_secs, CtEntry, CtKey, DropReason, PortInfo,
    RULE_LOOKUP_BITS,
};

use crate::{
    flow::{self, Flow, Kind},
    icmp,
    l4::{self, tcp_flags},
    maps::{CT, CT_NEW, CT_STATS},
    packet::Packet,
    policy::{self, Query, NO_RULE},
};

const NS_PER_SEC: u64 = 1_000_000_000;
const EEXIST: i32 = 17;

/// Tracks `flow` of a stateful port in `direction`: passes it, or says why not.
#[inline(always)]
pub fn track(
    pkt: &mut Packet,
    port: &PortInfo,
    flow: &mut Flow,
    direction: u8,
    bytes: u64,
) -> Result<(), DropReason> {
    // CLOCK_MONOTONIC at tick resolution: timeouts are seconds, and the fine clock
    // costs a clock-source read per packet.
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    match flow.kind {
        Kind::IcmpError => {
            // About a tracked connection (path MTU discovery needs these), or else
            // only a rule allowing it lets it through. The rule first: finding the
            // connection overwrites the flow's key.
            let slot = policy::rule(port, flow, direction);
            if icmp::related(pkt, flow, now) {
                count(ct_stat::RELATED);
                return Ok(());
            }
            if slot == NO_RULE {
                return Err(DropReason::CtInvalid);
            }
            policy::charge(slot, bytes);
            return Ok(());
        }
        // No entry for these: judged packet by packet.
        Kind::IcmpOther | Kind::Fragment => return policy::allow(port, flow, direction, bytes),
        Kind::Tcp if invalid_tcp_flags(flow.tcp_flags) => return Err(DropReason::CtInvalid),
        _ => {}
    }
    let flow = &*flow;
    let key = &flow.key;
    if let Some((entry, in_ct)) = lookup(key, now) {
        // SAFETY: a map value; concurrent updates of its fields from other CPUs are
        // benign races (the last writer of a timestamp or state wins).
        let entry = unsafe { &mut *entry };
        if let Some(result) = existing(entry, in_ct, port, flow, direction, now, bytes) {
            return result;
        }
    }
    new_connection(port, flow, direction, now, bytes)
}

/// SYN+FIN, SYN+RST, or no flag at all: no connection has such a packet.
#[inline(always)]
fn invalid_tcp_flags(flags: u8) -> bool {
    use tcp_flags::*;
    flags & (SYN | FIN) == SYN | FIN || flags & (SYN | RST) == SYN | RST || flags == 0
}

#[inline(always)]
fn count(stat: u32) {
    if let Some(c) = CT_STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU value, only touched by the program running on this CPU.
        unsafe { *c += 1 };
    }
}

/// Whether `entry` (in `CT` when `in_ct`, else `CT_NEW`) has outlived its timeout.
#[inline(always)]
fn expired(entry: &CtEntry, protocol: u8, in_ct: bool, now: u64) -> bool {
    let timeout = timeout_secs(protocol, entry.state, in_ct) * NS_PER_SEC;
    // Another CPU may have stamped a time later than ours.
    now.saturating_sub(entry.last_seen_ns) > timeout
}

#[inline(always)]
fn remove(key: &CtKey, in_ct: bool) {
    let removed = if in_ct {
        CT.remove(key)
    } else {
        CT_NEW.remove(key)
    };
    if removed.is_ok() {
        count(ct_stat::DELETES);
    }
}

/// The live entry of `key`, in `CT` first, then `CT_NEW` (`true`: found in `CT`). An
/// expired entry is absent: it is deleted on the way.
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<(*mut CtEntry, bool)> {
    if let Some(entry) = CT.get_ptr_mut(key) {
        // SAFETY: a map value (see `track`).
        if !expired(unsafe { &*entry }, key.protocol, true, now) {
            return Some((entry, true));
        }
        remove(key, true);
    }
    if let Some(entry) = CT_NEW.get_ptr_mut(key) {
        // SAFETY: a map value (see `track`).
        if !expired(unsafe { &*entry }, key.protocol, false, now) {
            return Some((entry, false));
        }
        remove(key, false);
    }
    None
}

/// The TCP state after a packet with `flags` from the `lo` endpoint (`from_lo`) or the
/// other, in the reply direction or not.
#[inline(always)]
fn tcp_next(state: u8, ct: u8, flags: u8, from_lo: bool, is_reply: bool) -> (u8, u8) {
    use tcp_flags::*;
    if flags & RST != 0 {
        return (ct_state::CLOSED, ct);
    }
    if flags & FIN != 0 {
        let ct = ct
            | if from_lo {
                ct_flags::FIN_LO
            } else {
                ct_flags::FIN_HI
            };
        let both = ct_flags::FIN_LO | ct_flags::FIN_HI;
        let state = if ct & both == both || state == ct_state::CLOSED {
            ct_state::CLOSED
        } else {
            ct_state::CLOSING
        };
        return (state, ct);
    }
    let state = match state {
        ct_state::SYN_SENT if is_reply && flags & (SYN | ACK) == SYN | ACK => ct_state::SYN_RECV,
        ct_state::SYN_RECV if !is_reply && flags & (SYN | ACK) == ACK => ct_state::ESTABLISHED,
        other => other,
    };
    (state, ct)
}

/// A packet of a tracked connection. `None`: the entry was of a closed TCP connection
/// that a new SYN reopens, and is gone; the packet is a new connection's.
#[inline(always)]
fn existing(
    entry: &mut CtEntry,
    in_ct: bool,
    port: &PortInfo,
    flow: &Flow,
    direction: u8,
    now: u64,
    bytes: u64,
) -> Option<Result<(), DropReason>> {
    let (key, from_lo) = (&flow.key, flow.from_lo);
    let is_reply = from_lo != (entry.flags & ct_flags::ORIG_FROM_LO != 0);
    let tcp = flow.kind == Kind::Tcp;
    let syn_only = flow.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
    match flow.kind {
        // An echo request from the side that answers, or a reply from the side that
        // asked: not this exchange. Judged on its own.
        Kind::EchoRequest if is_reply => return Some(policy::allow(port, flow, direction, bytes)),
        Kind::EchoReply if !is_reply => return Some(policy::allow(port, flow, direction, bytes)),
        Kind::Tcp if syn_only && entry.state == ct_state::CLOSED => {
            remove(key, in_ct);
            return None;
        }
        _ => {}
    }
    if entry.policy_revision != port.policy_revision {
        if !still_allowed(key, entry, port) {
            remove(key, in_ct);
            return Some(Err(DropReason::ConnectionRevoked));
        }
        entry.policy_revision = port.policy_revision;
    }
    let (mut state, mut flags) = (entry.state, entry.flags);
    if tcp {
        if flow.tcp_flags & tcp_flags::RST != 0 && !in_ct {
            // Refused before it was confirmed: nothing left to track.
            remove(key, false);
            return Some(Ok(()));
        }
        (state, flags) = tcp_next(state, flags, flow.tcp_flags, from_lo, is_reply);
    }
    if !in_ct && is_reply {
        return Some(confirm(key, entry, state, flags, now));
    }
    entry.last_seen_ns = now;
    entry.state = state;
    entry.flags = flags;
    Some(Ok(()))
}

/// The first reply: the entry moves from `CT_NEW` to `CT`. When `CT` is full the packet
/// is dropped and the entry stays where it is.
#[inline(always)]
fn confirm(key: &CtKey, entry: &CtEntry, state: u8, flags: u8, now: u64) -> Result<(), DropReason> {
    let confirmed = CtEntry {
        last_seen_ns: now,
        policy_revision: entry.policy_revision,
        state,
        flags: flags | ct_flags::REPLIED,
        _pad: [0; 2],
    };
    match CT.insert(key, &confirmed, u64::from(BPF_NOEXIST)) {
        Ok(()) => count(ct_stat::CONFIRMED),
        // Confirmed at the same time on another CPU.
        Err(e) if e == -EEXIST => {}
        Err(_) => {
            count(ct_stat::TABLE_FULL);
            return Err(DropReason::CtTableFull);
        }
    }
    let _ = CT_NEW.remove(key);
    Ok(())
}

/// Whether the current rules still allow the packet that opened the connection: its
/// direction, its remote, its protocol and destination port (an echo: the request).
#[inline(always)]
fn still_allowed(key: &CtKey, entry: &CtEntry, port: &PortInfo) -> bool {
    let orig_from_lo = entry.flags & ct_flags::ORIG_FROM_LO != 0;
    let direction = if entry.flags & ct_flags::ORIG_EGRESS != 0 {
        sg_direction::EGRESS
    } else {
        sg_direction::INGRESS
    };
    let dport = if orig_from_lo {
        key.port_hi
    } else {
        key.port_lo
    };
    let q = Query {
        policy_id: port.policy_id,
        direction,
        remote_hi: flow::remote_is_hi(direction, orig_from_lo),
        port: if l4::has_ports(key.protocol) {
            dport.to_be_bytes()
        } else if flow::is_icmp(key.family, key.protocol) {
            [flow::echo_request(key.family), 0]
        } else {
            [0, 0]
        },
        bits: RULE_LOOKUP_BITS,
    };
    policy::classify(key, &q) != NO_RULE
}

/// A packet no live entry knows: judged by the rules and, if allowed, tracked.
#[inline(always)]
fn new_connection(
    port: &PortInfo,
    flow: &Flow,
    direction: u8,
    now: u64,
    bytes: u64,
) -> Result<(), DropReason> {
    use tcp_flags::*;
    let (key, from_lo) = (&flow.key, flow.from_lo);
    let tcp = flow.kind == Kind::Tcp;
    if tcp && flow.tcp_flags & (SYN | ACK) == SYN | ACK {
        // The answer to a SYN nobody sent.
        return Err(DropReason::CtInvalid);
    }
    let slot = policy::rule(port, flow, direction);
    if slot == NO_RULE {
        return Err(DropReason::PolicyDenied);
    }
    if flow.kind == Kind::EchoReply {
        // Only a request opens an echo exchange.
        policy::charge(slot, bytes);
        return Ok(());
    }
    let mut flags = 0;
    if from_lo {
        flags |= ct_flags::ORIG_FROM_LO;
    }
    if direction == sg_direction::EGRESS {
        flags |= ct_flags::ORIG_EGRESS;
    }
    if tcp && flow.tcp_flags & SYN == 0 {
        // Mid-stream (the entry was lost to a restart or a flush): picked up as
        // established, as Linux's nf_conntrack_tcp_loose does.
        let (state, flags) = tcp_next(
            ct_state::ESTABLISHED,
            flags | ct_flags::REPLIED,
            flow.tcp_flags,
            from_lo,
            false,
        );
        let entry = CtEntry {
            last_seen_ns: now,
            policy_revision: port.policy_revision,
            state,
            flags,
            _pad: [0; 2],
        };
        match CT.insert(key, &entry, u64::from(BPF_NOEXIST)) {
            Ok(()) => count(ct_stat::CONFIRMED),
            // Picked up at the same time on another CPU.
            Err(e) if e == -EEXIST => {}
            // Refused: not charged to the rule, as it did not go through.
            Err(_) => {
                count(ct_stat::TABLE_FULL);
                return Err(DropReason::CtTableFull);
            }
        }
        policy::charge(slot, bytes);
        return Ok(());
    }
    let entry = CtEntry {
        last_seen_ns: now,
        policy_revision: port.policy_revision,
        state: if tcp {
            ct_state::SYN_SENT
        } else {
            ct_state::OPEN
        },
        flags,
        _pad: [0; 2],
    };
    // An LRU map: the insert makes room by evicting the least recently used entry.
    if CT_NEW.insert(key, &entry, 0).is_ok() {
        count(ct_stat::NEW_INSERTS);
    }
    policy::charge(slot, bytes);
    Ok(())
}
