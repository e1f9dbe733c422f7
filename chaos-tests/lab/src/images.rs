//! Entrypoints of the lab's multi-call images (`ferry-lab image <name> ...`), what a
//! container image's entrypoint does on a cluster.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// Runs image `name` with `args` and returns its exit code (or never returns, for images
/// that replace this process with their server).
pub fn run(name: &str, args: &[String]) -> ExitCode {
    match name {
        "sqlite-writer" => ferry_sqlite_writer::cli::main_with_args(
            std::iter::once("sqlite-writer".to_string()).chain(args.iter().cloned()),
        ),
        "postgres" => postgres(args),
        "ferry-replicator" => exit_code(ferry_replicator::cli::main_with_args(
            std::iter::once("ferry-replicator".to_string())
                .chain(args.iter().cloned())
                .collect(),
        )),
        "ferry-controller" => exit_code(ferry_failover::cli::main_with_args(
            std::iter::once("ferry-controller".to_string())
                .chain(args.iter().cloned())
                .collect(),
        )),
        "ferry-gate" => exit_code(ferry_failover::gate::main_with_args(
            std::iter::once("ferry-gate".to_string())
                .chain(args.iter().cloned())
                .collect(),
        )),
        other => {
            eprintln!("ferry-lab image: unknown image {other:?}");
            ExitCode::from(2)
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The directory holding the machine's PostgreSQL server binaries (`postgres`, `initdb`):
/// Debian's `/usr/lib/postgresql/<newest>/bin`, else the first `PATH` entry with both.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let has_both = |d: &Path| d.join("postgres").is_file() && d.join("initdb").is_file();
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, d)| has_both(d))
        .collect();
    debian.sort();
    if let Some((_, d)) = debian.pop() {
        return Some(d);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).find(|d| has_both(d))
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// The `postgres` image: `initdb` when `PGDATA` holds no cluster yet (trust authentication,
/// superuser `POSTGRES_USER`), then the server on `POD_IP:PGPORT` with no Unix socket (sites
/// share the machine's `/tmp`). Extra arguments go to the server (e.g. `-c fsync=on`).
fn postgres(args: &[String]) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("postgres image: {msg}");
        ExitCode::FAILURE
    };
    let Some(bin) = postgres_bin_dir() else {
        return fail(
            "PostgreSQL server binaries not found (install the postgresql package)".into(),
        );
    };
    let data = PathBuf::from(env_or("PGDATA", "/var/lib/postgresql/data"));
    let port = env_or("PGPORT", "5432");
    let user = env_or("POSTGRES_USER", "postgres");
    let listen = env_or("POD_IP", "127.0.0.1");
    if !data.join("PG_VERSION").exists() {
        if let Err(e) = std::fs::create_dir_all(&data) {
            return fail(format!("creating PGDATA {}: {e}", data.display()));
        }
        let status = Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", &user, "--auth=trust", "--encoding=UTF8"])
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => return fail(format!("initdb exited with {s} (PostgreSQL refuses to run as root: set securityContext.runAsUser)")),
            Err(e) => return fail(format!("running initdb: {e}")),
        }
    }
    let mut server_args: Vec<OsString> =
        vec!["-D".into(), data.into_os_string(), "-p".into(), port.into()];
    server_args.extend([
        "-c".into(),
        format!("listen_addresses={listen}").into(),
        "-c".into(),
        "unix_socket_directories=".into(),
    ]);
    server_args.extend(args.iter().map(OsString::from));
    // Replace this process, so the kubelet's signals reach the postmaster directly.
    let err = Command::new(bin.join("postgres")).args(server_args).exec();
    fail(format!("starting postgres: {err}"))
}
