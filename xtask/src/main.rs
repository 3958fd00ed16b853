//! Project tasks: `cargo xtask <setup|build|test|demo|bench>`.
//!
//! Every task first runs `setup`, which installs what a fresh Debian 12 machine lacks for
//! the eBPF build (../shared/TOOLCHAIN.md) and for the tests, skipping what is present.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and test tools if missing.
    Setup,
    /// Build the eBPF programs and the agent (release).
    Build,
    /// Run every test: unit, packet (BPF_PROG_TEST_RUN) and integration (namespaces).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build everything and show the datapath switching and policing real traffic.
    Demo,
    /// Measure the packet path beside the alternatives (Linux bridge, iptables as
    /// Neutron writes it, nftables sets, the L3 agent's router) and a no-op floor, and
    /// write the report (results.json, report.html, summary.md) to target/bench/<UTC
    /// timestamp>/.
    Bench {
        /// The quick mode (under 3 minutes); without it the full run (under 30).
        #[arg(long)]
        quick: bool,
        /// Directory of the report instead of target/bench/<timestamp>/.
        #[arg(long)]
        out: Option<String>,
        /// Arguments for the benchmark binary (see `--help` after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// Debian packages: the eBPF toolchain of TOOLCHAIN.md, and the tools tests drive.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "/usr/bin/rustc"),
    (
        "libstd-rust-web-dev-bpf",
        "/usr/lib/rustlib/bpfel-unknown-none",
    ),
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    ("iproute2", "/usr/sbin/ip"),
    ("iputils-ping", "/usr/bin/ping"),
    // The traffic generator's receiving veths need GRO (NAPI) on; the benchmark's
    // peers: iptables (legacy and nft backends) and nftables.
    ("ethtool", "/usr/sbin/ethtool"),
    ("iptables", "/usr/sbin/iptables-legacy-restore"),
    ("nftables", "/usr/sbin/nft"),
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    setup()?;
    match cli.task {
        Task::Setup => Ok(()),
        Task::Build => cargo(&root, &["build", "--release", "-p", "dataplane-agent"]),
        Task::Test { args } => {
            require_root("the packet and integration tests")?;
            // Integration tests start the agent binary, which `cargo test` does not build
            // for another package.
            cargo(&root, &["build", "-p", "dataplane-agent", "--bins"])?;
            // The default members: the eBPF crate only builds for the BPF target.
            let mut test = vec!["test", "--no-fail-fast"];
            if !args.is_empty() {
                test.push("--");
                test.extend(args.iter().map(String::as_str));
            }
            cargo(&root, &test)
        }
        Task::Demo => {
            require_root("the demo (it creates network namespaces)")?;
            cargo(&root, &["build", "-p", "dataplane-agent", "--bins"])?;
            cargo(&root, &["run", "-p", "dataplane-tests", "--bin", "demo"])
        }
        Task::Bench { quick, out, args } => {
            require_root("the benchmark (BPF_PROG_TEST_RUN)")?;
            // The control-plane part starts the agent binary from the same profile.
            cargo(
                &root,
                &["build", "--release", "-p", "dataplane-agent", "--bins"],
            )?;
            let mut bench = vec![
                "run",
                "--release",
                "-p",
                "dataplane-tests",
                "--bin",
                "bench",
                "--",
            ];
            if quick {
                bench.push("--quick");
            }
            if let Some(out) = &out {
                bench.extend(["--out", out]);
            }
            bench.extend(args.iter().map(String::as_str));
            cargo(&root, &bench)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{what} need root (CAP_BPF, CAP_NET_ADMIN); run as root");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).current_dir(root).args(args))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, probe)| !Path::new(probe).exists())
        .map(|(package, _)| *package)
        .collect();
    if !missing.is_empty() {
        require_root("installing Debian packages")?;
        eprintln!("xtask: installing {}", missing.join(" "));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !bpf_linker_installed() {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (LLVM 22)");
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        run(Command::new(cargo)
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"))?;
    }
    Ok(())
}

/// bpf-linker of the pinned version, where the agent's build script looks for it.
fn bpf_linker_installed() -> bool {
    let home_bin = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin"));
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(home_bin)
        .map(|dir| dir.join("bpf-linker"))
        .filter(|linker| linker.is_file())
        .any(|linker| {
            Command::new(linker)
                .arg("--version")
                .output()
                .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION))
        })
}
