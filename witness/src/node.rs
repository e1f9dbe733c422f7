//! One witness's raft node: the single thread that owns the raft-rs `RawNode`, its sled
//! storage and the replicated state machine, and runs the Ready loop.
//!
//! The loop follows the order raft-rs documents for `RawNode::ready` (src/lib.rs, "Processing
//! the Ready State", and examples/five_mem_node):
//! 1. send `messages()` (the leader's, safe before persisting);
//! 2. install a received snapshot into storage and the state machine;
//! 3. apply `committed_entries()`;
//! 4. append `entries()`, store `hs()`, then flush sled ([`SledStorage::persist`]);
//! 5. only then send `persisted_messages()` (votes and append acknowledgements);
//! 6. `advance`, store the new commit index, send the light ready's messages and apply its
//!    committed entries, `advance_apply`.
//!
//! Around it: a tick every [`NodeConfig::tick`], proposals and linearizable reads (ReadIndex,
//! raft thesis §6.4) from the gRPC services, snapshots every [`NodeConfig::snapshot_every`]
//! applied entries so the log stays bounded, membership changes through ConfChangeV2, and the
//! failure detector ([`crate::detector`]) every few ticks.
//!
//! The thread is a plain OS thread: sled flushes block, and raft-rs is synchronous.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message};
use raft::{RawNode, SnapshotStatus, StateRole};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::clock::{SharedClock, SystemClock};
use crate::detector::Detector;
use crate::logger;
use crate::rule::{RuleConfig, SiteView};
use crate::state::{Command, Outcome, WitnessState};
use crate::storage::{SledStorage, StoreError};

/// A witness node's configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This witness's raft id (non-zero, unique in the quorum).
    pub id: u64,
    /// The initial members, id to `host:port`, this one included. Used to bootstrap a new
    /// quorum and to find peers until the replicated membership says otherwise.
    pub peers: BTreeMap<u64, String>,
    /// Where the sled database lives.
    pub data_dir: PathBuf,
    /// Joining an existing quorum: start with no voters and learn the membership (and
    /// everything else) from the leader, after a `ChangeMembership` adds this witness.
    pub join: bool,
    /// The raft tick (default 100 ms). Elections time out after 10 to 20 ticks.
    pub tick: Duration,
    /// Store a snapshot and compact the log every this many applied entries (default 500).
    pub snapshot_every: u64,
    /// Entries kept behind a snapshot for slow followers (default 100).
    pub keep_entries: u64,
    /// The failover rule's tunables.
    pub rule: RuleConfig,
    /// The wall clock every site-facing decision reads (default: the system clock).
    pub clock: SharedClock,
}

