//! The witness quorum as separate `ferry-witness` processes on loopback, with mutual TLS:
//! leases and epochs, automatic failover after site loss, witness losses, SIGKILL and restart
//! with the log intact, snapshots, and membership changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_schemas::proto::witness::raft_peer_client::RaftPeerClient;
use ferry_schemas::proto::witness::{
    ChangeMembershipRequest, FailoverMode, HeartbeatRequest, Member, PairReport,
    ProposeMigrationRequest, RegisterPairRequest, RenewLeaseRequest, StateReply,
};
use ferry_tls::{CertificateAuthority, TlsMaterial};
use ferry_witness::client::QuorumClient;
use tonic::Code;

const PAIR: &str = "shop/ledger";
const LEASE_MS: u64 = 2_000;
const BOUND: Duration = Duration::from_secs(30);

/// Witness processes started by this test, killed by PID on drop.
struct Quorum {
    dir: tempfile::TempDir,
    ca: CertificateAuthority,
    addresses: BTreeMap<u64, String>,
    children: BTreeMap<u64, Child>,
    site_loss_timeout: &'static str,
    snapshot_every: u64,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Quorum {
    fn start(n: u64, site_loss_timeout: &'static str, snapshot_every: u64) -> Quorum {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("witness-test-ca").unwrap();
        let addresses = (1..=n)
            .map(|id| (id, format!("127.0.0.1:{}", free_port())))
            .collect();
        let mut q = Quorum {
            dir,
            ca,
            addresses,
            children: BTreeMap::new(),
            site_loss_timeout,
            snapshot_every,
        };
        for id in 1..=n {
            q.spawn(id, &q.addresses.clone());
        }
        q
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn spawn(&mut self, id: u64, peers: &BTreeMap<u64, String>) {
        self.spawn_with(id, peers, false)
    }

    fn spawn_with(&mut self, id: u64, peers: &BTreeMap<u64, String>, join: bool) {
        let tls_dir = self.path(&format!("w{id}/tls"));
        if !tls_dir.exists() {
            let m = self
                .ca
                .issue(&format!("witness-{id}"), &["127.0.0.1".into()])
                .unwrap();
            std::fs::create_dir_all(&tls_dir).unwrap();
            m.write_dir(&tls_dir).unwrap();
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("w{id}.log")))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry-witness"));
        cmd.arg("--id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(&self.addresses[&id])
            .arg("--data-dir")
            .arg(self.path(&format!("w{id}/data")))
            .arg("--tls-dir")
            .arg(&tls_dir)
            .arg("--site-loss-timeout")
            .arg(self.site_loss_timeout)
            .arg("--skew-margin")
            .arg("500ms")
            .arg("--snapshot-every")
            .arg(self.snapshot_every.to_string())
            .env("RUST_LOG", "info,raft=warn")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        for (pid, addr) in peers {
            cmd.arg("--peer").arg(format!("{pid}={addr}"));
        }
        if join {
            cmd.arg("--join");
        }
        self.children.insert(id, cmd.spawn().unwrap());
    }

    fn kill(&mut self, id: u64) {
        let mut c = self.children.remove(&id).unwrap();
        c.kill().unwrap(); // SIGKILL
        c.wait().unwrap();
    }

    fn restart(&mut self, id: u64) {
        let peers: BTreeMap<u64, String> = self
            .addresses
            .iter()
            .filter(|(i, _)| **i <= 3)
            .map(|(i, a)| (*i, a.clone()))
            .collect();
        self.spawn(id, &peers);
    }

    fn site_tls(&self, site: &str) -> TlsMaterial {
        self.ca.issue(site, &["127.0.0.1".into()]).unwrap()
    }

    fn client(&self) -> QuorumClient {
        let all: Vec<String> = self.addresses.values().cloned().collect();
        QuorumClient::new(&all, &self.site_tls("site-client")).unwrap()
    }

    fn client_of(&self, id: u64) -> QuorumClient {
        QuorumClient::new(
            &[self.addresses[&id].clone()],
            &self.site_tls("site-client"),
        )
        .unwrap()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for id in self.addresses.keys() {
            let p = self.path(&format!("w{id}.log"));
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out += &format!("--- witness {id} ({})\n", p.display());
            for l in tail.into_iter().rev() {
                out += l;
                out += "\n";
            }
        }
        out
    }
}

impl Drop for Quorum {
    fn drop(&mut self) {
        for c in self.children.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Retries `f` until it returns Some, or panics after `BOUND` with the witnesses' logs.
async fn eventually<T, F, Fut>(q: &Quorum, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            q.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn register(mode: FailoverMode) -> RegisterPairRequest {
    RegisterPairRequest {
        pair: PAIR.into(),
        primary_site: "a".into(),
        secondary_site: "b".into(),
        mode: mode as i32,
        rpo_ms: 30_000,
        allowance_ms: 0,
        active_site: "a".into(),
        epoch: 1,
        site_loss_timeout_ms: 0,
    }
}

fn renew(site: &str, epoch: u64) -> RenewLeaseRequest {
    RenewLeaseRequest {
        pair: PAIR.into(),
        site: site.into(),
        epoch,
        duration_ms: LEASE_MS,
    }
}

fn now_ms() -> i64 {
    use ferry_witness::clock::Clock as _;
    ferry_witness::clock::SystemClock::default().now_ms()
}

fn heartbeat(site: &str, generation: u64, capture_ms: i64) -> HeartbeatRequest {
    HeartbeatRequest {
        site: site.into(),
        sent_at_unix_ms: now_ms(),
        pairs: vec![PairReport {
            pair: PAIR.into(),
            committed_generation: generation,
            capture_time_unix_ms: capture_ms,
            epoch: 1,
        }],
    }
}

async fn registered(q: &Quorum, mode: FailoverMode) -> QuorumClient {
    let c = q.client();
    eventually(q, "the pair registered", || {
        let c = c.clone();
        async move { c.register_pair(register(mode)).await.ok() }
    })
    .await;
    c
}

fn pair_of(s: &StateReply) -> &ferry_schemas::proto::witness::PairState {
    s.pairs
        .iter()
        .find(|p| p.pair == PAIR)
        .expect("pair in state")
}

#[tokio::test]
async fn leases_and_epochs_fence_the_old_site() {
    let q = Quorum::start(3, "10s", 500);
    let c = registered(&q, FailoverMode::Manual).await;
    let lease = c.renew_lease(renew("a", 1)).await.unwrap();
    assert_eq!((lease.holder.as_str(), lease.epoch), ("a", 1));

    // The secondary cannot take the lease, and an old epoch is refused: both name the cause.
    let err = c.renew_lease(renew("b", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().starts_with("stale epoch 1"),
        "{}",
        err.message()
    );

    // A planned migration goes through the quorum and bumps the epoch.
    let moved = c
        .propose_migration(ProposeMigrationRequest {
            pair: PAIR.into(),
            from_site: "a".into(),
            to_site: "b".into(),
            epoch: 1,
        })
        .await
        .unwrap();
    assert_eq!((moved.active_site.as_str(), moved.epoch), ("b", 2));
    // Replaying it (a second controller, a retry) is refused: one move per epoch.
    let again = c
        .propose_migration(ProposeMigrationRequest {
            pair: PAIR.into(),
            from_site: "a".into(),
            to_site: "b".into(),
            epoch: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);

    // The old primary learns the new epoch from the refusal and must demote itself.
    let err = c.renew_lease(renew("a", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("current epoch 2, active site b"),
        "{}",
        err.message()
    );
    c.renew_lease(renew("b", 2)).await.unwrap();

    let state = c.get_state().await.unwrap();
    let p = pair_of(&state);
    assert_eq!(
        (p.active_site.as_str(), p.epoch, p.lease_holder.as_str()),
        ("b", 2, "b")
    );
    assert_eq!(p.history.len(), 1);
    assert_eq!(p.history[0].kind, "Migration");
    assert_eq!(state.voters, vec![1, 2, 3]);
}

/// Sends heartbeats for `site` every 200 ms until aborted.
fn keep_heartbeating(
    c: QuorumClient,
    site: &'static str,
    generation: u64,
    capture_ms: i64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            c.heartbeat(heartbeat(site, generation, capture_ms)).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// Renews `site`'s lease every 500 ms until aborted; returns the instant of the last success.
fn keep_renewing(
    c: QuorumClient,
    site: &'static str,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<i64>,
) {
    let (tx, rx) = tokio::sync::watch::channel(0i64);
    let task = tokio::spawn(async move {
        loop {
            let sent = now_ms();
            if c.renew_lease(renew(site, 1)).await.is_ok() {
                let _ = tx.send(sent);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    (task, rx)
}

#[tokio::test]
async fn a_lost_site_fails_over_after_its_lease_and_the_loss_timeout() {
    let q = Quorum::start(3, "2s", 500);
    let c = registered(&q, FailoverMode::Automatic).await;
    let capture = now_ms();
    let b = keep_heartbeating(c.clone(), "b", 7, capture);
    let a = keep_heartbeating(c.clone(), "a", 7, capture);
    let (renewals, last_renewal) = keep_renewing(c.clone(), "a");
    eventually(&q, "a's lease", || {
        let r = *last_renewal.borrow();
        async move { (r > 0).then_some(()) }
    })
    .await;
    // That nothing fails over while a heartbeats and renews, whatever time passes, is proved
    // on a manual clock in tests/time.rs.
    assert_eq!(pair_of(&c.get_state().await.unwrap()).epoch, 1);

    // Site a dies: no heartbeats, no renewals.
    a.abort();
    renewals.abort();
    let lost_at = Instant::now();
    let last_sent = *last_renewal.borrow();
    let mut decisions = c.watch(0).await.unwrap();
    let d = tokio::time::timeout(BOUND, decisions.message())
        .await
        .expect("a failover decision in time")
        .unwrap()
        .expect("the decision stream stays open");
    let detected = lost_at.elapsed();
    let r = d.record.unwrap();
    assert_eq!(
        (r.kind.as_str(), r.from_site.as_str(), r.to_site.as_str()),
        ("Failover", "a", "b")
    );
    assert_eq!((r.epoch, r.generation), (2, 7));
    // Never before a's lease (counted from when a *sent* its last renewal) ran out.
    assert!(
        r.decided_at_unix_ms >= last_sent + LEASE_MS as i64,
        "decided at {} before the lease sent at {last_sent} expired",
        r.decided_at_unix_ms
    );
    assert!(r.data_loss_seconds <= 30.0 && r.data_loss_seconds >= 0.0);
    // siteLossTimeout (2 s) + lease (2 s) + margin + detector ticks, well under 10 s.
    assert!(detected < Duration::from_secs(10), "took {detected:?}");
    println!(
        "failover decided {:.1}s after site loss; data loss window {:.1}s",
        detected.as_secs_f64(),
        r.data_loss_seconds
    );
    let p = pair_of(&c.get_state().await.unwrap()).clone();
    assert_eq!((p.active_site.as_str(), p.epoch), ("b", 2));
    // The returning old primary is refused and told the new epoch.
    let err = c.renew_lease(renew("a", 1)).await.unwrap_err();
    assert!(err.message().contains("current epoch 2, active site b"));
    b.abort();
}

#[tokio::test]
async fn a_lagging_secondary_blocks_failover_with_the_reason() {
    let q = Quorum::start(3, "1s", 500);
    let c = registered(&q, FailoverMode::Automatic).await;
    // b's newest generation was captured 10 minutes ago; allowance is the RPO, 30 s.
    let b = keep_heartbeating(c.clone(), "b", 3, now_ms() - 600_000);
    c.heartbeat(heartbeat("a", 3, now_ms())).await;
    let state = eventually(&q, "the blocked reason", || {
        let c = c.clone();
        async move {
            let s = c.get_state().await.ok()?;
            pair_of(&s)
                .blocked_reason
                .starts_with("secondary lag")
                .then_some(s)
        }
    })
    .await;
    let p = pair_of(&state);
    assert!(
        p.blocked_reason.starts_with("secondary lag 60")
            && p.blocked_reason.ends_with("exceeds allowance 30s"),
        "{}",
        p.blocked_reason
    );
    assert_eq!((p.active_site.as_str(), p.epoch), ("a", 1));
    b.abort();
}

#[tokio::test]
async fn one_witness_down_changes_nothing_two_down_stops_all_decisions() {
    let mut q = Quorum::start(3, "2s", 500);
    let c = registered(&q, FailoverMode::Automatic).await;
    let capture = now_ms();
    let b = keep_heartbeating(c.clone(), "b", 4, capture);
    let a = keep_heartbeating(c.clone(), "a", 4, capture);

    q.kill(3);
    // Leases keep being renewed with one witness of three down.
    for _ in 0..5 {
        let t = Instant::now();
        let lease = c.renew_lease(renew("a", 1)).await.unwrap();
        assert_eq!(lease.holder, "a");
        assert!(t.elapsed() < Duration::from_secs(4));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(pair_of(&c.get_state().await.unwrap()).epoch, 1);

    // Two of three down: no quorum. Renewals fail with a clear error.
    q.kill(2);
    let err = c.renew_lease(renew("a", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().starts_with("no witness quorum"),
        "{}",
        err.message()
    );
    // Site a goes silent: the surviving witness still answers, without a quorum. That no
    // amount of time then makes a failover is proved on a manual clock in tests/time.rs.
    a.abort();
    let round = q.client_of(1).heartbeat(heartbeat("b", 4, capture)).await;
    assert!(!round.reached_quorum() || round.asked == 1);
    let reply = &round.replies[0];
    let p = reply.pairs.iter().find(|p| p.pair == PAIR).unwrap();
    assert_eq!(
        (p.active_site.as_str(), p.epoch),
        ("a", 1),
        "no failover without quorum"
    );
    assert!(c.heartbeat(heartbeat("b", 4, capture)).await.replies.len() == 1);
    assert!(!c
        .heartbeat(heartbeat("b", 4, capture))
        .await
        .reached_quorum());
    b.abort();
}

#[tokio::test]
async fn witnesses_killed_mid_write_restart_with_their_logs() {
    // Snapshots every 40 entries, so the restarted witness also exercises compaction and
    // catching up from a snapshot.
    let mut q = Quorum::start(3, "30s", 40);
    let c = registered(&q, FailoverMode::Manual).await;
    // Witness 3 is SIGKILLed while renewals stream in, and misses many of them.
    let (renewals, last) = keep_renewing_fast(c.clone());
    eventually(&q, "10 renewals committed before witness 3 dies", || {
        let n = *last.borrow();
        async move { (n >= 10).then_some(()) }
    })
    .await;
    q.kill(3);
    eventually(&q, "100 renewals while witness 3 is down", || {
        let n = *last.borrow();
        async move { (n >= 100).then_some(()) }
    })
    .await;
    renewals.abort();
    let _ = renewals.await;
    q.restart(3);
    let leader_view = c.get_state().await.unwrap();
    let expected = pair_of(&leader_view).clone();
    let w3 = q.client_of(3);
    eventually(&q, "witness 3 to catch up", || {
        let w3 = w3.clone();
        let want = expected.clone();
        async move {
            let r = w3.heartbeat(heartbeat("a", 1, 0)).await;
            let p = r
                .replies
                .first()?
                .pairs
                .iter()
                .find(|p| p.pair == PAIR)?
                .clone();
            (p.lease_expires_unix_ms == want.lease_expires_unix_ms).then_some(())
        }
    })
    .await;
    let s = c.get_state().await.unwrap();
    assert!(
        s.log_entries <= 40 + 8 + 40,
        "log bounded by snapshots: {}",
        s.log_entries
    );

    // An acknowledged write survives SIGKILL of every witness at once: sled was flushed
    // before the acknowledgement, not 500 ms later.
    let moved = c
        .propose_migration(ProposeMigrationRequest {
            pair: PAIR.into(),
            from_site: "a".into(),
            to_site: "b".into(),
            epoch: 1,
        })
        .await
        .unwrap();
    for id in [1, 2, 3] {
        q.kill(id);
    }
    for id in [1, 2, 3] {
        q.restart(id);
    }
    let after = eventually(&q, "the restarted quorum", || {
        let c = c.clone();
        async move { c.get_state().await.ok() }
    })
    .await;
    let p = pair_of(&after);
    assert_eq!(
        (p.active_site.as_str(), p.epoch),
        (moved.active_site.as_str(), moved.epoch)
    );
    assert_eq!(p.history.len(), 1);
}

/// Renews a's lease back to back; counts successes.
fn keep_renewing_fast(
    c: QuorumClient,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<u64>,
) {
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    let task = tokio::spawn(async move {
        let mut n = 0;
        loop {
            if c.renew_lease(renew("a", 1)).await.is_ok() {
                n += 1;
                let _ = tx.send(n);
            }
        }
    });
    (task, rx)
}

#[tokio::test]
async fn membership_grows_from_three_to_five_voters() {
    let mut q = Quorum::start(3, "30s", 500);
    let c = registered(&q, FailoverMode::Manual).await;
    for id in [4u64, 5] {
        q.addresses.insert(id, format!("127.0.0.1:{}", free_port()));
    }
    // New members start empty and learn everything from the quorum.
    let first_three: BTreeMap<u64, String> = q
        .addresses
        .iter()
        .filter(|(i, _)| **i <= 3)
        .map(|(i, a)| (*i, a.clone()))
        .collect();
    for id in [4u64, 5] {
        q.spawn_with(id, &first_three, true);
    }
    let tls = q.site_tls("admin");
    let mut admin = RaftPeerClient::new(
        ferry_witness::transport::channel(&q.addresses[&1], &tls, Duration::from_secs(10)).unwrap(),
    );
    for id in [4u64, 5] {
        let req = ChangeMembershipRequest {
            add_voters: vec![Member {
                id,
                address: q.addresses[&id].clone(),
            }],
            remove_voters: vec![],
        };
        let reply = admin.change_membership(req).await.unwrap().into_inner();
        assert!(reply.voters.contains(&id));
    }
    let c5 = q.client();
    let s = c5.get_state().await.unwrap();
    assert_eq!(s.voters, vec![1, 2, 3, 4, 5]);
    // Two of five down: a majority of three still commits.
    q.kill(1);
    q.kill(2);
    let lease = eventually(&q, "a renewal with 3 of 5 witnesses", || {
        let c = c5.clone();
        async move { c.renew_lease(renew("a", 1)).await.ok() }
    })
    .await;
    assert_eq!(lease.holder, "a");
    drop(c);
}
