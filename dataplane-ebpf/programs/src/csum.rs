//! Internet checksums (RFC 1071) of what the datapath writes itself, and their
//! incremental update (RFC 1624) where it changes a word of what it forwards.
use aya_ebpf::helpers::bpf_csum_diff;

/// One's complement sum of `len` bytes (a multiple of 4, at most 512) from `at`, plus
/// `seed`, by the kernel: an unrolled loop would spill past the stack the call chain
/// below `port_ingress` has left. Sums in memory order; `fold` of it is stored as is.
#[inline(always)]
pub fn sum(at: *const u8, len: usize, seed: u32) -> u32 {
    // SAFETY: `at..at + len` is inside the caller's stack or map value; the helper only
    // reads it.
    unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, at as *mut u32, len as u32, seed) as u32 }
}

/// One's complement addition.
#[inline(always)]
pub fn add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum + u32::from(carry)
}

/// The checksum of what `sum` added up, in memory order.
#[inline(always)]
pub fn fold(sum: u32) -> [u8; 2] {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}

/// The checksum `check` after a 16-bit word of what it covers went from `old` to `new`
/// (all as they are in the packet).
#[inline(always)]
pub fn update(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(((sum & 0xffff) + (sum >> 16)) as u16)
}
