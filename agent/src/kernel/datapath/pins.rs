//! Where the datapath's maps and links are pinned, and whether a pinned map is one this
//! agent can adopt.
//!
//! ```text
//! <root>/v<ABI_VERSION>/state/<MAP>   what the programs keep (conntrack, counters, the
//!                                     active set and the stage arrays): one of each
//! <root>/v<ABI_VERSION>/set<N>/<MAP>  map set N's copy of the desired-state maps
//! <root>/links/<ifindex>-<hook>       the dispatchers' tcx and XDP links
//! ```
//!
//! The version in the map paths keeps an agent from ever opening maps of another layout;
//! the links have none, so that an agent of any version can take them over, atomically,
//! by pointing them at its own programs.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use aya::maps::{MapError, MapInfo};
use dataplane_abi::ABI_VERSION;

#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    pub fn version_dir(&self) -> PathBuf {
        self.root.join(format!("v{ABI_VERSION}"))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.version_dir().join("state")
    }

    pub fn set_dir(&self, set: u32) -> PathBuf {
        self.version_dir().join(format!("set{set}"))
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, ifindex: u32, hook: &str) -> PathBuf {
        self.links_dir().join(format!("{ifindex}-{hook}"))
    }

    /// Directories of other map layouts (`<root>/v<N>`, N not [`ABI_VERSION`]).
    pub fn other_versions(&self) -> io::Result<Vec<PathBuf>> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(Vec::new());
        };
        let current = format!("v{ABI_VERSION}");
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let versioned = name
                .strip_prefix('v')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if versioned && name != current {
                found.push(entry.path());
            }
        }
        Ok(found)
    }

    /// The pinned links: (ifindex, hook, path).
    pub fn pinned_links(&self) -> io::Result<Vec<(u32, String, PathBuf)>> {
        let Ok(entries) = std::fs::read_dir(self.links_dir()) else {
            return Ok(Vec::new());
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some((ifindex, hook)) = name.split_once('-') {
                if let Ok(ifindex) = ifindex.parse() {
                    found.push((ifindex, hook.to_owned(), entry.path()));
                }
            }
        }
        Ok(found)
    }
}

/// What a map is, as far as reusing it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for MapShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// What to do with the pin of a map this agent wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fit {
    /// Nothing pinned: a new map is created and pinned.
    Absent,
    /// The pinned map is the one wanted: it is used as it is.
    Adopt,
    /// Same layout, another size (the operator changed a limit): a new map is created
    /// and the old one's entries copied in, as many as fit.
    Resize { pinned: MapShape },
    /// Another layout under the same version: a bug in whoever pinned it. Not read; a
    /// new map replaces it.
    Mismatch { pinned: MapShape },
}

/// How the pinned `pinned` compares with the `wanted` map.
pub fn fit(pinned: Option<MapShape>, wanted: &MapShape) -> Fit {
    match pinned {
        None => Fit::Absent,
        Some(pinned) if pinned == *wanted => Fit::Adopt,
        Some(pinned)
            if MapShape {
                max_entries: wanted.max_entries,
                ..pinned
            } == *wanted =>
        {
            Fit::Resize { pinned }
        }
        Some(pinned) => Fit::Mismatch { pinned },
    }
}

/// The shape of the map pinned at `path`, if one is.
pub fn pinned_shape(path: &Path) -> Result<Option<MapShape>, MapError> {
    if !path.exists() {
        return Ok(None);
    }
    let info = MapInfo::from_pin(path)?;
    Ok(Some(MapShape {
        map_type: info.map_type()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    }))
}

/// The maps of the object, as the loader creates them with `max_entries` overrides.
pub fn object_shapes(
    object: &[u8],
    max_entries: &BTreeMap<&str, u32>,
) -> Result<BTreeMap<String, MapShape>, aya_obj::ParseError> {
    let parsed = aya_obj::Object::parse(object)?;
    Ok(parsed
        .maps
        .iter()
        .map(|(name, map)| {
            let shape = MapShape {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: max_entries
                    .get(name.as_str())
                    .copied()
                    .unwrap_or(map.max_entries()),
                flags: map.map_flags(),
            };
            (name.clone(), shape)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: MapShape = MapShape {
        map_type: 1,
        key_size: 4,
        value_size: 16,
        max_entries: 256,
        flags: 0,
    };

    #[test]
    fn a_pinned_map_is_adopted_only_as_it_is_wanted() {
        assert_eq!(fit(None, &HASH), Fit::Absent);
        assert_eq!(fit(Some(HASH), &HASH), Fit::Adopt);
        let smaller = MapShape {
            max_entries: 128,
            ..HASH
        };
        assert_eq!(fit(Some(smaller), &HASH), Fit::Resize { pinned: smaller });
        for other in [
            MapShape {
                value_size: 24,
                ..HASH
            },
            MapShape {
                key_size: 8,
                ..HASH
            },
            MapShape {
                map_type: 9,
                ..HASH
            },
            MapShape { flags: 1, ..HASH },
        ] {
            assert_eq!(fit(Some(other), &HASH), Fit::Mismatch { pinned: other });
        }
    }

    #[test]
    fn only_the_directories_of_other_versions_are_leftovers() {
        let root = std::env::temp_dir().join(format!("dp-pins-{}", std::process::id()));
        let layout = PinLayout::new(&root);
        for dir in [
            root.join("v3").join("maps"),
            root.join("v12"),
            layout.state_dir(),
            root.join("vx"),
            root.join("links"),
        ] {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let mut others = layout.other_versions().unwrap();
        others.sort();
        assert_eq!(others, vec![root.join("v12"), root.join("v3")]);
        std::fs::write(layout.link(7, "port_ingress"), b"").unwrap();
        std::fs::write(layout.links_dir().join("junk"), b"").unwrap();
        assert_eq!(
            layout.pinned_links().unwrap(),
            vec![(7, "port_ingress".to_owned(), layout.link(7, "port_ingress"))]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