impl NodeConfig {
    /// Defaults for everything but identity, peers, directory and rule.
    pub fn new(id: u64, peers: BTreeMap<u64, String>, data_dir: PathBuf, rule: RuleConfig) -> Self {
        NodeConfig {
            id,
            peers,
            data_dir,
            join: false,
            tick: Duration::from_millis(100),
            snapshot_every: 500,
            keep_entries: 100,
            rule,
            clock: SystemClock::default().shared(),
        }
    }
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The raft storage could not be opened.
    #[error("opening the raft storage")]
    Storage(#[from] StoreError),
    /// The stored snapshot's state machine bytes do not decode.
    #[error("decoding the stored state machine snapshot")]
    Snapshot(#[source] serde_json::Error),
    /// raft-rs refused the configuration or the stored state.
    #[error("starting raft")]
    Raft(#[source] raft::Error),
}

/// Why a proposal or read got no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuorumError {
    /// Nothing was committed in time: fewer than a majority of witnesses are reachable, or no
    /// leader is elected yet.
    #[error("no witness quorum: not committed within {0:?}")]
    Timeout(Duration),
    /// The node thread has stopped.
    #[error("the witness node has stopped")]
    Stopped,
    /// raft-rs refused a membership change.
    #[error("membership change refused: {0}")]
    Membership(String),
}

/// What the node publishes after every Ready that changed something.
#[derive(Clone, Debug, Default)]
pub struct Published {
    /// The applied state machine.
    pub state: Arc<WitnessState>,
    /// This node's id.
    pub id: u64,
    /// The leader this node knows (0: none).
    pub leader: u64,
    /// Whether this node is the leader.
    pub is_leader: bool,
    /// The current raft term.
    pub term: u64,
    /// Voting members.
    pub voters: Vec<u64>,
    /// Entries held in the raft log (bounded by snapshots).
    pub log_len: u64,
}

/// Requests into the node thread.
pub(crate) enum Input {
    Raft(Message),
    Propose(Command, oneshot::Sender<Result<Outcome, QuorumError>>),
    Read(oneshot::Sender<Result<Arc<WitnessState>, QuorumError>>),
    Membership {
        add: BTreeMap<u64, String>,
        remove: Vec<u64>,
        reply: oneshot::Sender<Result<Vec<u64>, QuorumError>>,
    },
    Unreachable(u64),
    SnapshotDone(u64, bool),
    /// Ends the node thread (the server is shutting down); storage is closed on the way out.
    Stop,
}

/// How long a proposal or read waits before it is answered with [`QuorumError::Timeout`]
/// (defined with the client, which waits longer).
pub use ferry_witness_client::QUORUM_TIMEOUT;

/// A proposal's raft entry payload: who proposed it (to answer them) and what.
#[derive(Serialize, Deserialize)]
struct Envelope {
    node: u64,
    id: u64,
    command: Command,
}

/// A cheap handle to a running node, for the gRPC services.
#[derive(Clone)]
pub struct NodeHandle {
    id: u64,
    tx: Sender<Input>,
    published: watch::Receiver<Published>,
    views: Arc<Mutex<BTreeMap<String, SiteView>>>,
    clock: SharedClock,
    detections: watch::Receiver<u64>,
}

impl NodeHandle {
    /// This witness's raft id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The newest published state (applied here; may trail the leader).
    pub fn published(&self) -> Published {
        self.published.borrow().clone()
    }

    /// A receiver that changes whenever the node publishes.
    pub fn subscribe(&self) -> watch::Receiver<Published> {
        self.published.clone()
    }

    /// The node's wall clock (Unix ms), the one every site-facing decision reads.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Counts the failure detector's rounds (one every five raft ticks): a test that must
    /// show that nothing happens waits for rounds to pass, not for time.
    pub fn detections(&self) -> watch::Receiver<u64> {
        self.detections.clone()
    }

    /// Stops the node thread. Proposals and reads after this fail with
    /// [`QuorumError::Stopped`].
    pub fn stop(&self) {
        let _ = self.tx.send(Input::Stop);
    }

    /// Heartbeat soft state, shared with the failure detector.
    pub fn views(&self) -> Arc<Mutex<BTreeMap<String, SiteView>>> {
        self.views.clone()
    }

    /// Proposes `command` and waits until it is applied here (or refused at apply).
    ///
    /// # Errors
    /// [`QuorumError::Timeout`] after [`QUORUM_TIMEOUT`] without a commit.
    pub async fn propose(&self, command: Command) -> Result<Outcome, QuorumError> {
        let (tx, rx) = oneshot::channel();
        self.send(Input::Propose(command, tx))?;
        rx.await.map_err(|_| QuorumError::Stopped)?
    }

    /// A linearizable read: the state once this node has applied everything committed before
    /// the read began (raft ReadIndex, confirmed by a quorum of heartbeats).
    ///
    /// # Errors
    /// [`QuorumError::Timeout`] without a quorum.
    pub async fn read(&self) -> Result<Arc<WitnessState>, QuorumError> {
        let (tx, rx) = oneshot::channel();
        self.send(Input::Read(tx))?;
        rx.await.map_err(|_| QuorumError::Stopped)?
    }

    /// Adds and removes voters (raft ConfChangeV2, with joint consensus when more than one
    /// voter changes) and records the added members' addresses. Returns the new voters.
    ///
    /// # Errors
    /// [`QuorumError`] without a quorum, or when raft-rs refuses the change.
    pub async fn change_membership(
        &self,
        add: BTreeMap<u64, String>,
        remove: Vec<u64>,
    ) -> Result<Vec<u64>, QuorumError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Membership { add, remove, reply })?;
        rx.await.map_err(|_| QuorumError::Stopped)?
    }

    pub(crate) fn step(&self, m: Message) -> Result<(), QuorumError> {
        self.send(Input::Raft(m))
    }

    pub(crate) fn report(&self, input: Input) {
        let _ = self.tx.send(input);
    }

    fn send(&self, input: Input) -> Result<(), QuorumError> {
        self.tx.send(input).map_err(|_| QuorumError::Stopped)
    }
}

