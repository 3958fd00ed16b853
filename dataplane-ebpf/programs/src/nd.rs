//! Neighbour advertisements the datapath sends for routers' addresses: on a port's
//! network (`router`, tc) and on the uplink for the gateways' IPv6 addresses (`uplink`,
//! XDP). Both answer a solicitation with the same 32-byte message.
use crate::{
    csum::{add, fold, sum},
    eth::Mac,
    ipv6::{ICMP6_NEIGH_ADVERT, IPPROTO_ICMPV6, ND_OPT_TARGET_LL_ADDR},
};

/// NA flags: router, solicited, override.
const NA_FLAGS: u8 = 0xe0;
/// An NS or NA with one link-layer option: ICMPv6 header (4), reserved (4), target
/// (16), option (8).
pub const ND_LEN: usize = 32;
/// An NS without the option (a unicast reachability probe may leave it out).
pub const NS_BARE_LEN: usize = 24;
/// Hop limit of every ND message: a receiver drops one with any other (RFC 4861 7.1).
pub const ND_HOP_LIMIT: u8 = 255;

/// The advertisement as it is in the frame, after the IPv6 header.
#[repr(C)]
pub struct NaMsg {
    kind: u8,
    code: u8,
    check: [u8; 2],
    flags: [u8; 4],
    target: [u8; 16],
    opt_kind: u8,
    opt_len: u8,
    mac: Mac,
}

impl NaMsg {
    /// The answer to a solicitation from `solicitor` for `target`, which is at `mac`:
    /// sent from `target` to `solicitor`, whose addresses its checksum covers.
    #[inline(always)]
    pub fn answer(target: &[u8; 16], mac: &Mac, solicitor: &[u8; 16]) -> NaMsg {
        let mut msg = NaMsg {
            kind: ICMP6_NEIGH_ADVERT,
            code: 0,
            check: [0; 2],
            flags: [NA_FLAGS, 0, 0, 0],
            target: *target,
            opt_kind: ND_OPT_TARGET_LL_ADDR,
            opt_len: 1,
            mac: *mac,
        };
        msg.check = msg.checksum(target, solicitor);
        msg
    }

    /// The ICMPv6 checksum (RFC 4443 2.3) from `src` (the target) to `dst`: the
    /// pseudo-header's addresses, then its length and next header as 32-bit words.
    #[inline(always)]
    fn checksum(&self, src: &[u8; 16], dst: &[u8; 16]) -> [u8; 2] {
        let pseudo = add(
            add(sum(src.as_ptr(), 16, 0), sum(dst.as_ptr(), 16, 0)),
            add(
                u32::from_ne_bytes((ND_LEN as u32).to_be_bytes()),
                u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6]),
            ),
        );
        fold(sum(core::ptr::from_ref(self).cast(), ND_LEN, pseudo))
    }
}

const _: () = assert!(core::mem::size_of::<NaMsg>() == ND_LEN);
