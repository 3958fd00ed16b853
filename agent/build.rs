//! Builds the eBPF programs for `bpfel-unknown-none` and embeds the objects in the agent:
//! the datapath (`dataplane-ebpf`) and the benchmark's traffic generator
//! (`dataplane-traffic`, which the agent itself never loads).
//!
//! The BPF build needs Debian's rustc (it ships `core` for the BPF target) and
//! bpf-linker; `cargo xtask setup` installs both (see ../shared/TOOLCHAIN.md). The BPF
//! crate has a target directory of its own, `target/bpf`, so cargo does not wait on the
//! lock of the build that runs this script, and a second build is incremental.
//!
//! `DATAPLANE_BPF_OBJECT=<path>` embeds an object built elsewhere instead (packagers,
//! or work on the agent while the programs are mid-edit); the traffic object is taken
//! from beside it (`dataplane-traffic`, as cargo names it).
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const BPF_TARGET: &str = "bpfel-unknown-none";
const BPF_CRATE: &str = "dataplane-ebpf";
/// Object names as cargo builds them, and the names they are embedded under.
const OBJECTS: [(&str, &str); 2] = [
    ("dataplane-ebpf", "dataplane.bpf.o"),
    ("dataplane-traffic", "traffic.bpf.o"),
];

fn main() {
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-env-changed=DATAPLANE_BPF_OBJECT");
    if let Some(prebuilt) = env::var_os("DATAPLANE_BPF_OBJECT") {
        let prebuilt = Path::new(&prebuilt);
        let dir = prebuilt.parent().unwrap_or(Path::new("."));
        let (_, datapath) = OBJECTS[0];
        println!("cargo:rerun-if-changed={}", prebuilt.display());
        copy(prebuilt, &out_dir.join(datapath));
        for (built, embedded) in &OBJECTS[1..] {
            println!("cargo:rerun-if-changed={}", dir.join(built).display());
            copy(&dir.join(built), &out_dir.join(embedded));
        }
        return;
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap();
    let ebpf_dir = workspace.join("dataplane-ebpf");
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );

    let bpf_linker = find_bpf_linker().unwrap_or_else(|| {
        panic!("bpf-linker not found on PATH or in ~/.cargo/bin: run `cargo xtask setup`")
    });
    if !Path::new(DEBIAN_RUSTC).exists() {
        panic!("{DEBIAN_RUSTC} (Debian's rustc-web) not found: run `cargo xtask setup`");
    }

    let target_dir = workspace.join("target").join("bpf");
    let path = env::join_paths(
        std::iter::once(bpf_linker.parent().unwrap().to_path_buf())
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    let mut cmd = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace)
        .args([
            "build",
            "--release",
            "--ignore-rust-version",
            "--target",
            BPF_TARGET,
        ])
        .args(["--package", BPF_CRATE, "--target-dir"])
        .arg(&target_dir)
        .env("RUSTC", DEBIAN_RUSTC)
        // Debian's stable rustc must accept the unstable features aya-ebpf uses.
        .env("RUSTC_BOOTSTRAP", "1")
        // BTF in the object lets bpftool show the maps' types.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        )
        .env("PATH", path);
    for inherited in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(inherited);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    assert!(status.success(), "eBPF build failed: {cmd:?}");

    let built = target_dir.join(BPF_TARGET).join("release");
    for (name, embedded) in OBJECTS {
        copy(&built.join(name), &out_dir.join(embedded));
    }
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
}

fn find_bpf_linker() -> Option<PathBuf> {
    let home_bin = env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin"));
    env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .chain(home_bin)
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}
