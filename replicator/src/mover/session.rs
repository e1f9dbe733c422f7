//! The replicator's side of a mover session: typed requests over the command/event channels.
//!
//! A [`MoverSession`] is the one narrow interface between the replicator and volume bytes. It
//! does not know whether the mover is a pod that dialled in ([`super::hub`]) or a thread on a
//! local path ([`MoverSession::in_process`]); the delta engine behind it does not know either.

use std::path::PathBuf;

use ferry_schemas::proto::replication::{
    mover_command::Command, mover_event::Event, ChangedExtents, Extent, FinishCommand,
    MoverCommand, MoverEvent, OpenCommand, ReadCommand, ReadSummary,
};
use tokio::sync::mpsc;

use crate::delta::{BlockIndex, Generation, StreamId, VolumeDigest};

/// Channel depth between replicator and mover, in messages (chunks are ≤ 1 MiB each).
const DEPTH: usize = 8;

/// Failures of a mover session. Each names the cause; the sync that used the session fails
/// and the previous generation stays as it was.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The mover disconnected or exited.
    #[error("mover went away")]
    Gone,
    /// The mover reported a failure (its message names the path and step).
    #[error("mover failed: {0}")]
    Mover(String),
    /// The mover answered out of turn.
    #[error("mover sent {0} unexpectedly")]
    Unexpected(&'static str),
    /// An index or stream id did not encode or decode.
    #[error("mover message does not decode: {0}")]
    Codec(#[from] postcard::Error),
}

/// What the mover said about one applied chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Verified and applied.
    Applied(u64),
    /// Failed its checksum: the sender must send it again from this seq.
    Corrupt(u64),
}

/// A live session with one mover, which holds one volume.
#[derive(Debug)]
pub struct MoverSession {
    commands: mpsc::Sender<MoverCommand>,
    events: mpsc::Receiver<MoverEvent>,
}

fn event_name(event: &Event) -> &'static str {
    match event {
        Event::Hello(_) => "hello",
        Event::Index(_) => "index",
        Event::Chunk(_) => "chunk",
        Event::ReadDone(_) => "read_done",
        Event::Applied(_) => "applied",
        Event::Finished(_) => "finished",
        Event::Error(_) => "error",
    }
}

impl MoverSession {
    /// A session over channels already connected to a mover.
    pub fn new(commands: mpsc::Sender<MoverCommand>, events: mpsc::Receiver<MoverEvent>) -> Self {
        Self { commands, events }
    }

    /// Runs the mover agent on a thread of this process, on the volume at `root`: for tests,
    /// benchmarks and volumes the replicator can reach directly.
    pub fn in_process(root: PathBuf) -> Self {
        let (command_tx, command_rx) = mpsc::channel(DEPTH);
        let (event_tx, event_rx) = mpsc::channel(DEPTH);
        tokio::task::spawn_blocking(move || super::agent::run(root, command_rx, event_tx));
        Self::new(command_tx, event_rx)
    }

    async fn send(&self, command: Command) -> Result<(), SessionError> {
        self.commands
            .send(MoverCommand {
                command: Some(command),
            })
            .await
            .map_err(|_| SessionError::Gone)
    }

    async fn next(&mut self) -> Result<Event, SessionError> {
        match self.events.recv().await {
            Some(MoverEvent {
                event: Some(Event::Error(e)),
            }) if e.corrupt_seq.is_none() => Err(SessionError::Mover(e.message)),
            Some(MoverEvent { event: Some(event) }) => Ok(event),
            Some(MoverEvent { event: None }) => Err(SessionError::Unexpected("an empty event")),
            None => Err(SessionError::Gone),
        }
    }

    /// Source side: asks the mover to scan its volume as `generation` and stream the delta
    /// against `previous` (a full copy when `None`), skipping chunks below `from_seq`. With
    /// `quick_check_before`, files whose size and mtime match `previous` and that were
    /// modified before that instant are not read (see [`crate::delta::scan_against`]). With
    /// `changed` (Block volumes: byte ranges `(offset, length)` from changed block tracking),
    /// only those ranges are read (see [`crate::delta::scan_changed`]). Returns the new index; then call
    /// [`next_chunk`](Self::next_chunk) until it returns the summary.
    ///
    /// # Errors
    /// [`SessionError`] when the mover fails (e.g. the volume cannot be read) or goes away.
    pub async fn read(
        &mut self,
        generation: Generation,
        previous: Option<&BlockIndex>,
        from_seq: u64,
        block: bool,
        quick_check_before: Option<std::time::SystemTime>,
        changed: Option<&[(u64, u64)]>,
    ) -> Result<BlockIndex, SessionError> {
        let quick_check_before_unix_nanos = quick_check_before
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let previous_index = match previous {
            Some(index) => postcard::to_stdvec(index)?,
            None => Vec::new(),
        };
        self.send(Command::Read(ReadCommand {
            generation: generation.0,
            previous_index,
            from_seq,
            block,
            index_only: false,
            quick_check_before_unix_nanos,
            changed: changed.map(|extents| ChangedExtents {
                extents: extents
                    .iter()
                    .map(|&(offset_bytes, size_bytes)| Extent {
                        offset_bytes,
                        size_bytes,
                    })
                    .collect(),
            }),
        }))
        .await?;
        match self.next().await? {
            Event::Index(bytes) => Ok(postcard::from_bytes(&bytes)?),
            other => Err(SessionError::Unexpected(event_name(&other))),
        }
    }

