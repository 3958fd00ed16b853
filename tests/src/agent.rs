//! The real agent binary, started inside a test's "node" namespace and stopped (SIGTERM,
//! then SIGKILL) when the guard drops. Each agent pins into a bpffs of its own, mounted
//! for it, which outlives restarts of the agent and is unmounted (detaching whatever is
//! still attached) when the guard drops.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dataplane_abi::map_names;
use dataplane_agent::kernel::datapath::PinLayout;
use dataplane_proto::v1::{self as pb, dataplane_client::DataplaneClient};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use tonic::transport::Channel;

use crate::{bpffs::BpffsMount, netns::NetNs};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How long an agent may take to load its programs and open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a SIGTERM may take before the guard uses SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The agent binary: `DATAPLANE_AGENT_BIN`, else `dataplane-agent` in the same profile
/// directory as the running binary (`target/<profile>/` for the demo and bench,
/// `target/<profile>/deps/` for tests), which `cargo xtask test|demo` build first.
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("DATAPLANE_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("current_exe has no directory")?;
    let found = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|dir| dir.join("dataplane-agent"))
        .find(|candidate| candidate.is_file());
    found.with_context(|| {
        format!(
            "no dataplane-agent beside {}: build it with `cargo build -p dataplane-agent` \
                 (`cargo xtask test` and `cargo xtask demo` do)",
            exe.display()
        )
    })
}

/// A running agent; stopped and its state directory removed on drop.
pub struct Agent {
    child: Option<Child>,
    node_name: String,
    state_dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    /// What `run` is started with, again by [`Agent::restart`].
    namespace: String,
    /// Dropped after the agent is stopped, before the state directory goes.
    bpffs: Option<BpffsMount>,
    flags: Vec<String>,
}

impl Agent {
    /// Starts `dataplane-agent run` inside `node` with its own node name, state
    /// directory, socket and bpffs directory, and waits until its API answers.
    pub async fn start(node: &NetNs, node_name: &str) -> Result<Agent> {
        Self::start_with(node, node_name, &[]).await
    }

