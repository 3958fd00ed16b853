//! The node: desired state, its compiled form and the datapath, kept in step.
//!
//! Every change goes through one path: validate into a new [`State`], compile it
//! against the devices present, sync the datapath, and only then make the new state
//! current. A datapath error rolls the maps back to the previous compiled tables, so a
//! request either takes effect whole or not at all.

use std::collections::BTreeMap;

use dataplane_abi::DropReason;
use tokio::sync::{broadcast, Mutex};
use tracing::{info, warn};

use crate::{
    core::{
        compile::{compile, Compiled, NodeView, ResourceStatus, Slots, StatusKind},
        model::{Change, Resource, ResourceRef, State},
        validate::ValidationError,
    },
    kernel::{
        datapath::{Counters, Datapath, DatapathError},
        links,
    },
};

/// What watchers are told.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeEvent {
    Status(ResourceRef, ResourceStatus),
    Applied {
        generation: u64,
        operation: Operation,
        changes: u32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Apply,
    Sync,
    /// Port devices appeared or went away.
    Devices,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "apply",
            Operation::Sync => "sync",
            Operation::Devices => "devices",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("programming the datapath failed; the previous state stays in force")]
    Datapath(#[from] DatapathError),
    #[error("port {port_id} is not programmed on this node")]
    PortNotProgrammed { port_id: String },
}

/// Result of an accepted Apply or Sync.
#[derive(Debug)]
pub struct Committed {
    pub generation: u64,
    /// Status of each resource the request named (upserts; deletes are gone).
    pub statuses: Vec<(ResourceRef, ResourceStatus)>,
    /// Resources that are new, changed, or gone, against the state before.
    pub created: u32,
    pub updated: u32,
    pub deleted: u32,
}

pub struct Node {
    node_name: String,
    inner: Mutex<Inner>,
    events: broadcast::Sender<NodeEvent>,
}

struct Inner {
    state: State,
    slots: Slots,
    compiled: Compiled,
    interfaces: BTreeMap<String, u32>,
    datapath: Datapath,
    generation: u64,
}

/// Watchers that fall this far behind miss events (and are told so by the channel).
const EVENT_BACKLOG: usize = 4096;

