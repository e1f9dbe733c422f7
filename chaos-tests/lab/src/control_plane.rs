//! A site's control plane: the lab's own API server ([`crate::apiserver`], the default, which
//! needs nothing but this binary), or a real Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler) started from a kit of upstream binaries.
//!
//! The real control plane follows the flag set tested in the kit's README (Kubernetes
//! v1.32): etcd first, then kube-apiserver with TLS, token and client-certificate
//! authentication, `Node,RBAC` authorisation, service-account token signing and the
//! front-proxy flags, then the controller manager (every upstream controller) and the
//! scheduler. Each listens on the site's own loopback address, so the links in front of the
//! site (`links.rs`) cut it off like any other service, and every process is a child of the
//! site process, so `ferry-lab site kill` takes them all at the same instant (a power cut:
//! etcd's data directory survives, as a disk would).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::sites::SiteLayout;

/// The environment variable naming the directory of the kit's binaries
/// (`kube-apiserver`, `kube-controller-manager`, `kube-scheduler`).
pub const KUBE_BIN_ENV: &str = "FERRY_LAB_KUBE_BIN";
/// The environment variable naming a directory of `snapshot.storage.k8s.io` CRD files to
/// install instead of the lab's own definitions (CI points it at the upstream ones).
pub const SNAPSHOT_CRDS_ENV: &str = "FERRY_LAB_SNAPSHOT_CRDS";
/// The kube-apiserver's secure port on the site's address.
pub const APISERVER_PORT: u16 = 6443;
/// etcd's client port on the site's address.
const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's peer port on the site's address.
const ETCD_PEER_PORT: u16 = 2380;
/// The controller manager's secure (health) port.
const CONTROLLER_MANAGER_PORT: u16 = 10257;
/// The scheduler's secure (health) port.
const SCHEDULER_PORT: u16 = 10259;
/// The Service IP range; its first address is the `kubernetes` Service's.
const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The first address of [`SERVICE_CIDR`], which the serving certificate must name.
const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// How long a fresh control plane may take to become ready (kube-apiserver on 2 cores
/// takes about 10 s; a restart after SIGKILL replays etcd's log first).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long each process gets to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Which control plane a lab site runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ControlPlane {
    /// The lab's own API server and node-side controllers (no dependency beyond Rust).
    #[default]
    Lab,
    /// Real etcd, kube-apiserver, kube-controller-manager and kube-scheduler; the lab node
    /// joins it as a node (kubelet, CSI provisioner and snapshotter).
    Kubernetes,
}

impl ControlPlane {
    /// `lab` or `kubernetes`, as the command line spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lab => "lab",
            Self::Kubernetes => "kubernetes",
        }
    }
}

/// The lab-wide settings `ferry-lab up` records in `DIR/lab.json`, so that every later
/// `serve` and `site start` brings a site back with the same control plane.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LabSettings {
    /// The sites' control plane.
    #[serde(default)]
    pub control_plane: ControlPlane,
    /// Where the Kubernetes binaries are (only for [`ControlPlane::Kubernetes`]).
    #[serde(default)]
    pub kube_bin: Option<PathBuf>,
    /// A directory of `snapshot.storage.k8s.io` CRD files to install instead of the lab's
    /// own (only for [`ControlPlane::Kubernetes`]).
    #[serde(default)]
    pub snapshot_crds: Option<PathBuf>,
    /// What backs each node's storage (copy-on-write where possible, by default).
    #[serde(default)]
    pub node_storage: crate::node::backing::NodeStorage,
}

