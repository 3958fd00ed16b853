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
    /// `repr(C, align(2))` structs. Every header starts at an even offset and the kernel
    /// keeps `skb->data` even, so they are 2-aligned; that lets the compiler read them
    /// in 16-bit words rather than byte by byte.
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
        // and `T` is valid for any bytes at any alignment.
        Some(unsafe { &*(p as *const T) })
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
