//! CPU cost per packet on the receive side (the CPU the filter under test runs on).
//!
//! Cycles from a hardware counter (`perf_event_open`, PERF_COUNT_HW_CPU_CYCLES on that
//! CPU, every task and interrupt) where the machine has one; many VMs expose no PMU, and
//! then the CPU's busy time from `/proc/stat` (everything but idle and iowait, in
//! USER_HZ ticks: 10 ms resolution) is used instead, labelled as such. Either way it is
//! the whole CPU's work, the receiving half of the path and whatever else ran there.

use std::{
    fs::File,
    io::Read as _,
    os::fd::{FromRawFd, OwnedFd},
};

use anyhow::{Context as _, Result};

/// What [`Meter`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Cycles,
    BusyTime,
}

impl Method {
    pub fn describe(self, cpu: usize) -> String {
        match self {
            Method::Cycles => format!("hardware cycles on CPU {cpu} (perf_event_open)"),
            Method::BusyTime => format!(
                "no hardware cycle counter here: busy time of CPU {cpu} from /proc/stat \
                 (10 ms ticks), in ns per delivered packet"
            ),
        }
    }

    pub fn metric(self) -> (&'static str, &'static str) {
        match self {
            Method::Cycles => ("receive-side CPU cycles per delivered packet", "cycles"),
            Method::BusyTime => ("receive-side CPU time per delivered packet", "ns"),
        }
    }
}

pub struct Meter {
    cpu: usize,
    counter: Option<OwnedFd>,
}

impl Meter {
    /// A cycle counter on `cpu` if the machine has one, else the busy-time fallback.
    pub fn new(cpu: usize) -> Self {
        Self {
            cpu,
            counter: cycle_counter(cpu).ok(),
        }
    }

    pub fn method(&self) -> Method {
        if self.counter.is_some() {
            Method::Cycles
        } else {
            Method::BusyTime
        }
    }

    /// The counter's value now (cycles, or busy ns).
    pub fn read(&self) -> Result<f64> {
        match &self.counter {
            Some(fd) => {
                let mut value = [0u8; 8];
                File::from(fd.try_clone()?).read_exact(&mut value)?;
                Ok(u64::from_ne_bytes(value) as f64)
            }
            None => busy_nanos(self.cpu),
        }
    }
}

/// `perf_event_attr` as far as this counter needs it (PERF_ATTR_SIZE_VER5 bytes).
#[repr(C)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    rest: [u64; 12],
}

/// `PERF_FLAG_FD_CLOEXEC` (linux/perf_event.h); not in the libc crate.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;

fn cycle_counter(cpu: usize) -> Result<OwnedFd> {
    let attr = PerfEventAttr {
        kind: 0,   // PERF_TYPE_HARDWARE
        size: 112, // PERF_ATTR_SIZE_VER5
        config: 0, // PERF_COUNT_HW_CPU_CYCLES
        rest: [0; 12],
    };
    // SAFETY: `attr` is a valid perf_event_attr of the size it states; pid -1 with a
    // CPU counts every task there; the fd is owned right away.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            std::ptr::from_ref(&attr),
            -1,
            cpu as libc::c_int,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("perf_event_open(cycles)");
    }
    // SAFETY: a new fd, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Busy ns of `cpu` since boot, from `/proc/stat`.
fn busy_nanos(cpu: usize) -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let label = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label.as_str()))
        .with_context(|| format!("no {label} in /proc/stat"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...: guests' time is in user.
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    // SAFETY: plain libc call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(busy as f64 * 1e9 / hz)
}

static METER: std::sync::OnceLock<Meter> = std::sync::OnceLock::new();

/// The meter of the CPU the filter under test runs on (the receive side).
pub fn meter() -> &'static Meter {
    METER.get_or_init(|| Meter::new(crate::traffic::FILTER_CPU))
}
