//! Real TCP and UDP traffic between VM namespaces: sockets are created on a thread that
//! has joined the VM's namespace (a socket stays in the namespace it was made in) and
//! then used from anywhere. Every wait is bounded.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::NetNs;

/// How long any single connect, read or write may block.
pub const IO_TIMEOUT: Duration = Duration::from_millis(1500);

/// A TCP echo server in a namespace; stops when dropped.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `address` inside `ns` and echoes every connection's bytes back.
    pub fn tcp(ns: &NetNs, address: SocketAddr) -> Result<EchoServer> {
        let listener = ns.run(move || TcpListener::bind(address))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let stopped = stopped.clone();
                        std::thread::spawn(move || echo(stream, &stopped));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(EchoServer {
            stop,
            thread: Some(thread),
        })
    }
}

fn echo(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects from `ns` to `address` (bounded by [`IO_TIMEOUT`]).
pub fn tcp_connect(ns: &NetNs, address: SocketAddr) -> Result<TcpStream> {
    let stream = ns.run(move || TcpStream::connect_timeout(&address, IO_TIMEOUT))??;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Sends `message` and waits for it to come back.
pub fn echo_round_trip(stream: &mut TcpStream, message: &[u8]) -> Result<()> {
    stream.write_all(message)?;
    let mut back = vec![0u8; message.len()];
    stream
        .read_exact(&mut back)
        .context("no echo came back in time")?;
    anyhow::ensure!(back == message, "echo differs");
    Ok(())
}

/// Whether a TCP connection from `ns` to `address` opens and echoes.
pub fn tcp_works(ns: &NetNs, address: SocketAddr) -> bool {
    tcp_connect(ns, address)
        .and_then(|mut stream| echo_round_trip(&mut stream, b"ping"))
        .is_ok()
}

/// A UDP socket bound in `ns`, reads bounded by [`IO_TIMEOUT`].
pub fn udp_socket(ns: &NetNs, address: SocketAddr) -> Result<UdpSocket> {
    let socket = ns.run(move || UdpSocket::bind(address))??;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(socket)
}

/// Sends one datagram from `from` (in `ns`) to `to` in `server_ns`, has the receiver
/// answer it and the answer come back, and returns the source the receiver saw.
pub fn udp_exchange(
    ns: &NetNs,
    from: SocketAddr,
    server_ns: &NetNs,
    to: SocketAddr,
) -> Result<SocketAddr> {
    udp_exchange_via(ns, from, server_ns, to, to)
}

/// As [`udp_exchange`], to a server listening on `listen` that the sender knows as `to`
/// (a floating IP of it).
pub fn udp_exchange_via(
    ns: &NetNs,
    from: SocketAddr,
    server_ns: &NetNs,
    listen: SocketAddr,
    to: SocketAddr,
) -> Result<SocketAddr> {
    let server = udp_socket(server_ns, listen)?;
    let client = udp_socket(ns, from)?;
    client.send_to(b"hello", to)?;
    let mut buf = [0u8; 64];
    let (len, seen) = server
        .recv_from(&mut buf)
        .context("the datagram did not arrive")?;
    server.send_to(&buf[..len], seen)?;
    let (_, back) = client
        .recv_from(&mut buf)
        .context("the answer did not come back")?;
    anyhow::ensure!(back == to, "the answer came from {back}, not {to}");
    Ok(seen)
}
