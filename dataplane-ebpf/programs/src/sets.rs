//! The map set a frame is judged by (see `dataplane_abi::map_set`). Each hook's program
//! is a dispatcher: it reads the active set, counts itself in flight on it, and
//! tail-calls that set's stage; the stage uncounts itself when it is done. The agent
//! switches `ACTIVE_SET` and then waits for the old set's in-flight count to reach zero
//! before it writes that set again, so no run ever sees a set change under it.
//!
//! The count goes up before the set is read a second time, and down after the stage
//! made its last lookup, both with atomic adds (full barriers on x86-64): an agent that
//! switched and then reads zero has seen every run that could still read the old set.
use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    ptr::read_volatile,
};

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray, ProgramArray},
    EbpfContext,
};
use dataplane_abi::{map_set, DropReason};

#[map]
pub static ACTIVE_SET: Array<u32> = Array::with_max_entries(1, 0);

/// Runs in flight, per set, per CPU (a run starts and ends on one CPU).
#[map]
pub static IN_FLIGHT: PerCpuArray<u64> = PerCpuArray::with_max_entries(map_set::COUNT, 0);

/// The tc stages of both sets, at `stage * map_set::COUNT + set`.
#[map]
pub static TC_STAGES: ProgramArray = ProgramArray::with_max_entries(map_set::TC_STAGES, 0);

/// `uplink_xdp`'s stage of each set (XDP programs cannot share an array with tc ones).
#[map]
pub static XDP_STAGES: ProgramArray = ProgramArray::with_max_entries(map_set::XDP_STAGES, 0);

/// Which set this copy of the object's maps is: set by the loader, `.rodata`.
#[no_mangle]
static MAP_SET: u32 = 0;

#[inline(always)]
fn active() -> u32 {
    // SAFETY: a read of the array's only value; volatile, so each call reads it again.
    ACTIVE_SET
        .get(0)
        .map(|set| unsafe { read_volatile(set) })
        .unwrap_or(0)
        & (map_set::COUNT - 1)
}

/// Adds `delta` to this CPU's count of `set`, atomically. The object is built for BPF
/// v1, where the add cannot fetch: the x86-64 JIT makes it `lock add`, a full barrier,
/// which is what the agent's wait relies on.
#[inline(always)]
fn count(set: u32, delta: u64) {
    if let Some(counter) = IN_FLIGHT.get_ptr_mut(set) {
        // SAFETY: the map value is a live, aligned u64 for the whole run.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(counter, delta) };
    }
}

/// The set this run is judged by, counted in flight; `None` if the set changed twice
/// while it looked (the agent switches at most once per update).
#[inline(always)]
fn enter() -> Option<u32> {
    let mut set = active();
    for _ in 0..2 {
        count(set, 1);
        let now = active();
        if now == set {
            return Some(set);
        }
        count(set, u64::MAX);
        set = now;
    }
    None
}

/// Hands the frame to the active set's copy of `stage` (`map_set::PORT_INGRESS`, ...).
/// Returns only if it could not: the caller drops the frame for that reason.
#[inline(always)]
pub fn dispatch_tc<C: EbpfContext>(ctx: &C, stage: u32) -> DropReason {
    dispatch(ctx, &TC_STAGES, stage * map_set::COUNT)
}

/// As [`dispatch_tc`] for `uplink_xdp`.
#[inline(always)]
pub fn dispatch_xdp<C: EbpfContext>(ctx: &C) -> DropReason {
    dispatch(ctx, &XDP_STAGES, 0)
}

#[inline(always)]
fn dispatch<C: EbpfContext>(ctx: &C, stages: &ProgramArray, base: u32) -> DropReason {
    let Some(set) = enter() else {
        return DropReason::StageUnavailable;
    };
    // SAFETY: the context is the one this program was called with.
    unsafe { stages.tail_call(ctx, base + set) };
    // No stage there: not in flight after all.
    count(set, u64::MAX);
    DropReason::StageUnavailable
}

/// Ends a stage's run on its set. Called after its last map lookup.
#[inline(always)]
pub fn leave() {
    // SAFETY: a plain read of a static; volatile so the loader's value is read, not the
    // 0 it was built with.
    count(unsafe { read_volatile(&MAP_SET) }, u64::MAX);
}