/// Starts the node thread. Outgoing raft messages go to `outbox` (see [`crate::transport`]).
///
/// # Errors
/// [`NodeError`] when storage cannot be opened or raft-rs refuses the stored state.
pub fn start(
    cfg: NodeConfig,
    outbox: tokio::sync::mpsc::UnboundedSender<Message>,
) -> Result<NodeHandle, NodeError> {
    let voters: Vec<u64> = if cfg.join {
        Vec::new()
    } else {
        cfg.peers.keys().copied().collect()
    };
    let storage = SledStorage::open(&cfg.data_dir, &voters)?;
    let snapshot = storage.stored_snapshot()?;
    let mut state = if snapshot.data.is_empty() {
        WitnessState::default()
    } else {
        serde_json::from_slice(&snapshot.data).map_err(NodeError::Snapshot)?
    };
    if state.members.is_empty() {
        state.members = cfg.peers.clone();
    }
    let applied = snapshot.get_metadata().index;
    let raft_cfg = raft::Config {
        id: cfg.id,
        election_tick: 10,
        heartbeat_tick: 3,
        applied,
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    let node =
        RawNode::new(&raft_cfg, storage, &logger::raft_logger(cfg.id)).map_err(NodeError::Raft)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let (pub_tx, pub_rx) = watch::channel(Published::default());
    let views = Arc::new(Mutex::new(BTreeMap::new()));
    let (detections, detections_rx) = watch::channel(0u64);
    let handle = NodeHandle {
        id: cfg.id,
        tx,
        published: pub_rx,
        views: views.clone(),
        clock: cfg.clock.clone(),
        detections: detections_rx,
    };
    let detector = Detector::new(cfg.id, cfg.rule, views, cfg.clock.clone());
    let mut runner = Runner {
        id: cfg.id,
        node,
        state,
        applied,
        last_snapshot: applied,
        cfg,
        outbox,
        published: pub_tx,
        waiters: HashMap::new(),
        reads: Vec::new(),
        membership: HashMap::new(),
        next_id: rand::random::<u64>() >> 16,
        detector,
        detections,
    };
    runner.publish();
    std::thread::Builder::new()
        .name(format!("witness-{}", runner.id))
        .spawn(move || runner.run(rx))
        .expect("spawning the witness node thread");
    Ok(handle)
}

struct PendingRead {
    ctx: u64,
    index: Option<u64>,
    deadline: Instant,
    reply: oneshot::Sender<Result<Arc<WitnessState>, QuorumError>>,
}

type Waiter = (Instant, oneshot::Sender<Result<Outcome, QuorumError>>);
type MembershipWaiter = (Instant, oneshot::Sender<Result<Vec<u64>, QuorumError>>);

struct Runner {
    id: u64,
    node: RawNode<SledStorage>,
    state: WitnessState,
    applied: u64,
    last_snapshot: u64,
    cfg: NodeConfig,
    outbox: tokio::sync::mpsc::UnboundedSender<Message>,
    published: watch::Sender<Published>,
    waiters: HashMap<u64, Waiter>,
    reads: Vec<PendingRead>,
    membership: HashMap<u64, MembershipWaiter>,
    next_id: u64,
    detector: Detector,
    detections: watch::Sender<u64>,
}

impl Runner {
    fn run(mut self, rx: Receiver<Input>) {
        let mut next_tick = Instant::now() + self.cfg.tick;
        let mut ticks = 0u64;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Input::Stop) => return,
                Ok(input) => self.handle(input),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Drain what else is queued before one Ready: batching keeps flushes few.
            while let Ok(input) = rx.try_recv() {
                if matches!(input, Input::Stop) {
                    return;
                }
                self.handle(input);
            }
            if Instant::now() >= next_tick {
                next_tick += self.cfg.tick;
                ticks += 1;
                self.node.tick();
                if ticks % 5 == 0 {
                    self.detect();
                    self.expire_waiters();
                }
            }
            if let Err(e) = self.on_ready() {
                // A storage failure makes the node unusable (raft-rs Storage contract): stop,
                // so the process exits and restarts from what sled holds.
                tracing::error!(witness = self.id, error = %e, "raft storage failed; node stops");
                return;
            }
        }
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Raft(m) => {
                if let Err(e) = self.node.step(m) {
                    tracing::debug!(witness = self.id, error = %e, "raft message dropped");
                }
            }
            Input::Propose(command, reply) => {
                let id = self.fresh_id();
                let env = Envelope {
                    node: self.id,
                    id,
                    command,
                };
                let data = serde_json::to_vec(&env).expect("serialising a command");
                match self.node.propose(vec![], data) {
                    Ok(()) => {
                        self.waiters
                            .insert(id, (Instant::now() + QUORUM_TIMEOUT, reply));
                    }
                    Err(_) => {
                        let _ = reply.send(Err(QuorumError::Timeout(QUORUM_TIMEOUT)));
                    }
                }
            }
            Input::Read(reply) => {
                let ctx = self.fresh_id();
                self.node.read_index(ctx.to_be_bytes().to_vec());
                self.reads.push(PendingRead {
                    ctx,
                    index: None,
                    deadline: Instant::now() + QUORUM_TIMEOUT,
                    reply,
                });
            }
            Input::Membership { add, remove, reply } => {
                let id = self.fresh_id();
                let mut cc = ConfChangeV2::default();
                let mut changes = Vec::new();
                for node in add.keys() {
                    changes.push(single(*node, ConfChangeType::AddNode));
                }
                for node in &remove {
                    changes.push(single(*node, ConfChangeType::RemoveNode));
                }
                cc.set_changes(changes.into());
                let env = Envelope {
                    node: self.id,
                    id,
                    command: Command::Members { add, remove },
                };
                let ctx = serde_json::to_vec(&env).expect("serialising a command");
                match self.node.propose_conf_change(ctx, cc) {
                    Ok(()) => {
                        self.membership
                            .insert(id, (Instant::now() + QUORUM_TIMEOUT, reply));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(QuorumError::Membership(e.to_string())));
                    }
                }
            }
            Input::Unreachable(peer) => self.node.report_unreachable(peer),
            Input::Stop => {} // handled by the loop
            Input::SnapshotDone(peer, ok) => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.node.report_snapshot(peer, status);
            }
        }
    }

    fn on_ready(&mut self) -> Result<(), raft::Error> {
        if !self.node.has_ready() {
            return Ok(());
        }
        let mut ready = self.node.ready();
        self.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.node.mut_store().apply_snapshot(snapshot.clone())?;
            self.state = if snapshot.data.is_empty() {
                WitnessState::default()
            } else {
                serde_json::from_slice(&snapshot.data)
                    .map_err(|e| raft::Error::Store(raft::StorageError::Other(Box::new(e))))?
            };
            self.applied = snapshot.get_metadata().index;
            self.last_snapshot = self.applied;
        }
        let committed = ready.take_committed_entries();
        self.apply_entries(committed)?;
        let mut wrote = false;
        if !ready.entries().is_empty() {
            self.node.mut_store().append(ready.entries())?;
            wrote = true;
        }
        if let Some(hs) = ready.hs() {
            self.node.mut_store().set_hard_state(hs.clone())?;
            wrote = true;
        }
        if wrote || !ready.snapshot().is_empty() || !ready.persisted_messages().is_empty() {
            self.node.store().persist()?;
        }
        self.send(ready.take_persisted_messages());
        for rs in ready.take_read_states() {
            let ctx = read_ctx(&rs.request_ctx);
            if let Some(r) = self.reads.iter_mut().find(|r| r.ctx == ctx) {
                r.index = Some(rs.index);
            }
        }
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.node.mut_store().set_commit(commit)?;
        }
        self.send(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed)?;
        self.node.advance_apply();
        self.answer_reads();
        self.maybe_snapshot()?;
        self.publish();
        Ok(())
    }

    fn send(&self, messages: Vec<Message>) {
        for m in messages {
            let _ = self.outbox.send(m);
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), raft::Error> {
        for entry in entries {
            self.applied = entry.index;
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    // A new leader's empty entry.
                    self.state.applied_index = entry.index;
                }
                EntryType::EntryNormal => {
                    let env: Envelope = match serde_json::from_slice(&entry.data) {
                        Ok(env) => env,
                        Err(e) => {
                            tracing::error!(index = entry.index, error = %e, "undecodable entry skipped");
                            continue;
                        }
                    };
                    let outcome = self.state.apply(entry.index, env.command);
                    if env.node == self.id {
                        if let Some((_, reply)) = self.waiters.remove(&env.id) {
                            let _ = reply.send(Ok(outcome));
                        }
                    }
                }
                EntryType::EntryConfChangeV2 | EntryType::EntryConfChange => {
                    self.apply_conf_change(&entry)?;
                }
            }
        }
        Ok(())
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), raft::Error> {
        let result = if entry.get_entry_type() == EntryType::EntryConfChangeV2 {
            let cc = ConfChangeV2::parse_from_bytes(&entry.data)?;
            self.node.apply_conf_change(&cc)
        } else {
            let cc = raft::eraftpb::ConfChange::parse_from_bytes(&entry.data)?;
            self.node.apply_conf_change(&cc)
        };
        let env: Option<Envelope> = serde_json::from_slice(&entry.context).ok();
        match result {
            Ok(cs) => {
                self.node.mut_store().set_conf_state(cs.clone())?;
                let mut reply_to = None;
                if let Some(env) = env {
                    let _ = self.state.apply(entry.index, env.command);
                    if env.node == self.id {
                        reply_to = self.membership.remove(&env.id);
                    }
                }
                self.state.applied_index = entry.index;
                if let Some((_, reply)) = reply_to {
                    let _ = reply.send(Ok(cs.voters.clone()));
                }
            }
            Err(e) => {
                tracing::warn!(index = entry.index, error = %e, "membership change not applied");
                if let Some(env) = env.filter(|env| env.node == self.id) {
                    if let Some((_, reply)) = self.membership.remove(&env.id) {
                        let _ = reply.send(Err(QuorumError::Membership(e.to_string())));
                    }
                }
            }
        }
        Ok(())
    }

    fn answer_reads(&mut self) {
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads)
            .into_iter()
            .partition(|r| r.index.is_some_and(|i| i <= applied));
        self.reads = waiting;
        if ready.is_empty() {
            return;
        }
        let state = Arc::new(self.state.clone());
        for r in ready {
            let _ = r.reply.send(Ok(state.clone()));
        }
    }

    fn maybe_snapshot(&mut self) -> Result<(), raft::Error> {
        if self.applied < self.last_snapshot + self.cfg.snapshot_every {
            return Ok(());
        }
        let data = serde_json::to_vec(&self.state).expect("serialising the state machine");
        let keep = self.cfg.keep_entries;
        self.node
            .mut_store()
            .create_snapshot(self.applied, data, keep)?;
        self.last_snapshot = self.applied;
        tracing::debug!(
            witness = self.id,
            index = self.applied,
            "snapshot stored, log compacted"
        );
        Ok(())
    }

    fn publish(&mut self) {
        let raft = &self.node.raft;
        let mut voters: Vec<u64> = raft.prs().conf().voters().ids().iter().collect();
        voters.sort_unstable();
        let next = Published {
            state: Arc::new(self.state.clone()),
            id: self.id,
            leader: raft.leader_id,
            is_leader: raft.state == StateRole::Leader,
            term: raft.term,
            voters,
            log_len: self.node.store().log_len(),
        };
        self.published.send_if_modified(|p| {
            let changed = p.state.applied_index != next.state.applied_index
                || p.leader != next.leader
                || p.is_leader != next.is_leader
                || p.term != next.term
                || p.voters != next.voters
                || p.state != next.state;
            if changed {
                *p = next;
            }
            changed
        });
    }

    fn detect(&mut self) {
        let voters = self.node.raft.prs().conf().voters().ids().len();
        let is_leader = self.node.raft.state == StateRole::Leader;
        let proposals = self
            .detector
            .tick(&self.state, is_leader, voters, Instant::now());
        for command in proposals {
            let id = self.fresh_id();
            let env = Envelope {
                node: self.id,
                id,
                command,
            };
            let data = serde_json::to_vec(&env).expect("serialising a command");
            if let Err(e) = self.node.propose(vec![], data) {
                tracing::debug!(witness = self.id, error = %e, "detector proposal dropped");
            }
        }
        self.detections.send_modify(|n| *n += 1);
    }

    fn expire_waiters(&mut self) {
        let now = Instant::now();
        let timeout = || Err(QuorumError::Timeout(QUORUM_TIMEOUT));
        let expired: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, (deadline, _))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some((_, reply)) = self.waiters.remove(&id) {
                let _ = reply.send(timeout());
            }
        }
        let expired: Vec<u64> = self
            .membership
            .iter()
            .filter(|(_, (deadline, _))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some((_, reply)) = self.membership.remove(&id) {
                let _ = reply.send(Err(QuorumError::Timeout(QUORUM_TIMEOUT)));
            }
        }
        let (late, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads)
            .into_iter()
            .partition(|r| r.deadline <= now);
        self.reads = waiting;
        for r in late {
            let _ = r.reply.send(Err(QuorumError::Timeout(QUORUM_TIMEOUT)));
        }
    }
}

fn single(node: u64, ty: ConfChangeType) -> ConfChangeSingle {
    let mut s = ConfChangeSingle {
        node_id: node,
        ..Default::default()
    };
    s.set_change_type(ty);
    s
}

fn read_ctx(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if bytes.len() == 8 {
        b.copy_from_slice(bytes);
    }
    u64::from_be_bytes(b)
}
