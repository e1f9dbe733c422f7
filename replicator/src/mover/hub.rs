//! Where mover pods dial in: the replicator's `Mover` gRPC service, and the mover's client.
//!
//! A replicator that needs a volume creates a mover pod with a fresh token in its env and
//! calls [`MoverHub::expect`] with that token. The pod mounts the volume, dials the hub and says
//! hello with the token; the hub hands the connection to whoever expected it, as a
//! [`MoverSession`]. Movers dial in (rather than listen) so no port has to be allocated per
//! pod, which matters in the lab, where all pods of a site share one address.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_schemas::proto::replication::{
    mover_client::MoverClient, mover_event::Event, mover_server::Mover, MoverCommand, MoverEvent,
    MoverHello,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::session::MoverSession;

const DEPTH: usize = 8;

/// The replicator's registry of movers it is waiting for, served as the `Mover` gRPC service.
#[derive(Debug, Default, Clone)]
pub struct MoverHub {
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<MoverSession>>>>,
}

impl MoverHub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `token` and returns where its session arrives once the mover dials in. Drop
    /// the receiver to stop waiting (a late mover is then refused).
    pub fn expect(&self, token: &str) -> oneshot::Receiver<MoverSession> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(token.to_string(), tx);
        rx
    }

    /// Forgets `token` (after a timeout or when the pod was deleted).
    pub fn forget(&self, token: &str) {
        self.lock().remove(token);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<MoverSession>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl Mover for MoverHub {
    type AttachStream = ReceiverStream<Result<MoverCommand, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<MoverEvent>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let token = match inbound.next().await {
            Some(Ok(MoverEvent {
                event: Some(Event::Hello(MoverHello { token })),
            })) => token,
            Some(Err(status)) => return Err(status),
            _ => return Err(Status::invalid_argument("a mover must say hello first")),
        };
        let Some(waiter) = self.lock().remove(&token) else {
            return Err(Status::permission_denied(format!(
                "no replicator job expects mover token {token:?}"
            )));
        };
        let (command_tx, mut command_rx) = mpsc::channel::<MoverCommand>(DEPTH);
        let (event_tx, event_rx) = mpsc::channel::<MoverEvent>(DEPTH);
        let (out_tx, out_rx) = mpsc::channel::<Result<MoverCommand, Status>>(DEPTH);
        tokio::spawn(async move {
            while let Some(command) = command_rx.recv().await {
                if out_tx.send(Ok(command)).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            while let Some(Ok(event)) = inbound.next().await {
                if event_tx.send(event).await.is_err() {
                    break;
                }
            }
        });
        if waiter
            .send(MoverSession::new(command_tx, event_rx))
            .is_err()
        {
            return Err(Status::cancelled(
                "the replicator stopped waiting for this mover",
            ));
        }
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }
}

/// Failures of a mover process.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The replicator's address is not a valid URI.
    #[error("invalid replicator address {0:?}")]
    Address(String),
    /// Connecting or the stream failed.
    #[error("attaching to the replicator at {address}")]
    Transport {
        /// The address dialled.
        address: String,
        /// The cause.
        #[source]
        source: tonic::Status,
    },
    /// Connecting failed.
    #[error("connecting to the replicator at {address}")]
    Connect {
        /// The address dialled.
        address: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The mover process: dials the replicator at `address` (e.g. `http://127.0.1.1:7444`),
/// presents `token`, then serves commands on the volume at `root` until the replicator closes
/// the session.
///
/// # Errors
/// [`AttachError`] when the replicator cannot be reached or refuses the token.
pub async fn attach_and_serve(
    address: &str,
    token: &str,
    root: PathBuf,
) -> Result<(), AttachError> {
    let endpoint = tonic::transport::Endpoint::from_shared(address.to_string())
        .map_err(|_| AttachError::Address(address.to_string()))?
        .initial_stream_window_size(crate::transport::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(crate::transport::CONNECTION_WINDOW_BYTES);
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| AttachError::Connect {
            address: address.to_string(),
            source,
        })?;
    let mut client = MoverClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let (event_tx, event_rx) = mpsc::channel::<MoverEvent>(DEPTH);
    event_tx
        .send(MoverEvent {
            event: Some(Event::Hello(MoverHello {
                token: token.to_string(),
            })),
        })
        .await
        .map_err(|_| AttachError::Address(address.to_string()))?;
    let response = client
        .attach(ReceiverStream::new(event_rx))
        .await
        .map_err(|source| AttachError::Transport {
            address: address.to_string(),
            source,
        })?;
    let mut commands = response.into_inner();
    let (command_tx, command_rx) = mpsc::channel::<MoverCommand>(DEPTH);
    let agent = tokio::task::spawn_blocking(move || super::agent::run(root, command_rx, event_tx));
    let mut result = Ok(());
    loop {
        match commands.next().await {
            Some(Ok(command)) => {
                if command_tx.send(command).await.is_err() {
                    break;
                }
            }
            Some(Err(source)) => {
                result = Err(AttachError::Transport {
                    address: address.to_string(),
                    source,
                });
                break;
            }
            None => break,
        }
    }
    drop(command_tx);
    let _ = agent.await;
    result
}
