//! gRPC plumbing: the replicator's servers and its client to a peer site, over mutual TLS
//! (RFC 8446) with the site's certificate ([`crate::tls`]).

use std::future::Future;
use std::time::Duration;

use ferry_schemas::proto::{MoverServer, ReplicationClient, ReplicationServer};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server};

use crate::destination::Destination;
use crate::mover::MoverHub;
use crate::tls::{client_tls_config, server_tls_config, TlsMaterial};

/// Largest message accepted, in bytes: a chunk body is at most 1 MiB plus framing; manifests
/// of a large app can be several MiB.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Connect timeout to a peer, in seconds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 flow-control window per stream, in bytes (RFC 9113 §6.9). The protocol default of
/// 64 KiB makes every 1 MiB chunk wait for 16 WINDOW_UPDATE round trips; 4 MiB lets a chunk
/// travel at once.
pub const STREAM_WINDOW_BYTES: u32 = 4 << 20;
/// HTTP/2 flow-control window per connection, in bytes.
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

/// Transport failures.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The endpoint is not `host:port`.
    #[error("invalid replicator endpoint {0:?} (want host:port)")]
    Endpoint(String),
    /// TLS could not be configured or the server failed.
    #[error("gRPC transport")]
    Tonic(#[from] tonic::transport::Error),
}

/// Serves the `Replication` service (for peers, with mutual TLS) on `listener` until
/// `shutdown` resolves.
///
/// # Errors
/// [`TransportError::Tonic`] when TLS cannot be configured or the server fails.
pub async fn serve_replication(
    listener: TcpListener,
    tls: &TlsMaterial,
    destination: Destination,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TransportError> {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .tls_config(server_tls_config(tls))?
        .add_service(
            ReplicationServer::new(destination)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}

/// Serves the `Mover` service (for this site's mover pods: plain HTTP/2, authenticated by the
/// per-job token) on `listener` until `shutdown` resolves.
///
/// # Errors
/// [`TransportError::Tonic`] when the server fails.
pub async fn serve_movers(
    listener: TcpListener,
    hub: MoverHub,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TransportError> {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .add_service(
            MoverServer::new(hub)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}

/// A client to the peer replicator at `endpoint` (`host:port`), presenting `tls` and
/// checking the peer's certificate names `host`. Connects lazily: errors surface on the first
/// call, as `Unavailable`.
///
/// # Errors
/// [`TransportError::Endpoint`] for a malformed endpoint; [`TransportError::Tonic`] when TLS
/// cannot be configured.
pub fn connect_peer(
    endpoint: &str,
    tls: &TlsMaterial,
) -> Result<ReplicationClient<Channel>, TransportError> {
    let host = endpoint
        .rsplit_once(':')
        .map(|(host, _)| host.trim_start_matches('[').trim_end_matches(']'))
        .filter(|h| !h.is_empty())
        .ok_or_else(|| TransportError::Endpoint(endpoint.to_string()))?;
    let channel = Endpoint::from_shared(format!("https://{endpoint}"))
        .map_err(|_| TransportError::Endpoint(endpoint.to_string()))?
        .tls_config(client_tls_config(tls, host))?
        .connect_timeout(CONNECT_TIMEOUT)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_lazy();
    Ok(ReplicationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}
