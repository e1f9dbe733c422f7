//! Benchmark (not a test): the second sync of a large block image after 1% random 4 KiB writes,
//! Ferry's delta engine alone and Ferry's whole replication path (gRPC with mutual TLS to a
//! `ferry-replicator receive` process on 127.0.0.1) against rsync (local, and daemon mode over
//! loopback), plus the full-read hashing rate of Ferry's scanner against `b3sum`.
//!
//! Usage: `cargo build --release -p ferry-replicator --bins && ./target/release/ferry-delta-bench
//! [--size-mib N] [--seed N] [--dir PATH] [--keep] [--json]`. Peers whose binary is absent are
//! skipped with a message. With `--json`, stdout carries one JSON object per row (`name`,
//! `wall_s`, `cpu_s`, `wire_bytes`, `read_bytes`, `peak_rss_mib`; null where not measured) and
//! everything else goes to stderr.
//! Everything runs on a warm page cache (the image was just written), for every tool alike.
//! rsync runs with `--ignore-times`: the copies it updates were made within the same second
//! as the writes, and its size+mtime quick check would otherwise skip them.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_replicator::delta::{
    diff, scan, Applier, BlockSize, ChunkOptions, ChunkStream, DeltaChunk, FinishOptions,
    Generation, HashStore, ScanOptions, VolumeKey, VolumeSnapshot,
};

const MIB: u64 = 1 << 20;

/// Set by `--json`: human-readable lines go to stderr, stdout carries only JSON rows.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `println!` for the human-readable report: stdout, or stderr under `--json`.
macro_rules! say {
    ($($arg:tt)*) => {
        if JSON.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!($($arg)*)
        } else {
            println!($($arg)*)
        }
    };
}
const BLOCK: u64 = 4096;

struct Args {
    size_mib: u64,
    sparse_gib: u64,
    cbt_gib: u64,
    seed: u64,
    dir: Option<PathBuf>,
    keep: bool,
    json: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        size_mib: 1024,
        sparse_gib: 16,
        cbt_gib: 16,
        seed: 1,
        dir: None,
        keep: false,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--size-mib" => args.size_mib = value()?.parse().context("parsing --size-mib")?,
            "--seed" => args.seed = value()?.parse().context("parsing --seed")?,
            "--sparse-gib" => args.sparse_gib = value()?.parse().context("parsing --sparse-gib")?,
            "--cbt-gib" => args.cbt_gib = value()?.parse().context("parsing --cbt-gib")?,
            "--dir" => args.dir = Some(PathBuf::from(value()?)),
            "--keep" => args.keep = true,
            "--json" => args.json = true,
            "--help" | "-h" => {
                println!(
                    "ferry-delta-bench [--size-mib N (1024)] [--sparse-gib N (16; 0 skips)] [--cbt-gib N (16; 0 skips)] [--seed N (1)] [--dir PATH] [--keep] [--json]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if args.size_mib == 0 {
        bail!("--size-mib must be positive");
    }
    Ok(args)
}

fn main() -> ExitCode {
    match parse_args().and_then(|args| run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// CPU seconds (user + system) from `/proc/<pid>/stat`: own and waited-for children's.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    own: f64,
    children: f64,
}

fn cpu_of(pid: &str) -> Result<Cpu> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .with_context(|| format!("parsing {path}"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |field: usize| -> Result<f64> {
        let raw: u64 = fields
            .get(field - 3)
            .with_context(|| format!("{path} has no field {field}"))?
            .parse()
            .with_context(|| format!("parsing field {field} of {path}"))?;
        Ok(raw as f64 / rustix::param::clock_ticks_per_second() as f64)
    };
    Ok(Cpu {
        own: ticks(14)? + ticks(15)?,
        children: ticks(16)? + ticks(17)?,
    })
}

/// Resets the peak resident set size of process `pid` (`self` or a PID): `5` written to
/// `/proc/<pid>/clear_refs` (Linux 4.0 and later, proc(5)), so `VmHWM` restarts from the
/// current resident set. Returns that resident set in bytes: the baseline the peak is
/// measured from.
///
/// # Errors
/// When the file cannot be written (another user's process, or an older kernel).
fn reset_peak_rss(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/clear_refs");
    fs::write(&path, "5").with_context(|| format!("writing {path}"))?;
    proc_status_bytes(pid, "VmRSS:")
}

/// Peak resident set size of process `pid` since its last reset, in bytes (`VmHWM` of
/// `/proc/<pid>/status`).
///
/// # Errors
/// When the file is unreadable or has no `VmHWM` line.
fn peak_rss(pid: &str) -> Result<u64> {
    proc_status_bytes(pid, "VmHWM:")
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn proc_status_bytes(pid: &str, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in {path}"))?;
    Ok(kib * 1024)
}

/// Bytes as MiB, rounded, for the table.
fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / MIB as f64)
}

/// The peak resident set of one process in bytes, and the resident set it grew from.
#[derive(Clone, Copy, Debug)]
struct Peak {
    peak: u64,
    baseline: u64,
}

fn peak_from(peak: u64, baseline: u64) -> Peak {
    Peak { peak, baseline }
}

/// One row of the results table.
#[derive(Clone, Debug)]
struct Row {
    name: String,
    wall: Duration,
    cpu_s: f64,
    wire_bytes: Option<u64>,
    /// Bytes read from the source volume (scan plus changed blocks), where known.
    read_bytes: Option<u64>,
    /// Per process (source, then destination): empty when not measured.
    peaks: Vec<Peak>,
}

impl Row {
    /// `42 (30)`, or `40 (30) + 75 (20)` for source + destination: peak MiB (grown from).
    fn peak_text(&self) -> String {
        if self.peaks.is_empty() {
            return "–".into();
        }
        self.peaks
            .iter()
            .map(|p| format!("{} ({})", mib(p.peak), mib(p.baseline)))
            .collect::<Vec<_>>()
            .join(" + ")
    }

    /// The `--json` form: one object, figures in seconds, bytes and MiB.
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name.trim_matches('*').trim(),
            "wall_s": self.wall.as_secs_f64(),
            "cpu_s": self.cpu_s,
            "wire_bytes": self.wire_bytes,
            "read_bytes": self.read_bytes,
            "peak_rss_mib": (!self.peaks.is_empty()).then(|| {
                self.peaks.iter().map(|p| p.peak).sum::<u64>() as f64 / MIB as f64
            }),
        })
    }
}

