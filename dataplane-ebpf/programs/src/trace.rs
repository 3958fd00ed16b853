//! Verdict tracing for packet tests: where the last frame `port_ingress` handled
//! went, in `VERDICT[0]`.
use core::ptr::read_volatile;

use dataplane_abi::{verdict_action, DropReason, Verdict, MAX_FLOOD_PORTS};

use crate::maps::VERDICT;

/// Set to 1 by test loaders. `.rodata`, frozen at load: at 0 the verifier knows every
/// branch below is dead and removes it, so production pays nothing.
#[no_mangle]
static TRACE_VERDICT: u32 = 0;

#[inline(always)]
fn verdict() -> Option<&'static mut Verdict> {
    // SAFETY: a plain read of a static; volatile so the compiler keeps the load the
    // loader's value is patched into instead of folding the 0 it was built with.
    if unsafe { read_volatile(&TRACE_VERDICT) } == 0 {
        return None;
    }
    // SAFETY: per-CPU value, only touched by the program running on this CPU.
    VERDICT.get_ptr_mut(0).map(|v| unsafe { &mut *v })
}

#[inline(always)]
fn set(action: u32, reason: u32) {
    if let Some(v) = verdict() {
        v.action = action;
        v.reason = reason;
        v.count = 0;
    }
}

#[inline(always)]
pub fn drop(reason: DropReason) {
    set(verdict_action::DROP, reason as u32);
}

#[inline(always)]
pub fn unicast(ifindex: u32) {
    set(verdict_action::UNICAST, 0);
    flood_target(ifindex);
}

/// Starts a flood verdict; each copy that left is then added with `flood_target`.
#[inline(always)]
pub fn flood() {
    set(verdict_action::FLOOD, 0);
}

#[inline(always)]
pub fn flood_target(ifindex: u32) {
    if let Some(v) = verdict() {
        // The count lives in the map, not in a register: the verifier need not track
        // one more bounded scalar through the flood loop.
        let n = v.count as usize;
        if n < MAX_FLOOD_PORTS {
            v.ifindexes[n] = ifindex;
            v.count += 1;
        }
    }
}
