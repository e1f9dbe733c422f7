//! The mover's side of a session: one blocking thread that owns the mounted volume.
//!
//! It runs the delta engine on the volume and nothing else: a `Read` scans the volume,
//! diffs it against the previous index it was given and streams the chunks (or, with
//! `index_only`, returns just the index); an `Open`,
//! `Apply`… `Finish` sequence applies a stream and verifies the result. It never decides what
//! to send where; its replicator does.

use std::path::PathBuf;

use ferry_schemas::proto::replication::{
    mover_command::Command, mover_event::Event, MoverCommand, MoverError, MoverEvent, ReadSummary,
};
use tokio::sync::mpsc;

use crate::delta::{
    diff, scan_against, scan_changed, Applier, BlockIndex, ChangedScanError, ChunkOptions,
    ChunkStream, DeltaChunk, FinishOptions, Generation, Mtime, QuickCheck, ScanOptions, StreamId,
    VolumeDigest, VolumeKind, VolumeSnapshot,
};

/// Runs a session on the volume at `root` (a directory for a file tree, an image file or
/// device for a block volume) until `commands` closes or `events` is dropped.
///
/// Failures are reported as [`MoverEvent`]s with an `error`, never as a panic: the
/// replicator decides whether to retry. Call from a blocking context (e.g.
/// `tokio::task::spawn_blocking`).
pub fn run(
    root: PathBuf,
    mut commands: mpsc::Receiver<MoverCommand>,
    events: mpsc::Sender<MoverEvent>,
) {
    let mut applier: Option<Applier> = None;
    while let Some(MoverCommand { command }) = commands.blocking_recv() {
        let outcome = match command {
            Some(Command::Read(read)) => read_volume(&root, read, &events),
            Some(Command::Open(open)) => open_volume(&root, open, &mut applier),
            Some(Command::Apply(bytes)) => apply_chunk(&bytes, &mut applier, &events),
            Some(Command::Finish(finish)) => finish_volume(&finish.digest, &mut applier, &events),
            None => Err(failure("empty mover command")),
        };
        let sent = match outcome {
            Ok(()) => true,
            Err(error) => events
                .blocking_send(MoverEvent {
                    event: Some(Event::Error(error)),
                })
                .is_ok(),
        };
        if !sent || events.is_closed() {
            break;
        }
    }
}

fn failure(message: impl Into<String>) -> MoverError {
    MoverError {
        message: message.into(),
        corrupt_seq: None,
    }
}

fn snapshot_at(root: &std::path::Path, block: bool) -> VolumeSnapshot {
    if block {
        VolumeSnapshot::Image(root.to_path_buf())
    } else {
        VolumeSnapshot::Tree(root.to_path_buf())
    }
}

fn send(events: &mpsc::Sender<MoverEvent>, event: Event) -> Result<(), MoverError> {
    events
        .blocking_send(MoverEvent { event: Some(event) })
        .map_err(|_| failure("replicator went away"))
}

fn read_volume(
    root: &std::path::Path,
    read: ferry_schemas::proto::replication::ReadCommand,
    events: &mpsc::Sender<MoverEvent>,
) -> Result<(), MoverError> {
    let previous: Option<BlockIndex> = if read.previous_index.is_empty() {
        None
    } else {
        Some(
            postcard::from_bytes(&read.previous_index)
                .map_err(|e| failure(format!("previous index does not decode: {e}")))?,
        )
    };
    let snapshot = snapshot_at(root, read.block);
    let scan_failed = |e: &dyn std::error::Error| {
        failure(format!("scanning {}: {}", root.display(), error_chain(e)))
    };
    // Changed block tracking: read only what the CSI driver says changed since the base.
    let mut cbt_fallback = String::new();
    let mut from_changed = None;
    match (&read.changed, &previous) {
        (Some(changed), Some(base)) if read.block => {
            let extents: Vec<(u64, u64)> = changed
                .extents
                .iter()
                .map(|e| (e.offset_bytes, e.size_bytes))
                .collect();
            let generation = Generation(read.generation);
            match scan_changed(root, &ScanOptions::default(), generation, base, &extents) {
                Ok(scanned) => from_changed = Some(scanned),
                Err(ChangedScanError::Unusable(why)) => cbt_fallback = why,
                Err(ChangedScanError::Scan(e)) => return Err(scan_failed(&e)),
            }
        }
        (Some(_), _) => {
            cbt_fallback = "changed extents need a block volume and a base index".into();
        }
        (None, _) => {}
    }
    let cbt = from_changed.is_some();
    let scanned = match from_changed {
        Some(scanned) => scanned,
        None => scan_against(
            &snapshot,
            &ScanOptions::default(),
            Generation(read.generation),
            previous
                .as_ref()
                .filter(|_| read.quick_check_before_unix_nanos > 0)
                .map(|previous| QuickCheck {
                    previous,
                    modified_before: Mtime {
                        secs: read.quick_check_before_unix_nanos.div_euclid(1_000_000_000),
                        nanos: read.quick_check_before_unix_nanos.rem_euclid(1_000_000_000) as u32,
                    },
                }),
        )
        .map_err(|e| scan_failed(&e))?,
    };
    let index_bytes = postcard::to_stdvec(&scanned.index)
        .map_err(|e| failure(format!("encoding the index: {e}")))?;
    send(events, Event::Index(index_bytes))?;
    if read.index_only {
        return send(
            events,
            Event::ReadDone(ReadSummary {
                blocks_scanned: scanned.index.blocks_total(),
                bytes_scanned: scanned.index.bytes_total(),
                bytes_changed: 0,
                chunks: 0,
                wire_bytes: 0,
                files_unread: scanned.stats.files_unread,
                bytes_unread: scanned.stats.bytes_unread,
                changed_block_tracking: cbt,
                changed_block_tracking_fallback: cbt_fallback,
            }),
        );
    }
    let plan = diff(previous.as_ref(), &scanned.index);
    let mut stream = ChunkStream::new(&plan, &snapshot, ChunkOptions::default())
        .map_err(|e| failure(format!("planning chunks: {}", error_chain(&e))))?;
    let mut chunks = 0u64;
    for chunk in stream.by_ref() {
        let chunk = chunk
            .map_err(|e| failure(format!("reading {}: {}", root.display(), error_chain(&e))))?;
        chunks += 1;
        if chunk.seq >= read.from_seq {
            send(events, Event::Chunk(chunk.to_bytes()))?;
        }
    }
    let summary = stream.summary();
    send(
        events,
        Event::ReadDone(ReadSummary {
            blocks_scanned: plan.stats.blocks_scanned,
            bytes_scanned: plan.stats.bytes_scanned,
            bytes_changed: plan.stats.bytes_changed,
            chunks,
            wire_bytes: summary.wire_bytes,
            files_unread: scanned.stats.files_unread,
            // With changed block tracking, what lies outside the changed extents is unread.
            bytes_unread: if cbt {
                plan.stats
                    .bytes_scanned
                    .saturating_sub(scanned.stats.bytes_scanned)
            } else {
                scanned.stats.bytes_unread
            },
            changed_block_tracking: cbt,
            changed_block_tracking_fallback: cbt_fallback,
        }),
    )
}

