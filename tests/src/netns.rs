//! Network namespaces for tests.
//!
//! A [`NetNs`] is a named namespace (`ip netns add`, so it shows in `ip netns list` and
//! `ip netns exec` works) that is deleted when the guard drops, also while a failing
//! test unwinds. Everything a test creates lives inside namespaces it owns: the root
//! namespace's interfaces are never touched.
//!
//! Two ways to act inside a namespace:
//! - [`NetNs::exec`] / [`NetNs::ip`] run a command in it (`ip netns exec`, `ip -n`);
//! - [`NetNs::run`] runs a closure on a thread that has `setns`-ed into it. Use it for
//!   anything that resolves interfaces in the caller's namespace: BPF_PROG_TEST_RUN on
//!   a `__sk_buff` with an `ifindex`, `bpf_clone_redirect` targets, sockets, netlink,
//!   tcx attach by ifindex.
use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::{AsRawFd, FromRawFd},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, ensure, Context, Result};

/// Length limit of an interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace owned by a test; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `dp-<tag>-<pid>-<n>` with its loopback up. `tag` says which test owns
    /// it, for whoever finds a leftover after a `kill -9`.
    pub fn new(tag: &str) -> Result<NetNs> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("dp-{tag}-{}-{n}", std::process::id());
        run_checked(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating netns {name}"))?;
        // From here on Drop deletes it, whatever fails next.
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the handle `setns` and `ip netns` use.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `argv` inside the namespace (`ip netns exec`) and returns its output,
    /// whatever its exit status.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        let (program, args) = argv.split_first().context("exec: empty argv")?;
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .with_context(|| format!("running {argv:?} in {}", self.name))
    }

    /// As [`NetNs::exec`], failing unless the command exits 0; returns its stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> Result<String> {
        let out = self.exec(argv)?;
        check_output(&out, &format!("{argv:?} in {}", self.name))
    }

    /// `ip -n <name> <args>`, failing unless it exits 0; returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Creates a veth pair: `name` in this namespace, `peer_name` in `peer_ns` (this
    /// namespace when `None`), both up. Returns the ifindex of `name`.
    pub fn add_veth(&self, name: &str, peer_ns: Option<&NetNs>, peer_name: &str) -> Result<u32> {
        for ifname in [name, peer_name] {
            if ifname.is_empty() || ifname.len() > MAX_IFNAME_LEN {
                bail!("interface name {ifname:?} is empty or longer than {MAX_IFNAME_LEN}");
            }
        }
        let peer = peer_ns.unwrap_or(self);
        self.ip(&[
            "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", &peer.name,
        ])?;
        self.ip(&["link", "set", name, "up"])?;
        peer.ip(&["link", "set", peer_name, "up"])?;
        self.ifindex(name)
    }

    /// Sets the MAC address of `dev`.
    pub fn set_mac(&self, dev: &str, mac: [u8; 6]) -> Result<()> {
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        self.ip(&["link", "set", dev, "address", &mac]).map(drop)
    }

    /// Sets `dev` down (`up == false`) or up.
    pub fn set_up(&self, dev: &str, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        self.ip(&["link", "set", dev, state]).map(drop)
    }

    /// The ifindex of `dev` in this namespace.
    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let dev = dev.to_owned();
        self.run(move || {
            nix::net::if_::if_nametoindex(dev.as_str())
                .with_context(|| format!("no interface {dev}"))
        })?
    }

    /// Sends `frame` (from its Ethernet header on) out of `dev` in this namespace
    /// through a raw packet socket, as a VM behind the device would. The frame must be
    /// at least an Ethernet header long.
    pub fn send_frame(&self, dev: &str, frame: &[u8]) -> Result<()> {
        let ifindex = self.ifindex(dev)?;
        self.run(|| send_raw(ifindex, frame))?
            .with_context(|| format!("sending a frame out of {dev} in {}", self.name))
    }

    /// Runs `f` on a new thread that has joined this namespace and returns its result.
    /// A panic in `f` is resumed on the caller's thread. The caller's own thread never
    /// changes namespace.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                // SAFETY: plain syscall on a valid fd; it only changes this new thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("setns into {}", self.name));
                }
                drop(file);
                Ok(f())
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// A namespace holding port devices for programs run with BPF_PROG_TEST_RUN: a veth
/// `<name>` (peer `<name>p`) for each name, with IPv6 off so the host stack adds no
/// traffic of its own. Returns the namespace and each device's ifindex.
pub fn device_lab(tag: &str, names: &[String]) -> Result<(NetNs, BTreeMap<String, u32>)> {
    let ns = NetNs::new(tag)?;
    ns.exec_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])?;
    ns.exec_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"])?;
    let mut devices = BTreeMap::new();
    for name in names {
        devices.insert(name.clone(), ns.add_veth(name, None, &format!("{name}p"))?);
    }
    Ok((ns, devices))
}

/// A number from the environment (test scale and seeds), or `default`.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the name drops the last reference once no thread or fd holds the
        // namespace; its devices (and veth peers elsewhere) go with it.
        if let Err(err) = run_checked(Command::new("ip").args(["netns", "delete", &self.name])) {
            eprintln!("warning: could not delete netns {}: {err:#}", self.name);
        }
    }
}

/// One frame out of `ifindex` of the calling thread's namespace, on an AF_PACKET socket.
fn send_raw(ifindex: u32, frame: &[u8]) -> Result<()> {
    // SAFETY: plain syscalls; the fd is owned right away, the address is a valid
    // `sockaddr_ll` whose size is passed along.
    unsafe {
        // Protocol 0: a send-only socket that receives nothing.
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        let sent = libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        if sent < 0 {
            return Err(std::io::Error::last_os_error()).context("sendto");
        }
        ensure!(
            sent as usize == frame.len(),
            "sent {sent} of {} bytes",
            frame.len()
        );
    }
    Ok(())
}

fn run_checked(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    check_output(&out, &what)
}

fn check_output(out: &Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
