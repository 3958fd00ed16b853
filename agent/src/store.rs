//! Durable desired state: what the last accepted Apply or Sync left, in an embedded
//! database (`redb`) under the state directory, so that a restarted agent programs the
//! datapath before the API server syncs it again.
//!
//! Table `resources`: key `<kind>/<id>`, value the resource as the API encodes it
//! (`dataplane.v1.Resource`, protobuf), which is how it came in and how the validation
//! that restores it reads it. Table `slots`: the compiler's slot assignments, so that
//! the restarted agent compiles the state into the very tables the datapath holds, and
//! adopts them without a change. Each commit writes its changes
//! in one write transaction: a crash leaves either all of them or none.
use std::path::Path;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{
    core::{
        compile::{SlotAssignments, SlotChanges},
        model::{Resource, ResourceRef},
    },
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;

const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
/// Slot assignments, by `<kind>/<what holds it>`: an id, a policy's group ids joined by
/// [`SEPARATOR`], or a class's rule slots joined by commas.
const SLOTS: TableDefinition<&str, u32> = TableDefinition::new("slots");
/// Not in any id (ids are printable).
const SEPARATOR: char = '\u{1f}';

fn slot_key_of_ids(kind: &str, ids: &[String]) -> String {
    format!("{kind}/{}", ids.join(&SEPARATOR.to_string()))
}

fn slot_key_of_numbers(kind: &str, numbers: &[u32]) -> String {
    let numbers: Vec<String> = numbers.iter().map(u32::to_string).collect();
    format!("{kind}/{}", numbers.join(","))
}

/// Every (key, slot or `None`) of `changes`, keyed as stored.
fn slot_entries(changes: &SlotChanges) -> Vec<(String, Option<u32>)> {
    let by_id = |kind: &'static str, list: &[(String, Option<u32>)]| {
        list.iter()
            .map(move |(id, slot)| (format!("{kind}/{id}"), *slot))
            .collect::<Vec<_>>()
    };
    let mut entries = by_id("port", &changes.ports);
    entries.extend(by_id("network", &changes.networks));
    entries.extend(by_id("rule", &changes.rules));
    entries.extend(by_id("router", &changes.routers));
    entries.extend(
        changes
            .policies
            .iter()
            .map(|(ids, slot)| (slot_key_of_ids("policy", ids), *slot)),
    );
    entries.extend(
        changes
            .classes
            .iter()
            .map(|(numbers, slot)| (slot_key_of_numbers("class", numbers), *slot)),
    );
    entries
}

