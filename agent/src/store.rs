//! Durable desired state: what the last accepted Apply or Sync left, in an embedded
//! database (`redb`) under the state directory, so that a restarted agent programs the
//! datapath before the API server syncs it again.
//!
//! One table, `resources`: key `<kind>/<id>`, value the resource as the API encodes it
//! (`dataplane.v1.Resource`, protobuf), which is how it came in and how the validation
//! that restores it reads it. Each commit writes its changes in one write transaction:
//! a crash leaves either all of them or none.
use std::path::Path;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{
    core::model::{Resource, ResourceRef},
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;

const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");

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

fn key(reference: &ResourceRef) -> String {
    format!("{}/{}", reference.kind.field_name(), reference.id)
}

impl Store {
    /// Opens the database at `path`, creating it if there is none.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let txn = db.begin_write().map_err(database)?;
        txn.open_table(RESOURCES).map_err(database)?;
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

    /// Writes `changes` (a resource as it is now, `None`: gone), all or nothing.
    pub fn save(&self, changes: &[(ResourceRef, Option<Resource>)]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(database)?;
        {
            let mut table = txn.open_table(RESOURCES).map_err(database)?;
            for (reference, resource) in changes {
                let key = key(reference);
                match resource {
                    Some(resource) => {
                        let bytes = pb::Resource::from(resource).encode_to_vec();
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
    use super::*;
    use crate::core::{
        fixtures::{network, port, subnet},
        model::State,
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
        State::replace(&resources).expect("valid test state")
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
            store.save(&State::default().changes_to(&first)).unwrap();
            // b deleted, a changed, the rest untouched.
            let changes = first.changes_to(&second);
            assert_eq!(changes.len(), 2, "{changes:?}");
            store.save(&changes).unwrap();
        }
        let loaded = Store::open(&db.0).unwrap().load().unwrap();
        assert_eq!(state(loaded), second);
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
