//! Neighbour resolution on a raw packet socket: ARP for IPv4 (`arp`), neighbour
//! discovery for IPv6 (`nd`).
//!
//! The datapath sends frames out of the uplink straight to the upstream gateway, so it
//! needs the gateway's MAC address. The uplink has no IP address in the host stack,
//! which means the kernel never resolves neighbours on it and its neighbour table
//! stays empty: the agent asks the gateway itself, with a request sent on an AF_PACKET
//! socket bound to the uplink.

mod arp;
mod nd;

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

/// How often the request goes out again while no reply has come: a single frame may
/// be lost, or arrive before the gateway's port is ready.
const RESEND_INTERVAL: Duration = Duration::from_millis(200);

const ETH_HLEN: usize = 14;

/// Asks for the MAC of `target` on `ifindex`, as `source` at `source_mac` (both of one
/// address family), and returns the MAC address of the first answer from `target`, or
/// `None` if none came within `timeout`. The request is repeated every 200 ms until
/// then.
pub fn resolve(
    ifindex: u32,
    source_mac: [u8; 6],
    source: IpAddr,
    target: IpAddr,
    timeout: Duration,
) -> io::Result<Option<[u8; 6]>> {
    match (source, target) {
        (IpAddr::V4(source), IpAddr::V4(target)) => exchange(
            ifindex,
            libc::ETH_P_ARP as u16,
            &arp::request(source_mac, source, target),
            |frame| arp::parse_reply(frame, target),
            timeout,
        ),
        (IpAddr::V6(source), IpAddr::V6(target)) => exchange(
            ifindex,
            libc::ETH_P_IPV6 as u16,
            &nd::solicitation(source_mac, source, target),
            |frame| nd::parse_advertisement(frame, target),
            timeout,
        ),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("resolving {target} from {source}: not one address family"),
        )),
    }
}

/// Sends `request` on a socket for ethertype `protocol` until `parse` takes a frame
/// for the answer, or `timeout` passes.
fn exchange(
    ifindex: u32,
    protocol: u16,
    request: &[u8],
    parse: impl Fn(&[u8]) -> Option<[u8; 6]>,
    timeout: Duration,
) -> io::Result<Option<[u8; 6]>> {
    let deadline = Instant::now() + timeout;
    let socket = bind(ifindex, protocol)?;
    send(&socket, request)?;
    let mut next_send = Instant::now() + RESEND_INTERVAL;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        if now >= next_send {
            send(&socket, request)?;
            next_send = now + RESEND_INTERVAL;
        }
        if wait_readable(&socket, next_send.min(deadline) - now)? {
            if let Some(mac) = receive_reply(&socket, &parse)? {
                return Ok(Some(mac));
            }
        }
    }
}

/// `mac` if the datapath can send to it: a zero or group address would have it send
/// the uplink's traffic nowhere or everywhere.
fn usable_mac(mac: [u8; 6]) -> Option<[u8; 6]> {
    (mac != [0; 6] && mac[0] & 1 == 0).then_some(mac)
}

/// A packet socket that sends on `ifindex` and receives only frames of ethertype
/// `protocol` from it.
fn bind(ifindex: u32, protocol: u16) -> io::Result<OwnedFd> {
    // Protocol 0 receives nothing until `bind` names the protocol and device, so no
    // frame from another device can queue up in between.
    // SAFETY: plain syscall with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(context(io::Error::last_os_error(), "socket(AF_PACKET)"));
    }
    // SAFETY: `fd` was just returned by `socket` and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `sockaddr_ll` is plain data, valid when zeroed.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: the address is a valid `sockaddr_ll` and its size is passed along.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(context(
            io::Error::last_os_error(),
            format_args!("binding a packet socket to ifindex {ifindex}"),
        ));
    }
    Ok(socket)
}

/// Sends `frame` out of the device the socket is bound to.
fn send(socket: &OwnedFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: the buffer is valid for `frame.len()` bytes.
    let sent = unsafe { libc::send(socket.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    if sent < 0 {
        return Err(context(
            io::Error::last_os_error(),
            "sending a neighbour request",
        ));
    }
    if sent as usize != frame.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!(
                "sent {sent} of {} bytes of a neighbour request",
                frame.len()
            ),
        ));
    }
    Ok(())
}

/// Waits up to `timeout` for a frame to read; `false` when none came.
fn wait_readable(socket: &OwnedFd, timeout: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // Rounded up: rounding down would spin on a zero timeout for the last millisecond.
    let millis = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: one valid `pollfd`, and the count says so.
    let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
    if ready < 0 {
        let err = io::Error::last_os_error();
        // A signal only cuts the wait short; the caller's loop waits again.
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(context(err, "polling a packet socket"));
    }
    Ok(ready > 0)
}

/// Reads every queued frame and returns the MAC of the first that `parse` takes for
/// the reply.
fn receive_reply(
    socket: &OwnedFd,
    parse: &impl Fn(&[u8]) -> Option<[u8; 6]>,
) -> io::Result<Option<[u8; 6]>> {
    let mut buf = [0u8; 128];
    loop {
        // SAFETY: `sockaddr_ll` is plain data, valid when zeroed.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: the buffer and the address are valid for the sizes passed along;
        // longer frames are truncated, which only cuts what follows the reply's headers.
        let len = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                std::ptr::from_mut(&mut from).cast(),
                &mut from_len,
            )
        };
        if len < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => return Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(context(err, "receiving on a packet socket")),
            }
        }
        // The socket also sees what the host itself sends on the device.
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        if let Some(mac) = parse(&buf[..len as usize]) {
            return Ok(Some(mac));
        }
    }
}

/// `err`, of the same kind, prefixed with what was being done.
fn context(err: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}
