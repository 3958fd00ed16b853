//! Port devices: finding them by name, preparing them, and hearing when they come and go.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
};

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

/// rtnetlink message and attribute numbers (linux/rtnetlink.h, linux/if_link.h).
mod rtnl {
    pub const NLMSG_ERROR: u16 = 2;
    pub const NLMSG_DONE: u16 = 3;
    pub const RTM_NEWLINK: u16 = 16;
    pub const RTM_GETLINK: u16 = 18;
    pub const NLM_F_REQUEST: u16 = 1;
    /// `NLM_F_ROOT | NLM_F_MATCH`: every object.
    pub const NLM_F_DUMP: u16 = 0x300;
    pub const NLMSG_HDRLEN: usize = 16;
    pub const IFINFOMSG_LEN: usize = 16;
    pub const IFLA_IFNAME: u16 = 3;
    pub const IFLA_LINKINFO: u16 = 18;
    pub const IFLA_LINK_NETNSID: u16 = 37;
    pub const IFLA_INFO_KIND: u16 = 1;
    pub const IFLA_XDP: u16 = 43;
    pub const IFLA_XDP_PROG_ID: u16 = 4;
    pub const IFLA_EXT_MASK: u16 = 29;
    pub const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
    /// Attribute type bits (the rest flag nesting and byte order).
    pub const NLA_TYPE_MASK: u16 = 0x3fff;
}

/// What rtnetlink says about a device that matters to delivery.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    /// `IFLA_IFNAME`.
    pub name: String,
    /// `IFLA_INFO_KIND`: "veth", "tun", ...; `None` for devices without one.
    pub kind: Option<String>,
    /// The device's link (a veth's other end) is in another network namespace.
    pub link_in_other_netns: bool,
    /// The XDP program attached, by id.
    pub xdp_program: Option<u32>,
}

impl LinkInfo {
    /// Frames for this device can be handed straight to its other end with
    /// `bpf_redirect_peer`: a veth whose other end lives in another namespace (the
    /// kernel refuses a peer in the same one).
    pub fn delivers_to_peer(&self) -> bool {
        self.kind.as_deref() == Some("veth") && self.link_in_other_netns
    }
}

/// The ifindexes of this namespace's devices that deliver to their peer
/// ([`LinkInfo::delivers_to_peer`]).
pub fn peer_devices() -> io::Result<BTreeSet<u32>> {
    Ok(devices()?
        .into_iter()
        .filter(|(_, info)| info.delivers_to_peer())
        .map(|(ifindex, _)| ifindex)
        .collect())
}

/// The id of the XDP program on device `ifindex`, if one is attached.
pub fn xdp_program(ifindex: u32) -> io::Result<Option<u32>> {
    Ok(devices()?
        .remove(&ifindex)
        .and_then(|info| info.xdp_program))
}

/// Every device of this namespace, by ifindex: one rtnetlink dump of every link, so
/// the cost of a refresh does not grow with a request per port.
pub fn devices() -> io::Result<BTreeMap<u32, LinkInfo>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    // Without the devices' statistics, which are most of each message and not read.
    let header = rtnl::NLMSG_HDRLEN + rtnl::IFINFOMSG_LEN;
    let len = header + 8;
    let mut request = vec![0u8; len];
    request[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    request[4..6].copy_from_slice(&rtnl::RTM_GETLINK.to_ne_bytes());
    request[6..8].copy_from_slice(&(rtnl::NLM_F_REQUEST | rtnl::NLM_F_DUMP).to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    request[header..header + 2].copy_from_slice(&8u16.to_ne_bytes());
    request[header + 2..header + 4].copy_from_slice(&rtnl::IFLA_EXT_MASK.to_ne_bytes());
    request[header + 4..header + 8].copy_from_slice(&rtnl::RTEXT_FILTER_SKIP_STATS.to_ne_bytes());
    socket.send_to(&request, &SocketAddr::new(0, 0), 0)?;
    let mut devices = BTreeMap::new();
    let mut reply = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut reply[..], 0)?;
        for message in messages(&reply[..n]) {
            match parse_link(message)? {
                Some((ifindex, info)) => {
                    devices.insert(ifindex, info);
                }
                None => return Ok(devices),
            }
        }
    }
}

/// The netlink messages in one datagram, each padded to 4 bytes.
fn messages(mut buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let len = u32::from_ne_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
        let message = buf.get(..len).filter(|_| len >= rtnl::NLMSG_HDRLEN)?;
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some(message)
    })
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("rtnetlink reply: {what}"),
    )
}

fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

/// Netlink attributes in `buf`: (type, payload), each padded to 4 bytes.
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(buf, 0)?);
        let kind = u16_at(buf, 2)? & rtnl::NLA_TYPE_MASK;
        let payload = buf.get(4..len)?;
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, payload))
    })
}

