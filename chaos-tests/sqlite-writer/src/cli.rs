//! The `sqlite-writer` command line, shared by the `sqlite-writer` binary and the lab's
//! `ferry-lab/sqlite-writer` image.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::ledger::{self, Verdict};
use crate::writer::{self, WriterConfig};
use clap::{Parser, Subcommand};

/// Default data directory when neither `--data-dir` nor `DATA_DIR` is given.
const DEFAULT_DATA_DIR: &str = "/data";

/// Commits a hash-chained ledger of numbered transactions into SQLite, and verifies copies of it.
///
/// `run` reads PAYLOAD_BYTES (default 256), WRITE_INTERVAL_MS (default 50; 0 = flat out) and
/// MAX_TXNS (stop after that many commits by this process) from the environment.
#[derive(Debug, Parser)]
#[command(name = "sqlite-writer", version)]
struct Cli {
    /// Directory holding ledger.db [env: DATA_DIR; default: /data].
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Commit numbered transactions until SIGTERM/SIGINT or MAX_TXNS (the default command).
    Run,
    /// Check the ledger: rows 1..=N without gaps, hash chain intact (exit 0 ok, 1 broken, 2 error).
    Verify {
        /// Print a JSON object on stdout instead of the `ok: ...` line.
        #[arg(long)]
        json: bool,
    },
    /// Print the number of the last committed row (0 if empty).
    Last,
}

/// Exit code for "could not check at all" (missing or unreadable database).
const EXIT_ERROR: u8 = 2;

/// Minimal JSON string escaping, enough for error messages.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Runs the command line given by `args` (the first item is the program name) and returns
/// the process exit code: 0 ok, 1 broken ledger or run error, 2 database missing.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    // Flag beats env beats default; an empty DATA_DIR counts as unset.
    let data_dir = cli.data_dir.unwrap_or_else(|| {
        std::env::var_os("DATA_DIR")
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), PathBuf::from)
    });
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let result = WriterConfig::from_env(data_dir)
                .and_then(|config| writer::run(&config, &mut std::io::stdout()));
            match result {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sqlite-writer: error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Verify { json } => {
            let verdict = ledger::open_existing(&data_dir).and_then(|conn| ledger::verify(&conn));
            match verdict {
                Ok(Verdict::Ok {
                    last,
                    last_committed_at_ms,
                }) => {
                    if json {
                        let at = last_committed_at_ms.map_or("null".to_owned(), |t| t.to_string());
                        println!(r#"{{"ok":true,"last":{last},"last_committed_at_ms":{at}}}"#);
                    } else {
                        println!("ok: last committed {last}");
                    }
                    ExitCode::SUCCESS
                }
                Ok(Verdict::Broken(b)) => {
                    eprintln!("broken: {b}");
                    if json {
                        let row = b.row.map_or("null".to_owned(), |n| n.to_string());
                        let reason = json_string(&b.to_string());
                        println!(r#"{{"ok":false,"row":{row},"reason":{reason}}}"#);
                    }
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("sqlite-writer: error: {e:#}");
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
        Command::Last => {
            match ledger::open_existing(&data_dir).and_then(|conn| ledger::last_committed(&conn)) {
                Ok(n) => {
                    println!("{n}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sqlite-writer: error: {e:#}");
                    ExitCode::from(EXIT_ERROR)
                }
            }
        }
    }
}
