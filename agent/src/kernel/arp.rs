//! IPv4 neighbour resolution on a raw packet socket.
//!
//! The datapath sends frames out of the uplink straight to the upstream gateway, so it
//! needs the gateway's MAC address. The uplink has no IP address in the host stack,
//! which means the kernel never resolves neighbours on it and its neighbour table
//! stays empty: the agent asks the gateway itself, with an ARP request sent on an
//! AF_PACKET socket bound to the uplink.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

/// How often the request goes out again while no reply has come: a single frame may
/// be lost, or arrive before the gateway's port is ready.
const RESEND_INTERVAL: Duration = Duration::from_millis(200);

const ETH_HLEN: usize = 14;
/// An ARP packet for Ethernet and IPv4 (RFC 826): hardware and protocol types and
/// lengths, opcode, then sender and target hardware and protocol addresses.
const ARP_LEN: usize = 28;
const FRAME_LEN: usize = ETH_HLEN + ARP_LEN;
const BROADCAST: [u8; 6] = [0xff; 6];

/// Asks who has `target` on `ifindex`, as `source_ip` at `source_mac`, and returns the
/// MAC address of the first reply from `target`, or `None` if none came within
/// `timeout`. The request is repeated every 200 ms until then.
pub fn resolve4(
    ifindex: u32,
    source_mac: [u8; 6],
    source_ip: Ipv4Addr,
    target: Ipv4Addr,
    timeout: Duration,
) -> io::Result<Option<[u8; 6]>> {
    let deadline = Instant::now() + timeout;
    let socket = bind(ifindex)?;
    let request = request_frame(source_mac, source_ip, target);
    send(&socket, &request)?;
    let mut next_send = Instant::now() + RESEND_INTERVAL;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        if now >= next_send {
            send(&socket, &request)?;
            next_send = now + RESEND_INTERVAL;
        }
        if wait_readable(&socket, next_send.min(deadline) - now)? {
            if let Some(mac) = receive_reply(&socket, target)? {
                return Ok(Some(mac));
            }
        }
    }
}

/// A broadcast ARP request: who has `target`, tell `source_ip` at `source_mac`.
pub fn request_frame(source_mac: [u8; 6], source_ip: Ipv4Addr, target: Ipv4Addr) -> [u8; 42] {
    let mut frame = [0u8; FRAME_LEN];
    frame[0..6].copy_from_slice(&BROADCAST);
    frame[6..12].copy_from_slice(&source_mac);
    frame[12..14].copy_from_slice(&(libc::ETH_P_ARP as u16).to_be_bytes());
    let arp = &mut frame[ETH_HLEN..];
    arp[0..2].copy_from_slice(&libc::ARPHRD_ETHER.to_be_bytes());
    arp[2..4].copy_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&libc::ARPOP_REQUEST.to_be_bytes());
    arp[8..14].copy_from_slice(&source_mac);
    arp[14..18].copy_from_slice(&source_ip.octets());
    // The target hardware address stays zero: it is what the request asks for.
    arp[24..28].copy_from_slice(&target.octets());
    frame
}

/// The sender hardware address of `frame` if it is an Ethernet/IPv4 ARP reply from
/// `target` that names a usable unicast address.
fn parse_reply(frame: &[u8], target: Ipv4Addr) -> Option<[u8; 6]> {
    let arp = frame.get(ETH_HLEN..FRAME_LEN)?;
    let be16 = |at: usize| u16::from_be_bytes([arp[at], arp[at + 1]]);
    let is_reply = frame[12..14] == (libc::ETH_P_ARP as u16).to_be_bytes()
        && be16(0) == libc::ARPHRD_ETHER
        && be16(2) == libc::ETH_P_IP as u16
        && arp[4] == 6
        && arp[5] == 4
        && be16(6) == libc::ARPOP_REPLY;
    if !is_reply || arp[14..18] != target.octets() {
        return None;
    }
    let mac: [u8; 6] = arp[8..14].try_into().ok()?;
    // A zero or group address would have the datapath send the uplink's traffic
    // nowhere or everywhere.
    if mac == [0; 6] || mac[0] & 1 != 0 {
        return None;
    }
    Some(mac)
}

