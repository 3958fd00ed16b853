//! The dispatchers' links to devices. Pinned, they outlive the agent: traffic keeps its
//! programs while the agent is stopped, killed or restarted, and the next agent takes a
//! pinned link over by pointing it at its own dispatcher, in one atomic update. A link
//! whose pin is removed behind the agent's back is gone with it: the drift check finds
//! its device without the dispatcher and attaches it again.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::XdpLink,
    LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
};
use tracing::{debug, info, warn};

use super::DatapathError;

/// One link of a dispatcher to a device.
pub enum Link {
    /// Held by its pin alone: no fd is kept (two per port would take most of a
    /// process's file limit at 10,000 ports). Removing the pin detaches it.
    Pinned(PathBuf),
    /// Held by its fd (a datapath without a pin root), which is dropped to detach.
    Held { _fd: FdLink },
}

impl Link {
    /// Detaches, at once: the pinned link is detached before its pin goes (the kernel
    /// drops a removed pin's link only after an RCU grace period and a work item, and
    /// until then the device refuses the same dispatcher again), or the fd goes.
    pub fn release(self) {
        if let Link::Pinned(pin) = &self {
            if let Err(e) = detach_pinned(pin) {
                debug!(pin = %pin.display(), error = %e, "pinned link not detached; removing its pin");
            }
            if let Err(e) = std::fs::remove_file(pin) {
                debug!(pin = %pin.display(), error = %e, "link pin already gone");
            }
        }
    }

    pub fn pin_path(&self) -> Option<&PathBuf> {
        match self {
            Link::Pinned(pin) => Some(pin),
            Link::Held { .. } => None,
        }
    }

    fn new(fd: FdLink, pin: Option<PathBuf>) -> Result<Self, DatapathError> {
        let Some(path) = pin else {
            return Ok(Link::Held { _fd: fd });
        };
        fd.pin(&path).map_err(|source| DatapathError::PinLink {
            path: path.clone(),
            source,
        })?;
        Ok(Link::Pinned(path))
    }

    /// A link taken over from its pin (its fd, just opened, is not needed).
    fn taken_over(fd: FdLink, pin: Option<PathBuf>) -> Self {
        match pin {
            Some(path) => Link::Pinned(path),
            None => Link::Held { _fd: fd },
        }
    }
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `BPF_LINK_DETACH` on the link pinned at `pin`: off its device now, whoever else
/// holds it. (aya keeps a link's fd to itself, so both calls are made here.)
fn detach_pinned(pin: &Path) -> io::Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // `bpf_attr.obj_get`: pathname, bpf_fd, file_flags.
    let obj_get: [u64; 2] = [path.as_ptr() as u64, 0];
    // SAFETY: the attr is a valid `obj_get` prefix; `path` outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, obj_get.as_ptr(), 16usize) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd, and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // `bpf_attr.link_detach`: link_fd.
    let link_detach: [u32; 2] = [fd.as_raw_fd() as u32, 0];
    // SAFETY: the attr is a valid `link_detach` prefix.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, link_detach.as_ptr(), 8usize) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The link pinned at `pin`, if there is one there.
fn pinned(pin: Option<&PathBuf>) -> Option<FdLink> {
    let path = pin?;
    if !path.exists() {
        return None;
    }
    match PinnedLink::from_pin(path) {
        Ok(link) => Some(link.into()),
        Err(e) => {
            warn!(pin = %path.display(), error = %e, "unreadable link pin; replacing it");
            let _ = std::fs::remove_file(path);
            None
        }
    }
}

/// A link its device no longer has (the device went away): its pin is removed.
fn defunct(pin: Option<&PathBuf>, error: &ProgramError) {
    if let Some(path) = pin {
        debug!(pin = %path.display(), %error, "pinned link is defunct; attaching anew");
        let _ = std::fs::remove_file(path);
    }
}

/// Attaches `dispatcher` to `interface` at `direction` (tcx, appended), taking over
/// the link pinned at `pin` if it is still attached.
pub fn tc(
    dispatcher: &mut SchedClassifier,
    interface: &str,
    direction: TcAttachType,
    pin: Option<PathBuf>,
) -> Result<Link, DatapathError> {
    let attach_err = |source| DatapathError::Attach {
        interface: interface.to_owned(),
        direction: match direction {
            TcAttachType::Ingress => "ingress",
            _ => "egress",
        },
        source,
    };
    if let Some(fd) = pinned(pin.as_ref()) {
        if let Ok(link) = SchedClassifierLink::try_from(fd) {
            match dispatcher.attach_to_link(link) {
                Ok(id) => {
                    let link = dispatcher.take_link(id).map_err(attach_err)?;
                    info!(interface, ?direction, "took over the pinned link");
                    let fd = FdLink::try_from(link).map_err(DatapathError::Link)?;
                    return Ok(Link::taken_over(fd, pin));
                }
                Err(e) => defunct(pin.as_ref(), &e),
            }
        }
    }
    let id = dispatcher
        .attach_with_options(
            interface,
            direction,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(attach_err)?;
    let link = dispatcher.take_link(id).map_err(attach_err)?;
    Link::new(FdLink::try_from(link).map_err(DatapathError::Link)?, pin)
}

/// Attaches the XDP `dispatcher` to `interface` (driver mode where it can, else
/// generic; generic only with `generic`), taking over the link pinned at `pin`.
pub fn xdp(
    dispatcher: &mut Xdp,
    interface: &str,
    generic: bool,
    pin: Option<PathBuf>,
) -> Result<Link, DatapathError> {
    let attach_err = |source| DatapathError::Attach {
        interface: interface.to_owned(),
        direction: "xdp",
        source,
    };
    if let Some(fd) = pinned(pin.as_ref()) {
        if let Ok(link) = XdpLink::try_from(fd) {
            match dispatcher.attach_to_link(link) {
                Ok(id) => {
                    let link = dispatcher.take_link(id).map_err(attach_err)?;
                    info!(interface, "took over the pinned XDP link");
                    let fd = FdLink::try_from(link).map_err(DatapathError::Link)?;
                    return Ok(Link::taken_over(fd, pin));
                }
                Err(e) => defunct(pin.as_ref(), &e),
            }
        }
    }
    let id = if generic {
        dispatcher.attach(interface, XdpMode::Skb)
    } else {
        dispatcher.attach(interface, XdpMode::Driver).or_else(|e| {
            debug!(interface, error = %e, "no driver XDP; generic");
            dispatcher.attach(interface, XdpMode::Skb)
        })
    }
    .map_err(attach_err)?;
    let link = dispatcher.take_link(id).map_err(attach_err)?;
    Link::new(FdLink::try_from(link).map_err(DatapathError::Link)?, pin)
}

/// Whether `dispatcher` is among the programs tcx runs on `interface` at `direction`.
pub fn tc_attached(
    dispatcher: &SchedClassifier,
    interface: &str,
    direction: TcAttachType,
) -> Result<bool, ProgramError> {
    let ours = dispatcher.info()?.id();
    let (_, attached) = SchedClassifier::query_tcx(interface, direction)?;
    Ok(attached.iter().any(|program| program.id() == ours))
}
