//! Bounds-checked direct access to the frame.
use core::mem::{align_of, size_of};

use aya_ebpf::programs::TcContext;

/// The frame being classified. `at` hands out header references after the bounds check
/// the verifier needs, pulling non-linear data into the linear part only when the bytes
/// asked for are not there yet. A pull invalidates every packet pointer taken before
/// it; the borrow of `self` that each reference holds makes the compiler enforce that
/// callers copy what they need out of one header before asking for the next.
pub struct Packet<'a> {
    ctx: &'a TcContext,
    data: usize,
    end: usize,
}

impl<'a> Packet<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a TcContext) -> Self {
        Self {
            ctx,
            data: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// Length of the whole frame, linear or not.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.ctx.len() as usize
    }

    /// The `T` at byte `off`, or `None` if the frame is shorter. `T` must be valid for
    /// any bytes and aligned to at most 2: the headers of this crate are byte arrays in
    /// `repr(C, align(2))` structs. Every header starts at an even offset of a frame
    /// whose start the kernel keeps even (`NET_SKB_PAD`, `NET_IP_ALIGN`), so they are
    /// 2-aligned, which lets the compiler read them in 16-bit words instead of byte by
    /// byte. (Were a frame ever odd, x86 and arm64 still load it right, and the verifier
    /// only enforces alignment on packets for architectures without that.)
    #[inline(always)]
    pub fn at<T>(&mut self, off: usize) -> Option<&T> {
        const { assert!(align_of::<T>() <= 2) };
        let mut p = self.data + off;
        if p + size_of::<T>() > self.end {
            self.pull(off + size_of::<T>())?;
            p = self.data + off;
            if p + size_of::<T>() > self.end {
                return None;
            }
        }
        // SAFETY: `p .. p + size_of::<T>()` is inside the linear data (checked above),
        // 2-aligned (see above), and `T` is valid for any bytes.
        Some(unsafe { &*(p as *const T) })
    }

    /// As [`Packet::at`], to write the header in place. Only for what no checksum of
    /// the skb covers, or what keeps the sums it is part of (the verifier then makes
    /// the program unclone the skb before it runs, as `bpf_skb_store_bytes` would).
    #[inline(always)]
    pub fn at_mut<T>(&mut self, off: usize) -> Option<&mut T> {
        let p: *const T = self.at::<T>(off)?;
        // SAFETY: as in `at`; the frame is the program's to write, and the borrow of
        // `self` keeps any other reference into it from living past a pull.
        Some(unsafe { &mut *p.cast_mut() })
    }

    /// Makes the first `len` bytes linear. Cold: taps and veths hand over the headers
    /// linear; only odd GSO/frag layouts get here.
    #[inline(always)]
    fn pull(&mut self, len: usize) -> Option<()> {
        if len > self.len() {
            return None;
        }
        self.ctx.pull_data(len as u32).ok()?;
        self.data = self.ctx.data();
        self.end = self.ctx.data_end();
        Some(())
    }
}