    /// Destination side: scans the volume as `generation` and returns its block index, with
    /// no chunks (what a source plans against when this copy is a diverged seed).
    ///
    /// # Errors
    /// [`SessionError`] when the mover fails (e.g. the volume cannot be read) or goes away.
    pub async fn index(
        &mut self,
        generation: Generation,
        block: bool,
    ) -> Result<BlockIndex, SessionError> {
        self.send(Command::Read(ReadCommand {
            generation: generation.0,
            previous_index: Vec::new(),
            from_seq: 0,
            block,
            index_only: true,
            quick_check_before_unix_nanos: 0,
            changed: None,
        }))
        .await?;
        let index = match self.next().await? {
            Event::Index(bytes) => postcard::from_bytes(&bytes)?,
            other => return Err(SessionError::Unexpected(event_name(&other))),
        };
        match self.next().await? {
            Event::ReadDone(_) => Ok(index),
            other => Err(SessionError::Unexpected(event_name(&other))),
        }
    }

    /// Source side: the next chunk's bytes, or `Err(summary)`-free `Ok(Chunk::Done)` at the end.
    ///
    /// # Errors
    /// [`SessionError`] when the mover fails mid-read or goes away.
    pub async fn next_chunk(&mut self) -> Result<ReadItem, SessionError> {
        match self.next().await? {
            Event::Chunk(bytes) => Ok(ReadItem::Chunk(bytes)),
            Event::ReadDone(summary) => Ok(ReadItem::Done(summary)),
            other => Err(SessionError::Unexpected(event_name(&other))),
        }
    }

    /// Destination side: prepares the volume to receive `stream`.
    ///
    /// # Errors
    /// [`SessionError::Gone`]; an open failure surfaces on the first [`apply`](Self::apply).
    pub async fn open(&mut self, stream: StreamId, block: bool) -> Result<(), SessionError> {
        self.send(Command::Open(OpenCommand {
            stream_id: postcard::to_stdvec(&stream)?,
            block,
        }))
        .await
    }

    /// Destination side: verifies and applies one chunk (its `DeltaChunk` bytes).
    ///
    /// # Errors
    /// [`SessionError::Mover`] when applying fails for another reason than a bad checksum
    /// (the staged volume is then torn, and the sync must be restarted from its base).
    pub async fn apply(&mut self, chunk: Vec<u8>) -> Result<ApplyOutcome, SessionError> {
        self.send(Command::Apply(chunk)).await?;
        match self.events.recv().await {
            Some(MoverEvent {
                event: Some(Event::Applied(seq)),
            }) => Ok(ApplyOutcome::Applied(seq)),
            Some(MoverEvent {
                event: Some(Event::Error(e)),
            }) => match e.corrupt_seq {
                Some(seq) => Ok(ApplyOutcome::Corrupt(seq)),
                None => Err(SessionError::Mover(e.message)),
            },
            Some(MoverEvent { event: Some(other) }) => {
                Err(SessionError::Unexpected(event_name(&other)))
            }
            Some(MoverEvent { event: None }) => Err(SessionError::Unexpected("an empty event")),
            None => Err(SessionError::Gone),
        }
    }

    /// Destination side: checks the stream is complete, fsyncs, rescans and compares the
    /// volume's digest with `digest`.
    ///
    /// # Errors
    /// [`SessionError::Mover`] naming the mismatch or the incomplete stream.
    /// Returns the verified volume's block index (the generation's index).
    pub async fn finish(
        &mut self,
        digest: VolumeDigest,
    ) -> Result<Option<BlockIndex>, SessionError> {
        self.send(Command::Finish(FinishCommand {
            digest: digest.0.to_vec(),
        }))
        .await?;
        let mut index = None;
        loop {
            match self.next().await? {
                Event::Index(bytes) => index = Some(postcard::from_bytes(&bytes)?),
                Event::Finished(_) => return Ok(index),
                other => return Err(SessionError::Unexpected(event_name(&other))),
            }
        }
    }
}

/// One item of a read.
#[derive(Debug)]
pub enum ReadItem {
    /// `DeltaChunk` bytes, in seq order.
    Chunk(Vec<u8>),
    /// The end of the stream, with counters.
    Done(ReadSummary),
}
