//! Prometheus metrics, `GET /metrics` on the configured TCP address (text exposition
//! format). Each scrape reads the node afresh: per-port and uplink counters, drops by
//! reason, conntrack, SNAT and map fill, the latency of accepted Applies and Syncs,
//! and what this agent is.
use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{
    body::Bytes, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{
    kernel::datapath::Counters,
    node::{ConntrackStats, DriftTotals, Node, NodeCounters, NodeError},
};

/// The content type of the text exposition format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics listener on `address`: bound at start, so that a taken address stops the
/// agent there rather than leaving it without metrics.
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("binding metrics on TCP {address}"))?;
    info!(%address, "metrics listening (GET /metrics)");
    Ok(listener)
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(node: Arc<Node>, listener: TcpListener) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = listener
            .accept()
            .await
            .context("accepting a metrics client")?;
        let node = node.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| respond(node.clone(), request));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "metrics connection");
            }
        });
    }
}

async fn respond<B>(
    node: Arc<Node>,
    request: Request<B>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status, content_type, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a response of constant parts")
    };
    if request.method() != Method::GET || request.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "only GET /metrics\n".into(),
        ));
    }
    match snapshot(&node).await {
        Ok(snapshot) => Ok(reply(
            StatusCode::OK,
            CONTENT_TYPE,
            render(&snapshot, node.apply_latency()),
        )),
        Err(e) => {
            warn!(error = %e, "reading the datapath for metrics");
            Ok(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ))
        }
    }
}

/// What one scrape reports, read from the node.
pub struct Snapshot {
    pub counters: NodeCounters,
    pub conntrack: ConntrackStats,
    /// SNAT bindings, and room for how many.
    pub snat: (u64, u64),
    /// The agent-written maps: (name, entries, room for how many).
    pub maps: Vec<(&'static str, u64, u64)>,
    /// What the drift checks put back since start.
    pub drift_repaired: DriftTotals,
    /// Monitor events the ring buffer had no room for; `None` without a monitor.
    pub monitor_lost: Option<u64>,
}

async fn snapshot(node: &Node) -> Result<Snapshot, NodeError> {
    Ok(Snapshot {
        counters: node.counters(None).await?,
        conntrack: node.conntrack_stats().await?,
        snat: node.snat_fill().await?,
        maps: node.map_fill().await?,
        drift_repaired: node.drift_repaired(),
        monitor_lost: node.monitor_lost()?,
    })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortLabel {
    port: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    port: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabel {
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    abi_version: String,
}

/// A counter family by port (`port` "" for the uplink's own metrics).
fn port_counter(registry: &mut Registry, name: &str, help: &str) -> Family<PortLabel, Counter> {
    let family = Family::<PortLabel, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let gauge = Gauge::<i64>::default();
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry.register(name, help, gauge);
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let counter = Counter::<u64>::default();
    counter.inc_by(value);
    registry.register(name, help, counter);
}

/// The exposition of `snapshot`, with `apply_latency` (the node's own histogram).
pub fn render(snapshot: &Snapshot, apply_latency: &Histogram) -> String {
    let mut registry = Registry::with_prefix("dataplane");
    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            abi_version: dataplane_abi::ABI_VERSION.to_string(),
        })
        .set(1);
    registry.register("build_info", "This agent's version and map ABI", build);

    let rx_packets = port_counter(
        &mut registry,
        "port_rx_packets",
        "Frames a port sent into the datapath",
    );
    let rx_bytes = port_counter(
        &mut registry,
        "port_rx_bytes",
        "Bytes a port sent into the datapath",
    );
    let tx_packets = port_counter(
        &mut registry,
        "port_tx_packets",
        "Frames the datapath delivered to a port",
    );
    let tx_bytes = port_counter(
        &mut registry,
        "port_tx_bytes",
        "Bytes the datapath delivered to a port",
    );
    let drops = Family::<DropLabels, Counter>::default();
    registry.register(
        "port_drops",
        "Frames dropped at a port, by reason",
        drops.clone(),
    );
    let count_port = |port: &str, c: &Counters| {
        let label = PortLabel {
            port: port.to_owned(),
        };
        rx_packets.get_or_create(&label).inc_by(c.rx_packets);
        rx_bytes.get_or_create(&label).inc_by(c.rx_bytes);
        tx_packets.get_or_create(&label).inc_by(c.tx_packets);
        tx_bytes.get_or_create(&label).inc_by(c.tx_bytes);
        for (reason, n) in &c.drops {
            drops
                .get_or_create(&DropLabels {
                    port: port.to_owned(),
                    reason: reason.name().to_owned(),
                })
                .inc_by(*n);
        }
    };
    for (port, c) in &snapshot.counters.ports {
        count_port(port, c);
    }

    let unattributed = Family::<ReasonLabel, Counter>::default();
    registry.register(
        "unattributed_drops",
        "Frames dropped before any port could be charged with them, by reason",
        unattributed.clone(),
    );
    for (reason, n) in &snapshot.counters.unattributed {
        unattributed
            .get_or_create(&ReasonLabel {
                reason: reason.name().to_owned(),
            })
            .inc_by(*n);
    }

    if let Some((_, uplink)) = &snapshot.counters.uplink {
        counter(
            &mut registry,
            "uplink_rx_packets",
            "Frames that arrived on the uplink",
            uplink.rx_packets,
        );
        counter(
            &mut registry,
            "uplink_rx_bytes",
            "Bytes that arrived on the uplink",
            uplink.rx_bytes,
        );
        counter(
            &mut registry,
            "uplink_tx_packets",
            "Frames the datapath sent out of the uplink",
            uplink.tx_packets,
        );
        counter(
            &mut registry,
            "uplink_tx_bytes",
            "Bytes the datapath sent out of the uplink",
            uplink.tx_bytes,
        );
        let uplink_drops = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "uplink_drops",
            "Frames dropped on the uplink, by reason",
            uplink_drops.clone(),
        );
        for (reason, n) in &uplink.drops {
            uplink_drops
                .get_or_create(&ReasonLabel {
                    reason: reason.name().to_owned(),
                })
                .inc_by(*n);
        }
    }

