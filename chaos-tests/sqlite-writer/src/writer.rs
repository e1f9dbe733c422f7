//! The writer loop: configuration from the environment, commits, progress lines and clean stops.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::ledger;

/// Default payload size in bytes (`PAYLOAD_BYTES`).
pub const DEFAULT_PAYLOAD_BYTES: usize = 256;

/// Default pause between commits in milliseconds (`WRITE_INTERVAL_MS`).
pub const DEFAULT_WRITE_INTERVAL_MS: u64 = 50;

/// A progress line is printed after this many commits...
const PROGRESS_EVERY_COMMITS: u64 = 100;

/// ...or once this much time has passed since the previous one, whichever comes first.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What the writer loop needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterConfig {
    /// Directory holding `ledger.db` (created if absent).
    pub data_dir: PathBuf,
    /// Payload size of each row.
    pub payload_bytes: usize,
    /// Pause after each commit; zero commits as fast as possible.
    pub interval: Duration,
    /// Stop after this many commits by this process (`None`: run until signalled).
    pub max_txns: Option<u64>,
}

/// Reads an optional numeric environment variable; unset or empty means `None`.
fn env_number(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .with_context(|| format!("{name} must be a non-negative integer, got {v:?}")),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => bail!("{name}: {e}"),
    }
}

impl WriterConfig {
    /// Builds the configuration from `PAYLOAD_BYTES`, `WRITE_INTERVAL_MS` and `MAX_TXNS`,
    /// rejecting malformed values rather than silently using defaults.
    pub fn from_env(data_dir: PathBuf) -> Result<Self> {
        let payload_bytes = match env_number("PAYLOAD_BYTES")? {
            Some(b) => usize::try_from(b).unwrap_or(usize::MAX),
            None => DEFAULT_PAYLOAD_BYTES,
        };
        ensure!(
            payload_bytes <= ledger::MAX_PAYLOAD_BYTES,
            "PAYLOAD_BYTES={payload_bytes} exceeds the maximum of {}",
            ledger::MAX_PAYLOAD_BYTES
        );
        let interval_ms = env_number("WRITE_INTERVAL_MS")?.unwrap_or(DEFAULT_WRITE_INTERVAL_MS);
        Ok(Self {
            data_dir,
            payload_bytes,
            interval: Duration::from_millis(interval_ms),
            max_txns: env_number("MAX_TXNS")?,
        })
    }
}

/// Why the writer loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGTERM or SIGINT arrived.
    Signal(i32),
    /// `max_txns` commits were made.
    MaxTxns,
}

/// Forwards SIGTERM/SIGINT to a channel, so the loop can finish its transaction and also wake
/// early from the pause between commits.
fn stop_signals() -> Result<Receiver<i32>> {
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(rx)
}

/// Writes a line and flushes. Errors are ignored on purpose: the log reader going away must
/// not stop the workload, whose real output is the database.
fn say(out: &mut impl Write, line: std::fmt::Arguments<'_>) {
    let _ = out
        .write_fmt(line)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
}

/// Runs the writer until a signal or `max_txns`, printing the start line, progress lines and a
/// final `last committed <n>` line to `out`. Returns the last committed row number.
pub fn run(config: &WriterConfig, out: &mut impl Write) -> Result<(u64, StopReason)> {
    // Before opening the database, so an early SIGTERM never kills us mid-setup.
    let stop = stop_signals()?;
    let mut conn = ledger::open_for_writing(&config.data_dir)?;
    let mut last = ledger::last_committed(&conn)?;
    say(
        out,
        format_args!(
            "sqlite-writer: writing to {}, resuming after {last}",
            ledger::db_path(&config.data_dir).display()
        ),
    );
    let mut committed = 0u64;
    let mut since_report = 0u64;
    let mut last_report = Instant::now();
    let reason = loop {
        match stop.try_recv() {
            Ok(sig) => break StopReason::Signal(sig),
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
        }
        if config.max_txns.is_some_and(|max| committed >= max) {
            break StopReason::MaxTxns;
        }
        last = ledger::commit_next(&mut conn, config.payload_bytes)?.n;
        committed += 1;
        since_report += 1;
        if since_report >= PROGRESS_EVERY_COMMITS || last_report.elapsed() >= PROGRESS_EVERY {
            say(out, format_args!("committed {last}"));
            since_report = 0;
            last_report = Instant::now();
        }
        if !config.interval.is_zero() {
            // Waiting on the channel rather than sleeping makes a stop prompt even with long pauses.
            match stop.recv_timeout(config.interval) {
                Ok(sig) => break StopReason::Signal(sig),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => thread::sleep(config.interval),
            }
        }
    };
    let why = match reason {
        StopReason::Signal(SIGTERM) => "stopped by SIGTERM".to_owned(),
        StopReason::Signal(SIGINT) => "stopped by SIGINT".to_owned(),
        StopReason::Signal(sig) => format!("stopped by signal {sig}"),
        StopReason::MaxTxns => format!("reached MAX_TXNS={committed}"),
    };
    say(
        out,
        format_args!("sqlite-writer: {why}, last committed {last}"),
    );
    Ok((last, reason))
}
