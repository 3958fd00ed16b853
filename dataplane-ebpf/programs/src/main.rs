//! TC programs of a VM port's device. `port_ingress` (tcx ingress: frames the VM sends)
//! validates, applies port security and the egress rules of the port's security groups,
//! and switches; `port_egress` (tcx egress: frames delivered to the VM) only lets
//! through what `port_ingress` switched, and applies the ingress rules. Unicast frames
//! for a port whose FDB entry has `PEER_DELIVERY` skip its device: `port_ingress` makes the same
//! checks and hands them to the VM's end of the veth (see `deliver`). Only
//! `port_ingress` and `uplink_ingress` trace verdicts (see `drop::Hook`).
//!
//! The uplink NIC has `uplink_xdp` (see `uplink`) and `uplink_ingress` (tcx ingress),
//! which translates what arrives for the external addresses and delivers it to the
//! ports (see `nat`).
//!
//! Each of these four is a dispatcher attached to the device, and the work is done by
//! its `_stage` program, of which the active map set's copy is tail-called (see `sets`).
#![no_std]
#![no_main]
// The BPF target has no `AtomicU64::fetch_add` (no compare-and-swap); `sets` needs the
// atomic add the BPF instruction set does have.
#![allow(internal_features)]
#![feature(core_intrinsics, adt_const_params)]

mod arp;
mod conntrack;
mod csum;
mod deliver;
mod drop;
mod eth;
mod flow;
mod icmp;
mod ipv4;
mod ipv6;
mod l2;
mod l4;
mod maps;
mod monitor;
mod nat;
mod nd;
mod packet;
mod policy;
mod port_security;
mod router;
mod sets;
mod trace;
mod uplink;

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS},
        TC_ACT_OK,
    },
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use dataplane_abi::{
    map_set, port_flags, sg_direction, DropReason, PortInfo, PortStats, MARK_FROM_DATAPATH,
    MARK_MAGIC_MASK,
};

use crate::{
    drop::Hook,
    eth::{ETH_P_ARP, ETH_P_IP, ETH_P_IPV6},
    maps::UPLINK_STATS,
    packet::Packet,
    router::Hop,
};

/// Does nothing: the benchmark floor.
#[classifier]
pub fn noop_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Passes every frame: the benchmark floor of `uplink_xdp`.
#[xdp]
pub fn noop_xdp(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[xdp]
pub fn uplink_xdp(ctx: XdpContext) -> u32 {
    let reason = sets::dispatch_xdp(&ctx);
    uplink::count_drop(reason);
    XDP_DROP
}

#[xdp]
pub fn uplink_xdp_stage(ctx: XdpContext) -> u32 {
    let action = uplink::run(&ctx);
    sets::leave();
    action
}

#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    let reason = sets::dispatch_tc(&ctx, map_set::UPLINK_INGRESS);
    drop::shot(&ctx, Hook::Uplink, uplink_stats(), reason)
}

#[classifier]
pub fn uplink_ingress_stage(ctx: TcContext) -> i32 {
    let action = uplink_ingress_run(&ctx);
    sets::leave();
    action
}

#[inline(always)]
fn uplink_stats() -> Option<&'static mut PortStats> {
    // SAFETY: per-CPU value, only touched by the program running on this CPU.
    UPLINK_STATS
        .get_ptr_mut(0)
        .map(|stats| unsafe { &mut *stats })
}

#[inline(always)]
fn uplink_ingress_run(ctx: &TcContext) -> i32 {
    // IPv6 is routed in, IPv4 translated (or routed in when for no external address).
    let ipv6 = Packet::new(ctx)
        .at::<[u8; 2]>(12)
        .is_some_and(|proto| u16::from_be_bytes(*proto) == ETH_P_IPV6);
    let hop = if ipv6 {
        router::inbound6(ctx)
    } else {
        nat::inbound(ctx)
    };
    let decided = match Hop(hop).decode() {
        // Expired in the router, before anything was rewritten: answered by a function
        // of its own (beside the translation on the stack, not below it).
        Err(DropReason::TtlExceeded) => Hop(router::expired_on_uplink(ctx)).decode(),
        other => other,
    };
    match decided {
        Ok(Some(target)) => {
            // From no port: slot 0.
            ctx.set_mark(MARK_FROM_DATAPATH);
            deliver::unicast(ctx, &target)
        }
        // Not for an address this node translates: the host's.
        Ok(None) => TC_ACT_OK,
        Err(reason) => drop::shot(ctx, Hook::Uplink, uplink_stats(), reason),
    }
}

