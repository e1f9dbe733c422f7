//! Finds which outside tools the lab's tests need are on this machine, so that `cargo test`
//! lists a test whose tool is missing as *ignored* (with the install hint as the reason)
//! instead of passing it. With `CI=true` nothing is ignored: the tests run and fail with the
//! hint, as CI installs everything (`.ci/install-test-deps.sh`, `.ci/kube-kit.sh`).
//!
//! Emits `lab_no_kube_kit`, `lab_no_helm`, `lab_no_kubectl`, `lab_no_postgres`, `lab_no_xfs`. Rebuilt when
//! `PATH`, `HELM`, `FERRY_LAB_KUBE_BIN` or `CI` change.

use std::path::{Path, PathBuf};

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The real control plane's kit: the three binaries in `FERRY_LAB_KUBE_BIN` (or on `PATH`)
/// and etcd on `PATH`, as `control_plane::KubeKit::locate` looks for them.
fn kube_kit() -> bool {
    let dir = std::env::var_os("FERRY_LAB_KUBE_BIN").map(PathBuf::from);
    let found = |name: &str| match &dir {
        Some(d) => d.join(name).is_file(),
        None => on_path(name).is_some(),
    };
    [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ]
    .into_iter()
    .all(found)
        && on_path("etcd").is_some()
}

/// PostgreSQL's server binaries (Debian's `/usr/lib/postgresql/<v>/bin` or `PATH`), psql and
/// pgbench, as `images::postgres_bin_dir` and the PostgreSQL tests look for them.
fn postgres() -> bool {
    let has_server = |d: &Path| d.join("postgres").is_file() && d.join("initdb").is_file();
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| has_server(&e.path().join("bin")));
    let on_path_server =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| has_server(&d)));
    (debian || on_path_server) && on_path("psql").is_some() && on_path("pgbench").is_some()
}

/// Copy-on-write node storage: root and `mkfs.xfs`, as `node::backing` needs them.
fn xfs() -> bool {
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    });
    root && (on_path("mkfs.xfs").is_some() || Path::new("/usr/sbin/mkfs.xfs").is_file())
}

fn main() {
    for var in ["PATH", "HELM", "FERRY_LAB_KUBE_BIN", "CI"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=build.rs");
    let tools = [
        ("lab_no_kube_kit", kube_kit()),
        (
            "lab_no_helm",
            match std::env::var("HELM") {
                Ok(helm) => Path::new(&helm).is_file() || on_path(&helm).is_some(),
                Err(_) => on_path("helm").is_some(),
            },
        ),
        ("lab_no_kubectl", on_path("kubectl").is_some()),
        ("lab_no_postgres", postgres()),
        ("lab_no_xfs", xfs()),
    ];
    let ci = std::env::var("CI").as_deref() == Ok("true");
    for (cfg, present) in tools {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if !present && !ci {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
