//! End-to-end tests running the real `sqlite-writer` binary against temporary data directories.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use ferry_sqlite_writer::ledger;

const BIN: &str = env!("CARGO_BIN_EXE_sqlite-writer");

/// Upper bound for any single wait in these tests; generous for a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Env vars the writer reads; cleared so the caller's environment cannot leak in.
const WRITER_ENV: [&str; 4] = ["DATA_DIR", "PAYLOAD_BYTES", "WRITE_INTERVAL_MS", "MAX_TXNS"];

fn command(dir: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    for var in WRITER_ENV {
        cmd.env_remove(var);
    }
    cmd.arg("--data-dir").arg(dir);
    cmd
}

/// Sends a signal to one process we started, by PID, via kill(1) (the crate forbids unsafe).
fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// Runs a short-lived command to completion, bounded by [`TIMEOUT`].
fn run_bounded(mut cmd: Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning sqlite-writer");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(out) => out.expect("waiting for sqlite-writer"),
        Err(_) => {
            signal(pid, "KILL");
            panic!("{cmd:?} did not finish within {TIMEOUT:?}");
        }
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `verify` must succeed; returns N from `ok: last committed N`.
fn verify_ok(dir: &Path) -> u64 {
    let out = run_bounded({
        let mut c = command(dir);
        c.arg("verify");
        c
    });
    let text = stdout(&out);
    assert!(out.status.success(), "verify failed: {out:?}");
    text.trim()
        .strip_prefix("ok: last committed ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected verify output {text:?}"))
}

/// `verify` must report a broken ledger (exit 1) naming `row`.
fn verify_broken(dir: &Path, row: u64) {
    let out = run_bounded({
        let mut c = command(dir);
        c.arg("verify");
        c
    });
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout(&out).is_empty(), "{out:?}");
    assert!(err.starts_with("broken: "), "{err:?}");
    assert!(
        err.contains(&format!("row {row}:")),
        "expected row {row} in {err:?}"
    );
}

/// A running writer whose stdout lines arrive on a channel; SIGKILLed on drop if still running.
struct Writer {
    child: Child,
    lines: Receiver<String>,
}

impl Writer {
    fn spawn(dir: &Path, env: &[(&str, &str)]) -> Self {
        let mut cmd = command(dir);
        cmd.arg("run").envs(env.iter().copied());
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning sqlite-writer run");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next stdout line matching `pred`, skipping others.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!("no {what} line within {TIMEOUT:?}"),
                Err(RecvTimeoutError::Disconnected) => panic!("writer exited before a {what} line"),
            }
        }
    }

    /// Waits for the next `committed <n>` progress line and returns n.
    fn wait_progress(&self) -> u64 {
        let line = self.wait_for("progress", |l| l.starts_with("committed "));
        line["committed ".len()..].parse().expect("progress number")
    }

    /// Waits for the process to exit (its stdout closing), returning its status and the lines
    /// it printed meanwhile.
    fn wait_exit(mut self) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + TIMEOUT;
        let mut rest = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => rest.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("writer did not exit within {TIMEOUT:?}"),
            }
        }
        let status = self.child.wait().expect("waiting for writer");
        (status, rest)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Only our own child, by PID; a no-op if it already exited and was reaped.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parses `... last committed <n>` from the writer's final line.
fn final_last(lines: &[String]) -> u64 {
    let line = lines.last().expect("a final line");
    let (_, n) = line
        .rsplit_once("last committed ")
        .unwrap_or_else(|| panic!("final line {line:?}"));
    n.parse().expect("final number")
}

