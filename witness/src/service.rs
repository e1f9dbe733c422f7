//! The `Witness` gRPC service that site controllers call: heartbeats, pair registration,
//! leases, migrations, manual failovers, linearizable state reads and the decision stream.
//!
//! Every state change goes through [`NodeHandle::propose`] (one raft entry, answered once a
//! majority has it on disk and this witness applied it). Refusals map to gRPC codes as
//! `witness.proto` documents: stale epoch → FAILED_PRECONDITION, no quorum → UNAVAILABLE.

use std::pin::Pin;

use ferry_schemas::proto::witness::witness_server::Witness;
use ferry_schemas::proto::witness::{
    Decision, FailoverMode, FailoverRecord, GetStateRequest, HeartbeatReply, HeartbeatRequest,
    LeaseReply, Member, PairState, ProposeMigrationRequest, RegisterPairRequest, RenewLeaseRequest,
    RequestFailoverRequest, SiteState, StateReply, WatchRequest,
};
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::node::{NodeHandle, QuorumError};
use crate::rule::{other_site, Report, RuleConfig, SiteView};
use crate::state::{
    Applied, Command, DecisionRecord, Mode, Outcome, PairConfig, PairRecord, Refusal,
};

/// The `Witness` service of one witness node.
pub struct WitnessService {
    node: NodeHandle,
    rule: RuleConfig,
}

impl WitnessService {
    /// The service for `node`; `rule` supplies the skew margin for manual failovers.
    pub fn new(node: NodeHandle, rule: RuleConfig) -> Self {
        WitnessService { node, rule }
    }

    async fn propose(&self, command: Command) -> Result<Outcome, Status> {
        self.node.propose(command).await.map_err(unavailable)
    }
}

fn unavailable(e: QuorumError) -> Status {
    Status::unavailable(e.to_string())
}

fn refused(r: Refusal) -> Status {
    match r {
        Refusal::StaleEpoch { .. } => Status::failed_precondition(r.to_string()),
        Refusal::UnknownPair(_) => Status::not_found(r.to_string()),
        Refusal::BadTarget { .. } => Status::invalid_argument(r.to_string()),
    }
}

fn pair_of(outcome: Outcome) -> Result<PairRecord, Status> {
    match outcome {
        Ok(Applied::Pair(p)) => Ok(*p),
        Ok(Applied::Done) => Err(Status::internal("the command did not return a pair")),
        Err(r) => Err(refused(r)),
    }
}

fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field}: required")))
    } else {
        Ok(value)
    }
}

/// The wire form of a decision.
pub fn record_to_wire(d: &DecisionRecord) -> FailoverRecord {
    FailoverRecord {
        kind: d.kind.clone(),
        from_site: d.from.clone(),
        to_site: d.to.clone(),
        epoch: d.epoch,
        decided_at_unix_ms: d.decided_at_ms,
        generation: d.generation,
        capture_time_unix_ms: d.capture_time_ms,
        last_heard_unix_ms: d.last_heard_ms,
        data_loss_seconds: d.data_loss_seconds,
        not_before_unix_ms: d.not_before_ms,
        index: d.index,
        reason: d.reason.clone(),
    }
}

/// The wire form of a pair.
pub fn pair_to_wire(p: &PairRecord) -> PairState {
    let mode = match p.config.mode {
        Mode::Manual => FailoverMode::Manual,
        Mode::Automatic => FailoverMode::Automatic,
    };
    PairState {
        pair: p.config.pair.clone(),
        primary_site: p.config.primary.clone(),
        secondary_site: p.config.secondary.clone(),
        mode: mode as i32,
        rpo_ms: p.config.rpo_ms,
        allowance_ms: p.config.allowance_ms,
        active_site: p.active.clone(),
        epoch: p.epoch,
        lease_holder: p
            .lease
            .as_ref()
            .map(|l| l.holder.clone())
            .unwrap_or_default(),
        lease_expires_unix_ms: p.lease.as_ref().map(|l| l.expires_at_ms).unwrap_or(0),
        not_before_unix_ms: p.not_before_ms,
        blocked_reason: p.blocked.clone().unwrap_or_default(),
        history: p.history.iter().map(record_to_wire).collect(),
        site_loss_timeout_ms: p.config.site_loss_timeout_ms,
    }
}