#[classifier]
pub fn port_ingress(ctx: TcContext) -> i32 {
    let reason = sets::dispatch_tc(&ctx, map_set::PORT_INGRESS);
    drop::shot(&ctx, Hook::Ingress, None, reason)
}

#[classifier]
pub fn port_ingress_stage(ctx: TcContext) -> i32 {
    let action = port_ingress_run(&ctx);
    sets::leave();
    action
}

#[inline(always)]
fn port_ingress_run(ctx: &TcContext) -> i32 {
    let ifindex = ifindex(ctx);
    let Some((port, stats)) = maps::port(ifindex) else {
        return drop::shot(ctx, Hook::Ingress, None, DropReason::UnknownPort);
    };
    stats.rx_packets += 1;
    stats.rx_bytes += u64::from(ctx.len());
    match ingress(ctx, port, ifindex, stats) {
        Ok(action) => action,
        Err(reason) => drop::shot(ctx, Hook::Ingress, Some(stats), reason),
    }
}

#[inline(always)]
fn ingress(
    ctx: &TcContext,
    port: &PortInfo,
    ifindex: u32,
    stats: &mut PortStats,
) -> Result<i32, DropReason> {
    if port.flags & port_flags::ADMIN_UP == 0 {
        return Err(DropReason::PortAdminDown);
    }
    let mut pkt = Packet::new(ctx);
    let eth = eth::parse(&mut pkt)?;
    let secure = port.flags & port_flags::PORT_SECURITY != 0;
    let policy = port.flags & port_flags::POLICY != 0;
    // Network headers are validated on every port, before port security looks at them.
    // Security groups judge what port security let through.
    match eth.proto {
        ETH_P_IP => {
            let ip = ipv4::parse(&mut pkt)?;
            if secure {
                port_security::ipv4(&mut pkt, port, &eth, &ip)?;
            }
            if policy {
                policy::check(ctx, port, Some(&ip), None, sg_direction::EGRESS)?;
            }
        }
        ETH_P_IPV6 => {
            let ip = ipv6::parse(&mut pkt)?;
            if secure {
                port_security::ipv6(&mut pkt, port, &eth, &ip)?;
            }
            if policy {
                policy::check(ctx, port, None, Some(&ip), sg_direction::EGRESS)?;
            }
            if let Some(sender) = router::nd_reply(ctx, port, &ip)? {
                return Ok(l2::to_port(ctx, port, &sender));
            }
        }
        ETH_P_ARP => {
            let arp = arp::parse(&mut pkt)?;
            if secure {
                port_security::arp(port, &eth, &arp)?;
            }
            if let Some(sender) = router::arp_reply(ctx, port)? {
                return Ok(l2::to_port(ctx, port, &sender));
            }
        }
        _ if secure => port_security::other(port, &eth)?,
        _ => {}
    }
    l2::forward(ctx, port, ifindex, &eth.dst, eth.proto, stats)
}

#[classifier]
pub fn port_egress(ctx: TcContext) -> i32 {
    let reason = sets::dispatch_tc(&ctx, map_set::PORT_EGRESS);
    drop::shot(&ctx, Hook::Egress, None, reason)
}

#[classifier]
pub fn port_egress_stage(ctx: TcContext) -> i32 {
    let action = port_egress_run(&ctx);
    sets::leave();
    action
}

#[inline(always)]
fn port_egress_run(ctx: &TcContext) -> i32 {
    let Some((port, stats)) = maps::port(ifindex(ctx)) else {
        return drop::shot(ctx, Hook::Egress, None, DropReason::UnknownPort);
    };
    // SAFETY: `skb` is the context the kernel passed in.
    let mark = unsafe { (*ctx.skb.skb).mark };
    // Only frames `port_ingress` switched reach a VM, not the host stack's own.
    if mark & MARK_MAGIC_MASK != MARK_FROM_DATAPATH {
        return drop::shot(ctx, Hook::Egress, Some(stats), DropReason::NotFromDatapath);
    }
    // The mark stays: crossing into the VM (veth to another namespace, tap to the VMM)
    // scrubs or drops it, so clearing it would be work for nothing.
    match deliver::accept(ctx, port, stats) {
        Ok(()) => {
            monitor::delivered(ctx.skb.skb, ifindex(ctx));
            TC_ACT_OK
        }
        Err(reason) => drop::shot(ctx, Hook::Egress, Some(stats), reason),
    }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context the kernel passed in.
    unsafe { (*ctx.skb.skb).ifindex }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
