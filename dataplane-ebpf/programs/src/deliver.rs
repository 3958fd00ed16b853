//! Delivery to a port: the checks a frame must pass to reach the VM (the port is up,
//! the ingress rules of its security groups allow it), made by `port_egress` on the
//! port's device, or by `port_ingress` itself for a port whose FDB entry has
//! `PEER_DELIVERY`, whose unicast frames skip the device's transmit path.
use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use dataplane_abi::{
    fdb_flags, port_flags, sg_direction, DropReason, FdbEntry, PortInfo, PortStats,
};

use crate::{
    drop::{self, Hook},
    eth::{self, ETH_P_IP, ETH_P_IPV6},
    ipv4, ipv6, maps, monitor,
    packet::Packet,
    policy, trace,
};

/// Whether `port` takes the frame; counts it as sent to the VM if so.
#[inline(always)]
pub fn accept(ctx: &TcContext, port: &PortInfo, stats: &mut PortStats) -> Result<(), DropReason> {
    if port.flags & port_flags::ADMIN_UP == 0 {
        return Err(DropReason::PortAdminDown);
    }
    if port.flags & port_flags::POLICY != 0 {
        ingress_rules(ctx, port)?;
    }
    stats.tx_packets += 1;
    stats.tx_bytes += u64::from(ctx.len());
    Ok(())
}

/// The ingress rules of the port's security groups, for an IP frame towards the VM.
#[inline(always)]
fn ingress_rules(ctx: &TcContext, port: &PortInfo) -> Result<(), DropReason> {
    let mut pkt = Packet::new(ctx);
    let eth = eth::parse(&mut pkt)?;
    match eth.proto {
        ETH_P_IP => {
            let ip = ipv4::parse(&mut pkt)?;
            policy::check(ctx, port, Some(&ip), None, sg_direction::INGRESS)
        }
        ETH_P_IPV6 => {
            let ip = ipv6::parse(&mut pkt)?;
            policy::check(ctx, port, None, Some(&ip), sg_direction::INGRESS)
        }
        _ => Ok(()),
    }
}

/// Sends a switched frame to the port of `fdb`: straight into its peer with
/// `PEER_DELIVERY` (after its checks, whose drops are the receiver's), else out of the
/// device, where `port_egress` checks it.
#[inline(always)]
pub fn unicast(ctx: &TcContext, fdb: &FdbEntry) -> i32 {
    let target = fdb.ifindex;
    if fdb.flags & fdb_flags::PEER_DELIVERY != 0 {
        return to_peer(ctx, target);
    }
    redirect(target);
    trace::unicast(target);
    TC_ACT_REDIRECT as i32
}

/// The receiver's checks, then into its peer. Inlined: as a BPF function of its own
/// its frame would push the deepest call chain (through `policy::check`) past the
/// 512 bytes of stack a program has.
#[inline(always)]
fn to_peer(ctx: &TcContext, target: u32) -> i32 {
    let Some((port, stats)) = maps::port(target) else {
        return drop::shot(ctx, Hook::Peer(target), None, DropReason::UnknownPort);
    };
    if let Err(reason) = accept(ctx, port, stats) {
        return drop::shot(ctx, Hook::Peer(target), Some(stats), reason);
    }
    // SAFETY: helper call with plain integer arguments; with flags 0 it cannot fail,
    // the redirect itself happens after return.
    unsafe { bpf_redirect_peer(target, 0) };
    trace::unicast(target);
    monitor::delivered(ctx.skb.skb, target);
    TC_ACT_REDIRECT as i32
}

#[inline(always)]
pub fn redirect(ifindex: u32) {
    // With flags 0 the helper cannot fail: the redirect itself happens after return.
    // SAFETY: helper call with plain integer arguments.
    unsafe { bpf_redirect(ifindex, 0) };
}
