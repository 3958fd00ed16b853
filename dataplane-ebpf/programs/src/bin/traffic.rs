//! The benchmark's traffic generator and sink (see `dataplane_abi::traffic_programs`):
//! an object of its own, so loading it never creates the datapath's maps.
//!
//! The generator works on the frames of a live-frames test run. The kernel does not
//! restore a frame's bytes when it reuses the frame's page, so the generator reads the
//! source port and checksum it finds and updates the checksum incrementally: correct
//! whatever the frame held before.
#![no_std]
#![no_main]

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect,
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use dataplane_abi::{sink_stat, GenTemplate, GEN_TEMPLATE_LEN};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const IPV6_HLEN: usize = 40;

#[no_mangle]
static GEN_IFINDEX: u32 = 0;
#[no_mangle]
static GEN_FLOWS: u32 = 1;
#[no_mangle]
static GEN_FIRST_PORT: u32 = 1024;

#[map]
static GEN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map]
static GEN_TEMPLATE: Array<GenTemplate> = Array::with_max_entries(1, 0);

#[map]
static SINK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(sink_stat::COUNT, 0);

/// Offset of the UDP header of an IPv4 (any header length) or IPv6 (no extension
/// headers) frame in `data..end`, or `None`.
#[inline(always)]
fn udp_offset(data: usize, end: usize) -> Option<usize> {
    // The shortest UDP frame: Ethernet, a 20-byte IPv4 header, UDP.
    if data + ETH_HLEN + 20 + 8 > end {
        return None;
    }
    // SAFETY: the bytes read are inside `data..end` (checked above).
    let proto = u16::from_be(unsafe { *((data + 12) as *const u16) });
    match proto {
        ETH_P_IP => {
            // SAFETY: as above.
            let (vihl, protocol) = unsafe {
                (
                    *((data + ETH_HLEN) as *const u8),
                    *((data + ETH_HLEN + 9) as *const u8),
                )
            };
            let ihl = usize::from(vihl & 0x0f) * 4;
            if protocol != IPPROTO_UDP || !(20..=60).contains(&ihl) {
                return None;
            }
            let off = ETH_HLEN + ihl;
            (data + off + 8 <= end).then_some(off)
        }
        ETH_P_IPV6 if data + ETH_HLEN + IPV6_HLEN + 8 <= end => {
            // SAFETY: as above.
            let next = unsafe { *((data + ETH_HLEN + 6) as *const u8) };
            (next == IPPROTO_UDP).then_some(ETH_HLEN + IPV6_HLEN)
        }
        _ => None,
    }
}

/// One's-complement update of a checksum for a 16-bit field going from `old` to `new`
/// (RFC 1624, eqn. 3). All values in network order as read.
#[inline(always)]
fn csum_replace(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Gives the frame the next flow's source port and sends it out of `GEN_IFINDEX`.
#[xdp]
pub fn traffic_gen(ctx: XdpContext) -> u32 {
    // SAFETY: plain reads of statics; volatile keeps the loads the loader patches.
    let (ifindex, flows, first) = unsafe {
        (
            read_volatile(&GEN_IFINDEX),
            read_volatile(&GEN_FLOWS),
            read_volatile(&GEN_FIRST_PORT),
        )
    };
    let Some(off) = udp_offset(ctx.data(), ctx.data_end()) else {
        return xdp_action::XDP_ABORTED;
    };
    let Some(template) = GEN_TEMPLATE.get(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // The headers back as the user set them, in 16-bit words (headers are 2-aligned).
    let (data, end, len) = (ctx.data(), ctx.data_end(), off + 8);
    for word in 0..GEN_TEMPLATE_LEN / 2 {
        let at = 2 * word;
        if at + 2 > len || data + at + 2 > end {
            break;
        }
        // SAFETY: `data + at .. data + at + 2` is inside the frame (checked above),
        // and `at + 2 <= GEN_TEMPLATE_LEN`.
        unsafe {
            *((data + at) as *mut [u8; 2]) = [template.bytes[at], template.bytes[at + 1]];
        }
    }
    let Some(seq) = GEN_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: per-CPU value, only touched by the program running on this CPU.
    let seq = unsafe { &mut *seq };
    let flow = if flows > 1 { *seq % flows } else { 0 };
    *seq = seq.wrapping_add(1);
    let port = (first.wrapping_add(flow) as u16).to_be();
    let udp = ctx.data() + off;
    if udp + 8 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: `udp..udp + 8` is inside the frame (checked above); packet data is
    // 2-aligned (NET_IP_ALIGN headroom, even header offsets).
    unsafe {
        let sport = udp as *mut u16;
        let check = (udp + 6) as *mut u16;
        let old = *sport;
        // A zero IPv4 checksum means "none" and stays so.
        if *check != 0 {
            let mut new = csum_replace(*check, old, port);
            if new == 0 {
                new = 0xffff;
            }
            *check = new;
        }
        *sport = port;
        bpf_redirect(ifindex, 0) as u32
    }
}

/// Passes every frame on (see `traffic_programs::PASS`).
#[xdp]
pub fn traffic_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Counts and drops the UDP frames reaching the device (tc ingress: what a VM behind it
/// would receive, without the cost of turning each into an XDP frame); the rest goes
/// on.
#[classifier]
pub fn traffic_sink(ctx: TcContext) -> i32 {
    if udp_offset(ctx.data(), ctx.data_end()).is_none() {
        return TC_ACT_OK;
    }
    for (stat, add) in [
        (sink_stat::PACKETS, 1),
        (sink_stat::BYTES, u64::from(ctx.len())),
    ] {
        if let Some(c) = SINK_STATS.get_ptr_mut(stat) {
            // SAFETY: per-CPU value, only touched by the program running on this CPU.
            unsafe { *c += add };
        }
    }
    TC_ACT_SHOT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
