//! The agent's configuration: a TOML file, with command-line flags on top.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

/// Everything `dataplane-agent run` needs. Each field may come from the config file;
/// a flag given on the command line wins.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// This node's name: the agent programs ports whose `binding.host` equals it.
    pub node_name: Option<String>,
    /// Holds the lock file and, by default, the API socket.
    pub state_dir: Option<PathBuf>,
    /// The API's unix socket (mode 0600).
    pub socket: Option<PathBuf>,
    /// Also serve the API on this TCP address (unauthenticated: loopback only, please).
    pub grpc_tcp: Option<SocketAddr>,
    /// Serve Prometheus metrics (`GET /metrics`) on this TCP address.
    pub metrics: Option<SocketAddr>,
    /// Directory under a bpffs mount where this agent pins its maps.
    pub bpffs_dir: Option<PathBuf>,
    /// Ports this node can program at once.
    pub max_ports: Option<u32>,
    /// Confirmed connections the conntrack table holds; new ones beyond are dropped.
    pub conntrack_entries: Option<u32>,
    /// The NIC to the external networks (routers' gateways, floating IPs).
    pub uplink: Option<String>,
    /// SNAT's source ports, `first-last` (default 1024-65535).
    pub snat_ports: Option<String>,
}

impl FileConfig {
    pub fn read(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }
}

/// The configuration in force, defaults filled in.
#[derive(Debug)]
pub struct Config {
    pub node_name: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub grpc_tcp: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub bpffs_dir: PathBuf,
    pub max_ports: u32,
    pub conntrack_entries: u32,
    pub uplink: Option<String>,
    /// First SNAT port and how many.
    pub snat_ports: (u16, u16),
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/dataplane";
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const DEFAULT_MAX_PORTS: u32 = 4096;
/// Confirmed connections the agent tracks unless configured otherwise.
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 262_144;
/// 1024-65535: the ports below are the well-known ones.
const DEFAULT_SNAT_PORTS: (u16, u16) = (1024, 64512);

/// `first-last` as (first, count).
fn parse_port_range(text: &str) -> anyhow::Result<(u16, u16)> {
    let parsed = text.split_once('-').and_then(|(first, last)| {
        Some((
            first.trim().parse::<u16>().ok()?,
            last.trim().parse::<u16>().ok()?,
        ))
    });
    match parsed {
        Some((first, last)) if first >= 1 && first <= last => {
            // At most 65,535 ports: fits the count.
            Ok((first, last - first + 1))
        }
        _ => anyhow::bail!(
            "snat_ports must be `first-last` with 1 <= first <= last <= 65535, got {text:?}"
        ),
    }
}

impl Config {
    /// `overrides` are the command-line flags; `file` the config file, if any.
    pub fn resolve(overrides: FileConfig, file: FileConfig) -> anyhow::Result<Self> {
        let node_name = match overrides.node_name.or(file.node_name) {
            Some(name) => name,
            None => nix::unistd::gethostname()
                .context("reading the hostname for node_name")?
                .into_string()
                .map_err(|_| anyhow::anyhow!("hostname is not UTF-8; set node_name"))?,
        };
        anyhow::ensure!(!node_name.is_empty(), "node_name must not be empty");
        let state_dir = overrides
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let socket = overrides
            .socket
            .or(file.socket)
            .unwrap_or_else(|| state_dir.join("agent.sock"));
        let bpffs_dir = overrides.bpffs_dir.or(file.bpffs_dir).unwrap_or_else(|| {
            PathBuf::from(BPFFS_MOUNT)
                .join("dataplane")
                .join(&node_name)
        });
        let max_ports = overrides
            .max_ports
            .or(file.max_ports)
            .unwrap_or(DEFAULT_MAX_PORTS);
        anyhow::ensure!(
            (2..=65535).contains(&max_ports),
            "max_ports must be within 2..=65535, got {max_ports}"
        );
        let conntrack_entries = overrides
            .conntrack_entries
            .or(file.conntrack_entries)
            .unwrap_or(DEFAULT_CONNTRACK_ENTRIES);
        anyhow::ensure!(
            conntrack_entries >= 16,
            "conntrack_entries must be at least 16, got {conntrack_entries}"
        );
        let snat_ports = match overrides.snat_ports.or(file.snat_ports) {
            Some(text) => parse_port_range(&text)?,
            None => DEFAULT_SNAT_PORTS,
        };
        Ok(Self {
            uplink: overrides.uplink.or(file.uplink),
            snat_ports,
            node_name,
            conntrack_entries,
            state_dir,
            socket,
            grpc_tcp: overrides.grpc_tcp.or(file.grpc_tcp),
            metrics: overrides.metrics.or(file.metrics),
            bpffs_dir,
            max_ports,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_defaults_fill_the_rest() {
        let file: FileConfig =
            toml::from_str("node_name = \"file-node\"\nstate_dir = \"/tmp/s\"\nmax_ports = 100\n")
                .unwrap();
        let flags = FileConfig {
            node_name: Some("flag-node".into()),
            ..FileConfig::default()
        };
        let config = Config::resolve(flags, file).unwrap();
        assert_eq!(config.node_name, "flag-node");
        assert_eq!(config.socket, PathBuf::from("/tmp/s/agent.sock"));
        assert_eq!(config.max_ports, 100);
        assert_eq!(
            config.bpffs_dir,
            PathBuf::from("/sys/fs/bpf/dataplane/flag-node")
        );
    }

    #[test]
    fn snat_port_ranges() {
        assert_eq!(parse_port_range("1024-65535").unwrap(), (1024, 64512));
        assert_eq!(parse_port_range("5000-5003").unwrap(), (5000, 4));
        for bad in ["", "5", "0-10", "10-5", "1-65536", "a-b"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_limits_are_refused() {
        assert!(toml::from_str::<FileConfig>("nod_name = \"x\"").is_err());
        let flags = FileConfig {
            node_name: Some("n".into()),
            max_ports: Some(1),
            ..FileConfig::default()
        };
        assert!(Config::resolve(flags, FileConfig::default()).is_err());
    }
}
