//! The ledger format (schema, deterministic payloads, hash chain), committing rows and verifying.
//!
//! Table `ledger(n INTEGER PRIMARY KEY, committed_at_ms INTEGER, payload BLOB, prev_hash BLOB,
//! hash BLOB)` holds rows numbered 1..=N, one transaction per row, where
//!
//! - `payload` is [`payload`]`(n, len)`: deterministic from `n`, so it can be checked;
//! - `prev_hash` is row `n-1`'s `hash` ([`GENESIS_PREV_HASH`] for `n = 1`);
//! - `hash` is [`row_hash`]: `blake3(n as u64 LE || committed_at_ms as i64 LE || payload ||
//!   prev_hash)`.
//!
//! All state lives in the database, so a crash (or a crash-consistent copy of the directory)
//! always recovers to a committed prefix of the chain.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "ledger.db";

/// Length in bytes of `hash` and `prev_hash`.
pub const HASH_LEN: usize = 32;

/// `prev_hash` of row 1.
pub const GENESIS_PREV_HASH: [u8; HASH_LEN] = [0; HASH_LEN];

/// Largest accepted payload size; guards against a typo in `PAYLOAD_BYTES` filling the disk.
pub const MAX_PAYLOAD_BYTES: usize = 16 << 20;

/// Context string for blake3's key derivation, so payload bytes never collide with row hashes.
const PAYLOAD_CONTEXT: &str = "ferry-lab sqlite-writer 2026 ledger payload v1";

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS ledger (
    n INTEGER PRIMARY KEY,
    committed_at_ms INTEGER NOT NULL,
    payload BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL
)";

/// Path of the ledger database inside `data_dir`.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DB_FILE)
}

/// The deterministic payload of row `n`: the first `len` bytes of a blake3 XOF stream keyed by `n`.
///
/// Being a stream prefix, `payload(n, a)` is a prefix of `payload(n, b)` for `a <= b`, so a
/// verifier only needs the stored length, not the writer's `PAYLOAD_BYTES`.
pub fn payload(n: u64, len: usize) -> Vec<u8> {
    let mut hasher = blake3::Hasher::new_derive_key(PAYLOAD_CONTEXT);
    hasher.update(&n.to_le_bytes());
    let mut out = vec![0; len];
    hasher.finalize_xof().fill(&mut out);
    out
}

/// The chain hash of a row: `blake3(n LE u64 || committed_at_ms LE i64 || payload || prev_hash)`.
pub fn row_hash(n: u64, committed_at_ms: i64, payload: &[u8], prev_hash: &[u8]) -> [u8; HASH_LEN] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&n.to_le_bytes());
    hasher.update(&committed_at_ms.to_le_bytes());
    hasher.update(payload);
    hasher.update(prev_hash);
    *hasher.finalize().as_bytes()
}

/// The newest committed row, as far as the next commit and the reports need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tip {
    /// Row number.
    pub n: u64,
    /// When it was committed, in milliseconds since the Unix epoch.
    pub committed_at_ms: i64,
    /// Its chain hash.
    pub hash: [u8; HASH_LEN],
}

/// Opens (creating the directory and database if absent) the ledger for writing.
///
/// Sets WAL mode with `synchronous=FULL`: every commit is fsynced to the WAL before it returns,
/// and a copy of db + wal taken at one instant recovers to a committed prefix.
pub fn open_for_writing(data_dir: &Path) -> Result<Connection> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let path = db_path(data_dir);
    let conn = Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // Another writer (or a verifier during recovery) may hold the lock briefly.
    conn.busy_timeout(Duration::from_secs(10))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .context("enabling WAL journal mode")?;
    ensure!(
        mode.eq_ignore_ascii_case("wal"),
        "SQLite refused WAL journal mode for {} (got {mode:?})",
        path.display()
    );
    // Not persistent: must be set on every connection.
    conn.pragma_update(None, "synchronous", "FULL")
        .context("setting synchronous=FULL")?;
    conn.execute_batch(SCHEMA)
        .context("creating the ledger table")?;
    Ok(conn)
}

