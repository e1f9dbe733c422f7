//! `ferry-gate`: the init container that keeps an app's pod from starting at a site that does
//! not hold the pair's witness lease.
//!
//! A Kubernetes kubelet starts a pod's containers again on its own after a node reboot or a
//! whole site coming back from a power cut, before any controller has looked at the cluster.
//! For a DR pair that failed over meanwhile, that would run the app at both sites. So the
//! pods of a protected app carry this init container (image `ghcr.io/ferry-dr/ferry-gate`):
//! it exits 0 only once the pair's site-local Lease ([`crate::lease`]) says this site may run
//! the app, and waits otherwise. The site agent writes that Lease only after the witness
//! quorum renewed the lease at the pair's current epoch, and deletes it when it fences or
//! demotes the site.
//!
//! ```yaml
//! initContainers:
//!   - name: ferry-gate
//!     image: ghcr.io/ferry-dr/ferry-gate:0.1.0
//!     args: ["--pair", "ledger"]
//!     env:
//!       - name: POD_NAMESPACE
//!         valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
//! ```
//!
//!
//! The same image as a native sidecar (an init container with `restartPolicy: Always`, after
//! the gate) with `--watch` closes the remaining gap: it watches the Lease and, once it ends,
//! deletes its own pod, so the app stops at the end of the lease even when this site's
//! controller is down and cannot fence it (its replacement pod then waits in the gate):
//!
//! ```yaml
//!   - name: ferry-fence
//!     image: ghcr.io/ferry-dr/ferry-gate:0.1.0
//!     args: ["--pair", "ledger", "--watch"]
//!     restartPolicy: Always
//!     env:
//!       - name: POD_NAMESPACE
//!         valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
//!       - name: POD_NAME
//!         valueFrom: {fieldRef: {fieldPath: metadata.name}}
//! ```
//!
//! The service account needs `get` on `leases` in the app's namespace, and `delete` on `pods`
//! for the sidecar. With `get` on `drpairs.ferry.dev` too, a pair that was deleted (its Lease
//! removed by the controller) opens the gate and stops the fencing: the app is no longer
//! protected and runs as any other; without that permission the gate stays closed.

use std::time::{Duration, SystemTime};

use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

use crate::lease::{lease_name, run_until};

/// How often the gate looks at the Lease.
const POLL: Duration = Duration::from_millis(250);

/// Waits until this site may run the app of a DR pair, then exits 0; with `--watch`, then
/// keeps watching and deletes its own pod once the site may no longer run the app.
#[derive(Debug, Parser)]
#[command(name = "ferry-gate", version, about)]
struct Cli {
    /// The DRPair's name.
    #[arg(long, env = "FERRY_PAIR")]
    pair: String,
    /// The app's (and the DRPair's) namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: String,
    /// Run as a sidecar: once the lease is held, watch it, and delete this pod (`--pod`) when
    /// it ends, so the app stops even if this site's controller is gone.
    #[arg(long)]
    watch: bool,
    /// This pod's name (for `--watch`).
    #[arg(long, env = "POD_NAME", required_if_eq("watch", "true"))]
    pod: Option<String>,
}

/// Why the gate is still closed, as it tells the pod's log.
#[derive(Debug, PartialEq, Eq)]
enum Closed {
    /// No Lease: the site never held the lease, or fenced or demoted itself.
    NoLease,
    /// The Lease lacks the run-until annotation.
    Unreadable,
    /// The Lease ended at this instant (RFC 3339).
    Ended(String),
    /// The API server did not answer.
    Unreachable(String),
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Closed::NoLease => write!(f, "this site holds no witness lease on the pair (not active here, fenced, or demoted)"),
            Closed::Unreadable => write!(f, "the Lease has no {} annotation", crate::lease::RUN_UNTIL_ANNOTATION),
            Closed::Ended(at) => write!(f, "this site's lease ended at {at}; waiting for a renewal"),
            Closed::Unreachable(e) => write!(f, "reading the Lease: {e}"),
        }
    }
}

/// Whether `lease` lets the app start at `now`.
fn check(lease: Option<&Lease>, now: SystemTime) -> Result<SystemTime, Closed> {
    let lease = lease.ok_or(Closed::NoLease)?;
    let until = run_until(lease).ok_or(Closed::Unreadable)?;
    if until > now {
        Ok(until)
    } else {
        Err(Closed::Ended(
            humantime::format_rfc3339_millis(until).to_string(),
        ))
    }
}

/// Whether the DRPair is known not to exist (deleted with its Lease): the app is then not
/// protected, and nothing is fenced. An error (including 403, when the pod's service account
/// may not read DRPairs) counts as "exists", so the gate stays closed.
async fn pair_deleted(client: &Client, namespace: &str, pair: &str) -> bool {
    matches!(
        Api::<ferry_schemas::DRPair>::namespaced(client.clone(), namespace)
            .get_opt(pair)
            .await,
        Ok(None)
    )
}

