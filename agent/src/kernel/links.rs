//! Port devices: finding them by name, preparing them, and hearing when they come and go.

use std::{collections::BTreeMap, io};

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tokio::io::unix::AsyncFd;
use tracing::debug;

/// rtnetlink multicast group of link (device) changes.
const RTMGRP_LINK: u32 = 1;

/// Ifindex of each named device that exists in this agent's network namespace.
pub fn resolve_interfaces<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u32> {
    names
        .into_iter()
        .filter_map(|name| {
            nix::net::if_::if_nametoindex(name)
                .ok()
                .map(|ifindex| (name.to_owned(), ifindex))
        })
        .collect()
}

/// Turns off IPv6 on a port device, as os-vif does for VM taps: the host side of a port
/// carries no addresses, so the host stack must not send router solicitations or MLD
/// reports into the VM's network (the egress program would drop them anyway).
pub fn disable_host_ipv6(interface: &str) -> io::Result<()> {
    let path = format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6");
    match std::fs::write(&path, "1") {
        // Kernels built without IPv6 have no such file: nothing to turn off.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// A subscription to rtnetlink link events. The agent does not parse them: any event
/// means "devices may have changed", and it re-resolves the names it cares about.
pub struct LinkEvents {
    socket: AsyncFd<Socket>,
}

impl LinkEvents {
    pub fn subscribe() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
        socket.set_non_blocking(true)?;
        // SAFETY: the socket owns its fd, and `AsyncFd` owns the socket until it drops.
        let socket = unsafe { AsyncFd::register(socket)? };
        Ok(Self { socket })
    }

    /// Waits for the next batch of link events and consumes all that are queued.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut guard = self.socket.readable().await?;
            let mut received = 0usize;
            loop {
                match guard.get_inner().recv(&mut &mut buf[..], 0) {
                    Ok(_) => received += 1,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // Overrun: events were lost, which still means "something changed".
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => received += 1,
                    Err(e) => return Err(e),
                }
            }
            guard.clear_ready();
            if received > 0 {
                debug!(messages = received, "link events");
                return Ok(());
            }
        }
    }
}
