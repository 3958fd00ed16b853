//! Latency on request/response traffic, in the namespaces of the traffic parts: a TCP
//! echo server in B, a client in A.
//!
//! - TCP_RR-style: one connection (`TCP_NODELAY`), one byte sent and echoed back,
//!   `transactions` times; each round trip timed; p50, p90, p99 per round.
//! - First packet of a new flow: `connects` new connections, each from a new source
//!   port, each `connect()` timed (SYN out, SYN/ACK back: the first packet of a flow
//!   both ways, conntrack entries created on the way); p50 and p99 per round.
//!
//! Two scenarios: L2 switching (ours against a Linux bridge, see `l2`) and security
//! groups with `rules` rules (ours against iptables as Neutron writes it, both
//! backends, and nftables sets, see `traffic`), the policy also allowing TCP to the
//! server. Checks: every transaction returns its byte, every connection is accepted,
//! and a connection to a port no rule allows (security groups) does not open.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use dataplane_tests::netns::NetNs;

use crate::{
    l2::{self, Switch},
    results::{Better, Context, Part, Record},
    traffic::{self, BenchRule, System},
    SERVER_PORT,
};

/// A TCP port no rule allows.
const DENIED_TCP_PORT: u16 = 5004;

/// Per-round percentiles, in µs.
#[derive(Clone, Copy, Debug)]
struct Latencies {
    rr: [f64; 3],
    connect: [f64; 2],
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Runs both measurements from `client` to the server `server` starts in its
/// namespace at `to`.
fn measure(
    client: &NetNs,
    server: &NetNs,
    to: SocketAddr,
    transactions: u32,
    connects: u32,
) -> Result<Latencies> {
    let listener = server.run(|| TcpListener::bind(to))??;
    // Polled, so the server gives up when the client does.
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let accept = move |listener: &TcpListener| -> Result<TcpStream> {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false)?;
                    return Ok(stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ensure!(Instant::now() < deadline, "no client connected in time");
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    // The connections of the first-packet measurement, then the echoed one.
    let server_thread = std::thread::spawn(move || -> Result<()> {
        for _ in 0..connects {
            drop(accept(&listener)?);
        }
        let mut stream = accept(&listener)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut byte = [0u8; 1];
        loop {
            match stream.read(&mut byte)? {
                0 => return Ok(()),
                _ => stream.write_all(&byte)?,
            }
        }
    });
    let timeout = Duration::from_secs(2);
    let result = client.run(|| -> Result<Latencies> {
        let mut connect = Vec::with_capacity(connects as usize);
        for _ in 0..connects {
            let start = Instant::now();
            let stream = TcpStream::connect_timeout(&to, timeout).context("connecting")?;
            connect.push(start.elapsed().as_secs_f64() * 1e6);
            drop(stream);
        }
        let mut stream = TcpStream::connect_timeout(&to, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        let mut rr = Vec::with_capacity(transactions as usize);
        let mut byte = [7u8; 1];
        for _ in 0..transactions {
            let start = Instant::now();
            stream.write_all(&byte)?;
            stream
                .read_exact(&mut byte)
                .context("waiting for the echo")?;
            rr.push(start.elapsed().as_secs_f64() * 1e6);
        }
        ensure!(byte == [7], "the echo changed the byte");
        drop(stream);
        rr.sort_by(f64::total_cmp);
        connect.sort_by(f64::total_cmp);
        Ok(Latencies {
            rr: [0.5, 0.9, 0.99].map(|p| percentile(&rr, p)),
            connect: [0.5, 0.99].map(|p| percentile(&connect, p)),
        })
    })?;
    let served = server_thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    let latencies = result?;
    served.context("the echo server")?;
    Ok(latencies)
}

/// A connection to a port no rule allows must not open.
fn denied(client: &NetNs, server: &NetNs, to: SocketAddr) -> Result<()> {
    let to = SocketAddr::new(to.ip(), DENIED_TCP_PORT);
    let _listener = server.run(|| TcpListener::bind(to))??;
    let opened = client.run(|| TcpStream::connect_timeout(&to, Duration::from_millis(300)))?;
    ensure!(
        opened.is_err(),
        "a connection to port {DENIED_TCP_PORT}, which no rule allows, opened"
    );
    Ok(())
}

/// The part: both scenarios, every system, `rounds` times interleaved.
pub struct Latency {
    pub rules: usize,
    pub rounds: usize,
    pub transactions: u32,
    pub connects: u32,
}

const SG_SYSTEMS: [System; 4] = System::ALL;
const SWITCHES: [Switch; 2] = [Switch::Ours, Switch::LinuxBridge];

/// The security-group ports of `traffic` with TCP to the server allowed too.
fn sg_ports(rules: usize) -> [traffic::BenchPort; 2] {
    let mut ports = traffic::ports(rules);
    let tcp = BenchRule {
        remote: "10.0.0.0/24".parse().expect("a prefix"),
        protocol_name: "tcp",
        port: SERVER_PORT,
    };
    ports[0].egress.push(tcp.clone());
    ports[1].ingress.push(tcp);
    ports
}

impl Part for Latency {
    fn name(&self) -> &'static str {
        "latency"
    }

    fn steps(&self) -> u64 {
        (self.rounds * (SG_SYSTEMS.len() + SWITCHES.len())) as u64
    }

    fn run(&mut self, ctx: &mut Context<'_>) -> Result<()> {
        let to = SocketAddr::new(l2::B_IP.into(), SERVER_PORT);
        let mut l2_results: Vec<(Switch, Vec<Latencies>)> =
            SWITCHES.iter().map(|s| (*s, vec![])).collect();
        let mut sg_results: Vec<(System, Vec<Latencies>)> =
            SG_SYSTEMS.iter().map(|s| (*s, vec![])).collect();
        let ports = sg_ports(self.rules);
        for round in 0..self.rounds {
            for (switch, out) in &mut l2_results {
                ctx.progress.step(&format!(
                    "latency: round {}/{}, L2, {}",
                    round + 1,
                    self.rounds,
                    switch.name()
                ));
                let topo = l2::Topology::build(*switch, ctx.lab)?;
                let r = measure(&topo.a.ns, &topo.b.ns, to, self.transactions, self.connects);
                topo.release(*switch, ctx.lab)?;
                out.push(r?);
            }
            for (system, out) in &mut sg_results {
                ctx.progress.step(&format!(
                    "latency: round {}/{}, security groups, {}",
                    round + 1,
                    self.rounds,
                    system.name()
                ));
                let topo = traffic::configure(*system, &ports, ctx.lab)?;
                let r = denied(&topo.a.ns, &topo.b.ns, to).and_then(|()| {
                    measure(&topo.a.ns, &topo.b.ns, to, self.transactions, self.connects)
                });
                traffic::release(*system, &topo, ctx.lab)?;
                out.push(r?);
            }
        }
        let l2_scenario = "Latency through L2 switching (TCP, in-namespace)".to_owned();
        let sg_scenario = format!(
            "Latency through security groups, {} rules (TCP, in-namespace)",
            self.rules
        );
        let mut checks = vec![
            "every transaction's byte is echoed back",
            "every connection opens",
        ];
        for (system, latencies) in &l2_results {
            add(ctx, &l2_scenario, system.name(), latencies, &checks, self);
        }
        checks.push("a connection to a port no rule allows does not open");
        for (system, latencies) in &sg_results {
            add(ctx, &sg_scenario, system.name(), latencies, &checks, self);
        }
        Ok(())
    }
}

/// Reads one percentile of a round's latencies.
type Percentile = fn(&Latencies) -> f64;

fn add(
    ctx: &mut Context<'_>,
    scenario: &str,
    system: &str,
    latencies: &[Latencies],
    checks: &[&str],
    part: &Latency,
) {
    let rr_case = format!(
        "TCP_RR, 1-byte request and response, {} transactions",
        part.transactions
    );
    let connect_case = format!(
        "new flow: TCP connect (SYN -> SYN/ACK), {} connections",
        part.connects
    );
    let series: [(&str, &str, Percentile); 5] = [
        (&rr_case, "round trip p50", |l| l.rr[0]),
        (&rr_case, "round trip p90", |l| l.rr[1]),
        (&rr_case, "round trip p99", |l| l.rr[2]),
        (&connect_case, "first-packet round trip p50", |l| {
            l.connect[0]
        }),
        (&connect_case, "first-packet round trip p99", |l| {
            l.connect[1]
        }),
    ];
    for (case, metric, value) in series {
        ctx.results.add(
            Record::new(
                "latency",
                scenario,
                case,
                system,
                metric,
                "µs",
                Better::Lower,
                latencies.iter().map(&value).collect(),
            )
            .checks(checks),
        );
    }
}
