//! The BPF filesystem the agent pins its maps in.

use std::{io, path::Path};

/// Where bpffs is mounted on a systemd host.
pub const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

use nix::{
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

/// Mounts bpffs at `mountpoint` unless one is there already (a fresh machine has none,
/// and `ip netns exec` gives the agent a fresh /sys without one).
pub fn ensure_mounted(mountpoint: &Path) -> io::Result<()> {
    std::fs::create_dir_all(mountpoint)?;
    if statfs(mountpoint)
        .map_err(io::Error::from)?
        .filesystem_type()
        == BPF_FS_MAGIC
    {
        return Ok(());
    }
    mount(
        Some("bpf"),
        mountpoint,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(io::Error::from)
}

/// Creates `dir` if needed and checks that it is on bpffs: pins elsewhere fail.
pub fn ensure_on_bpffs(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    if statfs(dir).map_err(io::Error::from)?.filesystem_type() == BPF_FS_MAGIC {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{} is not on a bpffs mount",
        dir.display()
    )))
}