/// One message of a link dump: a device's ifindex and `LinkInfo`, or `None` at the
/// dump's end.
fn parse_link(msg: &[u8]) -> io::Result<Option<(u32, LinkInfo)>> {
    let kind = u16_at(msg, 4).ok_or_else(|| invalid("short header"))?;
    let body = msg
        .get(rtnl::NLMSG_HDRLEN..)
        .ok_or_else(|| invalid("truncated message"))?;
    match kind {
        rtnl::NLMSG_DONE => return Ok(None),
        rtnl::NLMSG_ERROR => {
            let errno = i32::from_ne_bytes(
                body.get(0..4)
                    .ok_or_else(|| invalid("short error"))?
                    .try_into()
                    .map_err(|_| invalid("short error"))?,
            );
            return Err(io::Error::from_raw_os_error(-errno));
        }
        rtnl::RTM_NEWLINK => {}
        _ => return Err(invalid(&format!("message type {kind}"))),
    }
    let ifindex = body
        .get(4..8)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or_else(|| invalid("short ifinfomsg"))?;
    let attrs = body
        .get(rtnl::IFINFOMSG_LEN..)
        .ok_or_else(|| invalid("short ifinfomsg"))?;
    let mut info = LinkInfo::default();
    for (attr, payload) in attributes(attrs) {
        match attr {
            rtnl::IFLA_IFNAME => {
                let text = payload.split(|b| *b == 0).next().unwrap_or_default();
                info.name = String::from_utf8_lossy(text).into_owned();
            }
            rtnl::IFLA_LINK_NETNSID => info.link_in_other_netns = true,
            rtnl::IFLA_LINKINFO => {
                for (nested, value) in attributes(payload) {
                    if nested == rtnl::IFLA_INFO_KIND {
                        let text = value.split(|b| *b == 0).next().unwrap_or_default();
                        info.kind = Some(String::from_utf8_lossy(text).into_owned());
                    }
                }
            }
            rtnl::IFLA_XDP => {
                info.xdp_program = attributes(payload)
                    .find(|(nested, _)| *nested == rtnl::IFLA_XDP_PROG_ID)
                    .and_then(|(_, value)| value.get(0..4)?.try_into().ok())
                    .map(u32::from_ne_bytes)
                    .filter(|id| *id != 0);
            }
            _ => {}
        }
    }
    Ok(Some((ifindex, info)))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((rtnl::NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m
    }

    fn newlink(ifindex: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![0u8; rtnl::IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        for a in attrs {
            body.extend_from_slice(a);
        }
        message(rtnl::RTM_NEWLINK, &body)
    }

    fn info(msg: &[u8]) -> LinkInfo {
        parse_link(msg).unwrap().unwrap().1
    }

    #[test]
    fn a_veth_with_its_peer_elsewhere_delivers_to_the_peer() {
        let kind = attribute(rtnl::IFLA_INFO_KIND, b"veth\0");
        // The nested flag bit on IFLA_LINKINFO, as the kernel sends it.
        let linkinfo = attribute(rtnl::IFLA_LINKINFO | 0x8000, &kind);
        let ifname = attribute(3, b"port-a\0");
        let netnsid = attribute(rtnl::IFLA_LINK_NETNSID, &0i32.to_ne_bytes());
        let peer = newlink(7, &[ifname.clone(), linkinfo.clone(), netnsid]);
        assert_eq!(parse_link(&peer).unwrap().unwrap().0, 7);
        let peer = info(&peer);
        assert_eq!(peer.name, "port-a");
        assert_eq!(peer.kind.as_deref(), Some("veth"));
        assert!(peer.link_in_other_netns && peer.delivers_to_peer());

        // Both ends in this namespace: no netnsid, no shortcut.
        assert!(!info(&newlink(8, &[ifname.clone(), linkinfo])).delivers_to_peer());

        // A tap has its own kind and no peer.
        let tun = attribute(
            rtnl::IFLA_LINKINFO,
            &attribute(rtnl::IFLA_INFO_KIND, b"tun\0"),
        );
        assert!(!info(&newlink(9, &[ifname, tun])).delivers_to_peer());
    }

    #[test]
    fn the_attached_xdp_program_is_read_from_ifla_xdp() {
        let xdp = |id: u32| {
            let mut nested = attribute(1, &[1]); // IFLA_XDP_ATTACHED: driver
            nested.extend(attribute(rtnl::IFLA_XDP_PROG_ID, &id.to_ne_bytes()));
            attribute(rtnl::IFLA_XDP | 0x8000, &nested)
        };
        assert_eq!(info(&newlink(3, &[xdp(42)])).xdp_program, Some(42));
        // Id 0, or no attribute: nothing attached.
        assert_eq!(info(&newlink(3, &[xdp(0)])).xdp_program, None);
        assert_eq!(info(&newlink(3, &[])).xdp_program, None);
    }

    #[test]
    fn a_dump_splits_into_messages_and_ends_at_done() {
        let mut datagram = newlink(1, &[attribute(3, b"lo\0")]);
        datagram.extend(newlink(2, &[attribute(3, b"eth0\0")]));
        datagram.extend(message(rtnl::NLMSG_DONE, &[0; 4]));
        let parsed: Vec<_> = messages(&datagram)
            .map(|m| parse_link(m).unwrap().map(|(ifindex, _)| ifindex))
            .collect();
        assert_eq!(parsed, [Some(1), Some(2), None]);
    }

    #[test]
    fn errors_and_garbage_are_errors() {
        let enodev = message(rtnl::NLMSG_ERROR, &(-libc::ENODEV).to_ne_bytes());
        let err = parse_link(&enodev).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
        assert!(parse_link(&[1, 2, 3]).is_err());
        assert!(parse_link(&message(99, &[0; 16])).is_err());
        assert!(parse_link(&message(rtnl::RTM_NEWLINK, &[0; 2])).is_err());
        // A message shorter than a header, or claiming more than there is, ends the walk.
        assert_eq!(messages(&[4, 0, 0, 0, 0, 0]).count(), 0);
        assert_eq!(messages(&[200, 0, 0, 0, 0, 0, 0, 0]).count(), 0);
        // An attribute claiming more than there is ends the attribute walk.
        let mut truncated = newlink(3, &[attribute(3, b"port\0")]);
        let at = rtnl::NLMSG_HDRLEN + rtnl::IFINFOMSG_LEN;
        truncated[at..at + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(info(&truncated), LinkInfo::default());
    }
}
