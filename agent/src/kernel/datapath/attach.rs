//! The dispatchers' links to devices. Pinned, they outlive the agent: traffic keeps its
//! programs while the agent is stopped, killed or restarted, and the next agent takes a
//! pinned link over by pointing it at its own dispatcher, in one atomic update.

use std::path::PathBuf;

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
    xdp::XdpLink,
    LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
};
use tracing::{debug, info, warn};

use super::DatapathError;

/// One link of a dispatcher to a device, and where it is pinned.
pub struct Link {
    fd: FdLink,
    pin: Option<PathBuf>,
}

impl Link {
    /// Detaches: the pin goes, then the last fd.
    pub fn release(self) {
        if let Some(pin) = &self.pin {
            if let Err(e) = std::fs::remove_file(pin) {
                debug!(pin = %pin.display(), error = %e, "link pin already gone");
            }
        }
    }

    pub fn pin_path(&self) -> Option<&PathBuf> {
        self.pin.as_ref()
    }

    /// Pins the link again where it was (its pin was removed behind the agent's back).
    pub fn repin(self) -> Result<Self, DatapathError> {
        let Some(path) = self.pin else {
            return Ok(self);
        };
        let pinned = self
            .fd
            .pin(&path)
            .map_err(|source| DatapathError::PinLink {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            fd: pinned.into(),
            pin: Some(path),
        })
    }

    fn new(fd: FdLink, pin: Option<PathBuf>) -> Result<Self, DatapathError> {
        let Some(path) = pin else {
            return Ok(Self { fd, pin: None });
        };
        let pinned = fd.pin(&path).map_err(|source| DatapathError::PinLink {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            fd: pinned.into(),
            pin: Some(path),
        })
    }
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
                    return Ok(Link {
                        fd: FdLink::try_from(link).map_err(DatapathError::Link)?,
                        pin,
                    });
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
                    return Ok(Link {
                        fd: FdLink::try_from(link).map_err(DatapathError::Link)?,
                        pin,
                    });
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