type DecisionStream = Pin<Box<dyn Stream<Item = Result<Decision, Status>> + Send>>;

#[tonic::async_trait]
impl Witness for WitnessService {
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let req = request.into_inner();
        let site = required("site", &req.site)?.to_string();
        let view = SiteView {
            last_heard_ms: Some(self.node.clock().now_ms()),
            reports: req
                .pairs
                .iter()
                .map(|r| {
                    let report = Report {
                        generation: r.committed_generation,
                        capture_time_ms: r.capture_time_unix_ms,
                        epoch: r.epoch,
                    };
                    (r.pair.clone(), report)
                })
                .collect(),
        };
        if let Ok(mut views) = self.node.views().lock() {
            views.insert(site, view);
        }
        let published = self.node.published();
        Ok(Response::new(HeartbeatReply {
            witness_id: published.id,
            leader_id: published.leader,
            pairs: published.state.pairs.values().map(pair_to_wire).collect(),
        }))
    }

    async fn register_pair(
        &self,
        request: Request<RegisterPairRequest>,
    ) -> Result<Response<PairState>, Status> {
        let req = request.into_inner();
        let pair = required("pair", &req.pair)?;
        let primary = required("primary_site", &req.primary_site)?;
        let secondary = required("secondary_site", &req.secondary_site)?;
        if primary == secondary {
            return Err(Status::invalid_argument(format!(
                "secondary_site: must differ from primary_site {primary:?}"
            )));
        }
        let active = required("active_site", &req.active_site)?;
        if active != primary && active != secondary {
            return Err(Status::invalid_argument(format!(
                "active_site: {active:?} is neither {primary:?} nor {secondary:?}"
            )));
        }
        let mode = match FailoverMode::try_from(req.mode) {
            Ok(FailoverMode::Automatic) => Mode::Automatic,
            Ok(FailoverMode::Manual) => Mode::Manual,
            _ => return Err(Status::invalid_argument("mode: Manual or Automatic")),
        };
        let config = PairConfig {
            pair: pair.to_string(),
            primary: primary.to_string(),
            secondary: secondary.to_string(),
            mode,
            rpo_ms: req.rpo_ms,
            allowance_ms: if req.allowance_ms == 0 {
                req.rpo_ms
            } else {
                req.allowance_ms
            },
            site_loss_timeout_ms: req.site_loss_timeout_ms,
        };
        let command = Command::RegisterPair {
            config,
            active: active.to_string(),
            epoch: req.epoch,
        };
        let pair = pair_of(self.propose(command).await?)?;
        Ok(Response::new(pair_to_wire(&pair)))
    }

    async fn renew_lease(
        &self,
        request: Request<RenewLeaseRequest>,
    ) -> Result<Response<LeaseReply>, Status> {
        let req = request.into_inner();
        required("pair", &req.pair)?;
        required("site", &req.site)?;
        if req.duration_ms == 0 {
            return Err(Status::invalid_argument("duration_ms: must be positive"));
        }
        let command = Command::RenewLease {
            pair: req.pair.clone(),
            site: req.site.clone(),
            epoch: req.epoch,
            at_ms: self.node.clock().now_ms(),
            duration_ms: req.duration_ms,
        };
        let pair = pair_of(self.propose(command).await?)?;
        let lease = pair
            .lease
            .ok_or_else(|| Status::internal("renewed lease missing"))?;
        Ok(Response::new(LeaseReply {
            pair: req.pair,
            epoch: pair.epoch,
            holder: lease.holder,
            duration_ms: req.duration_ms,
            expires_at_unix_ms: lease.expires_at_ms,
        }))
    }

    async fn propose_migration(
        &self,
        request: Request<ProposeMigrationRequest>,
    ) -> Result<Response<PairState>, Status> {
        let req = request.into_inner();
        required("pair", &req.pair)?;
        required("from_site", &req.from_site)?;
        required("to_site", &req.to_site)?;
        let now = self.node.clock().now_ms();
        let command = Command::Move {
            pair: req.pair.clone(),
            expected_epoch: req.epoch,
            record: DecisionRecord {
                kind: "Migration".into(),
                from: req.from_site,
                to: req.to_site,
                epoch: 0,
                decided_at_ms: now,
                generation: 0,
                capture_time_ms: 0,
                last_heard_ms: 0,
                data_loss_seconds: 0.0,
                not_before_ms: now,
                index: 0,
                reason: "planned migration".into(),
            },
        };
        let pair = pair_of(self.propose(command).await?)?;
        Ok(Response::new(pair_to_wire(&pair)))
    }

    async fn request_failover(
        &self,
        request: Request<RequestFailoverRequest>,
    ) -> Result<Response<PairState>, Status> {
        let req = request.into_inner();
        required("pair", &req.pair)?;
        let state = self.node.read().await.map_err(unavailable)?;
        let pair = state
            .pairs
            .get(&req.pair)
            .ok_or_else(|| refused(Refusal::UnknownPair(req.pair.clone())))?;
        let to = if req.to_site.is_empty() {
            other_site(pair).to_string()
        } else {
            req.to_site.clone()
        };
        let now = self.node.clock().now_ms();
        let views = self
            .node
            .views()
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let report = views
            .get(&to)
            .and_then(|v| v.reports.get(&req.pair))
            .copied()
            .unwrap_or_default();
        let from_heard = views
            .get(&pair.active)
            .and_then(|v| v.last_heard_ms)
            .unwrap_or(0)
            .max(
                state
                    .sites
                    .get(&pair.active)
                    .map(|s| s.last_heard_ms)
                    .unwrap_or(0),
            );
        // The old active site may still hold its lease: the new one waits it out.
        let lease_end = match &pair.lease {
            Some(l) if l.epoch == pair.epoch => l.expires_at_ms + self.rule.skew_margin_ms as i64,
            _ => now,
        };
        let loss_ms = if report.generation == 0 {
            0
        } else {
            (from_heard.min(now) - report.capture_time_ms).max(0)
        };
        let command = Command::Move {
            pair: req.pair.clone(),
            expected_epoch: req.epoch,
            record: DecisionRecord {
                kind: "ManualFailover".into(),
                from: pair.active.clone(),
                to,
                epoch: 0,
                decided_at_ms: now,
                generation: report.generation,
                capture_time_ms: report.capture_time_ms,
                last_heard_ms: from_heard,
                data_loss_seconds: loss_ms as f64 / 1000.0,
                not_before_ms: lease_end.max(now),
                index: 0,
                reason: if req.reason.is_empty() {
                    "manual failover".into()
                } else {
                    req.reason
                },
            },
        };
        let pair = pair_of(self.propose(command).await?)?;
        Ok(Response::new(pair_to_wire(&pair)))
    }

    async fn get_state(
        &self,
        _request: Request<GetStateRequest>,
    ) -> Result<Response<StateReply>, Status> {
        let state = self.node.read().await.map_err(unavailable)?;
        let published = self.node.published();
        Ok(Response::new(StateReply {
            leader_id: published.leader,
            applied_index: state.applied_index,
            pairs: state.pairs.values().map(pair_to_wire).collect(),
            sites: state
                .sites
                .iter()
                .map(|(site, s)| SiteState {
                    site: site.clone(),
                    suspected_by: s.suspected_by.iter().copied().collect(),
                    last_heard_unix_ms: s.last_heard_ms,
                })
                .collect(),
            members: state
                .members
                .iter()
                .map(|(id, address)| Member {
                    id: *id,
                    address: address.clone(),
                })
                .collect(),
            log_entries: published.log_len,
            voters: published.voters,
        }))
    }

    type WatchStream = DecisionStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut next = request.into_inner().from_index;
        let mut published = self.node.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let state = published.borrow_and_update().state.clone();
                for (pair, d) in state.decisions_since(next) {
                    next = d.index + 1;
                    let decision = Decision {
                        pair,
                        record: Some(record_to_wire(&d)),
                    };
                    if tx.send(Ok(decision)).await.is_err() {
                        return;
                    }
                }
                if published.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