fn open_volume(
    root: &std::path::Path,
    open: ferry_schemas::proto::replication::OpenCommand,
    applier: &mut Option<Applier>,
) -> Result<(), MoverError> {
    let stream: StreamId = postcard::from_bytes(&open.stream_id)
        .map_err(|e| failure(format!("stream id does not decode: {e}")))?;
    let kind = if open.block {
        VolumeKind::BlockImage
    } else {
        VolumeKind::FileTree
    };
    let opened = Applier::open(root, kind, stream)
        .map_err(|e| failure(format!("opening {}: {}", root.display(), error_chain(&e))))?;
    *applier = Some(opened);
    Ok(())
}

fn apply_chunk(
    bytes: &[u8],
    applier: &mut Option<Applier>,
    events: &mpsc::Sender<MoverEvent>,
) -> Result<(), MoverError> {
    let Some(target) = applier.as_mut() else {
        return Err(failure("chunk before open"));
    };
    let chunk = match DeltaChunk::from_bytes(bytes) {
        Ok(chunk) => chunk,
        // Too short to carry its own seq: ask again from the next one expected.
        Err(e) => {
            return Err(MoverError {
                message: format!("corrupt chunk: {e}"),
                corrupt_seq: Some(target.next_seq()),
            })
        }
    };
    match target.apply(&chunk) {
        Ok(()) => send(events, Event::Applied(chunk.seq)),
        Err(crate::delta::ApplyError::ChunkCorrupt { .. }) => Err(MoverError {
            message: format!("chunk {} failed its checksum", chunk.seq),
            corrupt_seq: Some(chunk.seq),
        }),
        Err(e) => Err(failure(format!(
            "applying chunk {}: {}",
            chunk.seq,
            error_chain(&e)
        ))),
    }
}

fn finish_volume(
    digest: &[u8],
    applier: &mut Option<Applier>,
    events: &mpsc::Sender<MoverEvent>,
) -> Result<(), MoverError> {
    let Some(target) = applier.take() else {
        return Err(failure("finish before open"));
    };
    let expected: [u8; 32] = digest
        .try_into()
        .map_err(|_| failure(format!("digest is {} bytes, not 32", digest.len())))?;
    let report = target
        .finish(FinishOptions::default())
        .map_err(|e| failure(format!("finishing: {}", error_chain(&e))))?;
    match report.verified_digest {
        Some(VolumeDigest(got)) if got == expected => {
            // The verified index first: the replicator keeps it as this generation's index.
            if let Some(index) = &report.verified_index {
                let bytes = postcard::to_stdvec(index)
                    .map_err(|e| failure(format!("encoding the index: {e}")))?;
                send(events, Event::Index(bytes))?;
            }
            send(events, Event::Finished(got.to_vec()))
        }
        Some(got) => Err(failure(format!(
            "volume digest {got} differs from the source's {}",
            VolumeDigest(expected)
        ))),
        None => Err(failure("volume was not verified")),
    }
}

/// `error: cause: cause…`, so one line names the root cause.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
