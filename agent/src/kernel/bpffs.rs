//! The BPF filesystem the agent pins its maps in.

use std::{io, path::Path};

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
