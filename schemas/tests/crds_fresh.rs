//! The CRDs committed under `deploy/helm/ferry/crds/` are exactly what the types generate.

use std::path::{Path, PathBuf};

const REGENERATE: &str =
    "regenerate with `cargo run -p ferry-schemas --bin crdgen` and commit deploy/helm/ferry/crds/";

fn crd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/ferry/crds")
}

/// Describes the first line where two texts differ.
fn first_difference(committed: &str, generated: &str) -> String {
    let mut committed_lines = committed.lines();
    let mut generated_lines = generated.lines();
    let mut line = 1;
    loop {
        match (committed_lines.next(), generated_lines.next()) {
            (Some(a), Some(b)) if a == b => line += 1,
            (a, b) => {
                return format!(
                    "first at line {line}:\n  committed: {:?}\n  generated: {:?}",
                    a.unwrap_or("<end of file>"),
                    b.unwrap_or("<end of file>")
                )
            }
        }
    }
}

#[test]
fn committed_crds_match_the_types() {
    let dir = crd_dir();
    let files = ferry_schemas::crd::crd_files();
    let mut problems = Vec::new();
    for file in &files {
        let path = dir.join(&file.file_name);
        match std::fs::read_to_string(&path) {
            Err(e) => problems.push(format!(
                "deploy/helm/ferry/crds/{}: cannot read it ({e})",
                file.file_name
            )),
            Ok(committed) if committed != file.yaml => problems.push(format!(
                "deploy/helm/ferry/crds/{}: differs from what the types generate, {}",
                file.file_name,
                first_difference(&committed, &file.yaml)
            )),
            Ok(_) => {}
        }
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".ferry.dev.yaml") && !files.iter().any(|f| f.file_name == name) {
                problems.push(format!(
                    "deploy/helm/ferry/crds/{name}: no type generates it any more"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "stale CRDs in {}:\n{}\n{REGENERATE}",
        dir.display(),
        problems.join("\n")
    );
}