#[test]
fn max_txns_then_verify_reports_them() {
    let tmp = tempfile::tempdir().unwrap();
    // A not-yet-existing subdirectory, set via DATA_DIR rather than the flag.
    let dir = tmp.path().join("data");
    let mut cmd = Command::new(BIN);
    cmd.env("DATA_DIR", &dir)
        .env("MAX_TXNS", "200")
        .env("WRITE_INTERVAL_MS", "0")
        .env_remove("PAYLOAD_BYTES");
    let out = run_bounded(cmd);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    assert_eq!(
        lines[0],
        format!(
            "sqlite-writer: writing to {}, resuming after 0",
            dir.join("ledger.db").display()
        )
    );
    assert!(lines.contains(&"committed 100".to_owned()), "{lines:?}");
    assert!(lines.contains(&"committed 200".to_owned()), "{lines:?}");
    assert_eq!(final_last(&lines), 200);

    assert_eq!(verify_ok(&dir), 200);

    let last = run_bounded({
        let mut c = command(&dir);
        c.arg("last");
        c
    });
    assert!(last.status.success(), "{last:?}");
    assert_eq!(stdout(&last), "200\n");

    let json = run_bounded({
        let mut c = command(&dir);
        c.args(["verify", "--json"]);
        c
    });
    assert!(json.status.success(), "{json:?}");
    let text = stdout(&json);
    let at = text
        .trim()
        .strip_prefix(r#"{"ok":true,"last":200,"last_committed_at_ms":"#)
        .and_then(|rest| rest.strip_suffix('}'))
        .unwrap_or_else(|| panic!("unexpected JSON {text:?}"));
    assert!(at.parse::<i64>().unwrap() > 1_600_000_000_000, "{text}");

    // Default payload size is 256 bytes.
    let conn = rusqlite::Connection::open(ledger::db_path(&dir)).unwrap();
    let len: i64 = conn
        .query_row("SELECT length(payload) FROM ledger WHERE n = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(len, 256);
}

#[test]
fn sigkill_then_restart_continues_numbering() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut recovered = 0;
    // Several kills, each landing at an arbitrary point of the commit cycle.
    for round in 0..3 {
        let writer = Writer::spawn(dir, &[("WRITE_INTERVAL_MS", "0"), ("PAYLOAD_BYTES", "100")]);
        writer.wait_for("start", |l| {
            l.ends_with(&format!("resuming after {recovered}"))
        });
        let seen = writer.wait_progress();
        signal(writer.pid(), "KILL");
        let (status, _) = writer.wait_exit();
        assert!(!status.success(), "SIGKILLed writer reported {status:?}");

        // Everything reported as committed survived, and the chain is intact.
        let now = verify_ok(dir);
        assert!(
            now >= seen,
            "round {round}: recovered {now} < reported {seen}"
        );
        assert!(
            now > recovered,
            "round {round}: no progress past {recovered}"
        );
        recovered = now;
    }

    let writer = Writer::spawn(dir, &[("WRITE_INTERVAL_MS", "0"), ("MAX_TXNS", "150")]);
    writer.wait_for("start", |l| {
        l.ends_with(&format!("resuming after {recovered}"))
    });
    let (status, lines) = writer.wait_exit();
    assert!(status.success(), "{status:?} {lines:?}");
    assert_eq!(final_last(&lines), recovered + 150);
    assert_eq!(verify_ok(dir), recovered + 150);
}

#[test]
fn sigterm_and_sigint_finish_cleanly() {
    for sig in ["TERM", "INT"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let writer = Writer::spawn(dir, &[("WRITE_INTERVAL_MS", "1")]);
        let seen = writer.wait_progress();
        signal(writer.pid(), sig);
        let (status, lines) = writer.wait_exit();
        assert!(status.success(), "SIG{sig}: {status:?} {lines:?}");
        let last = final_last(&lines);
        assert!(
            lines.last().unwrap().contains(&format!("SIG{sig}")),
            "{lines:?}"
        );
        assert!(last >= seen);
        assert_eq!(
            verify_ok(dir),
            last,
            "SIG{sig}: printed last must match the database"
        );
    }
}

#[test]
fn sigterm_interrupts_a_long_pause() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Far longer than TIMEOUT: the stop must not wait for the pause to end.
    let writer = Writer::spawn(dir, &[("WRITE_INTERVAL_MS", "3600000")]);
    writer.wait_for("start", |l| l.starts_with("sqlite-writer: writing to"));
    signal(writer.pid(), "TERM");
    let (status, lines) = writer.wait_exit();
    assert!(status.success(), "{status:?} {lines:?}");
    let last = final_last(&lines);
    assert!(last <= 1, "{lines:?}");
    assert_eq!(verify_ok(dir), last);
}

/// Copies the db and, when present, its -wal and -shm files.
fn copy_ledger(from: &Path, to: &Path) -> bool {
    std::fs::create_dir_all(to).unwrap();
    let mut had_wal = false;
    for suffix in ["", "-wal", "-shm"] {
        let name = format!("{}{suffix}", ledger::DB_FILE);
        match std::fs::copy(from.join(&name), to.join(&name)) {
            Ok(_) => had_wal |= suffix == "-wal",
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !suffix.is_empty() => {}
            Err(e) => panic!("copying {name}: {e}"),
        }
    }
    had_wal
}