    let ct = &snapshot.conntrack;
    let table_gauge =
        |registry: &mut Registry, name: &str, help: &str, values: [(&str, u64); 2]| {
            let family = Family::<TableLabel, Gauge>::default();
            for (table, value) in values {
                family
                    .get_or_create(&TableLabel {
                        table: table.to_owned(),
                    })
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            }
            registry.register(name, help, family);
        };
    table_gauge(
        &mut registry,
        "conntrack_entries",
        "Tracked connections (confirmed, or seen one way only)",
        [
            ("confirmed", ct.confirmed_entries),
            ("unconfirmed", ct.unconfirmed_entries),
        ],
    );
    table_gauge(
        &mut registry,
        "conntrack_capacity",
        "Connections each conntrack table holds",
        [
            ("confirmed", ct.confirmed_capacity),
            ("unconfirmed", ct.unconfirmed_capacity),
        ],
    );
    counter(
        &mut registry,
        "conntrack_table_full_drops",
        "New connections dropped: the confirmed table was full",
        ct.table_full_drops,
    );
    counter(
        &mut registry,
        "conntrack_evictions",
        "Unconfirmed connections pushed out by newer ones",
        ct.evictions,
    );
    counter(
        &mut registry,
        "conntrack_expired",
        "Connections removed idle past their timeout",
        ct.expired,
    );
    gauge(
        &mut registry,
        "snat_bindings",
        "SNAT bindings (connections translated to a gateway address)",
        snapshot.snat.0,
    );
    gauge(
        &mut registry,
        "snat_capacity",
        "SNAT bindings the table holds",
        snapshot.snat.1,
    );

    let map_entries = Family::<MapLabel, Gauge>::default();
    let map_capacity = Family::<MapLabel, Gauge>::default();
    for (map, entries, capacity) in &snapshot.maps {
        let label = MapLabel {
            map: (*map).to_owned(),
        };
        map_entries
            .get_or_create(&label)
            .set(i64::try_from(*entries).unwrap_or(i64::MAX));
        map_capacity
            .get_or_create(&label)
            .set(i64::try_from(*capacity).unwrap_or(i64::MAX));
    }
    registry.register(
        "map_entries",
        "Entries the agent wrote into each map",
        map_entries,
    );
    registry.register("map_capacity", "Entries each map holds", map_capacity);
    let drift = Family::<MapLabel, Counter>::default();
    for (map, entries) in &snapshot.drift_repaired.entries {
        drift
            .get_or_create(&MapLabel {
                map: (*map).to_owned(),
            })
            .inc_by(*entries);
    }
    registry.register(
        "drift_repaired",
        "Map entries found changed behind the agent's back and put back",
        drift,
    );
    let relinked = Counter::<u64>::default();
    relinked.inc_by(snapshot.drift_repaired.links);
    registry.register(
        "drift_relinked",
        "Dispatchers found detached from a device behind the agent's back and attached again",
        relinked,
    );
    let repinned = Counter::<u64>::default();
    repinned.inc_by(snapshot.drift_repaired.pins);
    registry.register(
        "drift_repinned",
        "Pinned maps and links found removed from bpffs and pinned again",
        repinned,
    );

