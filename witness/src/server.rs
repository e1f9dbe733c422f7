//! Runs one witness: the raft node thread, the outbound raft router, and both gRPC services
//! (`Witness` for sites, `RaftPeer` for witnesses) on one mutual-TLS listener.

use std::future::Future;

use ferry_schemas::proto::witness::raft_peer_server::RaftPeerServer;
use ferry_schemas::proto::witness::witness_server::WitnessServer;
use ferry_tls::{server_tls_config, TlsMaterial};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::node::{self, NodeConfig, NodeError, NodeHandle};
use crate::service::WitnessService;
use crate::transport::{self, PeerService};

/// Errors running a witness.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The node could not start (storage, raft).
    #[error("starting the witness node")]
    Node(#[from] NodeError),
    /// TLS could not be configured or the gRPC server failed.
    #[error("serving gRPC")]
    Grpc(#[from] tonic::transport::Error),
}

/// Starts witness `cfg.id` and serves on `listener` until `shutdown` resolves, then stops the
/// node thread and the raft router. `on_start`
/// receives the node handle once the node runs (tests use it to observe the node).
///
/// # Errors
/// [`ServeError`] when the node cannot start or the server fails.
pub async fn serve(
    cfg: NodeConfig,
    listener: TcpListener,
    tls: TlsMaterial,
    on_start: impl FnOnce(NodeHandle),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (outbox_tx, outbox_rx) = tokio::sync::mpsc::unbounded_channel();
    let rule = cfg.rule;
    let peers = cfg.peers.clone();
    let node = node::start(cfg, outbox_tx)?;
    let router = tokio::spawn(transport::route(
        node.clone(),
        outbox_rx,
        peers,
        tls.clone(),
    ));
    on_start(node.clone());
    Server::builder()
        .tls_config(server_tls_config(&tls))?
        .add_service(
            RaftPeerServer::new(PeerService::new(node.clone())).max_decoding_message_size(64 << 20),
        )
        .add_service(WitnessServer::new(WitnessService::new(node.clone(), rule)))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    // The router and the node thread hold each other's channels: end both explicitly, so a
    // witness stopped in-process releases its port, its sled lock and its peers.
    router.abort();
    node.stop();
    Ok(())
}