#[test]
fn copy_taken_while_writing_is_crash_consistent() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    let writer = Writer::spawn(
        &live,
        &[("WRITE_INTERVAL_MS", "0"), ("PAYLOAD_BYTES", "1000")],
    );
    let mut floor = 0;
    for i in 0..5 {
        let reported = writer.wait_progress();
        // A volume snapshot captures all files at one instant. Freezing the writer (SIGSTOP) at
        // an arbitrary point, mid-transaction or mid-checkpoint, gives that instant; a plain
        // sequential copy of a live WAL database is not point-in-time and may legitimately tear.
        signal(writer.pid(), "STOP");
        let snap = tmp.path().join(format!("snap{i}"));
        let had_wal = copy_ledger(&live, &snap);
        signal(writer.pid(), "CONT");
        assert!(had_wal, "a live WAL database should have a -wal file");
        let got = verify_ok(&snap);
        assert!(
            got >= reported,
            "snapshot {i} holds {got} < reported {reported}"
        );
        assert!(got >= floor, "snapshot {i} went backwards: {got} < {floor}");
        floor = got;
        // Verifying the live database alongside the writer must work too (read-only, no lock fight).
        assert!(verify_ok(&live) >= got);
    }
    signal(writer.pid(), "TERM");
    let (status, lines) = writer.wait_exit();
    assert!(status.success(), "{status:?} {lines:?}");
    assert_eq!(verify_ok(&live), final_last(&lines));
}

#[test]
fn tampered_rows_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let writer = Writer::spawn(
        &base,
        &[
            ("WRITE_INTERVAL_MS", "0"),
            ("MAX_TXNS", "50"),
            ("PAYLOAD_BYTES", "64"),
        ],
    );
    let (status, _) = writer.wait_exit();
    assert!(status.success());
    assert_eq!(verify_ok(&base), 50);

    // (SQL tampering, the row verify must name)
    let cases: [(&str, u64); 6] = [
        ("UPDATE ledger SET payload = zeroblob(64) WHERE n = 17", 17),
        ("DELETE FROM ledger WHERE n = 30", 30),
        ("UPDATE ledger SET hash = zeroblob(32) WHERE n = 10", 10),
        (
            "UPDATE ledger SET committed_at_ms = committed_at_ms + 1 WHERE n = 42",
            42,
        ),
        (
            "UPDATE ledger SET prev_hash = x'01' || zeroblob(31) WHERE n = 1",
            1,
        ),
        ("UPDATE ledger SET hash = 'text' WHERE n = 5", 5),
    ];
    for (i, (sql, row)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        copy_ledger(&base, &dir);
        let conn = rusqlite::Connection::open(ledger::db_path(&dir)).unwrap();
        assert_eq!(conn.execute(sql, []).unwrap(), 1, "{sql}");
        drop(conn);
        verify_broken(&dir, row);
    }

    // A forger who rewrites row 23 consistently (new timestamp, recomputed hash) still breaks
    // the link from row 24.
    let dir = tmp.path().join("forged");
    copy_ledger(&base, &dir);
    let conn = rusqlite::Connection::open(ledger::db_path(&dir)).unwrap();
    let (payload, prev): (Vec<u8>, Vec<u8>) = conn
        .query_row(
            "SELECT payload, prev_hash FROM ledger WHERE n = 23",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let hash = ledger::row_hash(23, 12345, &payload, &prev);
    conn.execute(
        "UPDATE ledger SET committed_at_ms = 12345, hash = ?1 WHERE n = 23",
        [hash.as_slice()],
    )
    .unwrap();
    drop(conn);
    verify_broken(&dir, 24);

    let out = run_bounded({
        let mut c = command(&dir);
        c.args(["verify", "--json"]);
        c
    });
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).starts_with(r#"{"ok":false,"row":24,"reason":"row 24: prev_hash"#),
        "{out:?}"
    );
}

#[test]
fn empty_and_missing_databases() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nothing-here");
    for sub in ["verify", "last"] {
        let out = run_bounded({
            let mut c = command(&missing);
            c.arg(sub);
            c
        });
        assert_eq!(out.status.code(), Some(2), "{sub}: {out:?}");
        assert!(
            stderr(&out).contains("no ledger database"),
            "{sub}: {out:?}"
        );
    }

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(ledger::db_path(&empty), b"").unwrap();
    assert_eq!(verify_ok(&empty), 0);
    let out = run_bounded({
        let mut c = command(&empty);
        c.arg("last");
        c
    });
    assert_eq!(stdout(&out), "0\n", "{out:?}");

    // MAX_TXNS=0 initialises the schema without committing; the ledger is then empty but valid.
    let init = tmp.path().join("init");
    let (status, lines) = Writer::spawn(&init, &[("MAX_TXNS", "0")]).wait_exit();
    assert!(status.success());
    assert_eq!(final_last(&lines), 0);
    assert_eq!(verify_ok(&init), 0);
}

#[test]
fn malformed_env_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run_bounded({
        let mut c = command(tmp.path());
        c.arg("run").env("WRITE_INTERVAL_MS", "soon");
        c
    });
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("WRITE_INTERVAL_MS"), "{out:?}");
}