/// Opens an existing ledger for reading; a missing database file is an error.
///
/// Tries read-only first so a snapshot copy is not modified (beyond the `-shm` index, which
/// WAL recovery rebuilds); falls back to read-write where read-only cannot recover the WAL.
pub fn open_existing(data_dir: &Path) -> Result<Connection> {
    let path = db_path(data_dir);
    if !path.is_file() {
        bail!("no ledger database at {}", path.display());
    }
    let read_only = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let read_write = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut last_err = None;
    for flags in [read_only, read_write] {
        // Opening is lazy: only a first read reveals whether the WAL could be recovered.
        let attempt = Connection::open_with_flags(&path, flags).and_then(|conn| {
            conn.busy_timeout(Duration::from_secs(10))?;
            conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))?;
            Ok(conn)
        });
        match attempt {
            Ok(conn) => return Ok(conn),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.expect("at least one attempt"))
        .with_context(|| format!("opening {}", path.display()))
}

/// Whether the `ledger` table exists (an empty or fresh database has none).
fn has_ledger_table(conn: &Connection) -> Result<bool> {
    let count: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'ledger'",
        [],
        |row| row.get(0),
    )?;
    Ok(count > 0)
}

/// The newest row, or `None` for an empty ledger (or a database without the table).
///
/// Does not verify the chain; a malformed newest row is an error.
pub fn tip(conn: &Connection) -> Result<Option<Tip>> {
    if !has_ledger_table(conn)? {
        return Ok(None);
    }
    let row = conn
        .query_row(
            "SELECT n, committed_at_ms, hash FROM ledger ORDER BY n DESC LIMIT 1",
            [],
            |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, Vec<u8>>(2)?,
                ))
            },
        )
        .optional()
        .context("reading the newest ledger row")?;
    let Some((n, committed_at_ms, hash)) = row else {
        return Ok(None);
    };
    let n = u64::try_from(n).ok().filter(|&n| n >= 1);
    let n = n.context("newest ledger row has a number below 1; run `sqlite-writer verify`")?;
    let hash: [u8; HASH_LEN] = hash
        .try_into()
        .map_err(|_| anyhow::anyhow!("row {n} has a malformed hash; run `sqlite-writer verify`"))?;
    Ok(Some(Tip {
        n,
        committed_at_ms,
        hash,
    }))
}

/// The chain hash of row `n`, or `None` when the ledger has no such row. Used to prove two
/// copies of a ledger share a transaction (e.g. the last one before a migration).
///
/// # Errors
/// When the database cannot be read.
pub fn hash_of(conn: &Connection, n: u64) -> Result<Option<[u8; HASH_LEN]>> {
    if !has_ledger_table(conn)? {
        return Ok(None);
    }
    let n = i64::try_from(n).context("row number out of range")?;
    let hash: Option<Vec<u8>> = conn
        .query_row("SELECT hash FROM ledger WHERE n = ?1", [n], |row| {
            row.get(0)
        })
        .optional()
        .with_context(|| format!("reading ledger row {n}"))?;
    Ok(hash.and_then(|h| h.try_into().ok()))
}

/// Number of the newest committed row (0 for an empty ledger).
pub fn last_committed(conn: &Connection) -> Result<u64> {
    Ok(tip(conn)?.map_or(0, |t| t.n))
}

