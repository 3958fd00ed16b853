//! Packet events for the agent's monitor (`ctl monitor`): each drop, and with tracing
//! on each frame delivered to a port, into the `EVENTS` ring buffer, while the agent
//! has switched them on in `MONITOR_CONFIG`.
//!
//! One BPF function of its own, never inlined: its few bytes of stack are a frame of
//! their own, off the deepest call chain of `port_ingress` (at the 512-byte limit), and
//! with the monitor off a frame costs the call and one array lookup.
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use dataplane_abi::{monitor_hook, monitor_kind, MonitorEvent, MONITOR_HEADER_BYTES, NO_SLOT};

use crate::maps::PORTS;

/// About 1,500 events: what a burst of drops fills between two reads of the agent.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
pub static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static MONITOR_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// A drop of the frame in `skb`, at `hook` (`monitor_hook`) of the device `ifindex`.
#[inline(always)]
pub fn dropped(skb: *mut __sk_buff, hook: u32, ifindex: u32, reason: u32) {
    emit(skb, monitor_kind::DROP, hook, ifindex, reason);
}

/// The frame in `skb` goes to the VM of the port on `ifindex`.
#[inline(always)]
pub fn delivered(skb: *mut __sk_buff, ifindex: u32) {
    emit(skb, monitor_kind::TRACE, monitor_hook::TO_PORT, ifindex, 0);
}

#[inline(never)]
fn emit(skb: *mut __sk_buff, kind: u32, hook: u32, ifindex: u32, reason: u32) {
    // Modes count up with the kinds they include.
    match MONITOR_CONFIG.get(0) {
        Some(mode) if *mode >= kind => {}
        _ => return,
    }
    let Some(mut entry) = EVENTS.reserve::<MonitorEvent>(0) else {
        // Full: the agent is told how many it missed, the packet goes on.
        if let Some(lost) = EVENTS_LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU value, only touched by the program running on this CPU.
            unsafe { *lost += 1 };
        }
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `skb` is the context the kernel passed to the calling program; `event` is
    // the reserved record, written here and nowhere else until it is submitted.
    unsafe {
        let len = (*skb).len;
        (*event).timestamp_ns = bpf_ktime_get_ns();
        (*event).kind = kind;
        (*event).hook = hook;
        (*event).ifindex = ifindex;
        (*event).port_slot = PORTS.get(ifindex).map_or(NO_SLOT, |port| port.port_slot);
        (*event).reason = reason;
        (*event).original_len = len;
        (*event)._pad = 0;
        let wanted = if len < MONITOR_HEADER_BYTES as u32 {
            len
        } else {
            MONITOR_HEADER_BYTES as u32
        };
        let loaded = wanted > 0
            && bpf_skb_load_bytes(
                skb as *const _,
                0,
                (*event).header.as_mut_ptr().cast(),
                wanted,
            ) == 0;
        (*event).captured_len = if loaded { wanted } else { 0 };
    }
    entry.submit(0);
}