/// Puts the stored `key` and its slot where it belongs in `slots`.
fn hold(slots: &mut SlotAssignments, key: &str, slot: u32) -> Result<(), StoreError> {
    let bad = || StoreError::Decode {
        key: format!("slots {key}"),
    };
    let (kind, what) = key.split_once('/').ok_or_else(bad)?;
    match kind {
        "port" => slots.ports.push((what.to_owned(), slot)),
        "network" => slots.networks.push((what.to_owned(), slot)),
        "rule" => slots.rules.push((what.to_owned(), slot)),
        "router" => slots.routers.push((what.to_owned(), slot)),
        "policy" => slots
            .policies
            .push((what.split(SEPARATOR).map(str::to_owned).collect(), slot)),
        "class" => slots.classes.push((
            what.split(',')
                .map(|n| n.parse().map_err(|_| bad()))
                .collect::<Result<_, _>>()?,
            slot,
        )),
        _ => return Err(bad()),
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the state database {path}")]
    Open {
        path: String,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("the state database: {0}")]
    Database(String),
    #[error("a stored resource does not decode: {key}")]
    Decode { key: String },
    #[error("the stored state is not valid: {0}")]
    Invalid(String),
}

/// Everything `redb` can fail with, as text: the callers only report it.
fn database(error: impl std::fmt::Display) -> StoreError {
    StoreError::Database(error.to_string())
}

pub struct Store {
    db: Database,
}

/// The database's page cache. Its default (1 GiB) keeps every page written, the whole
/// state a second time in the agent's memory; the store is read once, at start, and
/// written with each commit's changes, which need no cache to speak of.
const CACHE_BYTES: usize = 8 << 20;

fn key(reference: &ResourceRef) -> String {
    format!("{}/{}", reference.kind.field_name(), reference.id)
}

impl Store {
    /// Opens the database at `path`, creating it if there is none.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let txn = db.begin_write().map_err(database)?;
        txn.open_table(RESOURCES).map_err(database)?;
        txn.open_table(SLOTS).map_err(database)?;
        txn.commit().map_err(database)?;
        Ok(Store { db })
    }

    /// Every stored resource.
    pub fn load(&self) -> Result<Vec<Resource>, StoreError> {
        let txn = self.db.begin_read().map_err(database)?;
        let table = txn.open_table(RESOURCES).map_err(database)?;
        let mut resources = Vec::new();
        for entry in table.iter().map_err(database)? {
            let (key, value) = entry.map_err(database)?;
            let resource = pb::Resource::decode(value.value()).map_err(|_| StoreError::Decode {
                key: key.value().to_owned(),
            })?;
            resources.push(resource);
        }
        resources_from_proto(resources).map_err(|e| StoreError::Invalid(e.to_string()))
    }

    /// The slot assignments stored with the state.
    pub fn load_slots(&self) -> Result<SlotAssignments, StoreError> {
        let txn = self.db.begin_read().map_err(database)?;
        let table = txn.open_table(SLOTS).map_err(database)?;
        let mut slots = SlotAssignments::default();
        for entry in table.iter().map_err(database)? {
            let (key, slot) = entry.map_err(database)?;
            hold(&mut slots, key.value(), slot.value())?;
        }
        Ok(slots)
    }

    /// Writes `changes` (a resource as it is now, `None`: gone) and the slots the commit
    /// took and released, all or nothing.
    pub fn save(
        &self,
        changes: impl IntoIterator<Item = (ResourceRef, Option<Resource>)>,
        slots: &SlotChanges,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(database)?;
        {
            let mut table = txn.open_table(SLOTS).map_err(database)?;
            for (key, slot) in slot_entries(slots) {
                match slot {
                    Some(slot) => table.insert(key.as_str(), slot).map_err(database)?,
                    None => table.remove(key.as_str()).map_err(database)?,
                };
            }
        }
        {
            let mut table = txn.open_table(RESOURCES).map_err(database)?;
            for (reference, resource) in changes {
                let key = key(&reference);
                match resource {
                    Some(resource) => {
                        let bytes = pb::Resource::from(&resource).encode_to_vec();
                        table
                            .insert(key.as_str(), bytes.as_slice())
                            .map_err(database)?;
                    }
                    None => {
                        table.remove(key.as_str()).map_err(database)?;
                    }
                }
            }
        }
        txn.commit().map_err(database)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::core::{
        compile::{compile, DatapathTables, NodeView, SlotLimits, Slots},
        fixtures::{network, port, subnet},
        model::{PortBinding, State},
    };

    /// A database file of its own, removed when the test ends.
    struct TempDb(std::path::PathBuf);

    impl TempDb {
        fn new(name: &str) -> TempDb {
            let path =
                std::env::temp_dir().join(format!("dp-store-{}-{name}.redb", std::process::id()));
            let _ = std::fs::remove_file(&path);
            TempDb(path)
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn state(resources: Vec<Resource>) -> State {
        State::replace(resources).expect("valid test state")
    }

    #[test]
    fn what_is_saved_is_loaded_after_reopening() {
        let db = TempDb::new("reopen");
        let first = state(vec![
            network("net").into(),
            subnet("sub", "net", "10.0.0.0/24").into(),
            port("a", "net", "fa:16:3e:00:00:01").into(),
            port("b", "net", "fa:16:3e:00:00:02").into(),
        ]);
        let mut renamed = port("a", "net", "fa:16:3e:00:00:01");
        renamed.name = "renamed".to_owned();
        renamed.revision_number = 2;
        let second = state(vec![
            network("net").into(),
            subnet("sub", "net", "10.0.0.0/24").into(),
            renamed.into(),
        ]);
        {
            let store = Store::open(&db.0).unwrap();
            assert!(store.load().unwrap().is_empty());
            let no_slots = SlotChanges::default();
            store
                .save(State::default().changes_to(&first), &no_slots)
                .unwrap();
            // b deleted, a changed, the rest untouched.
            let changes: Vec<_> = first.changes_to(&second).collect();
            assert_eq!(changes.len(), 2, "{changes:?}");
            store.save(changes, &no_slots).unwrap();
        }
        let loaded = Store::open(&db.0).unwrap().load().unwrap();
        assert_eq!(state(loaded), second);
    }

    /// Ports `ids`, each bound to this node's device of the same name.
    fn bound(ids: &[&str]) -> (State, BTreeMap<String, u32>) {
        let mut resources: Vec<Resource> = vec![
            network("net").into(),
            subnet("sub", "net", "10.0.0.0/24").into(),
        ];
        for (i, id) in ids.iter().enumerate() {
            let mut p = port(id, "net", &format!("fa:16:3e:00:00:{:02x}", i + 1));
            p.binding = PortBinding {
                host: "node".to_owned(),
                interface_name: (*id).to_owned(),
            };
            resources.push(p.into());
        }
        let devices = ids
            .iter()
            .enumerate()
            .map(|(i, id)| ((*id).to_owned(), 10 + i as u32))
            .collect();
        (state(resources), devices)
    }

    fn compiled(
        state: &State,
        devices: &BTreeMap<String, u32>,
        slots: &mut Slots,
    ) -> DatapathTables {
        let empty = BTreeSet::new();
        let view = NodeView {
            node_name: "node",
            interfaces: devices,
            peer_devices: &empty,
            uplink: None,
        };
        (*compile(state, &view, slots).tables).clone()
    }

    #[test]
    fn stored_slots_give_a_restart_the_same_tables_and_the_same_next_slots() {
        let db = TempDb::new("slots");
        let limits = SlotLimits {
            max_ports: 16,
            max_networks: 16,
            max_rules: 16,
        };
        let store = Store::open(&db.0).unwrap();
        let mut slots = Slots::new(limits);
        let mut tables = DatapathTables::default();
        // a, b, c take slots 1, 2, 3; b goes (2 free); d takes 2, e takes 4.
        for ids in [&["a", "b", "c"][..], &["a", "c"], &["a", "c", "d", "e"]] {
            let (state, devices) = bound(ids);
            let before = slots.clone();
            tables = compiled(&state, &devices, &mut slots);
            store.save([], &slots.changes_since(&before)).unwrap();
        }
        drop(store);

        let stored = Store::open(&db.0).unwrap().load_slots().unwrap();
        let mut restored = Slots::with_assignments(limits, stored);
        let (state, devices) = bound(&["a", "c", "d", "e"]);
        assert_eq!(compiled(&state, &devices, &mut restored), tables);
        // Both hand out the same slot next: c goes, f comes.
        let (state, devices) = bound(&["a", "d", "e", "f"]);
        assert_eq!(
            compiled(&state, &devices, &mut restored),
            compiled(&state, &devices, &mut slots)
        );
        assert_eq!(restored.port_slot("f"), slots.port_slot("f"));
    }

    #[test]
    fn a_corrupt_record_is_refused_not_skipped() {
        let db = TempDb::new("corrupt");
        let store = Store::open(&db.0).unwrap();
        let txn = store.db.begin_write().unwrap();
        txn.open_table(RESOURCES)
            .unwrap()
            .insert("port/x", [0xff, 0xff, 0xff].as_slice())
            .unwrap();
        txn.commit().unwrap();
        assert!(matches!(store.load(), Err(StoreError::Decode { key }) if key == "port/x"));
    }
}
