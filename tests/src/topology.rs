//! VMs for integration tests: each a namespace whose `eth0` is a veth whose other end
//! (the port's device) lives in the node namespace the agent runs in.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;

use crate::netns::NetNs;

/// The VM's interface name inside its namespace.
pub const VM_DEV: &str = "eth0";

pub struct Vm {
    pub ns: NetNs,
    /// The port's device in the node namespace (`binding.interface_name`).
    pub device: String,
    pub mac: [u8; 6],
}

/// Outcome of a bounded ping run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingResult {
    pub transmitted: u32,
    pub received: u32,
}

impl PingResult {
    pub fn all_replied(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }

    pub fn none_replied(&self) -> bool {
        self.received == 0
    }
}

impl Vm {
    /// Creates the VM namespace and its veth: `eth0` (with `mac` and `addresses`) in the
    /// VM, `device` in `node`. IPv6 addresses skip DAD so tests need not wait for it.
    pub fn create(
        node: &NetNs,
        tag: &str,
        device: &str,
        mac: [u8; 6],
        addresses: &[IpNet],
    ) -> Result<Vm> {
        let ns = NetNs::new(tag)?;
        node.add_veth(device, Some(&ns), VM_DEV)?;
        ns.set_up(VM_DEV, false)?;
        ns.set_mac(VM_DEV, mac)?;
        ns.set_up(VM_DEV, true)?;
        let vm = Vm {
            ns,
            device: device.to_owned(),
            mac,
        };
        for address in addresses {
            vm.add_address(*address)?;
        }
        Ok(vm)
    }

    /// VMs `<tag>-a` (10.0.0.1/24 on `tap-a`, MAC fa:16:3e:00:00:01) and `<tag>-b`
    /// (10.0.0.2/24 on `tap-b`, fa:16:3e:00:00:02) on `node`.
    pub fn pair(node: &NetNs, tag: &str) -> Result<(Vm, Vm)> {
        let a = Vm::create(
            node,
            &format!("{tag}-a"),
            "tap-a",
            [0xfa, 0x16, 0x3e, 0, 0, 1],
            &["10.0.0.1/24".parse()?],
        )?;
        let b = Vm::create(
            node,
            &format!("{tag}-b"),
            "tap-b",
            [0xfa, 0x16, 0x3e, 0, 0, 2],
            &["10.0.0.2/24".parse()?],
        )?;
        Ok((a, b))
    }

    pub fn add_address(&self, address: IpNet) -> Result<()> {
        let text = address.to_string();
        match address {
            IpNet::V4(_) => self.ns.ip(&["addr", "add", &text, "dev", VM_DEV])?,
            IpNet::V6(_) => self
                .ns
                .ip(&["-6", "addr", "add", &text, "dev", VM_DEV, "nodad"])?,
        };
        Ok(())
    }

    pub fn del_address(&self, address: IpNet) -> Result<()> {
        self.ns
            .ip(&["addr", "del", &address.to_string(), "dev", VM_DEV])
            .map(drop)
    }

    /// Pings `destination` `count` times, 0.2 s apart, each waiting at most 1 s, the
    /// whole run bounded by `count` + 2 seconds.
    pub fn ping(&self, destination: IpAddr, count: u32) -> Result<PingResult> {
        let count_text = count.to_string();
        let deadline = (count + 2).to_string();
        let destination = destination.to_string();
        let out = self.ns.exec(&[
            "ping",
            "-n",
            "-q",
            "-c",
            &count_text,
            "-i",
            "0.2",
            "-W",
            "1",
            "-w",
            &deadline,
            &destination,
        ])?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_ping(&text).with_context(|| format!("ping output: {text}"))
    }

    /// Sends one raw Ethernet frame out of the VM's `eth0`, as a VM could.
    pub fn send_frame(&self, frame: &[u8]) -> Result<()> {
        let frame = frame.to_vec();
        self.ns.run(move || send_raw(VM_DEV, &frame))?
    }

    /// Waits (at most `timeout`) for `predicate` over this VM's captured frames: runs a
    /// packet socket on `eth0` while `trigger` runs, and returns every frame received.
    pub fn capture_while<T>(
        &self,
        timeout: Duration,
        trigger: impl FnOnce() -> Result<T> + Send,
    ) -> Result<(T, Vec<Vec<u8>>)>
    where
        T: Send,
    {
        let socket = self.ns.run(|| open_packet_socket(VM_DEV))??;
        let result = trigger()?;
        let frames = receive_until(&socket, timeout)?;
        Ok((result, frames))
    }
}

fn parse_ping(text: &str) -> Result<PingResult> {
    // "5 packets transmitted, 5 received, 0% packet loss, time 804ms"
    let line = text
        .lines()
        .find(|line| line.contains("packets transmitted"))
        .context("no summary line")?;
    let mut numbers = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(str::parse::<u32>);
    let transmitted = numbers.next().context("no transmitted count")??;
    let received = numbers.next().context("no received count")??;
    Ok(PingResult {
        transmitted,
        received,
    })
}

fn open_packet_socket(dev: &str) -> Result<OwnedFd> {
    let ifindex = nix::net::if_::if_nametoindex(dev)?;
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain syscalls; the fd is owned right away.
    let socket = unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol as i32);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        OwnedFd::from_raw_fd(fd)
    };
    // Room for bursts (the benchmark's generator sends thousands of frames per run):
    // 16 MiB, beyond rmem_max (we are root).
    let buffer: libc::c_int = 16 << 20;
    // SAFETY: plain syscall with a pointer to an int of the size given.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::from_ref(&buffer).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = protocol;
    address.sll_ifindex = ifindex as i32;
    // SAFETY: `address` is a valid sockaddr_ll of the length given.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            &address as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if bound != 0 {
        return Err(std::io::Error::last_os_error()).context("binding AF_PACKET socket");
    }
    Ok(socket)
}

fn send_raw(dev: &str, frame: &[u8]) -> Result<()> {
    let socket = open_packet_socket(dev)?;
    // SAFETY: sending from a valid buffer on a bound socket.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
        )
    };
    if sent != frame.len() as isize {
        bail!("send_raw: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Frames arriving on the socket (incoming only) until `timeout` passes.
fn receive_until(socket: &OwnedFd, timeout: Duration) -> Result<Vec<Vec<u8>>> {
    let deadline = std::time::Instant::now() + timeout;
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(frames);
        }
        let mut poll = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis().max(1) as i32) };
        if ready <= 0 {
            continue;
        }
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: valid buffer and address of the stated sizes.
        let n = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
                &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut from_len,
            )
        };
        if n > 0 && from.sll_pkttype != libc::PACKET_OUTGOING {
            frames.push(buf[..n as usize].to_vec());
        }
    }
}