    /// As [`Agent::start`], with more `run` flags (say, `--uplink`).
    pub async fn start_with(node: &NetNs, node_name: &str, flags: &[&str]) -> Result<Agent> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let state_dir =
            std::env::temp_dir().join(format!("dp-agent-{}-{n}-{node_name}", std::process::id()));
        let bpffs = BpffsMount::new(&state_dir.join("bpffs"))?;
        let mut agent = Agent {
            child: None,
            node_name: node_name.to_owned(),
            socket: state_dir.join("agent.sock"),
            log: state_dir.join("agent.log"),
            state_dir,
            namespace: node.name().to_owned(),
            bpffs: Some(bpffs),
            flags: flags.iter().map(|f| (*f).to_owned()).collect(),
        };
        agent.spawn()?;
        agent.wait_ready().await?;
        Ok(agent)
    }

    /// Stops the agent (SIGTERM) and starts it again with the same state directory,
    /// bpffs directory and flags; waits until its API answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.terminate()?;
        self.start_again().await
    }

    /// Kills the agent (SIGKILL, no chance to clean up) and waits for it to be gone.
    pub fn kill(&mut self) -> Result<()> {
        let mut child = self.child.take().context("agent already stopped")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts the stopped or killed agent again, as it was started; waits until its API
    /// answers.
    pub async fn start_again(&mut self) -> Result<()> {
        anyhow::ensure!(self.child.is_none(), "agent still running");
        self.spawn()?;
        self.wait_ready().await
    }

    /// Stops the agent (SIGTERM) and starts it again with `flags` set (replacing the
    /// values those flags had); waits until its API answers.
    pub async fn restart_with(&mut self, flags: &[(&str, &str)]) -> Result<()> {
        self.terminate()?;
        for (flag, value) in flags {
            if let Some(at) = self.flags.iter().position(|f| f == flag) {
                self.flags.drain(at..=at + 1);
            }
            self.flags.extend([(*flag).to_owned(), (*value).to_owned()]);
        }
        self.start_again().await
    }

    fn spawn(&mut self) -> Result<()> {
        // Appended: a restart's log follows the first run's.
        let log_file = File::options().create(true).append(true).open(&self.log)?;
        // Small defaults, unless the test sets its own.
        let mut defaults = Vec::new();
        for (flag, value) in [("--max-ports", "256"), ("--conntrack-entries", "4096")] {
            if !self.flags.iter().any(|f| f == flag) {
                defaults.extend([flag, value]);
            }
        }
        let child = Command::new("ip")
            .args(["netns", "exec", &self.namespace])
            .arg(agent_binary()?)
            .args([
                "run",
                "--node-name",
                &self.node_name,
                "--log",
                "info,dataplane_agent=debug",
            ])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--bpffs-dir")
            .arg(self.bpffs_dir())
            .args(defaults)
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("spawning the agent")?;
        self.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("agent exited during start ({status}):\n{}", self.logs());
            }
            if self.socket.exists() && self.client().await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("agent not ready after {START_TIMEOUT:?}:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The agent's process id (`ip netns exec` execs it in place).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn bpffs_dir(&self) -> &Path {
        self.bpffs.as_ref().map_or(Path::new(""), BpffsMount::path)
    }

    /// Where the agent pins its maps and links.
    pub fn pins(&self) -> PinLayout {
        PinLayout::new(self.bpffs_dir())
    }

    /// The pinned maps of the map set packets use now.
    pub fn active_set_maps(&self) -> Result<PathBuf> {
        let pins = self.pins();
        let active: aya::maps::Array<_, u32> = aya::maps::Array::try_from(aya::maps::Map::Array(
            aya::maps::MapData::from_pin(pins.state_dir().join(map_names::ACTIVE_SET))?,
        ))?;
        Ok(pins.set_dir(active.get(&0, 0)?))
    }

    pub async fn client(&self) -> Result<DataplaneClient<Channel>> {
        Ok(dataplane_agent::client::connect_unix(&self.socket).await?)
    }

    /// Everything the agent logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit; the agent must stop on its own in time.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("agent already stopped")?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("agent ignored SIGTERM for {STOP_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(e) = self.terminate() {
                eprintln!("warning: {e:#}");
            }
        }
        if std::thread::panicking() {
            eprintln!("--- agent {} log ---\n{}", self.node_name, self.logs());
        }
        drop(self.bpffs.take());
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Polls the port's status until it is `want` (at most 10 s).
pub async fn wait_status(
    client: &mut DataplaneClient<Channel>,
    port_id: &str,
    want: pb::Status,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = client
            .get_port(pb::GetRequest {
                id: port_id.to_owned(),
            })
            .await?
            .into_inner()
            .status
            .unwrap_or_default();
        if got.status == want as i32 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "port {port_id} is {:?} ({}), not {want:?}",
                got.status,
                got.reason
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A resource that `wait_active` can wait for, by id.
#[derive(Clone, Copy, Debug)]
pub enum Awaited<'a> {
    Router(&'a str),
    FloatingIp(&'a str),
}

/// Waits up to 10 s until the router or floating IP is ACTIVE.
pub async fn wait_active(client: &mut DataplaneClient<Channel>, what: Awaited<'_>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = match what {
            Awaited::Router(id) => {
                client
                    .get_router(pb::GetRequest { id: id.to_owned() })
                    .await?
                    .into_inner()
                    .status
            }
            Awaited::FloatingIp(id) => {
                client
                    .get_floating_ip(pb::GetRequest { id: id.to_owned() })
                    .await?
                    .into_inner()
                    .status
            }
        }
        .unwrap_or_default();
        if status.status == pb::Status::Active as i32 {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what:?} is {:?} ({})", status.status, status.reason);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn counters(
    client: &mut DataplaneClient<Channel>,
    port_id: &str,
) -> Result<pb::PortCounters> {
    let mut response = client
        .get_port_counters(pb::GetPortCountersRequest {
            port_id: port_id.to_owned(),
        })
        .await?
        .into_inner();
    Ok(response.ports.remove(0))
}

pub fn drops(counters: &pb::PortCounters, reason: pb::DropReason) -> u64 {
    counters
        .drops
        .iter()
        .filter(|d| d.reason == reason as i32)
        .map(|d| d.packets)
        .sum()
}

/// The body of `GET /metrics` from an agent's metrics address, fetched inside `ns`.
pub fn scrape_metrics(ns: &NetNs, address: std::net::SocketAddr) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream =
        ns.run(move || std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)))??;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no end of the HTTP headers")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "metrics answered {head}");
    Ok(body.to_owned())
}

/// The value of the sample `series` (name and labels as exposed) in a scrape.
pub fn metric(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}
