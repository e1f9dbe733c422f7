//! Raft messages between witnesses: the outbound router (one sender task per peer, batching)
//! and the `RaftPeer` gRPC service that feeds inbound messages to the node.
//!
//! Messages are raft-rs `eraftpb.Message`s encoded with its own rust-protobuf codec and carried
//! as bytes (raft-rs 0.7's prost codec would pin an older prost than tonic's). Only peers that
//! passed mutual TLS reach the decoder (rust-protobuf 2 must not parse untrusted input,
//! RUSTSEC-2024-0437). A failed send is reported to raft as unreachable; raft resends.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ferry_schemas::proto::witness::raft_peer_client::RaftPeerClient;
use ferry_schemas::proto::witness::raft_peer_server::RaftPeer;
use ferry_schemas::proto::witness::{
    ChangeMembershipRequest, Member, MembershipReply, StepReply, StepRequest,
};
use ferry_tls::TlsMaterial;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::node::{Input, NodeHandle, QuorumError};

/// Most messages in one `Step` call.
const BATCH: usize = 256;
/// A `Step` call that takes longer counts as a failed send.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

pub use ferry_witness_client::channel;

/// Routes the node's outbound messages to per-peer sender tasks until `outbox` closes.
pub async fn route(
    node: NodeHandle,
    mut outbox: UnboundedReceiver<Message>,
    peers: BTreeMap<u64, String>,
    tls: TlsMaterial,
) {
    let mut senders: HashMap<u64, UnboundedSender<Message>> = HashMap::new();
    while let Some(m) = outbox.recv().await {
        let to = m.to;
        let tx = senders.entry(to).or_insert_with(|| {
            let (tx, rx) = unbounded_channel();
            tokio::spawn(send_to(node.clone(), to, rx, peers.clone(), tls.clone()));
            tx
        });
        let _ = tx.send(m);
    }
}

fn address_of(node: &NodeHandle, to: u64, peers: &BTreeMap<u64, String>) -> Option<String> {
    let published = node.published();
    published
        .state
        .members
        .get(&to)
        .or_else(|| peers.get(&to))
        .cloned()
}

async fn send_to(
    node: NodeHandle,
    to: u64,
    mut rx: UnboundedReceiver<Message>,
    peers: BTreeMap<u64, String>,
    tls: TlsMaterial,
) {
    let mut client: Option<(String, RaftPeerClient<Channel>)> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let snapshots = batch
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .count();
        let Some(address) = address_of(&node, to, &peers) else {
            node.report(Input::Unreachable(to));
            continue;
        };
        if client.as_ref().is_none_or(|(a, _)| *a != address) {
            client = channel(&address, &tls, SEND_TIMEOUT).ok().map(|c| {
                (
                    address.clone(),
                    RaftPeerClient::new(c)
                        .max_decoding_message_size(64 << 20)
                        .max_encoding_message_size(64 << 20),
                )
            });
        }
        let Some((_, c)) = client.as_mut() else {
            node.report(Input::Unreachable(to));
            continue;
        };
        let request = StepRequest {
            from: node.id(),
            messages: batch
                .iter()
                .map(|m| m.write_to_bytes().expect("encoding a raft message"))
                .collect(),
        };
        let ok = c.step(request).await.is_ok();
        if !ok {
            // Drop what queued up meanwhile too: raft resends from its own progress tracking.
            while rx.try_recv().is_ok() {}
            node.report(Input::Unreachable(to));
            client = None;
        }
        for _ in 0..snapshots {
            node.report(Input::SnapshotDone(to, ok));
        }
    }
}

/// The `RaftPeer` service: inbound raft messages and membership changes.
pub struct PeerService {
    node: NodeHandle,
}

impl PeerService {
    /// The service for `node`.
    pub fn new(node: NodeHandle) -> Self {
        PeerService { node }
    }
}

fn quorum_status(e: QuorumError) -> Status {
    Status::unavailable(e.to_string())
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn step(&self, request: Request<StepRequest>) -> Result<Response<StepReply>, Status> {
        let req = request.into_inner();
        for bytes in req.messages {
            let m = Message::parse_from_bytes(&bytes).map_err(|e| {
                Status::invalid_argument(format!("raft message from witness {}: {e}", req.from))
            })?;
            self.node.step(m).map_err(quorum_status)?;
        }
        Ok(Response::new(StepReply {}))
    }

    async fn change_membership(
        &self,
        request: Request<ChangeMembershipRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let req = request.into_inner();
        let mut add = BTreeMap::new();
        for m in req.add_voters {
            if m.id == 0 || m.address.is_empty() {
                return Err(Status::invalid_argument(
                    "add_voters: every member needs a non-zero id and an address",
                ));
            }
            add.insert(m.id, m.address);
        }
        let voters = self
            .node
            .change_membership(add, req.remove_voters)
            .await
            .map_err(quorum_status)?;
        let members = self
            .node
            .published()
            .state
            .members
            .iter()
            .map(|(id, address)| Member {
                id: *id,
                address: address.clone(),
            })
            .collect();
        Ok(Response::new(MembershipReply { members, voters }))
    }
}
