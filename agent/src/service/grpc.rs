//! The `dataplane.v1.Dataplane` service: converts requests to the core's types, calls the
//! node, converts results back. No logic of its own beyond that.

use std::{borrow::Borrow, pin::Pin, sync::Arc};

use dataplane_proto::v1 as pb;
use futures::Stream;
use tokio_stream::{
    wrappers::{errors::BroadcastStreamRecvError, BroadcastStream},
    StreamExt,
};
use tonic::{Request, Response, Status};
use tracing::warn;

use super::{
    convert::{
        changes_from_proto, drop_reason_to_proto, resources_from_proto, status_to_proto,
        trace_to_proto,
    },
    errors::{
        field_status, missing_field, node_status, not_found, query_status, request_status,
        trace_status, validation_status, RequestList,
    },
};
use crate::{
    core::{
        model::{self, ResourceKind, ResourceRef},
        trace::Probe,
    },
    kernel::{
        datapath::Counters,
        monitor::{MonitorEvent, MonitorFilter, Subscription},
    },
    node::{Committed, Connection, Node, NodeEvent},
};

pub struct DataplaneService {
    node: Arc<Node>,
}

impl DataplaneService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

fn statuses(committed: &Committed) -> Vec<pb::ResourceStatus> {
    committed
        .statuses
        .iter()
        .map(|(reference, status)| status_to_proto(reference, status))
        .collect()
}

fn event_to_proto(event: NodeEvent) -> pb::WatchEvent {
    let event = match event {
        NodeEvent::Status(reference, status) => {
            pb::watch_event::Event::Status(status_to_proto(&reference, &status))
        }
        NodeEvent::Applied {
            generation,
            operation,
            changes,
        } => pb::watch_event::Event::Applied(pb::ApplyResult {
            generation,
            operation: operation.as_str().to_owned(),
            changes,
        }),
        NodeEvent::Drift(drift) => pb::watch_event::Event::Drift(pb::DriftRepaired {
            maps: drift
                .entries
                .into_iter()
                .map(|(map, entries)| pb::drift_repaired::MapEntries {
                    map: map.to_owned(),
                    entries,
                })
                .collect(),
            links: drift.links,
            pins: drift.pins,
        }),
    };
    pb::WatchEvent { event: Some(event) }
}

fn connection_to_proto(connection: Connection) -> pb::Connection {
    let endpoint = |(address, port): (std::net::IpAddr, u16)| pb::Endpoint {
        address: address.to_string(),
        port: u32::from(port),
    };
    let state = match connection.state {
        dataplane_abi::ct_state::OPEN => pb::ConnectionState::Open,
        dataplane_abi::ct_state::SYN_SENT => pb::ConnectionState::SynSent,
        dataplane_abi::ct_state::SYN_RECV => pb::ConnectionState::SynRecv,
        dataplane_abi::ct_state::ESTABLISHED => pb::ConnectionState::Established,
        dataplane_abi::ct_state::CLOSING => pb::ConnectionState::Closing,
        dataplane_abi::ct_state::CLOSED => pb::ConnectionState::Closed,
        _ => pb::ConnectionState::Unspecified,
    };
    pb::Connection {
        port_id: connection.port_id,
        protocol: u32::from(connection.protocol),
        source: Some(endpoint(connection.source)),
        destination: Some(endpoint(connection.destination)),
        direction: if connection.egress {
            pb::ConnectionDirection::Egress
        } else {
            pb::ConnectionDirection::Ingress
        } as i32,
        state: state as i32,
        replied: connection.replied,
        idle_seconds: connection.idle_seconds,
    }
}

fn drop_counts(drops: &[(dataplane_abi::DropReason, u64)]) -> Vec<pb::DropCount> {
    drops
        .iter()
        .map(|(reason, packets)| pb::DropCount {
            reason: drop_reason_to_proto(*reason) as i32,
            packets: *packets,
        })
        .collect()
}

/// Body of a Get: the resource as stored plus its status, or NOT_FOUND.
macro_rules! get_body {
    ($self:ident, $request:ident, $field:ident, $kind:ident, $label:literal,
     $with_status:ident { $item:ident }) => {{
        let id = $request.into_inner().id;
        $self
            .node
            .read(|state, statuses| {
                state.$field.get(&id).map(|resource| pb::$with_status {
                    // Some kinds are held behind an `Arc`.
                    $item: Some(Borrow::<model::$kind>::borrow(resource).into()),
                    status: lookup_status(statuses, ResourceKind::$kind, &id),
                })
            })
            .await
            .map(Response::new)
            .ok_or_else(|| not_found($label, &id))
    }};
}