/// Deterministic pseudo-random bytes: BLAKE3's extendable output keyed by the seed.
fn xof(seed: u64, label: &str) -> blake3::OutputReader {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let mut hasher = blake3::Hasher::new_keyed(&key);
    hasher.update(label.as_bytes());
    hasher.finalize_xof()
}

fn write_random_image(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut out = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut reader = xof(seed, "image");
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        reader.fill(&mut buf[..n]);
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

/// Scans a sparse image of `--sparse-gib` GiB holding 64 MiB of random data (64 extents of
/// 1 MiB, spread evenly) with Ferry's scanner and with `b3sum`, and prints time and bytes
/// read: the scanner reads only the data extents (`SEEK_DATA`/`SEEK_HOLE`), b3sum every byte.
fn sparse_scan(args: &Args, dir: &Path, threads: usize) -> Result<Vec<Row>> {
    let size = args.sparse_gib << 30;
    let path = dir.join("sparse.img");
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(size)?;
    let mut data = xof(args.seed, "sparse");
    let mut extent = vec![0u8; MIB as usize];
    for i in 0..64u64 {
        data.fill(&mut extent);
        std::os::unix::fs::FileExt::write_all_at(&file, &extent, i * (size / 64))?;
    }
    file.sync_all()?;
    drop(file);
    let options = ScanOptions {
        block_size: BlockSize::default(),
        hash_threads: threads.try_into().context("thread count")?,
    };
    let (before, start) = (cpu_of("self")?, Instant::now());
    let scanned = scan(
        &VolumeSnapshot::Image(path.clone()),
        &options,
        Generation(0),
    )
    .context("scanning the sparse image")?;
    let ferry = start.elapsed();
    let mut rows = vec![hash_row(
        format!(
            "Ferry scanner, {} GiB sparse image holding 64 MiB",
            args.sparse_gib
        ),
        ferry,
        cpu_of("self")?.own - before.own,
        scanned.stats.bytes_scanned,
    )];
    say!(
        "sparse {} GiB image holding 64 MiB: Ferry scanner {:.3} s, read {} MiB, skipped {} MiB unread",
        args.sparse_gib,
        ferry.as_secs_f64(),
        scanned.stats.bytes_scanned / MIB,
        scanned.stats.bytes_skipped / MIB
    );
    if has_binary("b3sum") {
        let (before, start) = (cpu_of("self")?, Instant::now());
        let status = Command::new("b3sum")
            .arg(format!("--num-threads={threads}"))
            .arg(&path)
            .stdout(Stdio::null())
            .status()
            .context("running b3sum")?;
        if !status.success() {
            bail!("b3sum failed: {status}");
        }
        let b3 = start.elapsed();
        rows.push(hash_row(
            format!("b3sum, {} GiB sparse image holding 64 MiB", args.sparse_gib),
            b3,
            cpu_of("self")?.children - before.children,
            size,
        ));
        say!(
            "sparse {} GiB image: b3sum {:.3} s reading all {} MiB; Ferry/b3sum time {:.4}",
            args.sparse_gib,
            b3.as_secs_f64(),
            size / MIB,
            ferry.as_secs_f64() / b3.as_secs_f64()
        );
    }
    fs::remove_file(&path)?;
    Ok(rows)
}

/// Changed block tracking against a full scan: a sparse image of `--cbt-gib` GiB holding
/// 1 GiB of random data (1024 extents of 1 MiB, spread evenly), of which 0.1% of the 4 KiB
/// blocks are then rewritten. The full scan reads every data extent; the changed-extents scan
/// (`scan_changed`) reads only the rewritten blocks, given as a CSI driver's `GetMetadataDelta`
/// reports them (here: exactly the writes). Both indexes are checked equal.
fn cbt_scan(args: &Args, dir: &Path, threads: usize) -> Result<Vec<Row>> {
    let size = args.cbt_gib << 30;
    let path = dir.join("cbt.img");
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(size)?;
    let mut data = xof(args.seed, "cbt");
    let mut extent = vec![0u8; MIB as usize];
    let stride = size / 1024;
    for i in 0..1024u64 {
        data.fill(&mut extent);
        std::os::unix::fs::FileExt::write_all_at(&file, &extent, i * stride)?;
    }
    let options = ScanOptions {
        block_size: BlockSize::default(),
        hash_threads: threads.try_into().context("thread count")?,
    };
    let image = VolumeSnapshot::Image(path.clone());
    let base = scan(&image, &options, Generation(1))
        .context("scanning the base")?
        .index;
    // 0.1% of the data's blocks, distinct, inside the data extents.
    let data_blocks = 1024 * (MIB / BLOCK);
    let mut picked = std::collections::BTreeSet::new();
    let mut pick = xof(args.seed, "cbt-writes");
    while picked.len() < (data_blocks / 1000) as usize {
        let mut r = [0u8; 8];
        pick.fill(&mut r);
        let block = u64::from_le_bytes(r) % data_blocks;
        picked.insert((block / (MIB / BLOCK)) * stride + (block % (MIB / BLOCK)) * BLOCK);
    }
    let mut block = vec![0u8; BLOCK as usize];
    for offset in &picked {
        data.fill(&mut block);
        std::os::unix::fs::FileExt::write_all_at(&file, &block, *offset)?;
    }
    file.sync_all()?;
    drop(file);
    let changed: Vec<(u64, u64)> = picked.iter().map(|o| (*o, BLOCK)).collect();
    let (before, baseline, start) = (cpu_of("self")?, reset_peak_rss("self")?, Instant::now());
    let full = scan(&image, &options, Generation(2)).context("full scan")?;
    let full_wall = start.elapsed();
    let full_row = Row {
        name: format!(
            "Ferry full scan, {} GiB sparse image, 1 GiB data, 0.1% changed",
            args.cbt_gib
        ),
        wall: full_wall,
        cpu_s: cpu_of("self")?.own - before.own,
        wire_bytes: None,
        read_bytes: Some(full.stats.bytes_scanned),
        peaks: vec![peak_from(peak_rss("self")?, baseline)],
    };
    let (before, baseline, start) = (cpu_of("self")?, reset_peak_rss("self")?, Instant::now());
    let tracked =
        ferry_replicator::delta::scan_changed(&path, &options, Generation(2), &base, &changed)
            .context("changed-extents scan")?;
    let cbt_wall = start.elapsed();
    if tracked.index != full.index {
        bail!("the changed-extents index differs from the full scan's");
    }
    let cbt_row = Row {
        name: format!(
            "Ferry changed block tracking, same image ({} extents given)",
            changed.len()
        ),
        wall: cbt_wall,
        cpu_s: cpu_of("self")?.own - before.own,
        wire_bytes: None,
        read_bytes: Some(tracked.stats.bytes_scanned),
        peaks: vec![peak_from(peak_rss("self")?, baseline)],
    };
    say!(
        "changed block tracking, {} GiB image with 1 GiB of data, {} blocks (0.1%) rewritten:",
        args.cbt_gib,
        changed.len()
    );
    say!("| scan | wall s | CPU s | bytes read | peak RSS MiB (from) |");
    say!("|---|---:|---:|---:|---:|");
    for row in [&full_row, &cbt_row] {
        say!(
            "| {} | {:.3} | {:.3} | {} | {} |",
            row.name,
            row.wall.as_secs_f64(),
            row.cpu_s,
            row.read_bytes.unwrap_or(0),
            row.peak_text()
        );
    }
    say!(
        "changed block tracking / full scan: time {:.4}, bytes read {:.4}\n",
        cbt_wall.as_secs_f64() / full_wall.as_secs_f64(),
        tracked.stats.bytes_scanned as f64 / full.stats.bytes_scanned.max(1) as f64
    );
    fs::remove_file(&path)?;
    Ok(vec![full_row, cbt_row])
}

/// Overwrites 1% of the image's 4 KiB blocks (distinct, aligned) with random bytes.
fn one_percent_writes(path: &Path, size: u64, seed: u64) -> Result<u64> {
    let blocks = size / BLOCK;
    let count = blocks / 100;
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut picks = xof(seed, "positions");
    let mut data = xof(seed, "writes");
    let mut chosen = HashSet::new();
    let mut buf = [0u8; BLOCK as usize];
    while (chosen.len() as u64) < count {
        let mut raw = [0u8; 8];
        picks.fill(&mut raw);
        let block = u64::from_le_bytes(raw) % blocks;
        if chosen.insert(block) {
            data.fill(&mut buf);
            file.write_all_at(&buf, block * BLOCK)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(count)
}

fn file_hash(path: &Path) -> Result<blake3::Hash> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(file)
        .with_context(|| format!("hashing {}", path.display()))?;
    Ok(hasher.finalize())
}

fn has_binary(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One Ferry sync of `source` into `target` against the stored index; chunks go through their
/// wire form as a transport would carry them. Returns (wire bytes, blocks changed, bytes read
/// from the source: the scan plus the changed blocks read again for the chunks).
fn ferry_sync(
    store: &HashStore,
    key: &VolumeKey,
    source: &Path,
    target: &Path,
    generation: u64,
    scan_options: &ScanOptions,
) -> Result<(u64, u64, u64)> {
    let snapshot = VolumeSnapshot::Image(source.to_path_buf());
    let previous = store.load(key).context("loading index")?.into_previous();
    let scanned = scan(&snapshot, scan_options, Generation(generation)).context("scanning")?;
    let plan = diff(previous.as_ref(), &scanned.index);
    let mut stream =
        ChunkStream::new(&plan, &snapshot, ChunkOptions::default()).context("chunking")?;
    let mut applier = Applier::open(target, plan.kind, plan.stream).context("opening target")?;
    for chunk in stream.by_ref() {
        let wire = chunk.context("producing chunk")?.to_bytes();
        let received = DeltaChunk::from_bytes(&wire).context("receiving chunk")?;
        applier.apply(&received).context("applying chunk")?;
    }
    applier
        .finish(FinishOptions {
            verify: false,
            sync: false,
        })
        .context("finishing")?;
    store.save(key, &scanned.index).context("saving index")?;
    let summary = stream.summary();
    Ok((
        summary.wire_bytes,
        summary.blocks_changed,
        plan.stats.bytes_scanned + plan.stats.bytes_changed,
    ))
}

/// "Total bytes sent: 1,234" and "Total bytes received: 56" summed from rsync's --stats.
fn rsync_wire_bytes(stats: &str) -> Option<u64> {
    let field = |label: &str| -> Option<u64> {
        let line = stats.lines().find(|l| l.trim_start().starts_with(label))?;
        let digits: String = line[line.find(':')? + 1..]
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some(field("Total bytes sent")? + field("Total bytes received")?)
}

/// Where GNU time is (`apt-get install time`), to read a child's peak resident set.
const GNU_TIME: &str = "/usr/bin/time";

/// Runs rsync with `args`; returns wall time, CPU seconds, bytes on the wire from its
/// `--stats`, and its peak resident set in bytes (the largest of its processes, through GNU
/// time's `%M`) where GNU time is installed.
fn run_rsync(args: &[&str]) -> Result<(Duration, f64, Option<u64>, Option<u64>)> {
    let before = cpu_of("self")?;
    let rss_file = std::env::temp_dir().join(format!("ferry-bench-rss-{}", std::process::id()));
    let timed = Path::new(GNU_TIME).exists();
    let mut command = if timed {
        let mut c = Command::new(GNU_TIME);
        c.arg("-f").arg("%M").arg("-o").arg(&rss_file).arg("rsync");
        c
    } else {
        Command::new("rsync")
    };
    let start = Instant::now();
    let output = command.args(args).output().context("running rsync")?;
    let wall = start.elapsed();
    let after = cpu_of("self")?;
    if !output.status.success() {
        bail!(
            "rsync {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let peak = timed
        .then(|| fs::read_to_string(&rss_file).ok())
        .flatten()
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024);
    let _ = fs::remove_file(&rss_file);
    Ok((
        wall,
        after.children - before.children,
        rsync_wire_bytes(&String::from_utf8_lossy(&output.stdout)),
        peak,
    ))
}

/// An rsync daemon on 127.0.0.1 serving one writable module; killed by PID on drop.
struct RsyncDaemon {
    child: std::process::Child,
    port: u16,
}

impl RsyncDaemon {
    fn start(dir: &Path, module_path: &Path) -> Result<Self> {
        // Ask the kernel for a free port, then hand it to rsync.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("finding a free port")?
            .local_addr()?
            .port();
        let config = dir.join("rsyncd.conf");
        fs::write(
            &config,
            format!(
                "use chroot = no\npid file = {}\nlog file = {}\n[ferry]\n  path = {}\n  read only = no\n  uid = root\n  gid = root\n",
                dir.join("rsyncd.pid").display(),
                dir.join("rsyncd.log").display(),
                module_path.display()
            ),
        )
        .context("writing rsyncd.conf")?;
        let child = Command::new("rsync")
            .arg("--daemon")
            .arg("--no-detach")
            .arg(format!("--config={}", config.display()))
            .arg(format!("--port={port}"))
            .arg("--address=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting rsync daemon")?;
        let daemon = Self { child, port };
        // Wait for the listener under a deadline, polling.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if Instant::now() > deadline {
                bail!("rsync daemon did not listen on 127.0.0.1:{port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// CPU of the daemon and its reaped connection handlers, once the handler has exited.
    fn cpu_after_idle(&self) -> Result<f64> {
        let pid = self.pid();
        let children = format!("/proc/{pid}/task/{pid}/children");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pending = fs::read_to_string(&children).unwrap_or_default();
            if pending.trim().is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!("rsync daemon handler {pending} still running after 10 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let cpu = cpu_of(&pid)?;
        Ok(cpu.own + cpu.children)
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        // Kill exactly the daemon we started, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rsync_daemon_row(
    daemon: &RsyncDaemon,
    source: &Path,
    dest_name: &str,
    extra: &[&str],
    name: &str,
) -> Result<Row> {
    let before = daemon.cpu_after_idle()?;
    let url = format!("rsync://127.0.0.1:{}/ferry/{dest_name}", daemon.port);
    let size = fs::metadata(source)?.len();
    let source = source.display().to_string();
    let mut args = vec!["--inplace", "--no-whole-file", "--ignore-times", "--stats"];
    args.extend_from_slice(extra);
    args.push(&source);
    args.push(&url);
    let (wall, client_cpu, wire, _) = run_rsync(&args)?;
    let after = daemon.cpu_after_idle()?;
    Ok(Row {
        name: name.into(),
        wall,
        cpu_s: client_cpu + (after - before),
        wire_bytes: wire,
        // rsync reads the whole source file to find what changed.
        read_bytes: Some(size),
        // The daemon serves each connection from a forked child, whose peak is not read.
        peaks: Vec::new(),
    })
}

/// Ferry's real replication path: `ferry-replicator receive` as its own process on 127.0.0.1
/// (a destination keeping replicas in directories), this process as the source shipping over
/// gRPC with mutual TLS through a counting TCP relay (bytes on the wire = TLS records both
/// ways), an in-process mover reading the image.
struct GrpcPath {
    runtime: tokio::runtime::Runtime,
    receiver: std::process::Child,
    relay: String,
    counted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    tls: ferry_replicator::tls::TlsMaterial,
    hashes: HashStore,
    replicas: PathBuf,
}

impl GrpcPath {
    fn start(dir: &Path, receiver_exe: &Path) -> Result<Self> {
        use ferry_replicator::tls::CertificateAuthority;
        let ca = CertificateAuthority::generate("ferry-delta-bench")?;
        let source_tls = ca.issue("source", &["127.0.0.1".into()])?;
        let dest_dir = dir.join("grpc-dest");
        let dest_tls = dest_dir.join("tls");
        fs::create_dir_all(&dest_tls)?;
        ca.issue("destination", &["127.0.0.1".into()])?
            .write_dir(&dest_tls)?;
        let mut receiver = Command::new(receiver_exe)
            .args(["receive", "--listen", "127.0.0.1:0", "--tls-dir"])
            .arg(&dest_tls)
            .arg("--state-dir")
            .arg(dest_dir.join("state"))
            .arg("--replicas-dir")
            .arg(dest_dir.join("replicas"))
            .args(["--retain", "2"])
            // FERRY_BENCH_RECEIVER_LOG=info shows where the destination spends its time.
            .env(
                "RUST_LOG",
                std::env::var("FERRY_BENCH_RECEIVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", receiver_exe.display()))?;
        let mut line = String::new();
        let stdout = receiver.stdout.take().context("receiver stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let target = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("receiver said {line:?}"))?
            .to_string();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let relay = runtime.block_on(relay(target, counted.clone()))?;
        Ok(Self {
            runtime,
            receiver,
            relay,
            counted,
            tls: source_tls,
            hashes: HashStore::open(dir.join("grpc-hashes"))?,
            replicas: dest_dir.join("replicas"),
        })
    }

    /// Ships generation `generation` of `image`; returns wall time, CPU seconds of both
    /// processes and bytes on the wire.
    fn ship(&self, image: &Path, generation: u64) -> Result<Row> {
        use ferry_replicator::destination::{PairKey, VolumeSpec};
        use ferry_replicator::mover::MoverSession;
        use ferry_replicator::source::{ship, Faults, ShipRequest, SourceVolume};
        let receiver_pid = self.receiver.id().to_string();
        let (own, theirs) = (cpu_of("self")?, cpu_of(&receiver_pid)?);
        let base_self = reset_peak_rss("self")?;
        let base_receiver = reset_peak_rss(&receiver_pid)?;
        let counted = self.counted.load(std::sync::atomic::Ordering::Relaxed);
        let start = Instant::now();
        let report = self.runtime.block_on(async {
            let mut client = ferry_replicator::transport::connect_peer(&self.relay, &self.tls)?;
            let request = ShipRequest {
                pair: PairKey {
                    namespace: "bench".into(),
                    name: "image".into(),
                },
                generation,
                epoch: 1,
                source_site: "source".into(),
                pair_json: b"{}".to_vec(),
                manifests_json: b"[]".to_vec(),
                capture_time_unix_seconds: generation as f64,
                quick_check: true,
            };
            let volume = SourceVolume {
                spec: VolumeSpec {
                    volume: "image".into(),
                    block: true,
                    capacity: String::new(),
                },
                size_bytes: fs::metadata(image)?.len(),
                session: MoverSession::in_process(image.to_path_buf()),
                changed: None,
            };
            anyhow::Ok(
                ship(
                    &mut client,
                    &self.hashes,
                    &request,
                    vec![volume],
                    &Faults::default(),
                )
                .await?,
            )
        })?;
        let wall = start.elapsed();
        // The relay counts once the connection's bytes are through; the commit ack was.
        let cpu_s = cpu_of("self")?.own - own.own + cpu_of(&receiver_pid)?.own - theirs.own;
        let peaks = vec![
            peak_from(peak_rss("self")?, base_self),
            peak_from(peak_rss(&receiver_pid)?, base_receiver),
        ];
        let wire = self.counted.load(std::sync::atomic::Ordering::Relaxed) - counted;
        let copy = self
            .replicas
            .join("bench/image")
            .join(format!("g{generation}"))
            .join("image");
        if file_hash(&copy)? != file_hash(image)? {
            bail!("the gRPC destination's generation {generation} differs from the source");
        }
        Ok(Row {
            name: if report.volumes.values().all(|v| v.full_copy) {
                "Ferry over gRPC + mutual TLS on 127.0.0.1, full copy (generation 1)".into()
            } else {
                "**Ferry over gRPC + mutual TLS on 127.0.0.1: capture read, ship, stage, verify, commit**".into()
            },
            wall,
            cpu_s,
            wire_bytes: Some(wire),
            read_bytes: Some(
                report
                    .volumes
                    .values()
                    .map(|v| v.bytes_scanned + v.bytes_changed)
                    .sum(),
            ),
            peaks,
        })
    }
}

impl Drop for GrpcPath {
    fn drop(&mut self) {
        let _ = self.receiver.kill();
        let _ = self.receiver.wait();
    }
}

/// A TCP relay on 127.0.0.1 to `target` that adds every byte it carries (both ways) to
/// `counted`, counting as the bytes pass.
async fn relay(
    target: String,
    counted: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<String> {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let (target, counted) = (target.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                let pump =
                    |mut from: tokio::net::tcp::OwnedReadHalf,
                     mut to: tokio::net::tcp::OwnedWriteHalf,
                     counted: std::sync::Arc<std::sync::atomic::AtomicU64>| async move {
                        let mut buf = vec![0u8; 256 << 10];
                        while let Ok(n) = from.read(&mut buf).await {
                            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            counted.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let _ = to.shutdown().await;
                    };
                tokio::join!(pump(ri, wo, counted.clone()), pump(ro, wi, counted));
            });
        }
    });
    Ok(addr)
}

/// A row for reading and hashing `read_bytes` once.
fn hash_row(name: String, wall: Duration, cpu_s: f64, read_bytes: u64) -> Row {
    Row {
        name,
        wall,
        cpu_s,
        wire_bytes: None,
        read_bytes: Some(read_bytes),
        peaks: Vec::new(),
    }
}

fn mib_per_s(bytes: u64, wall: Duration) -> f64 {
    bytes as f64 / MIB as f64 / wall.as_secs_f64()
}

fn run(args: &Args) -> Result<()> {
    JSON.store(args.json, std::sync::atomic::Ordering::Relaxed);
    let size = args.size_mib * MIB;
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("ferry-delta-bench-{}", std::process::id()))
    });
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = bench(args, size, &dir);
    if !args.keep {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    result
}

fn bench(args: &Args, size: u64, dir: &Path) -> Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    say!(
        "ferry-delta-bench: {} MiB image, seed {}, {} CPUs, dir {}",
        args.size_mib,
        args.seed,
        threads,
        dir.display()
    );
    let source = dir.join("source.img");
    let ferry_target = dir.join("ferry-target.img");
    let daemon_dir = dir.join("daemon");
    fs::create_dir_all(&daemon_dir)?;
    write_random_image(&source, size, args.seed)?;

    // Hashing rate: one full read of the (page-cached) image.
    let mut hash_rows = Vec::new();
    let snapshot = VolumeSnapshot::Image(source.clone());
    for hash_threads in [threads, 1] {
        let options = ScanOptions {
            block_size: BlockSize::default(),
            hash_threads: hash_threads.try_into().context("thread count")?,
        };
        let (before, start) = (cpu_of("self")?, Instant::now());
        scan(&snapshot, &options, Generation(0)).context("scanning for the hashing rate")?;
        hash_rows.push(hash_row(
            format!("Ferry scanner, 4 KiB blocks, {hash_threads} thread(s)"),
            start.elapsed(),
            cpu_of("self")?.own - before.own,
            size,
        ));
    }
    if has_binary("b3sum") {
        for hash_threads in [threads, 1] {
            let (before, start) = (cpu_of("self")?, Instant::now());
            let status = Command::new("b3sum")
                .arg(format!("--num-threads={hash_threads}"))
                .arg(&source)
                .stdout(Stdio::null())
                .status()
                .context("running b3sum")?;
            if !status.success() {
                bail!("b3sum failed: {status}");
            }
            hash_rows.push(hash_row(
                format!("b3sum (whole file, mmap), {hash_threads} thread(s)"),
                start.elapsed(),
                cpu_of("self")?.children - before.children,
                size,
            ));
        }
    } else {
        say!("b3sum not found: skipping its hashing rate (apt-get install b3sum)");
    }

    let mut sparse_rows = if args.sparse_gib > 0 {
        sparse_scan(args, dir, threads)?
    } else {
        Vec::new()
    };
    if args.cbt_gib > 0 {
        sparse_rows.extend(cbt_scan(args, dir, threads)?);
    }

    // Generation 1: Ferry's full copy; rsync's destinations start as plain copies.
    let store = HashStore::open(dir.join("hashes")).context("opening hash store")?;
    let key = VolumeKey::new("bench", "image");
    let scan_options = ScanOptions::default();
    let before = cpu_of("self")?;
    let baseline = reset_peak_rss("self")?;
    let start = Instant::now();
    let (full_wire, _, full_read) =
        ferry_sync(&store, &key, &source, &ferry_target, 1, &scan_options)?;
    let full_row = Row {
        name: "Ferry full copy (generation 1, same path, empty index)".into(),
        wall: start.elapsed(),
        cpu_s: cpu_of("self")?.own - before.own,
        wire_bytes: Some(full_wire),
        read_bytes: Some(full_read),
        peaks: vec![peak_from(peak_rss("self")?, baseline)],
    };
    let receiver_exe = std::env::current_exe()?.with_file_name("ferry-replicator");
    let grpc = if receiver_exe.exists() {
        let grpc = GrpcPath::start(dir, &receiver_exe)?;
        let first = grpc.ship(&source, 1)?;
        Some((grpc, first))
    } else {
        say!(
            "{} not found: skipping the gRPC rows (cargo build --release -p ferry-replicator --bins)",
            receiver_exe.display()
        );
        None
    };
    let rsync = has_binary("rsync");
    let rsync_local = dir.join("rsync-local.img");
    if rsync {
        fs::copy(&source, &rsync_local).context("copying for rsync local")?;
        fs::copy(&source, daemon_dir.join("default.img")).context("copying for rsync daemon")?;
        fs::copy(&source, daemon_dir.join("b4096.img")).context("copying for rsync daemon")?;
    }

    let written = one_percent_writes(&source, size, args.seed)?;
    say!(
        "wrote {written} random 4 KiB blocks (1% of {})\n",
        size / BLOCK
    );

    let mut rows = vec![full_row];
    if let Some((grpc, first)) = &grpc {
        rows.push(first.clone());
        rows.push(grpc.ship(&source, 2)?);
    }
    drop(grpc);
    let before = cpu_of("self")?;
    let baseline = reset_peak_rss("self")?;
    let start = Instant::now();
    let (wire, changed, read) = ferry_sync(&store, &key, &source, &ferry_target, 2, &scan_options)?;
    rows.push(Row {
        name: "Ferry delta: scan + diff + chunk + apply (+ index save)".into(),
        wall: start.elapsed(),
        cpu_s: cpu_of("self")?.own - before.own,
        wire_bytes: Some(wire),
        read_bytes: Some(read),
        peaks: vec![peak_from(peak_rss("self")?, baseline)],
    });
    if changed != written {
        bail!("Ferry found {changed} changed blocks, {written} were written");
    }
    let before = cpu_of("self")?;
    let start = Instant::now();
    let verify = scan(
        &VolumeSnapshot::Image(ferry_target.clone()),
        &scan_options,
        Generation(2),
    )?;
    let current = store
        .load(&key)?
        .into_previous()
        .context("index missing after save")?;
    if verify.index.digest() != current.digest() {
        bail!("Ferry target differs from the source");
    }
    rows.push(Row {
        name: "  optional verify: rescan target, compare digest".into(),
        wall: start.elapsed(),
        cpu_s: cpu_of("self")?.own - before.own,
        wire_bytes: None,
        read_bytes: None,
        peaks: Vec::new(),
    });

    if rsync {
        let (wall, cpu_s, wire_bytes, peak) = run_rsync(&[
            "--inplace",
            "--no-whole-file",
            "--ignore-times",
            "--stats",
            &source.display().to_string(),
            &rsync_local.display().to_string(),
        ])?;
        rows.push(Row {
            name: "rsync --inplace --no-whole-file, local".into(),
            wall,
            cpu_s,
            wire_bytes,
            // rsync reads the whole source file (and the target) to find what changed.
            read_bytes: Some(size),
            // A fresh process: it grew from nothing.
            peaks: peak.map(|p| peak_from(p, 0)).into_iter().collect(),
        });
        let daemon = RsyncDaemon::start(dir, &daemon_dir)?;
        rows.push(rsync_daemon_row(
            &daemon,
            &source,
            "default.img",
            &[],
            "rsync daemon on 127.0.0.1 (default block size)",
        )?);
        rows.push(rsync_daemon_row(
            &daemon,
            &source,
            "b4096.img",
            &["--block-size=4096"],
            "rsync daemon on 127.0.0.1, --block-size=4096",
        )?);
        drop(daemon);
        let want = file_hash(&source)?;
        for path in [
            rsync_local,
            daemon_dir.join("default.img"),
            daemon_dir.join("b4096.img"),
        ] {
            if file_hash(&path)? != want {
                bail!("rsync target {} differs from the source", path.display());
            }
        }
    } else {
        say!("rsync not found: skipping rsync rows (apt-get install rsync)");
    }

    say!(
        "Second sync of a {} MiB random image after 1% random 4 KiB writes (all targets checked equal to the source):\n",
        args.size_mib
    );
    say!("| run | wall s | CPU s (user+sys) | bytes on the wire | % of image | peak RSS MiB (from) |");
    say!("|---|---:|---:|---:|---:|---:|");
    for row in &rows {
        let (wire, pct) = match row.wire_bytes {
            Some(bytes) => (
                bytes.to_string(),
                format!("{:.2}", bytes as f64 * 100.0 / size as f64),
            ),
            None => ("–".into(), "–".into()),
        };
        say!(
            "| {} | {:.2} | {:.2} | {} | {} | {} |",
            row.name,
            row.wall.as_secs_f64(),
            row.cpu_s,
            wire,
            pct,
            row.peak_text()
        );
    }
    say!("\nFull-read hashing rate of the same image (warm page cache):\n");
    say!("| hasher | MiB/s |");
    say!("|---|---:|");
    for row in &hash_rows {
        say!("| {} | {:.0} |", row.name, mib_per_s(size, row.wall));
    }
    if args.json {
        for row in sparse_rows.iter().chain(&hash_rows).chain(&rows) {
            println!("{}", row.json());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsync_stats_parsing() {
        let cases = [
            (
                "Total file size: 1,073,741,824 bytes\nTotal bytes sent: 85,012,345\nTotal bytes received: 1,234,567\n",
                Some(86_246_912),
            ),
            ("Total bytes sent: 10\nTotal bytes received: 5\n", Some(15)),
            ("Total bytes sent: 10\n", None),
            ("", None),
        ];
        for (stats, expected) in cases {
            assert_eq!(rsync_wire_bytes(stats), expected, "{stats:?}");
        }
    }

    #[test]
    fn peak_rss_of_self_resets_and_reads() {
        let baseline = reset_peak_rss("self").unwrap();
        let peak = peak_rss("self").unwrap();
        assert!(peak >= baseline / 2 && baseline > 0, "{baseline} {peak}");
        // Touch 32 MiB: the peak grows by about that much.
        let buffer = vec![1u8; 32 << 20];
        let grown = peak_rss("self").unwrap();
        assert!(buffer.iter().all(|&b| b == 1));
        assert!(grown >= peak + (30 << 20), "{peak} -> {grown}");
    }

    #[test]
    fn proc_stat_of_self_parses() {
        let cpu = cpu_of("self").unwrap();
        assert!(cpu.own >= 0.0 && cpu.children >= 0.0, "{cpu:?}");
    }
}