/// A packet socket that sends on `ifindex` and receives only ARP frames from it.
fn bind(ifindex: u32) -> io::Result<OwnedFd> {
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
    addr.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
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
            format_args!("binding an ARP socket to ifindex {ifindex}"),
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
            "sending an ARP request",
        ));
    }
    if sent as usize != frame.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes of an ARP request", frame.len()),
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
        return Err(context(err, "polling an ARP socket"));
    }
    Ok(ready > 0)
}

/// Reads every queued frame and returns the first reply from `target`.
fn receive_reply(socket: &OwnedFd, target: Ipv4Addr) -> io::Result<Option<[u8; 6]>> {
    let mut buf = [0u8; 128];
    loop {
        // SAFETY: `sockaddr_ll` is plain data, valid when zeroed.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: the buffer and the address are valid for the sizes passed along;
        // longer frames are truncated, which only cuts what follows the ARP packet.
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
                _ => return Err(context(err, "receiving on an ARP socket")),
            }
        }
        // The socket also sees what the host itself sends on the device.
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        if let Some(mac) = parse_reply(&buf[..len as usize], target) {
            return Ok(Some(mac));
        }
    }
}

/// `err`, of the same kind, prefixed with what was being done.
fn context(err: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const GATEWAY: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01];
    const MY_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

    /// The gateway's answer to `request_frame(ME, MY_IP, GATEWAY_IP)`.
    fn reply() -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&ME);
        frame.extend_from_slice(&GATEWAY);
        frame.extend_from_slice(&[0x08, 0x06]);
        frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
        frame.extend_from_slice(&GATEWAY);
        frame.extend_from_slice(&GATEWAY_IP.octets());
        frame.extend_from_slice(&ME);
        frame.extend_from_slice(&MY_IP.octets());
        frame
    }

    #[test]
    fn the_request_is_a_broadcast_who_has() {
        #[rustfmt::skip]
        let expected: [u8; 42] = [
            // Ethernet: broadcast, from us, ARP.
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x02, 0, 0, 0, 0, 0x0a,
            0x08, 0x06,
            // Ethernet/IPv4, lengths 6 and 4, request.
            0, 1, 0x08, 0x00, 6, 4, 0, 1,
            // Sender: our MAC and address.
            0x02, 0, 0, 0, 0, 0x0a, 203, 0, 113, 10,
            // Target: unknown MAC, the address asked about.
            0, 0, 0, 0, 0, 0, 203, 0, 113, 1,
        ];
        assert_eq!(request_frame(ME, MY_IP, GATEWAY_IP), expected);
    }

    #[test]
    fn a_reply_from_the_target_gives_its_mac() {
        assert_eq!(parse_reply(&reply(), GATEWAY_IP), Some(GATEWAY));
    }

    #[test]
    fn ethernet_padding_after_the_reply_is_ignored() {
        let mut frame = reply();
        frame.resize(60, 0);
        assert_eq!(parse_reply(&frame, GATEWAY_IP), Some(GATEWAY));
    }

    #[test]
    fn requests_are_not_replies() {
        let request = request_frame(GATEWAY, GATEWAY_IP, MY_IP);
        assert_eq!(parse_reply(&request, GATEWAY_IP), None);
        let mut frame = reply();
        frame[21] = 1;
        assert_eq!(parse_reply(&frame, GATEWAY_IP), None);
    }

    #[test]
    fn replies_from_other_addresses_are_ignored() {
        assert_eq!(parse_reply(&reply(), Ipv4Addr::new(203, 0, 113, 99)), None);
    }

    #[test]
    fn short_frames_are_ignored() {
        let frame = reply();
        for len in [0, 13, 14, 41] {
            assert_eq!(parse_reply(&frame[..len], GATEWAY_IP), None, "{len} bytes");
        }
    }

    #[test]
    fn other_protocols_and_address_kinds_are_ignored() {
        // Ethertype, hardware type, protocol type, hardware length, protocol length.
        for (at, value) in [(12, 0x86), (15, 6), (16, 0x86), (18, 8), (19, 16)] {
            let mut frame = reply();
            frame[at] = value;
            assert_eq!(parse_reply(&frame, GATEWAY_IP), None, "byte {at} = {value}");
        }
    }

    #[test]
    fn zero_and_group_sender_addresses_are_ignored() {
        for mac in [[0; 6], BROADCAST, [0x01, 0, 0x5e, 0, 0, 1]] {
            let mut frame = reply();
            frame[22..28].copy_from_slice(&mac);
            assert_eq!(parse_reply(&frame, GATEWAY_IP), None, "{mac:02x?}");
        }
    }
}