/// Body of a List: every resource of the kind with its status.
macro_rules! list_body {
    ($self:ident, $field:ident, $kind:ident, $with_status:ident { $item:ident },
     $list_response:ident { $items:ident }) => {{
        let $items = $self
            .node
            .read(|state, statuses| {
                state
                    .$field
                    .iter()
                    .map(|(id, resource)| pb::$with_status {
                        // Some kinds are held behind an `Arc`.
                        $item: Some(Borrow::<model::$kind>::borrow(resource).into()),
                        status: lookup_status(statuses, ResourceKind::$kind, id),
                    })
                    .collect()
            })
            .await;
        Ok(Response::new(pb::$list_response { $items }))
    }};
}

fn lookup_status(
    statuses: &std::collections::BTreeMap<ResourceRef, crate::core::compile::ResourceStatus>,
    kind: ResourceKind,
    id: &str,
) -> Option<pb::ResourceStatus> {
    let reference = ResourceRef {
        kind,
        id: id.to_owned(),
    };
    statuses
        .get(&reference)
        .map(|status| status_to_proto(&reference, status))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;
type MonitorStream = Pin<Box<dyn Stream<Item = Result<pb::MonitorEvent, Status>> + Send>>;

fn lost(count: u64) -> pb::MonitorEvent {
    pb::MonitorEvent {
        event: Some(pb::monitor_event::Event::Lost(pb::LostEvents { count })),
    }
}

#[tonic::async_trait]
impl pb::dataplane_server::Dataplane for DataplaneService {
    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let changes = changes_from_proto(request.into_inner().changes)
            .map_err(|e| validation_status(&e, RequestList::Changes))?;
        let committed = self
            .node
            .apply(&changes)
            .await
            .map_err(|e| node_status(e, RequestList::Changes))?;
        Ok(Response::new(pb::ApplyResponse {
            statuses: statuses(&committed),
            generation: committed.generation,
        }))
    }

    async fn sync(
        &self,
        request: Request<pb::SyncRequest>,
    ) -> Result<Response<pb::SyncResponse>, Status> {
        let resources = resources_from_proto(request.into_inner().resources)
            .map_err(|e| validation_status(&e, RequestList::Resources))?;
        let committed = self
            .node
            .sync(resources)
            .await
            .map_err(|e| node_status(e, RequestList::Resources))?;
        Ok(Response::new(pb::SyncResponse {
            statuses: statuses(&committed),
            generation: committed.generation,
            created: committed.created,
            updated: committed.updated,
            deleted: committed.deleted,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // Subscribe before reading the current statuses so nothing falls in between.
        let events = BroadcastStream::new(self.node.subscribe()).filter_map(|event| match event {
            Ok(event) => Some(Ok(event_to_proto(event))),
            Err(lagged) => {
                warn!(error = %lagged, "a watcher fell behind; events were dropped");
                Some(Err(Status::data_loss(format!(
                    "{lagged}; re-subscribe with include_current"
                ))))
            }
        });
        let current: Vec<Result<pb::WatchEvent, Status>> = if request.into_inner().include_current {
            self.node
                .read(|_, statuses| {
                    statuses
                        .iter()
                        .map(|(reference, status)| {
                            Ok(event_to_proto(NodeEvent::Status(
                                reference.clone(),
                                status.clone(),
                            )))
                        })
                        .collect()
                })
                .await
        } else {
            Vec::new()
        };
        Ok(Response::new(Box::pin(
            tokio_stream::iter(current).chain(events),
        )))
    }

    async fn get_network(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::NetworkWithStatus>, Status> {
        get_body!(
            self,
            request,
            networks,
            Network,
            "network",
            NetworkWithStatus { network }
        )
    }

    async fn list_networks(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        list_body!(
            self,
            networks,
            Network,
            NetworkWithStatus { network },
            ListNetworksResponse { networks }
        )
    }

    async fn get_subnet(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::SubnetWithStatus>, Status> {
        get_body!(
            self,
            request,
            subnets,
            Subnet,
            "subnet",
            SubnetWithStatus { subnet }
        )
    }

    async fn list_subnets(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListSubnetsResponse>, Status> {
        list_body!(
            self,
            subnets,
            Subnet,
            SubnetWithStatus { subnet },
            ListSubnetsResponse { subnets }
        )
    }

    async fn get_port(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::PortWithStatus>, Status> {
        get_body!(self, request, ports, Port, "port", PortWithStatus { port })
    }

    async fn list_ports(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListPortsResponse>, Status> {
        list_body!(
            self,
            ports,
            Port,
            PortWithStatus { port },
            ListPortsResponse { ports }
        )
    }

    async fn get_security_group(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::SecurityGroupWithStatus>, Status> {
        get_body!(
            self,
            request,
            security_groups,
            SecurityGroup,
            "security group",
            SecurityGroupWithStatus { security_group }
        )
    }

    async fn list_security_groups(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListSecurityGroupsResponse>, Status> {
        list_body!(
            self,
            security_groups,
            SecurityGroup,
            SecurityGroupWithStatus { security_group },
            ListSecurityGroupsResponse { security_groups }
        )
    }

    async fn get_router(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::RouterWithStatus>, Status> {
        get_body!(
            self,
            request,
            routers,
            Router,
            "router",
            RouterWithStatus { router }
        )
    }

    async fn list_routers(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListRoutersResponse>, Status> {
        list_body!(
            self,
            routers,
            Router,
            RouterWithStatus { router },
            ListRoutersResponse { routers }
        )
    }

    async fn get_floating_ip(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::FloatingIpWithStatus>, Status> {
        get_body!(
            self,
            request,
            floating_ips,
            FloatingIp,
            "floating IP",
            FloatingIpWithStatus { floating_ip }
        )
    }

    async fn list_floating_ips(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListFloatingIpsResponse>, Status> {
        list_body!(
            self,
            floating_ips,
            FloatingIp,
            FloatingIpWithStatus { floating_ip },
            ListFloatingIpsResponse { floating_ips }
        )
    }

    async fn get_qos_policy(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::QosPolicyWithStatus>, Status> {
        get_body!(
            self,
            request,
            qos_policies,
            QosPolicy,
            "QoS policy",
            QosPolicyWithStatus { qos_policy }
        )
    }

    async fn list_qos_policies(
        &self,
        _request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListQosPoliciesResponse>, Status> {
        list_body!(
            self,
            qos_policies,
            QosPolicy,
            QosPolicyWithStatus { qos_policy },
            ListQosPoliciesResponse { qos_policies }
        )
    }

    async fn get_port_counters(
        &self,
        request: Request<pb::GetPortCountersRequest>,
    ) -> Result<Response<pb::GetPortCountersResponse>, Status> {
        let port_id = request.into_inner().port_id;
        let port_id = (!port_id.is_empty()).then_some(port_id.as_str());
        let counters = self.node.counters(port_id).await.map_err(query_status)?;
        let to_proto = |(port_id, counters): (String, Counters)| pb::PortCounters {
            port_id,
            rx_packets: counters.rx_packets,
            rx_bytes: counters.rx_bytes,
            tx_packets: counters.tx_packets,
            tx_bytes: counters.tx_bytes,
            drops: drop_counts(&counters.drops),
        };
        Ok(Response::new(pb::GetPortCountersResponse {
            ports: counters.ports.into_iter().map(to_proto).collect(),
            unattributed_drops: drop_counts(&counters.unattributed),
            uplink: counters.uplink.map(to_proto),
        }))
    }

    async fn get_rule_counters(
        &self,
        request: Request<pb::GetRuleCountersRequest>,
    ) -> Result<Response<pb::GetRuleCountersResponse>, Status> {
        let group = request.into_inner().security_group_id;
        let rules = self
            .node
            .rule_counters((!group.is_empty()).then_some(group.as_str()))
            .await
            .map_err(query_status)?;
        Ok(Response::new(pb::GetRuleCountersResponse {
            rules: rules
                .into_iter()
                .map(|(security_group_id, rule_id, counters)| pb::RuleCounters {
                    security_group_id,
                    rule_id,
                    packets: counters.packets,
                    bytes: counters.bytes,
                })
                .collect(),
        }))
    }

    async fn list_connections(
        &self,
        request: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
        let port_id = request.into_inner().port_id;
        let connections = self
            .node
            .connections((!port_id.is_empty()).then_some(port_id.as_str()))
            .await
            .map_err(query_status)?;
        Ok(Response::new(pb::ListConnectionsResponse {
            connections: connections.into_iter().map(connection_to_proto).collect(),
        }))
    }

    async fn list_nat_bindings(
        &self,
        _request: Request<pb::ListNatBindingsRequest>,
    ) -> Result<Response<pb::ListNatBindingsResponse>, Status> {
        let bindings = self.node.nat_bindings().await.map_err(query_status)?;
        let endpoint = |(address, port): (std::net::Ipv4Addr, u16)| pb::Endpoint {
            address: address.to_string(),
            port: u32::from(port),
        };
        Ok(Response::new(pb::ListNatBindingsResponse {
            bindings: bindings
                .into_iter()
                .map(|b| pb::NatBinding {
                    protocol: u32::from(b.protocol),
                    internal: Some(endpoint(b.internal)),
                    external: Some(endpoint(b.external)),
                    remote: Some(endpoint(b.remote)),
                    port_id: b.port_id.unwrap_or_default(),
                    idle_seconds: b.idle_seconds,
                    expires_in_seconds: b.expires_in_seconds,
                })
                .collect(),
        }))
    }

    async fn trace_packet(
        &self,
        request: Request<pb::TracePacketRequest>,
    ) -> Result<Response<pb::TracePacketResponse>, Status> {
        let probe = Probe::try_from(request.into_inner()).map_err(|e| field_status(&e))?;
        let trace = self
            .node
            .trace_packet(&probe)
            .await
            .map_err(|e| trace_status(&e))?;
        Ok(Response::new(trace_to_proto(trace)))
    }

    async fn flush_connections(
        &self,
        request: Request<pb::FlushConnectionsRequest>,
    ) -> Result<Response<pb::FlushConnectionsResponse>, Status> {
        let port_id = request.into_inner().port_id;
        if port_id.is_empty() {
            return Err(missing_field("port_id"));
        }
        let flushed = self
            .node
            .flush_connections(&port_id)
            .await
            .map_err(query_status)?;
        Ok(Response::new(pb::FlushConnectionsResponse { flushed }))
    }

    async fn get_conntrack_stats(
        &self,
        _request: Request<pb::GetConntrackStatsRequest>,
    ) -> Result<Response<pb::ConntrackStats>, Status> {
        let stats = self.node.conntrack_stats().await.map_err(query_status)?;
        Ok(Response::new(pb::ConntrackStats {
            confirmed_entries: stats.confirmed_entries,
            unconfirmed_entries: stats.unconfirmed_entries,
            confirmed_capacity: stats.confirmed_capacity,
            unconfirmed_capacity: stats.unconfirmed_capacity,
            new_inserts: stats.new_inserts,
            confirmed: stats.confirmed,
            table_full_drops: stats.table_full_drops,
            deletes: stats.deletes,
            evictions: stats.evictions,
            related: stats.related,
            expired: stats.expired,
        }))
    }

    async fn get_port_policy(
        &self,
        request: Request<pb::GetPortPolicyRequest>,
    ) -> Result<Response<pb::PortPolicy>, Status> {
        let port_id = request.into_inner().port_id;
        if port_id.is_empty() {
            return Err(missing_field("port_id"));
        }
        let policy = self
            .node
            .port_policy(&port_id)
            .await
            .map_err(query_status)?;
        Ok(Response::new(pb::PortPolicy::from(&policy)))
    }

    type MonitorStream = MonitorStream;

    async fn monitor(
        &self,
        request: Request<pb::MonitorRequest>,
    ) -> Result<Response<Self::MonitorStream>, Status> {
        let filter =
            MonitorFilter::try_from(request.into_inner()).map_err(|e| request_status(&e))?;
        if let Some(port_id) = &filter.port_id {
            self.node
                .check_programmed(port_id)
                .await
                .map_err(query_status)?;
        }
        let monitor = self
            .node
            .monitor()
            .ok_or_else(|| Status::unavailable("this agent has no packet monitor"))?;
        let Subscription { events, emitting } = monitor.subscribe(filter.trace).map_err(|e| {
            warn!(error = ?e, "switching the monitor's events on failed");
            Status::internal(format!("switching the monitor's events on failed: {e}"))
        })?;
        // `emitting` lives as long as the stream: the programs emit while it is read.
        let stream = BroadcastStream::new(events).filter_map(move |event| {
            let _ = &emitting;
            match event {
                Ok(MonitorEvent::Packet(packet)) => filter.matches(&packet).then(|| {
                    Ok(pb::MonitorEvent {
                        event: Some(pb::monitor_event::Event::Packet((&*packet).into())),
                    })
                }),
                Ok(MonitorEvent::Lost(count)) => Some(Ok(lost(count))),
                Err(BroadcastStreamRecvError::Lagged(count)) => Some(Ok(lost(count))),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