impl Node {
    pub fn new(node_name: String, datapath: Datapath, slots: Slots) -> Self {
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        Self {
            node_name,
            inner: Mutex::new(Inner {
                state: State::default(),
                slots,
                compiled: Compiled::default(),
                interfaces: BTreeMap::new(),
                datapath,
                generation: 0,
            }),
            events,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// Applies a batch of changes, all or nothing.
    pub async fn apply(&self, changes: &[Change]) -> Result<Committed, NodeError> {
        let mut inner = self.inner.lock().await;
        let next = inner.state.apply(changes)?;
        let named: Vec<ResourceRef> = changes
            .iter()
            .filter_map(|change| match change {
                Change::Upsert(resource) => Some(resource.reference()),
                Change::Delete(_) => None,
            })
            .collect();
        self.commit(&mut inner, next, Operation::Apply, changes.len(), &named)
    }

    /// Replaces the whole desired state.
    pub async fn sync(&self, resources: &[Resource]) -> Result<Committed, NodeError> {
        let mut inner = self.inner.lock().await;
        let next = State::replace(resources)?;
        let named: Vec<ResourceRef> = resources.iter().map(Resource::reference).collect();
        self.commit(&mut inner, next, Operation::Sync, resources.len(), &named)
    }

    /// Re-resolves port devices after link events; recompiles if any came or went.
    pub async fn refresh_devices(&self) -> Result<(), NodeError> {
        let mut inner = self.inner.lock().await;
        let interfaces = self.local_interfaces(&inner.state);
        if interfaces == inner.interfaces {
            return Ok(());
        }
        let state = inner.state.clone();
        self.commit(&mut inner, state, Operation::Devices, 0, &[])
            .map(|_| ())
    }

    /// Reads the current state and statuses under the lock.
    pub async fn read<T>(
        &self,
        f: impl FnOnce(&State, &BTreeMap<ResourceRef, ResourceStatus>) -> T,
    ) -> T {
        let inner = self.inner.lock().await;
        f(&inner.state, &inner.compiled.statuses)
    }

    /// Counters of one programmed port, or of all of them, and drops charged to no port.
    pub async fn counters(
        &self,
        port_id: Option<&str>,
    ) -> Result<(Vec<(String, Counters)>, Vec<(DropReason, u64)>), NodeError> {
        let inner = self.inner.lock().await;
        let mut ports = Vec::new();
        for port in &inner.compiled.ports {
            if port_id.is_some_and(|id| id != port.port_id) {
                continue;
            }
            ports.push((
                port.port_id.clone(),
                inner.datapath.port_counters(port.slot)?,
            ));
        }
        if let Some(port_id) = port_id {
            if ports.is_empty() {
                return Err(NodeError::PortNotProgrammed {
                    port_id: port_id.to_owned(),
                });
            }
        }
        Ok((ports, inner.datapath.unattributed_drops()?))
    }

    /// Forwards the programs' pending log records.
    pub async fn flush_datapath_logs(&self) {
        self.inner.lock().await.datapath.flush_logs();
    }

    pub async fn datapath_log_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.lock().await.datapath.log_fd()
    }

    fn local_interfaces(&self, state: &State) -> BTreeMap<String, u32> {
        links::resolve_interfaces(
            state
                .ports
                .values()
                .filter(|port| port.binding.host == self.node_name)
                .map(|port| port.binding.interface_name.as_str())
                .filter(|name| !name.is_empty()),
        )
    }

    fn commit(
        &self,
        inner: &mut Inner,
        next: State,
        operation: Operation,
        changes: usize,
        named: &[ResourceRef],
    ) -> Result<Committed, NodeError> {
        let interfaces = self.local_interfaces(&next);
        let mut slots = inner.slots.clone();
        let compiled = compile(
            &next,
            &NodeView {
                node_name: &self.node_name,
                interfaces: &interfaces,
            },
            &mut slots,
        );
        for port in &compiled.ports {
            if !inner.interfaces.contains_key(&port.interface_name) {
                if let Err(e) = links::disable_host_ipv6(&port.interface_name) {
                    warn!(interface = %port.interface_name, error = %e, "could not disable IPv6 on the port device");
                }
            }
        }
        if let Err(e) = inner.datapath.sync(&compiled.tables, &compiled.ports) {
            if let Err(rollback) = inner
                .datapath
                .sync(&inner.compiled.tables, &inner.compiled.ports)
            {
                warn!(error = ?rollback, "rolling the datapath back failed too");
            }
            return Err(e.into());
        }

        let (created, updated, deleted) = inner.state.count_differences(&next);
        let old = std::mem::replace(&mut inner.compiled, compiled);
        inner.state = next;
        inner.slots = slots;
        inner.interfaces = interfaces;
        inner.generation += 1;
        let generation = inner.generation;
        self.announce(&old.statuses, &inner.compiled.statuses);
        let _ = self.events.send(NodeEvent::Applied {
            generation,
            operation,
            changes: changes as u32,
        });
        info!(
            generation,
            operation = operation.as_str(),
            changes,
            ports = inner.compiled.ports.len(),
            "committed"
        );

        let statuses = named
            .iter()
            .filter_map(|reference| {
                inner
                    .compiled
                    .statuses
                    .get(reference)
                    .map(|status| (reference.clone(), status.clone()))
            })
            .collect();
        Ok(Committed {
            generation,
            statuses,
            created,
            updated,
            deleted,
        })
    }

    /// Sends an event for every status that changed, and a DOWN "deleted" for every
    /// resource that is gone.
    fn announce(
        &self,
        old: &BTreeMap<ResourceRef, ResourceStatus>,
        new: &BTreeMap<ResourceRef, ResourceStatus>,
    ) {
        for (reference, status) in new {
            if old.get(reference) != Some(status) {
                let _ = self
                    .events
                    .send(NodeEvent::Status(reference.clone(), status.clone()));
            }
        }
        for (reference, status) in old {
            if !new.contains_key(reference) {
                let deleted = ResourceStatus {
                    status: StatusKind::Down,
                    reason: "deleted".to_owned(),
                    revision_number: status.revision_number,
                };
                let _ = self
                    .events
                    .send(NodeEvent::Status(reference.clone(), deleted));
            }
        }
    }
}