    if let Some(lost) = snapshot.monitor_lost {
        counter(
            &mut registry,
            "monitor_lost_events",
            "Packet monitor events dropped: the ring buffer was full",
            lost,
        );
    }

    registry.register(
        "apply_duration_seconds",
        "Time from an accepted Apply or Sync to the datapath programmed",
        apply_latency.clone(),
    );
    let mut text = String::new();
    encode(&mut text, &registry).expect("writing into a String does not fail");
    text
}

#[cfg(test)]
mod tests {
    use dataplane_abi::DropReason;
    use prometheus_client::metrics::histogram::exponential_buckets;

    use super::*;

    fn snapshot() -> Snapshot {
        let port = Counters {
            rx_packets: 10,
            rx_bytes: 1000,
            tx_packets: 7,
            tx_bytes: 700,
            drops: vec![
                (DropReason::PolicyDenied, 3),
                (DropReason::SourceIpSpoofed, 1),
            ],
        };
        let uplink = Counters {
            rx_packets: 5,
            rx_bytes: 500,
            tx_packets: 4,
            tx_bytes: 400,
            drops: vec![(DropReason::NoNatBinding, 2)],
        };
        Snapshot {
            counters: NodeCounters {
                ports: vec![("port-a".to_owned(), port)],
                unattributed: vec![(DropReason::UnknownPort, 9)],
                uplink: Some(("eth1".to_owned(), uplink)),
            },
            conntrack: ConntrackStats {
                confirmed_entries: 12,
                unconfirmed_entries: 2,
                confirmed_capacity: 1024,
                unconfirmed_capacity: 256,
                new_inserts: 20,
                confirmed: 12,
                table_full_drops: 1,
                deletes: 3,
                evictions: 4,
                related: 0,
                expired: 5,
            },
            snat: (6, 262_144),
            maps: vec![("FDB", 40, 65_536), ("PORTS", 3, 4096)],
            drift_repaired: DriftTotals {
                entries: [("FDB", 2)].into(),
                links: 1,
                pins: 3,
            },
            monitor_lost: Some(11),
        }
    }

    #[test]
    fn a_scrape_names_every_figure_with_its_labels() {
        let latency = Histogram::new(exponential_buckets(1e-4, 2.0, 17));
        latency.observe(0.002);
        let text = render(&snapshot(), &latency);
        for line in [
            format!(
                "dataplane_build_info{{version=\"{}\",abi_version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION"),
                dataplane_abi::ABI_VERSION
            ),
            "dataplane_port_rx_packets_total{port=\"port-a\"} 10".to_owned(),
            "dataplane_port_tx_bytes_total{port=\"port-a\"} 700".to_owned(),
            "dataplane_port_drops_total{port=\"port-a\",reason=\"policy_denied\"} 3".to_owned(),
            "dataplane_port_drops_total{port=\"port-a\",reason=\"source_ip_spoofed\"} 1".to_owned(),
            "dataplane_unattributed_drops_total{reason=\"unknown_port\"} 9".to_owned(),
            "dataplane_uplink_rx_packets_total 5".to_owned(),
            "dataplane_uplink_drops_total{reason=\"no_nat_binding\"} 2".to_owned(),
            "dataplane_conntrack_entries{table=\"confirmed\"} 12".to_owned(),
            "dataplane_conntrack_capacity{table=\"unconfirmed\"} 256".to_owned(),
            "dataplane_conntrack_table_full_drops_total 1".to_owned(),
            "dataplane_conntrack_evictions_total 4".to_owned(),
            "dataplane_snat_bindings 6".to_owned(),
            "dataplane_snat_capacity 262144".to_owned(),
            "dataplane_apply_duration_seconds_count 1".to_owned(),
            "dataplane_map_entries{map=\"FDB\"} 40".to_owned(),
            "dataplane_map_capacity{map=\"PORTS\"} 4096".to_owned(),
            "dataplane_drift_repaired_total{map=\"FDB\"} 2".to_owned(),
            "dataplane_drift_relinked_total 1".to_owned(),
            "dataplane_drift_repinned_total 3".to_owned(),
            "dataplane_monitor_lost_events_total 11".to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_node_without_an_uplink_reports_none() {
        let mut without = snapshot();
        without.counters.uplink = None;
        let text = render(&without, &Histogram::new(exponential_buckets(1e-4, 2.0, 2)));
        assert!(!text.contains("dataplane_uplink"), "{text}");
    }
}