/// Milliseconds since the Unix epoch (negative if the clock is before 1970, which is harmless).
fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// Commits the next row in its own transaction and returns it.
///
/// The tip is re-read inside an IMMEDIATE (write-locked) transaction rather than kept in
/// memory, so the chain stays correct whatever happened since the last call.
pub fn commit_next(conn: &mut Connection, payload_bytes: usize) -> Result<Tip> {
    ensure!(
        payload_bytes <= MAX_PAYLOAD_BYTES,
        "payload size {payload_bytes} exceeds the maximum of {MAX_PAYLOAD_BYTES} bytes"
    );
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .context("starting a write transaction")?;
    let prev = tip(&tx)?;
    let n = prev.map_or(1, |t| t.n + 1);
    let prev_hash = prev.map_or(GENESIS_PREV_HASH, |t| t.hash);
    let committed_at_ms = now_ms();
    let body = payload(n, payload_bytes);
    let hash = row_hash(n, committed_at_ms, &body, &prev_hash);
    let n_sql = i64::try_from(n).context("row number overflows SQLite's INTEGER")?;
    tx.execute(
        "INSERT INTO ledger (n, committed_at_ms, payload, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![n_sql, committed_at_ms, body, prev_hash.as_slice(), hash.as_slice()],
    )
    .with_context(|| format!("inserting row {n}"))?;
    tx.commit().with_context(|| format!("committing row {n}"))?;
    Ok(Tip {
        n,
        committed_at_ms,
        hash,
    })
}

/// Result of [`verify`] on a readable database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Rows are exactly 1..=`last`, correctly chained.
    Ok {
        /// Number of the last committed row (0 for an empty ledger).
        last: u64,
        /// `committed_at_ms` of that row, if any.
        last_committed_at_ms: Option<i64>,
    },
    /// The ledger is inconsistent.
    Broken(Breakage),
}

/// Why a ledger failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breakage {
    /// The first offending row, when the problem is attributable to one.
    pub row: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for Breakage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.row {
            Some(n) => write!(f, "row {n}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

fn broken(row: Option<u64>, reason: impl Into<String>) -> Verdict {
    Verdict::Broken(Breakage {
        row,
        reason: reason.into(),
    })
}

/// Reads a column that must be a blob, reporting the row on a type mismatch.
fn blob<'a>(value: ValueRef<'a>, n: u64, column: &str) -> Result<&'a [u8], Verdict> {
    match value {
        ValueRef::Blob(b) => Ok(b),
        other => Err(broken(
            Some(n),
            format!("{column} is {:?}, not a blob", other.data_type()),
        )),
    }
}

/// Checks one row against its predecessor's hash; `Err` carries the verdict.
fn check_row(
    expected: u64,
    row: &rusqlite::Row<'_>,
    prev_hash: &[u8; HASH_LEN],
) -> Result<(i64, [u8; HASH_LEN]), Verdict> {
    let sql_err = |e: rusqlite::Error| broken(Some(expected), format!("unreadable: {e}"));
    let n = row.get::<_, i64>(0).map_err(sql_err)?;
    match u64::try_from(n) {
        Ok(n) if n == expected => {}
        Ok(n) if n > expected => {
            return Err(broken(
                Some(expected),
                format!("missing (the next row present is {n})"),
            ))
        }
        // Not a valid row number, so not a `Some(row)`; the reason still names it.
        _ => {
            return Err(broken(
                None,
                format!("row {n}: row numbers must start at 1"),
            ))
        }
    }
    let n = expected;
    let committed_at_ms = match row.get_ref(1).map_err(sql_err)? {
        ValueRef::Integer(t) => t,
        other => {
            return Err(broken(
                Some(n),
                format!("committed_at_ms is {:?}, not an integer", other.data_type()),
            ))
        }
    };
    let body = blob(row.get_ref(2).map_err(sql_err)?, n, "payload")?;
    let stored_prev = blob(row.get_ref(3).map_err(sql_err)?, n, "prev_hash")?;
    let stored_hash = blob(row.get_ref(4).map_err(sql_err)?, n, "hash")?;
    if stored_prev != prev_hash {
        let what = if n == 1 {
            "is not the genesis (all-zero) hash".to_owned()
        } else {
            format!("does not match the hash of row {}", n - 1)
        };
        return Err(broken(Some(n), format!("prev_hash {what}")));
    }
    let hash = row_hash(n, committed_at_ms, body, stored_prev);
    if stored_hash != hash {
        return Err(broken(Some(n), "hash does not match the row's contents"));
    }
    if body != payload(n, body.len()) {
        return Err(broken(
            Some(n),
            "payload differs from the deterministic payload",
        ));
    }
    Ok((committed_at_ms, hash))
}

