//! `crdgen`: writes Ferry's CRDs, generated from the `ferry-schemas` types, as YAML files.
//!
//! Usage: `cargo run -p ferry-schemas --bin crdgen [-- --out DIR]`. Writes
//! `<plural>.ferry.dev.yaml` for each CRD into DIR (default: `deploy/helm/ferry/crds` at
//! the workspace root) and removes stale `*.ferry.dev.yaml` files there.
//! Exit codes: 0 written, 1 I/O failure, 2 bad arguments.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str =
    "usage: crdgen [--out DIR]\n\nWrites each Ferry CRD to DIR/<plural>.ferry.dev.yaml \
(default DIR: deploy/helm/ferry/crds at the workspace root).";

fn main() -> ExitCode {
    let out = match parse_args(std::env::args().skip(1)) {
        Ok(Some(out)) => out,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("crdgen: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match write_crds(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("crdgen: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The output directory, or `None` for `--help`.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<PathBuf>, String> {
    let workspace_root = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
    let mut out = workspace_root.map_or_else(
        || PathBuf::from("deploy/helm/ferry/crds"),
        |root| root.join("deploy/helm/ferry/crds"),
    );
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--out" => out = args.next().ok_or("--out needs a directory")?.into(),
            other => match other.strip_prefix("--out=") {
                Some(dir) => out = dir.into(),
                None => return Err(format!("unexpected argument {other:?}")),
            },
        }
    }
    Ok(Some(out))
}

fn write_crds(out: &Path) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let files = ferry_schemas::crd::crd_files();
    for file in &files {
        let path = out.join(&file.file_name);
        std::fs::write(&path, &file.yaml)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    let entries = std::fs::read_dir(out).map_err(|e| format!("listing {}: {e}", out.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("listing {}: {e}", out.display()))?
            .path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let stale = name.ends_with(".ferry.dev.yaml") && !files.iter().any(|f| f.file_name == name);
        if stale {
            std::fs::remove_file(&path)
                .map_err(|e| format!("removing stale {}: {e}", path.display()))?;
            println!("removed stale {}", path.display());
        }
    }
    Ok(())
}
