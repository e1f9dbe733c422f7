//! The client a site's failover controller uses to talk to the witness quorum (the `Witness`
//! gRPC service in `ferry_schemas::proto::witness`, over mutual TLS), without the quorum's
//! server side (raft, sled).
//!
//! Heartbeats go to every witness at once (each keeps its own soft state, and the detector
//! counts witnesses); everything else goes to one witness, which proposes it through raft, and
//! moves on to the next when a witness is unreachable or has no quorum. A definitive refusal
//! (stale epoch, unknown pair, bad argument) is returned at once, never retried elsewhere.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ferry_schemas::proto::witness::witness_client::WitnessClient;
use ferry_schemas::proto::witness::{
    Decision, GetStateRequest, HeartbeatReply, HeartbeatRequest, LeaseReply, PairState,
    ProposeMigrationRequest, RegisterPairRequest, RenewLeaseRequest, RequestFailoverRequest,
    StateReply, WatchRequest,
};
use std::time::Duration;

use ferry_tls::{client_tls_config, TlsMaterial};
use futures::future::join_all;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

/// How long a witness waits for a proposal or read to commit before it answers "no witness
/// quorum" (`UNAVAILABLE`); the witness server uses this value.
pub const QUORUM_TIMEOUT: Duration = Duration::from_secs(3);

/// A gRPC channel to a witness at `host:port` over mutual TLS, checking that the peer's
/// certificate names `host`. Connects lazily; a call times out after `timeout`.
///
/// # Errors
/// `Status::invalid_argument` for a malformed address or TLS material.
pub fn channel(address: &str, tls: &TlsMaterial, timeout: Duration) -> Result<Channel, Status> {
    let host = address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            Status::invalid_argument(format!("witness address {address:?}: want host:port"))
        })?;
    let ep = Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| Status::invalid_argument(format!("witness address {address:?}: {e}")))?
        .tls_config(client_tls_config(tls, host))
        .map_err(|e| Status::invalid_argument(format!("witness TLS material: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout);
    Ok(ep.connect_lazy())
}

/// A call to one witness gives up after this: longer than the witness's own commit timeout, so
/// its "no witness quorum" answer arrives rather than a cancellation.
pub const CALL_TIMEOUT: std::time::Duration =
    QUORUM_TIMEOUT.saturating_add(std::time::Duration::from_secs(2));

/// A client of the whole quorum.
#[derive(Clone)]
pub struct QuorumClient {
    witnesses: Arc<Vec<(String, WitnessClient<Channel>)>>,
    /// The witness that answered last: tried first next time.
    preferred: Arc<AtomicUsize>,
}

/// The result of one heartbeat round.
#[derive(Debug, Default)]
pub struct HeartbeatRound {
    /// Replies, from the witnesses that answered.
    pub replies: Vec<HeartbeatReply>,
    /// How many witnesses were asked.
    pub asked: usize,
}

impl HeartbeatRound {
    /// Whether a majority of the witnesses answered.
    pub fn reached_quorum(&self) -> bool {
        self.replies.len() > self.asked / 2
    }
}

fn definitive(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument | Code::AlreadyExists
    )
}

impl QuorumClient {
    /// A client of the witnesses at `addresses` (`host:port` each), presenting `tls`.
    ///
    /// # Errors
    /// `Status::invalid_argument` when an address or the TLS material is malformed.
    pub fn new(addresses: &[String], tls: &TlsMaterial) -> Result<Self, Status> {
        let witnesses = addresses
            .iter()
            .map(|a| {
                Ok((
                    a.clone(),
                    WitnessClient::new(channel(a, tls, CALL_TIMEOUT)?),
                ))
            })
            .collect::<Result<Vec<_>, Status>>()?;
        if witnesses.is_empty() {
            return Err(Status::invalid_argument("no witness addresses"));
        }
        Ok(QuorumClient {
            witnesses: Arc::new(witnesses),
            preferred: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Sends `request` to every witness concurrently.
    pub async fn heartbeat(&self, request: HeartbeatRequest) -> HeartbeatRound {
        let calls = self.witnesses.iter().map(|(_, c)| {
            let mut c = c.clone();
            let r = request.clone();
            async move { c.heartbeat(r).await.map(|r| r.into_inner()) }
        });
        let replies = join_all(calls)
            .await
            .into_iter()
            .filter_map(Result::ok)
            .collect();
        HeartbeatRound {
            replies,
            asked: self.witnesses.len(),
        }
    }

    async fn first<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(WitnessClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.witnesses.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut last = Status::unavailable("no witness quorum: no witness answered");
        for k in 0..n {
            let i = (start + k) % n;
            let (address, client) = &self.witnesses[i];
            match call(client.clone()).await {
                Ok(r) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(r.into_inner());
                }
                Err(s) if definitive(&s) => return Err(s),
                Err(s) => {
                    tracing::debug!(witness = %address, error = %s.message(), "witness call failed");
                    last = s;
                }
            }
        }
        // Whatever each witness said (unreachable, timed out, no leader), the caller's cause is
        // the same: no majority of witnesses could commit.
        if !last.message().starts_with("no witness quorum") {
            last = Status::unavailable(format!("no witness quorum: {}", last.message()));
        }
        Err(last)
    }

    /// Registers or updates a pair.
    ///
    /// # Errors
    /// The witness's status; UNAVAILABLE "no witness quorum" when none can commit.
    pub async fn register_pair(&self, r: RegisterPairRequest) -> Result<PairState, Status> {
        self.first(|mut c| {
            let r = r.clone();
            async move { c.register_pair(r).await }
        })
        .await
    }

    /// Renews the lease of the active site.
    ///
    /// # Errors
    /// FAILED_PRECONDITION "stale epoch ..." when the site must demote itself; UNAVAILABLE
    /// "no witness quorum" when no witness can commit.
    pub async fn renew_lease(&self, r: RenewLeaseRequest) -> Result<LeaseReply, Status> {
        self.first(|mut c| {
            let r = r.clone();
            async move { c.renew_lease(r).await }
        })
        .await
    }

    /// Proposes a planned migration (epoch + 1).
    ///
    /// # Errors
    /// As [`QuorumClient::renew_lease`].
    pub async fn propose_migration(&self, r: ProposeMigrationRequest) -> Result<PairState, Status> {
        self.first(|mut c| {
            let r = r.clone();
            async move { c.propose_migration(r).await }
        })
        .await
    }

    /// Asks for a manual failover.
    ///
    /// # Errors
    /// As [`QuorumClient::renew_lease`].
    pub async fn request_failover(&self, r: RequestFailoverRequest) -> Result<PairState, Status> {
        self.first(|mut c| {
            let r = r.clone();
            async move { c.request_failover(r).await }
        })
        .await
    }

    /// The quorum's state, read linearizably.
    ///
    /// # Errors
    /// UNAVAILABLE "no witness quorum" without a majority.
    pub async fn get_state(&self) -> Result<StateReply, Status> {
        self.first(|mut c| async move { c.get_state(GetStateRequest {}).await })
            .await
    }

    /// The decision stream from raft index `from_index`, from the first witness that answers.
    ///
    /// # Errors
    /// UNAVAILABLE when no witness answers.
    pub async fn watch(&self, from_index: u64) -> Result<Streaming<Decision>, Status> {
        self.first(|mut c| async move { c.watch(WatchRequest { from_index }).await })
            .await
    }
}