/// Verifies the whole ledger: SQLite page-level integrity, rows exactly 1..=N, each `prev_hash`
/// equal to the previous row's `hash`, each `hash` and payload recomputing.
///
/// `Err` means the database could not be read at all; a readable but inconsistent ledger is
/// [`Verdict::Broken`], naming the first bad row.
pub fn verify(conn: &Connection) -> Result<Verdict> {
    // One read transaction: a consistent snapshot even if a writer is running.
    let tx = conn
        .unchecked_transaction()
        .context("starting a read transaction")?;
    let check: String = tx
        .query_row("PRAGMA quick_check(1)", [], |row| row.get(0))
        .context("running PRAGMA quick_check")?;
    if check != "ok" {
        return Ok(broken(
            None,
            format!("SQLite integrity check failed: {check}"),
        ));
    }
    if !has_ledger_table(&tx)? {
        return Ok(Verdict::Ok {
            last: 0,
            last_committed_at_ms: None,
        });
    }
    let mut stmt =
        tx.prepare("SELECT n, committed_at_ms, payload, prev_hash, hash FROM ledger ORDER BY n")?;
    let mut rows = stmt.query([])?;
    let mut last = 0u64;
    let mut last_committed_at_ms = None;
    let mut prev_hash = GENESIS_PREV_HASH;
    while let Some(row) = rows.next().context("reading ledger rows")? {
        let expected = last + 1;
        match check_row(expected, row, &prev_hash) {
            Ok((at, hash)) => {
                last = expected;
                last_committed_at_ms = Some(at);
                prev_hash = hash;
            }
            Err(verdict) => return Ok(verdict),
        }
    }
    Ok(Verdict::Ok {
        last,
        last_committed_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_deterministic_and_prefix_stable() {
        assert_eq!(payload(7, 64), payload(7, 64));
        assert_ne!(payload(7, 64), payload(8, 64));
        assert_eq!(payload(7, 300)[..64], payload(7, 64)[..]);
        assert!(payload(1, 0).is_empty());
    }

    #[test]
    fn row_hash_covers_every_field() {
        let base = row_hash(1, 10, b"abc", &GENESIS_PREV_HASH);
        assert_ne!(base, row_hash(2, 10, b"abc", &GENESIS_PREV_HASH));
        assert_ne!(base, row_hash(1, 11, b"abc", &GENESIS_PREV_HASH));
        assert_ne!(base, row_hash(1, 10, b"abd", &GENESIS_PREV_HASH));
        assert_ne!(base, row_hash(1, 10, b"abc", &[1; HASH_LEN]));
    }

    #[test]
    fn commits_chain_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open_for_writing(dir.path()).unwrap();
        assert_eq!(
            verify(&conn).unwrap(),
            Verdict::Ok {
                last: 0,
                last_committed_at_ms: None
            }
        );
        let mut prev = None;
        for expected in 1..=20 {
            let t = commit_next(&mut conn, 32).unwrap();
            assert_eq!(t.n, expected);
            prev = Some(t);
        }
        let prev = prev.unwrap();
        assert_eq!(tip(&conn).unwrap(), Some(prev));
        assert_eq!(
            verify(&conn).unwrap(),
            Verdict::Ok {
                last: 20,
                last_committed_at_ms: Some(prev.committed_at_ms)
            }
        );
        conn.execute(
            "UPDATE ledger SET committed_at_ms = committed_at_ms + 1 WHERE n = 5",
            [],
        )
        .unwrap();
        match verify(&conn).unwrap() {
            Verdict::Broken(b) => assert_eq!(b.row, Some(5), "{b}"),
            v => panic!("expected broken, got {v:?}"),
        }
    }

    #[test]
    fn missing_database_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_existing(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no ledger database"), "{err:#}");
    }
}
