//! The single exit for dropped frames, and the drop counters.
use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use dataplane_abi::{monitor_hook, DropReason, PortStats};

use crate::{maps::NOPORT_DROPS, monitor, trace};

/// `reason` as an index the verifier can see is in bounds: a reason a BPF function
/// returned through memory reaches the caller as an unknown number, and the compiler,
/// knowing the enum's range, would drop a plain bounds check or mask. The volatile
/// read keeps the mask.
#[inline(always)]
fn index(reason: DropReason) -> usize {
    const { assert!(DropReason::COUNT.is_power_of_two()) };
    let value = reason as u32;
    // SAFETY: a read of a local.
    let value = unsafe { core::ptr::read_volatile(&value) };
    value as usize & (DropReason::COUNT - 1)
}

/// Counts a drop against the port. Also used for a failed flood copy, which does not
/// end the frame's journey.
#[inline(always)]
pub fn count(stats: &mut PortStats, reason: DropReason) {
    if let Some(c) = stats.drops.get_mut(index(reason)) {
        *c += 1;
    }
}

/// Which program drops, and for whom. Only `port_ingress` (with its deliveries to a
/// peer) and `uplink_ingress` trace their verdicts: `port_egress` runs nested inside
/// `port_ingress`'s flood copies (`bpf_clone_redirect` transmits at once, on the same
/// CPU), where a verdict of its own would overwrite the one the flood is writing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `port_ingress`: a frame the VM of the context's device sent.
    Ingress,
    /// `port_egress`: a frame on its way to the VM of the context's device.
    Egress,
    /// `port_ingress` handing the frame straight to the VM of the port on this device
    /// (`PEER_DELIVERY`): the receiver's checks refused it.
    Peer(u32),
    /// `uplink_ingress`.
    Uplink,
}

/// Drops the frame: counts it against `stats`, or in `NOPORT_DROPS` when the device
/// has no port, traces it except from egress, and reports it to the monitor. The only
/// place that returns `TC_ACT_SHOT`.
#[inline(always)]
pub fn shot(ctx: &TcContext, hook: Hook, stats: Option<&mut PortStats>, reason: DropReason) -> i32 {
    match stats {
        Some(stats) => count(stats, reason),
        None => {
            if let Some(c) = NOPORT_DROPS.get_ptr_mut(index(reason) as u32) {
                // SAFETY: per-CPU value, only touched by the program running on this CPU.
                unsafe { *c += 1 };
            }
        }
    }
    if hook != Hook::Egress {
        trace::drop(reason);
    }
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the context the kernel passed in.
    let device = unsafe { (*skb).ifindex };
    let (monitor_hook, ifindex) = match hook {
        Hook::Ingress => (monitor_hook::FROM_PORT, device),
        Hook::Egress => (monitor_hook::TO_PORT, device),
        Hook::Peer(target) => (monitor_hook::TO_PORT, target),
        Hook::Uplink => (monitor_hook::UPLINK, device),
    };
    monitor::dropped(skb, monitor_hook, ifindex, reason as u32);
    TC_ACT_SHOT
}
