//! What the lab's tests share: a lab stopped when its guard drops, bounded waiting that panics
//! with the last state seen, and checksums of volumes to compare data across sites.
//!
//! Tests whose outside tool is missing are listed as ignored by `cargo test` (the lab's build
//! script sets `lab_no_kube_kit`, `lab_no_helm`, `lab_no_kubectl`, `lab_no_postgres` outside
//! CI); see `control_plane::kubernetes_for_test`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::runtime::{conditions, wait::await_condition};
use kube::{Api, Client, ResourceExt};

/// A lab directory whose sites and witnesses are stopped when this drops, pass or panic
/// (`ferry-lab down`), so no test leaves processes behind.
#[derive(Debug)]
pub struct Lab(pub PathBuf);

impl Lab {
    /// The lab directory.
    pub fn dir(&self) -> &Path {
        &self.0
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = crate::sites::down(&self.0) {
            eprintln!("stopping the lab in {}: {e:#}", self.0.display());
        }
    }
}

/// Polls `f` until it returns `Ok` (every [`crate::wait::POLL`]), for at most `timeout`;
/// panics naming `what` and the last state `f` reported.
pub async fn eventually<V, F, Fut>(what: &str, timeout: Duration, f: F) -> V
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<V, String>>,
{
    crate::wait::until(what, timeout, f)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// BLAKE3 over a directory tree (relative paths, modes, contents, symlink targets, in path
/// order; Ferry's own `.ferry*` entries and `lost+found` left out) or a single file (a block
/// volume's image), hex. Equal checksums mean the same data, as an application reading the
/// volume sees it.
///
/// # Panics
/// When `path` cannot be read.
pub fn checksum(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap();
            out.push(entry.path());
            if entry.file_type().unwrap().is_dir() {
                walk(&entry.path(), out);
            }
        }
    }
    let mut hasher = blake3::Hasher::new();
    let meta =
        std::fs::metadata(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    if meta.is_file() {
        hasher.update(&std::fs::read(path).unwrap());
        return hasher.finalize().to_hex().to_string();
    }
    let mut entries = Vec::new();
    walk(path, &mut entries);
    entries.sort();
    for full in entries {
        let rel = full
            .strip_prefix(path)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if rel.starts_with(".ferry") || rel == "lost+found" {
            continue;
        }
        let m = std::fs::symlink_metadata(&full).unwrap();
        hasher.update(rel.as_bytes());
        hasher.update(&m.mode().to_le_bytes());
        if m.file_type().is_symlink() {
            hasher.update(
                std::fs::read_link(&full)
                    .unwrap()
                    .to_string_lossy()
                    .as_bytes(),
            );
        } else if m.is_file() {
            hasher.update(&std::fs::read(&full).unwrap());
        }
    }
    hasher.finalize().to_hex().to_string()
}

/// Applies Ferry's CRDs (`ferry_schemas::crd::all_crds`) and waits until each is Established.
///
/// # Panics
/// When the API server refuses a CRD or does not establish it within 30 s.
pub async fn install_ferry_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in ferry_schemas::crd::all_crds() {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("ferry-lab-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("CRD {} refused: {e}", crd.name_any()));
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(
                crds.clone(),
                &crd.name_any(),
                conditions::is_crd_established(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {} not established in 30 s", crd.name_any()))
        .unwrap();
    }
}
