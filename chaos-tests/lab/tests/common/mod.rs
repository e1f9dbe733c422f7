//! Test fixture: a lab site in this process, a lab site on a real Kubernetes control plane
//! (`ferry-lab up --control-plane kubernetes`), or any cluster named by a kubeconfig.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_lab::apiserver::store::WATCH_WINDOW;
use ferry_lab::apiserver::{ApiServer, ApiServerConfig};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Environment variable naming a kubeconfig to run the conformance suite against instead of
/// an in-process lab site (for example a k3d cluster).
pub const KUBECONFIG_ENV: &str = "FERRY_CONFORMANCE_KUBECONFIG";

/// A site under test.
pub struct Site {
    /// The in-process server, when the target is the lab.
    pub server: Option<ApiServer>,
    /// Kubeconfig path.
    pub kubeconfig: PathBuf,
    /// The lab's data directory (kept so a restart finds the same store).
    pub dir: Option<tempfile::TempDir>,
    /// Watch window of the in-process store.
    pub watch_window: usize,
    /// Bearer token the in-process server requires.
    pub token: Option<String>,
    /// The lab directory of a site on the real control plane (stopped on drop).
    pub lab: Option<PathBuf>,
}

/// Runs `ferry-lab ARGS --dir LAB`; panics with its output unless it succeeds.
fn ferry_lab(args: &[&str], lab: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
        .args(args)
        .arg("--dir")
        .arg(lab)
        .output()
        .expect("ferry-lab runs");
    assert!(
        out.status.success(),
        "ferry-lab {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(lab) = &self.lab {
            let _ = Command::new(env!("CARGO_BIN_EXE_ferry-lab"))
                .arg("down")
                .arg("--dir")
                .arg(lab)
                .output();
        }
    }
}

impl Site {
    /// A fresh lab site on 127.0.0.1 with token authentication, or the cluster named by
    /// [`KUBECONFIG_ENV`].
    pub async fn start() -> Self {
        Self::start_lab(WATCH_WINDOW, Some("test-token")).await
    }

    /// Like [`Site::start`], with a store that keeps only `watch_window` events for watches
    /// to resume from (a small window makes 410 Gone reachable in a test).
    pub async fn start_with_window(watch_window: usize) -> Self {
        Self::start_lab(watch_window, Some("test-token")).await
    }

    /// A fresh lab site without authentication (kubectl sends bearer tokens only over TLS).
    pub async fn start_open() -> Self {
        Self::start_lab(WATCH_WINDOW, None).await
    }

    async fn start_lab(watch_window: usize, token: Option<&str>) -> Self {
        let token = token.map(String::from);
        if let Ok(path) = std::env::var(KUBECONFIG_ENV) {
            return Self {
                server: None,
                kubeconfig: PathBuf::from(path),
                dir: None,
                watch_window,
                token,
                lab: None,
            };
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        let server = Self::serve(
            &dir,
            "127.0.0.1:0".parse().unwrap(),
            watch_window,
            token.clone(),
        )
        .await;
        ferry_lab::kubeconfig::write(&kubeconfig, "test", server.addr(), token.as_deref())
            .expect("kubeconfig");
        Self {
            server: Some(server),
            kubeconfig,
            dir: Some(dir),
            watch_window,
            token,
            lab: None,
        }
    }

    /// One bare site (`ferry-lab up --sites a --bare`) on a real control plane: etcd,
    /// kube-apiserver, controller-manager and scheduler from the kit; panics without it
    /// ([`ferry_lab::control_plane::kubernetes_for_test`]: such tests carry
    /// `#[cfg_attr(lab_no_kube_kit, ignore)]`).
    pub async fn start_kubernetes(test: &str) -> Self {
        let settings = ferry_lab::control_plane::kubernetes_for_test(test);
        let dir = tempfile::tempdir().expect("temp dir");
        let lab = dir.path().join("lab");
        let mut args = vec![
            "up".to_string(),
            "--sites".into(),
            "a".into(),
            "--bare".into(),
        ];
        args.extend(settings.up_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let site = Self {
            server: None,
            kubeconfig: lab.join("a/kubeconfig"),
            dir: Some(dir),
            watch_window: 0,
            token: None,
            lab: Some(lab),
        };
        // `site` stops the lab on drop should `up` fail half-way.
        ferry_lab(&args, site.lab.as_deref().unwrap());
        site
    }

    async fn serve(
        dir: &tempfile::TempDir,
        listen: SocketAddr,
        watch_window: usize,
        token: Option<String>,
    ) -> ApiServer {
        let config = ApiServerConfig {
            data_dir: dir.path().join("store"),
            listen,
            token,
            watch_window,
        };
        ApiServer::start(config)
            .await
            .expect("lab api server starts")
    }

    /// Whether the target is the in-process lab.
    pub fn is_lab(&self) -> bool {
        self.server.is_some()
    }

    /// Whether the target is a lab site on the real control plane.
    pub fn is_kubernetes(&self) -> bool {
        self.lab.is_some()
    }

    /// Whether [`Site::restart`] can restart the target (the lab, on either control plane).
    pub fn can_restart(&self) -> bool {
        self.is_lab() || self.is_kubernetes()
    }

    /// Stops the site and starts it again on the same address and store: the in-process
    /// server, or on the real control plane a power cut (`site kill`: SIGKILL to etcd and
    /// every control-plane process) and `site start`, which returns once it serves again.
    pub async fn restart(&mut self) {
        if let Some(lab) = self.lab.clone() {
            tokio::task::spawn_blocking(move || {
                ferry_lab(&["site", "kill", "a"], &lab);
                ferry_lab(&["site", "start", "a"], &lab);
            })
            .await
            .expect("restart runs");
            return;
        }
        let server = self.server.take().expect("restart needs the lab");
        let addr = server.addr();
        server.shutdown().await;
        let dir = self.dir.as_ref().expect("the lab has a data directory");
        self.server = Some(Self::serve(dir, addr, self.watch_window, self.token.clone()).await);
    }

    /// A kube-rs client built from the kubeconfig, as Ferry's binaries build theirs.
    pub async fn client(&self) -> Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig parses");
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig usable");
        Client::try_from(config).expect("client")
    }
}

/// A namespace name unique to this test run.
pub fn unique_ns(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

#[allow(unused_imports)]
pub use ferry_lab::testing::eventually;
