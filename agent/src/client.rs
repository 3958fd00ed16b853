//! A gRPC client of the agent over its unix socket, for `ctl`, tests and tools.

use std::path::{Path, PathBuf};

use dataplane_proto::v1::dataplane_client::DataplaneClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to the agent listening on `socket`.
pub async fn connect_unix(
    socket: &Path,
) -> Result<DataplaneClient<Channel>, tonic::transport::Error> {
    Ok(DataplaneClient::new(unix_channel(socket).await?))
}

/// A channel to the agent's socket, for any of its services (health, reflection too).
pub async fn unix_channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.to_path_buf();
    // The URI is required by the API but unused: the connector below dials the socket.
    Endpoint::from_static("http://agent.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
}
