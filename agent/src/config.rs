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
    /// Also serve the API on this TCP address, with mutual TLS (`tls_*`).
    pub grpc_tcp: Option<SocketAddr>,
    /// With `grpc_tcp`: this agent's certificate chain and key, and the CA that clients'
    /// certificates must chain to (PEM files).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    /// Serve `grpc_tcp` without TLS: anyone who reaches it can program this node.
    pub grpc_tcp_insecure: Option<bool>,
    /// API calls per second the agent takes, from all clients together (default 1000).
    pub max_requests_per_second: Option<u32>,
    /// Seconds between checks of the maps against the programmed state (default 30).
    pub drift_check_seconds: Option<u64>,
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
    pub grpc_tcp: Option<TcpApi>,
    pub max_requests_per_second: u32,
    pub drift_check_seconds: u64,
    pub metrics: Option<SocketAddr>,
    pub bpffs_dir: PathBuf,
    pub max_ports: u32,
    pub conntrack_entries: u32,
    pub uplink: Option<String>,
    /// First SNAT port and how many.
    pub snat_ports: (u16, u16),
}

/// The API on TCP: where, and how clients prove who they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpApi {
    pub address: SocketAddr,
    pub auth: TcpAuth,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TcpAuth {
    /// Clients present a certificate that chains to `client_ca`; the agent presents
    /// `cert` (with `key`).
    MutualTls {
        cert: PathBuf,
        key: PathBuf,
        client_ca: PathBuf,
    },
    /// No TLS, no client authentication (`grpc_tcp_insecure`).
    Insecure,
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/dataplane";
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
const DEFAULT_MAX_PORTS: u32 = 4096;
const DEFAULT_MAX_REQUESTS_PER_SECOND: u32 = 1000;
const DEFAULT_DRIFT_CHECK_SECONDS: u64 = 30;
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

/// How the TCP API authenticates: mutual TLS with all three files, or nothing when
/// asked for explicitly; anything in between is a mistake to report.
fn tcp_auth(tls: [Option<PathBuf>; 3], insecure: bool) -> anyhow::Result<TcpAuth> {
    match (tls, insecure) {
        ([None, None, None], true) => Ok(TcpAuth::Insecure),
        ([Some(cert), Some(key), Some(client_ca)], false) => Ok(TcpAuth::MutualTls {
            cert,
            key,
            client_ca,
        }),
        (_, true) => anyhow::bail!("grpc_tcp_insecure and tls_* exclude each other"),
        (tls, false) => {
            let missing: Vec<&str> = ["tls_cert", "tls_key", "tls_client_ca"]
                .into_iter()
                .zip(&tls)
                .filter(|(_, given)| given.is_none())
                .map(|(name, _)| name)
                .collect();
            anyhow::bail!(
                "grpc_tcp needs mutual TLS (missing {}), or grpc_tcp_insecure to serve without it",
                missing.join(", ")
            )
        }
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
        let tls = [
            overrides.tls_cert.or(file.tls_cert),
            overrides.tls_key.or(file.tls_key),
            overrides.tls_client_ca.or(file.tls_client_ca),
        ];
        let insecure = overrides
            .grpc_tcp_insecure
            .or(file.grpc_tcp_insecure)
            .unwrap_or(false);
        let grpc_tcp = match overrides.grpc_tcp.or(file.grpc_tcp) {
            None => None,
            Some(address) => Some(TcpApi {
                address,
                auth: tcp_auth(tls, insecure)?,
            }),
        };
        let max_requests_per_second = overrides
            .max_requests_per_second
            .or(file.max_requests_per_second)
            .unwrap_or(DEFAULT_MAX_REQUESTS_PER_SECOND);
        anyhow::ensure!(
            max_requests_per_second >= 1,
            "max_requests_per_second must be at least 1"
        );
        let drift_check_seconds = overrides
            .drift_check_seconds
            .or(file.drift_check_seconds)
            .unwrap_or(DEFAULT_DRIFT_CHECK_SECONDS);
        anyhow::ensure!(
            drift_check_seconds >= 1,
            "drift_check_seconds must be at least 1"
        );
        Ok(Self {
            uplink: overrides.uplink.or(file.uplink),
            max_requests_per_second,
            drift_check_seconds,
            snat_ports,
            node_name,
            conntrack_entries,
            state_dir,
            socket,
            grpc_tcp,
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
    fn the_tcp_api_takes_mutual_tls_or_an_explicit_insecure() {
        let with = |tls: [Option<&str>; 3], insecure: Option<bool>| {
            let flags = FileConfig {
                node_name: Some("n".into()),
                grpc_tcp: Some("127.0.0.1:50051".parse().unwrap()),
                tls_cert: tls[0].map(PathBuf::from),
                tls_key: tls[1].map(PathBuf::from),
                tls_client_ca: tls[2].map(PathBuf::from),
                grpc_tcp_insecure: insecure,
                ..FileConfig::default()
            };
            Config::resolve(flags, FileConfig::default()).map(|c| c.grpc_tcp.unwrap().auth)
        };
        assert_eq!(
            with([Some("c"), Some("k"), Some("ca")], None).unwrap(),
            TcpAuth::MutualTls {
                cert: "c".into(),
                key: "k".into(),
                client_ca: "ca".into()
            }
        );
        assert_eq!(with([None; 3], Some(true)).unwrap(), TcpAuth::Insecure);
        let missing = with([Some("c"), None, None], None).unwrap_err().to_string();
        assert!(
            missing.contains("missing tls_key, tls_client_ca"),
            "{missing}"
        );
        assert!(
            with([None; 3], None).is_err(),
            "no authentication by default"
        );
        assert!(with([Some("c"), Some("k"), Some("ca")], Some(true)).is_err());
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
