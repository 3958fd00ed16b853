//! Switching within the port's network: FDB for known unicast, the network's flood set
//! for everything else. No learning: the agent programs the FDB.
use aya_ebpf::{bindings::TC_ACT_REDIRECT, programs::TcContext};
use aya_log_ebpf::warn;
use dataplane_abi::{
    flood_flags, DropReason, FdbEntry, FdbKey, PortInfo, PortStats, MARK_FROM_DATAPATH,
    MAX_FLOOD_PORTS,
};

use crate::{
    deliver, drop,
    eth::{is_multicast, Mac},
    maps::{FDB, FLOOD},
    router, trace,
};

#[inline(always)]
/// `proto`: the frame's ethertype, for the router when `dst` is a router's interface.
pub fn forward(
    ctx: &TcContext,
    port: &PortInfo,
    ingress: u32,
    dst: &Mac,
    proto: u16,
    stats: &mut PortStats,
) -> Result<i32, DropReason> {
    // One flood call site below: the loop is the longest code of the program.
    let (need, none) = if is_multicast(dst) {
        (0, DropReason::NoFloodTarget)
    } else {
        let key = FdbKey {
            network_slot: port.network_slot,
            mac: *dst,
            _pad: [0; 2],
        };
        // SAFETY: the agent replaces FDB entries with one update, never in place.
        match unsafe { FDB.get(&key) } {
            Some(fdb) if fdb.ifindex != ingress => return Ok(to_port(ctx, port, fdb)),
            // The destination is the sender's own: a hairpin the network never does.
            Some(_) => return Err(DropReason::UnknownDestination),
            // A router's interface: routed (its MAC is in no FDB entry).
            None => match router::interface(port, dst) {
                Some(rif) => {
                    let target = router::route(ctx, port, rif, proto)?;
                    return Ok(to_port(ctx, port, &target));
                }
                None => (flood_flags::ACCEPTS_UNKNOWN, DropReason::UnknownDestination),
            },
        }
    };
    flood(ctx, port, ingress, need, none, stats)
}

/// Copies the frame to every port of the network's flood set that has all of `need`
/// in its flags, the ingress device excepted: clones to all but the last, the original
/// to the last. `none` is the drop reason when there is no such port.
#[inline(always)]
fn flood(
    ctx: &TcContext,
    port: &PortInfo,
    ingress: u32,
    need: u32,
    none: DropReason,
    stats: &mut PortStats,
) -> Result<i32, DropReason> {
    // SAFETY: the agent replaces flood sets with one update, never in place.
    let Some(set) = (unsafe { FLOOD.get(port.network_slot) }) else {
        return Err(none);
    };
    let count = set.count as usize;
    stamp(ctx, port);
    trace::flood();
    // Each target is sent to once the next one is known, so the last gets the original.
    let mut pending = 0;
    // Logged once after the loop: the log path is long, and inside the loop the
    // verifier would walk it once per iteration.
    let mut failed = (0, 0);
    for i in 0..MAX_FLOOD_PORTS {
        if i >= count {
            break;
        }
        let target = set.ports[i];
        if target.ifindex == ingress || target.flags & need != need {
            continue;
        }
        if pending != 0 {
            match ctx.clone_redirect(pending, 0) {
                // A failed copy loses that target only.
                Err(err) if err < 0 => {
                    drop::count(stats, DropReason::RedirectFailed);
                    failed = (pending, err);
                }
                // A positive `NET_XMIT_*` code: the copy left, and the target's egress
                // (say, `port_egress` of a port that is down) dropped and counted it.
                _ => trace::flood_target(pending),
            }
        }
        pending = target.ifindex;
    }
    if failed.0 != 0 {
        warn!(
            ctx,
            "flood: copy to ifindex {} failed: {}", failed.0, failed.1
        );
    }
    if pending == 0 {
        return Err(none);
    }
    deliver::redirect(pending);
    trace::flood_target(pending);
    Ok(TC_ACT_REDIRECT as i32)
}

/// Sends the frame, switched or answered by a router, to the port of `fdb`.
#[inline(always)]
pub fn to_port(ctx: &TcContext, port: &PortInfo, fdb: &FdbEntry) -> i32 {
    stamp(ctx, port);
    deliver::unicast(ctx, fdb)
}

/// Marks the frame as switched by the datapath, for `port_egress` of the target.
#[inline(always)]
fn stamp(ctx: &TcContext, port: &PortInfo) {
    ctx.set_mark(MARK_FROM_DATAPATH | (port.port_slot & 0xffff));
}