impl LabSettings {
    /// `DIR/lab.json`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("lab.json")
    }

    /// Reads `DIR/lab.json`; a lab without one runs the lab control plane.
    ///
    /// # Errors
    /// When the file exists but cannot be read or parsed.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = Self::path(dir);
        match std::fs::read(&path) {
            Ok(raw) => {
                serde_json::from_slice(&raw).with_context(|| format!("parsing {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The `ferry-lab up` arguments that choose these settings.
    pub fn up_args(&self) -> Vec<String> {
        let mut args = vec![
            "--control-plane".to_string(),
            self.control_plane.as_str().into(),
        ];
        if let Some(dir) = &self.kube_bin {
            args.extend(["--kube-bin".into(), dir.display().to_string()]);
        }
        if let Some(dir) = &self.snapshot_crds {
            args.extend(["--snapshot-crds".into(), dir.display().to_string()]);
        }
        args.extend(["--node-storage".into(), self.node_storage.as_str().into()]);
        args
    }

    /// Writes `DIR/lab.json`.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = Self::path(dir);
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// The binaries of a real control plane: the kit's three Kubernetes binaries and etcd.
#[derive(Clone, Debug)]
pub struct KubeKit {
    /// `kube-apiserver`.
    pub apiserver: PathBuf,
    /// `kube-controller-manager`.
    pub controller_manager: PathBuf,
    /// `kube-scheduler`.
    pub scheduler: PathBuf,
    /// `etcd` (Debian's `etcd-server` package).
    pub etcd: PathBuf,
}

/// What to tell someone whose machine lacks the kit.
pub const INSTALL_HINT: &str = "the Kubernetes control-plane kit is missing: unpack \
    ../shared/k8s/kubernetes-v1.32.13-linux-amd64.tar.xz and set FERRY_LAB_KUBE_BIN to its bin/ \
    directory (.ci/run does both), and install etcd (apt-get install etcd-server)";

impl KubeKit {
    /// Finds the kit: the Kubernetes binaries in `bin_dir`, else in `$FERRY_LAB_KUBE_BIN`,
    /// else on `PATH`; etcd on `PATH`.
    ///
    /// # Errors
    /// When a binary is missing; the message names it and [`INSTALL_HINT`].
    pub fn locate(bin_dir: Option<&Path>) -> Result<Self> {
        let from_env = std::env::var_os(KUBE_BIN_ENV).map(PathBuf::from);
        let dir = bin_dir.map(Path::to_path_buf).or(from_env);
        let find = |name: &str, dir: Option<&Path>| -> Result<PathBuf> {
            let found = match dir {
                Some(dir) => Some(dir.join(name)).filter(|p| p.is_file()),
                None => on_path(name),
            };
            found.with_context(|| format!("{name} not found; {INSTALL_HINT}"))
        };
        Ok(Self {
            apiserver: find("kube-apiserver", dir.as_deref())?,
            controller_manager: find("kube-controller-manager", dir.as_deref())?,
            scheduler: find("kube-scheduler", dir.as_deref())?,
            etcd: find("etcd", None)?,
        })
    }

    /// Whether the kit can be found (see [`KubeKit::locate`]).
    pub fn available() -> bool {
        Self::locate(None).is_ok()
    }
}

/// The real control plane's settings for a test scenario, from the environment
/// (`FERRY_LAB_KUBE_BIN`, `FERRY_LAB_SNAPSHOT_CRDS`).
///
/// A test never passes without running: where the kit is missing, the lab's build script
/// marks such tests `#[ignore]` (cfg `lab_no_kube_kit`, not under `CI=true`), so `cargo test`
/// lists them as ignored; a test that runs anyway panics here with [`INSTALL_HINT`].
pub fn kubernetes_for_test(test: &str) -> LabSettings {
    match KubeKit::locate(None) {
        Ok(_) => LabSettings {
            control_plane: ControlPlane::Kubernetes,
            kube_bin: std::env::var_os(KUBE_BIN_ENV).map(PathBuf::from),
            snapshot_crds: std::env::var_os(SNAPSHOT_CRDS_ENV).map(PathBuf::from),
            node_storage: Default::default(),
        },
        Err(e) => panic!("{test}: {e:#}"),
    }
}

/// The first `name` on `PATH` that is a file.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// A site's certificates, keys and tokens, generated once in `DIR/<site>/pki/` and kept
/// across restarts (clients keep trusting the same CA).
struct Pki {
    dir: PathBuf,
    /// The administrator's bearer token (`system:masters`).
    token: String,
    /// The cluster CA certificate (PEM).
    ca_pem: String,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Loads the site's PKI, generating it on first start: a cluster CA and the API server's
    /// serving certificate (SANs: the site address, loopback, the `kubernetes` Service's
    /// names and first IP), a front-proxy CA with its `front-proxy-client` certificate, the
    /// service-account signing key pair (ECDSA P-256, ES256 tokens) and the token file.
    fn ensure(dir: &Path, ip: IpAddr) -> Result<Self> {
        let token_path = dir.join("admin.token");
        if !token_path.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let ca = ferry_tls::CertificateAuthority::generate("ferry-lab-kubernetes-ca")?;
            let sans: Vec<String> = [
                ip.to_string(),
                "127.0.0.1".into(),
                "localhost".into(),
                "kubernetes".into(),
                "kubernetes.default".into(),
                "kubernetes.default.svc".into(),
                "kubernetes.default.svc.cluster.local".into(),
                KUBERNETES_SERVICE_IP.into(),
            ]
            .into();
            let serving = ca.issue("kube-apiserver", &sans)?;
            let front_proxy_ca = ferry_tls::CertificateAuthority::generate("front-proxy-ca")?;
            let front_proxy = front_proxy_ca.issue("front-proxy-client", &[])?;
            let sa = rcgen::KeyPair::generate().context("generating the service-account key")?;
            let files = [
                ("ca.crt", ca.ca_pem().to_string()),
                ("apiserver.crt", serving.cert_pem),
                ("apiserver.key", serving.key_pem),
                ("front-proxy-ca.crt", front_proxy_ca.ca_pem().to_string()),
                ("front-proxy-client.crt", front_proxy.cert_pem),
                ("front-proxy-client.key", front_proxy.key_pem),
                ("sa.key", sa.serialize_pem()),
                ("sa.pub", sa.public_key_pem()),
            ];
            for (name, pem) in files {
                std::fs::write(dir.join(name), pem)
                    .with_context(|| format!("writing {}", dir.join(name).display()))?;
            }
            let token = uuid::Uuid::new_v4().simple().to_string();
            std::fs::write(
                dir.join("tokens.csv"),
                format!("{token},admin,admin,\"system:masters\"\n"),
            )?;
            // Written last: its presence says the rest is complete.
            std::fs::write(&token_path, &token)?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            token: std::fs::read_to_string(&token_path)?.trim().to_string(),
            ca_pem: std::fs::read_to_string(dir.join("ca.crt"))?,
        })
    }
}

/// A running real control plane of one site.
pub struct KubernetesPlane {
    /// Children in start order: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.
    children: Vec<(&'static str, Child)>,
    /// `https://<site ip>:6443`.
    addr: SocketAddr,
    /// The cluster CA certificate (PEM), which pods get as `ca.crt`.
    ca_pem: String,
}

impl KubernetesPlane {
    /// Starts the site's control plane on `ip`, writes the administrator's kubeconfig to
    /// `layout.kubeconfig()` and returns once etcd answers `/health`, kube-apiserver answers
    /// `/readyz` with `ok`, and the controller manager and scheduler accept connections on
    /// their secure ports. Logs go to `DIR/<site>/logs/`.
    ///
    /// # Errors
    /// When a process cannot be spawned, exits during start-up (the message names its log),
    /// or is not ready within two minutes.
    pub async fn start(site: &str, layout: &SiteLayout, ip: IpAddr, kit: &KubeKit) -> Result<Self> {
        let pki = Pki::ensure(&layout.root.join("pki"), ip)?;
        let logs = layout.root.join("logs");
        std::fs::create_dir_all(&logs)?;
        let mut plane = Self {
            children: Vec::new(),
            addr: SocketAddr::new(ip, APISERVER_PORT),
            ca_pem: pki.ca_pem.clone(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;

        let etcd_data = layout.root.join("etcd");
        let client_url = format!("http://{ip}:{ETCD_CLIENT_PORT}");
        let peer_url = format!("http://{ip}:{ETCD_PEER_PORT}");
        let name = format!("lab-{site}");
        plane.spawn(
            "etcd",
            &kit.etcd,
            &[
                format!("--name={name}"),
                format!("--data-dir={}", etcd_data.display()),
                format!("--listen-client-urls={client_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster={name}={peer_url}"),
                "--initial-cluster-state=new".into(),
                format!("--initial-cluster-token=ferry-lab-{site}"),
                "--logger=zap".into(),
                "--log-level=warn".into(),
            ],
            &logs,
        )?;
        plane.wait("etcd", deadline, || etcd_healthy(ip)).await?;

        let p = |name: &str| pki.path(name).display().to_string();
        plane.spawn(
            "kube-apiserver",
            &kit.apiserver,
            &[
                format!("--etcd-servers={client_url}"),
                format!("--bind-address={ip}"),
                format!("--secure-port={APISERVER_PORT}"),
                format!("--advertise-address={ip}"),
                // Loopback is no valid Endpoints address (the kit's README).
                "--endpoint-reconciler-type=none".into(),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                format!("--token-auth-file={}", p("tokens.csv")),
                "--authorization-mode=Node,RBAC".into(),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                format!("--requestheader-client-ca-file={}", p("front-proxy-ca.crt")),
                "--requestheader-allowed-names=front-proxy-client".into(),
                "--requestheader-username-headers=X-Remote-User".into(),
                "--requestheader-group-headers=X-Remote-Group".into(),
                "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
                format!("--proxy-client-cert-file={}", p("front-proxy-client.crt")),
                format!("--proxy-client-key-file={}", p("front-proxy-client.key")),
                "--allow-privileged=true".into(),
                // Reach nodes by the address they report, never through a DNS lookup of the
                // node name (the lab's names resolve nowhere, and nothing may leave the host).
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--profiling=false".into(),
            ],
            &logs,
        )?;
        crate::kubeconfig::write_tls(
            &layout.kubeconfig(),
            site,
            plane.addr,
            &pki.ca_pem,
            &pki.token,
        )
        .context("writing the kubeconfig")?;
        let client = crate::site::client_from(&layout.kubeconfig()).await?;
        plane
            .wait("kube-apiserver", deadline, || {
                let client = client.clone();
                async move { health(&client, "/readyz").await }
            })
            .await?;

        let kubeconfig = layout.kubeconfig().display().to_string();
        let common = |port: u16| {
            vec![
                format!("--kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                format!("--bind-address={ip}"),
                format!("--secure-port={port}"),
                "--leader-elect=false".into(),
                "--profiling=false".into(),
            ]
        };
        let mut kcm = common(CONTROLLER_MANAGER_PORT);
        kcm.extend([
            // Every upstream controller (the fork's extra publisher stays off without
            // --openshift-config; see `publish_service_ca`).
            "--controllers=*".into(),
            "--use-service-account-credentials=false".into(),
            format!("--service-account-private-key-file={}", p("sa.key")),
            format!("--root-ca-file={}", p("ca.crt")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        ]);
        plane.spawn(
            "kube-controller-manager",
            &kit.controller_manager,
            &kcm,
            &logs,
        )?;
        plane.spawn(
            "kube-scheduler",
            &kit.scheduler,
            &common(SCHEDULER_PORT),
            &logs,
        )?;
        for (component, port) in [
            ("kube-controller-manager", CONTROLLER_MANAGER_PORT),
            ("kube-scheduler", SCHEDULER_PORT),
        ] {
            plane
                .wait(component, deadline, || secure_healthz(ip, port))
                .await?;
        }
        Ok(plane)
    }

    /// The API server's address, `<site ip>:6443`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The cluster CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    fn spawn(
        &mut self,
        name: &'static str,
        program: &Path,
        args: &[String],
        logs: &Path,
    ) -> Result<()> {
        let log_path = logs.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // A site process that ends without stopping it must not leave it behind.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        tracing::info!(component = name, pid = child.id(), log = %log_path.display(), "control-plane process started");
        self.children.push((name, child));
        Ok(())
    }

    /// Polls `ready` until it holds, failing early if the process `name` exited.
    async fn wait<F, Fut>(&mut self, name: &str, deadline: Instant, mut ready: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        loop {
            if ready().await {
                return Ok(());
            }
            if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| *n == name) {
                if let Some(status) = child.try_wait()? {
                    bail!("{name} exited during start-up ({status}); see its log under logs/");
                }
            }
            if Instant::now() > deadline {
                bail!("{name} not ready after {READY_TIMEOUT:?}; see its log under logs/");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Stops the processes in reverse start order: SIGTERM, then SIGKILL after 10 s.
    pub async fn shutdown(mut self) {
        while let Some((name, mut child)) = self.children.pop() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            if tokio::time::timeout(STOP_GRACE, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(component = name, "did not stop after SIGTERM; killing");
                let _ = child.kill().await;
            }
        }
    }
}

/// `GET path` on the API server answers `ok`.
async fn health(client: &kube::Client, path: &str) -> bool {
    let Ok(request) = http::Request::get(path).body(Vec::new()) else {
        return false;
    };
    matches!(client.request_text(request).await, Ok(body) if body.trim() == "ok")
}

/// etcd's `/health` over plain HTTP says `"health":"true"`.
async fn etcd_healthy(ip: IpAddr) -> bool {
    let addr = SocketAddr::new(ip, ETCD_CLIENT_PORT);
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), exchange).await,
        Ok(Ok(body)) if body.contains("\"health\":\"true\"")
    )
}

/// A component accepts connections on its secure port, which it opens once its informers
/// are set up (its certificate is self-signed, so this does not speak TLS to it).
async fn secure_healthz(ip: IpAddr, port: u16) -> bool {
    tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(SocketAddr::new(ip, port)),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

/// The ConfigMap the kit's ServiceAccount admission projects into every pod's token volume.
pub const SERVICE_CA_CONFIGMAP: &str = "openshift-service-ca.crt";

/// Publishes [`SERVICE_CA_CONFIGMAP`] (key `service-ca.crt`: the cluster CA) into every
/// namespace, until aborted.
///
/// The kit's kube-apiserver is built from the OpenShift fork, whose ServiceAccount admission
/// adds that ConfigMap, non-optional, to the `kube-api-access-*` volume of every pod; its
/// publisher controller in the controller manager stays off without `--openshift-config`,
/// and without the ConfigMap no kubelet could start a pod. The lab publishes it as that
/// controller would (docs/lab.md); upstream Kubernetes has neither the source nor the need.
pub async fn publish_service_ca(client: kube::Client, ca_pem: String) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    use kube::api::{Api, Patch, PatchParams};
    use kube::runtime::{watcher, WatchStreamExt};
    use kube::ResourceExt;
    let stream = watcher::watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .applied_objects();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let namespace = match event {
            Ok(ns) if ns.metadata.deletion_timestamp.is_none() => ns.name_any(),
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "namespace watch; retrying");
                continue;
            }
        };
        let cm = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": SERVICE_CA_CONFIGMAP, "namespace": namespace},
            "data": {"service-ca.crt": ca_pem},
        });
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
        if let Err(e) = api
            .patch(
                SERVICE_CA_CONFIGMAP,
                &PatchParams::apply("ferry-lab-service-ca-publisher").force(),
                &Patch::Apply(&cm),
            )
            .await
        {
            tracing::warn!(namespace, error = %e, "publishing the service CA ConfigMap");
        }
    }
}
