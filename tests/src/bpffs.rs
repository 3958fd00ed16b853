//! A bpffs mount of a test's own, for what pins maps and links there: unmounted (which
//! releases every pin in it) when the guard drops.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Result};

pub struct BpffsMount {
    dir: PathBuf,
}

impl BpffsMount {
    /// Mounts a new bpffs at `dir` (created).
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mounted = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(dir)
            .status()?;
        if !mounted.success() {
            let _ = std::fs::remove_dir(dir);
            bail!("mounting bpffs at {}", dir.display());
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        // Lazily: an agent's mount namespace may hold a reference a moment longer.
        if let Err(e) = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("warning: could not unmount {}: {e}", self.dir.display());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
