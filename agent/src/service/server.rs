//! Serving the API: the Dataplane service with the standard health and reflection
//! services beside it, on a unix socket (always, mode 0600) and a TCP address
//! (optional; mutual TLS unless explicitly insecure).

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use anyhow::Context as _;
use dataplane_proto::v1::{dataplane_server::DataplaneServer, FILE_DESCRIPTOR_SET};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{server::Router, Certificate, Identity, Server, ServerTlsConfig},
};
use tracing::{info, warn};

use super::{grpc::DataplaneService, limits::RateLimit};
use crate::{
    config::{TcpApi, TcpAuth},
    node::Node,
};

/// How long shutdown waits for clients to finish.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Largest request the agent decodes (a Sync of a large node's whole state fits).
const MAX_REQUEST_BYTES: usize = 256 * 1024 * 1024;

/// The TLS side of `auth`: this agent's identity, and the CA its clients must prove
/// themselves with. `None` for an insecure API.
fn tls_config(auth: &TcpAuth) -> anyhow::Result<Option<ServerTlsConfig>> {
    let TcpAuth::MutualTls {
        cert,
        key,
        client_ca,
    } = auth
    else {
        return Ok(None);
    };
    let read =
        |path: &Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    Ok(Some(
        ServerTlsConfig::new()
            .identity(Identity::from_pem(read(cert)?, read(key)?))
            .client_ca_root(Certificate::from_pem(read(client_ca)?)),
    ))
}

async fn router(
    node: Arc<Node>,
    tls: Option<ServerTlsConfig>,
    limit: Arc<RateLimit>,
) -> anyhow::Result<Router> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<DataplaneServer<DataplaneService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let dataplane = InterceptedService::new(
        DataplaneServer::new(DataplaneService::new(node))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        move |request| limit.check(request),
    );
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).context("the TCP API's TLS setup")?;
    }
    Ok(server
        .add_service(health_service)
        .add_service(reflection)
        .add_service(dataplane))
}

/// Serves until `shutdown` completes.
pub async fn serve(
    node: Arc<Node>,
    socket: &Path,
    tcp: Option<&TcpApi>,
    max_requests_per_second: u32,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // TCP first: once the unix socket answers (what tools wait for), every listener is
    // up, and a bad TLS file has already stopped the start.
    let tcp = match tcp {
        Some(api) => {
            let address = api.address;
            let tls = tls_config(&api.auth)?;
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("binding TCP {address}"))?;
            if tls.is_some() {
                info!(%address, "gRPC listening on TCP, mutual TLS");
            } else {
                warn!(%address, "gRPC listening on TCP without authentication (grpc_tcp_insecure): anyone who can reach it can program this node");
            }
            Some((listener, tls))
        }
        None => None,
    };
    // A socket file left by an earlier run (the state directory lock says none is
    // running now) would make bind fail.
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing stale socket {}", socket.display()))
        }
        _ => {}
    }
    let unix = UnixListener::bind(socket)
        .with_context(|| format!("binding unix socket {}", socket.display()))?;
    // Only root (the API server's relay on this node) may program the datapath.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", socket.display()))?;
    info!(socket = %socket.display(), "gRPC listening on unix socket");

    // One budget for every listener.
    let limit = Arc::new(RateLimit::new(max_requests_per_second));
    let (stop, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut servers = tokio::task::JoinSet::new();
    {
        let router = router(node.clone(), None, limit.clone()).await?;
        let mut stopped = stop.subscribe();
        servers.spawn(async move {
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(unix), async move {
                    let _ = stopped.recv().await;
                })
                .await
                .context("unix socket server")
        });
    }
    if let Some((listener, tls)) = tcp {
        let router = router(node, tls, limit).await?;
        let mut stopped = stop.subscribe();
        servers.spawn(async move {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = stopped.recv().await;
                })
                .await
                .context("TCP server")
        });
    }

    tokio::select! {
        () = shutdown => {}
        Some(finished) = servers.join_next() => {
            finished.context("server task")??;
            anyhow::bail!("a gRPC server stopped unexpectedly");
        }
    }
    let _ = stop.send(());
    // Open connections get a moment to finish their calls; a client that keeps its
    // connection (or a Watch stream) open must not hold the shutdown up.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(finished) = servers.join_next().await {
            finished.context("server task")??;
        }
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(result) => result?,
        Err(_) => {
            warn!(grace = ?SHUTDOWN_GRACE, "clients still connected at shutdown; closing anyway");
            servers.abort_all();
        }
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}