/// Waits until this site may run the app: the instant its lease ends, or `None` when the
/// DRPair no longer exists (unprotected: nothing to wait for).
async fn wait_open(client: &Client, namespace: &str, pair: &str) -> Option<SystemTime> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let name = lease_name(pair);
    let mut last: Option<Closed> = None;
    loop {
        let verdict = match api.get_opt(&name).await {
            Ok(lease) => check(lease.as_ref(), SystemTime::now()),
            Err(e) => Err(Closed::Unreachable(e.to_string())),
        };
        match verdict {
            Ok(until) => return Some(until),
            Err(Closed::NoLease) if pair_deleted(client, namespace, pair).await => return None,
            Err(closed) => {
                if last.as_ref() != Some(&closed) {
                    eprintln!("ferry-gate: {namespace}/{pair}: {closed}");
                    last = Some(closed);
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Watches the Lease until this site may no longer run the app, then deletes pod `pod`
/// (graceful deletion: the kubelet stops the app; its workload controller creates a new pod,
/// which waits in the init gate). Returns why, or `None` when the lease ended because the
/// DRPair was deleted (the app is no longer protected and keeps running).
async fn watch_until_closed(
    client: &Client,
    namespace: &str,
    pair: &str,
    pod: &str,
) -> Option<Closed> {
    let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
    let name = lease_name(pair);
    let mut known_until: Option<SystemTime> = None;
    let closed = loop {
        let verdict = match api.get_opt(&name).await {
            Ok(lease) => check(lease.as_ref(), SystemTime::now()),
            // Unreachable: act on what was read last, which says until when the app may run.
            Err(e) => match known_until {
                Some(until) if until > SystemTime::now() => Ok(until),
                _ => Err(Closed::Unreachable(e.to_string())),
            },
        };
        match verdict {
            Ok(until) => known_until = Some(until),
            Err(closed) => break closed,
        }
        tokio::time::sleep(POLL).await;
    };
    if closed == Closed::NoLease && pair_deleted(client, namespace, pair).await {
        return None;
    }
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    // Until the pod is marked for deletion (an API outage may outlast the lease).
    while let Err(e) = pods.delete(pod, &Default::default()).await {
        if matches!(&e, kube::Error::Api(s) if s.code == 404) {
            break;
        }
        eprintln!("ferry-gate: deleting pod {namespace}/{pod}: {e}");
        tokio::time::sleep(POLL).await;
    }
    Some(closed)
}

/// Runs the command line `args` (the first is the program name); returns the exit code.
pub fn main_with_args(args: Vec<String>) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferry-gate: starting the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async move {
        let client = match Client::try_default().await {
            Ok(client) => client,
            Err(e) => {
                eprintln!("ferry-gate: connecting to the Kubernetes API: {e}");
                return 1;
            }
        };
        let run = async {
            let unprotected = || {
                println!(
                    "ferry-gate: {}/{}: the DRPair does not exist: Ferry no longer protects this app; {}",
                    cli.namespace,
                    cli.pair,
                    if cli.watch { "not fencing it" } else { "starting the app" }
                )
            };
            let Some(until) = wait_open(&client, &cli.namespace, &cli.pair).await else {
                unprotected();
                if cli.watch {
                    // A native sidecar must keep running; it has nothing left to do.
                    std::future::pending::<()>().await;
                }
                return;
            };
            println!(
                "ferry-gate: {}/{}: this site holds the witness lease until {}; {}",
                cli.namespace,
                cli.pair,
                humantime::format_rfc3339_millis(until),
                if cli.watch {
                    "watching it"
                } else {
                    "starting the app"
                }
            );
            if let (true, Some(pod)) = (cli.watch, &cli.pod) {
                match watch_until_closed(&client, &cli.namespace, &cli.pair, pod).await {
                    Some(closed) => println!(
                        "ferry-gate: {}/{}: {closed}; deleted pod {pod} to stop the app here",
                        cli.namespace, cli.pair
                    ),
                    None => {
                        unprotected();
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        tokio::select! {
            () = run => 0,
            () = ferry_runtime::shutdown_signal() => 143,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease_until(t: Option<SystemTime>) -> Lease {
        let mut lease = Lease::default();
        if let Some(t) = t {
            lease.metadata.annotations = Some(
                [(
                    crate::lease::RUN_UNTIL_ANNOTATION.to_string(),
                    humantime::format_rfc3339_micros(t).to_string(),
                )]
                .into(),
            );
        }
        lease
    }

    #[test]
    fn opens_only_before_the_run_until_instant() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let later = now + Duration::from_secs(3);
        assert_eq!(check(Some(&lease_until(Some(later))), now), Ok(later));
        assert!(matches!(
            check(Some(&lease_until(Some(now))), now),
            Err(Closed::Ended(_))
        ));
        assert_eq!(check(None, now), Err(Closed::NoLease));
        assert_eq!(
            check(Some(&lease_until(None)), now),
            Err(Closed::Unreadable)
        );
    }
}
