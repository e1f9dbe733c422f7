//! The failover rule in witness time: three witnesses in-process on loopback (mutual TLS, real
//! raft) whose wall clock is a [`ManualClock`] the test moves by hand. "Nothing happens however
//! long a site stays up" and "nothing happens without a quorum" are proved by moving the clock
//! and waiting for the failure detector's rounds, never by sleeping through the time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_schemas::proto::witness::{
    FailoverMode, HeartbeatRequest, PairReport, RegisterPairRequest, RenewLeaseRequest,
};
use ferry_tls::CertificateAuthority;
use ferry_witness::client::QuorumClient;
use ferry_witness::clock::{Clock as _, ManualClock, SystemClock};
use ferry_witness::node::{NodeConfig, NodeHandle};
use ferry_witness::rule::RuleConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PAIR: &str = "shop/ledger";
const LEASE_MS: u64 = 2_000;
const SITE_LOSS_MS: u64 = 2_000;
const SKEW_MARGIN_MS: u64 = 500;
/// A bound on real time for anything the test waits for (elections, commits, rounds).
const BOUND: Duration = Duration::from_secs(30);

struct Witness {
    handle: NodeHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Three in-process witnesses sharing one manual clock.
struct Quorum {
    _dir: tempfile::TempDir,
    clock: ManualClock,
    ca: CertificateAuthority,
    addresses: Vec<String>,
    witnesses: BTreeMap<u64, Witness>,
}

impl Quorum {
    async fn start() -> Quorum {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("witness-time-ca").unwrap();
        let clock = ManualClock::at(SystemClock::default().now_ms());
        let mut listeners = BTreeMap::new();
        for id in 1..=3u64 {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            listeners.insert(id, l);
        }
        let peers: BTreeMap<u64, String> = listeners
            .iter()
            .map(|(id, l)| (*id, l.local_addr().unwrap().to_string()))
            .collect();
        let rule = RuleConfig {
            site_loss_timeout_ms: SITE_LOSS_MS,
            skew_margin_ms: SKEW_MARGIN_MS,
            voters: 3,
        };
        let mut witnesses = BTreeMap::new();
        for (id, listener) in listeners {
            let mut cfg =
                NodeConfig::new(id, peers.clone(), dir.path().join(format!("w{id}")), rule);
            // Fast raft ticks: elections in a few hundred ms, detector rounds every 50 ms.
            cfg.tick = Duration::from_millis(10);
            cfg.clock = clock.shared();
            let tls = ca
                .issue(&format!("witness-{id}"), &["127.0.0.1".into()])
                .unwrap();
            let (handle_tx, handle_rx) = oneshot::channel();
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                let on_start = move |h: NodeHandle| {
                    let _ = handle_tx.send(h);
                };
                let shutdown = async move {
                    let _ = stopped.await;
                };
                ferry_witness::server::serve(cfg, listener, tls, on_start, shutdown)
                    .await
                    .expect("witness serves");
            });
            let handle = handle_rx.await.expect("the witness started");
            witnesses.insert(
                id,
                Witness {
                    handle,
                    stop: Some(stop),
                    task: Some(task),
                },
            );
        }
        Quorum {
            _dir: dir,
            clock,
            ca,
            addresses: peers.into_values().collect(),
            witnesses,
        }
    }

    fn client(&self) -> QuorumClient {
        let tls = self.ca.issue("site-client", &["127.0.0.1".into()]).unwrap();
        QuorumClient::new(&self.addresses, &tls).unwrap()
    }

    /// Stops witness `id` (server, router and node thread) and waits until it has.
    async fn stop(&mut self, id: u64) {
        let w = self.witnesses.get_mut(&id).unwrap();
        let _ = w.stop.take().unwrap().send(());
        w.task.take().unwrap().await.unwrap();
    }

    /// Waits until every running witness's failure detector has run `rounds` more rounds, so
    /// that each has evaluated the rule at the clock's current time.
    async fn rounds(&self, rounds: u64) {
        for w in self.witnesses.values().filter(|w| w.task.is_some()) {
            let mut rx = w.handle.detections();
            let target = *rx.borrow_and_update() + rounds;
            tokio::time::timeout(BOUND, rx.wait_for(|n| *n >= target))
                .await
                .expect("detector rounds in time")
                .expect("the node runs");
        }
    }

    /// The pair as witness `id` has applied it: (active site, epoch, decisions so far).
    fn pair_at(&self, id: u64) -> (String, u64, usize) {
        let published = self.witnesses[&id].handle.published();
        let p = &published.state.pairs[PAIR];
        (p.active.clone(), p.epoch, p.history.len())
    }
}

impl Drop for Quorum {
    fn drop(&mut self) {
        for w in self.witnesses.values_mut() {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}

async fn eventually<T, Fut: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> Fut,
) -> T {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn heartbeat(q: &Quorum, site: &str) -> HeartbeatRequest {
    HeartbeatRequest {
        site: site.into(),
        sent_at_unix_ms: q.clock.now_ms(),
        pairs: vec![PairReport {
            pair: PAIR.into(),
            committed_generation: 5,
            // Both sites hold a fresh generation: data loss is never what blocks.
            capture_time_unix_ms: q.clock.now_ms(),
            epoch: 1,
        }],
    }
}

fn renew(site: &str) -> RenewLeaseRequest {
    RenewLeaseRequest {
        pair: PAIR.into(),
        site: site.into(),
        epoch: 1,
        duration_ms: LEASE_MS,
    }
}

/// A quorum with the pair registered (automatic failover, a active at epoch 1), both sites
/// heard and a's lease held.
async fn steady() -> (Quorum, QuorumClient) {
    let q = Quorum::start().await;
    let c = q.client();
    eventually("the pair registered", || {
        let c = c.clone();
        async move {
            c.register_pair(RegisterPairRequest {
                pair: PAIR.into(),
                primary_site: "a".into(),
                secondary_site: "b".into(),
                mode: FailoverMode::Automatic as i32,
                rpo_ms: 30_000,
                allowance_ms: 0,
                active_site: "a".into(),
                epoch: 1,
                site_loss_timeout_ms: 0,
            })
            .await
            .ok()
        }
    })
    .await;
    assert!(c.heartbeat(heartbeat(&q, "a")).await.reached_quorum());
    assert!(c.heartbeat(heartbeat(&q, "b")).await.reached_quorum());
    c.renew_lease(renew("a")).await.unwrap();
    (q, c)
}

#[tokio::test]
async fn however_long_the_active_site_heartbeats_and_renews_nothing_fails_over() {
    let (q, c) = steady().await;
    // Ten minutes of witness time, in steps shorter than the lease and the loss timeout.
    for _ in 0..600 {
        q.clock.advance_ms(1_000);
        assert!(c.heartbeat(heartbeat(&q, "a")).await.reached_quorum());
        assert!(c.heartbeat(heartbeat(&q, "b")).await.reached_quorum());
        c.renew_lease(renew("a")).await.unwrap();
        if q.clock.now_ms() % 60_000 < 1_000 {
            q.rounds(2).await;
        }
    }
    q.rounds(2).await;
    for id in 1..=3 {
        assert_eq!(q.pair_at(id), ("a".into(), 1, 0), "witness {id}");
    }
    let state = c.get_state().await.unwrap();
    let p = state.pairs.iter().find(|p| p.pair == PAIR).unwrap();
    assert_eq!(p.blocked_reason, "", "nothing to block: no site is lost");
}

#[tokio::test]
async fn a_silent_site_fails_over_only_once_its_lease_margin_and_loss_timeout_have_passed() {
    let (q, c) = steady().await;
    let lease = c.renew_lease(renew("a")).await.unwrap();
    let silent_from = q.clock.now_ms();
    // Site a goes silent; b keeps heartbeating. The lease (2 s) plus the skew margin (0.5 s)
    // and the loss timeout (2 s, from a's last heartbeat) must both pass: step 250 ms at a time
    // and let every witness evaluate each step.
    let mut decided = None;
    for _ in 0..40 {
        let now = q.clock.advance_ms(250);
        assert!(c.heartbeat(heartbeat(&q, "b")).await.reached_quorum());
        // Three rounds: suspicion proposed, committed, and the leader's verdict on it.
        q.rounds(3).await;
        let (active, epoch, decisions) = q.pair_at(1);
        if epoch == 2 {
            decided = Some(now);
            assert_eq!((active.as_str(), decisions), ("b", 1));
            break;
        }
        assert_eq!(active, "a");
    }
    let decided = decided.expect("a failover within 10 s of witness time");
    let earliest =
        (lease.expires_at_unix_ms + SKEW_MARGIN_MS as i64).max(silent_from + SITE_LOSS_MS as i64);
    assert!(
        decided >= earliest,
        "decided at {decided}, before the lease + margin or the loss timeout ({earliest})"
    );
    // Decided within one step of becoming allowed: availability is not given away either.
    assert!(
        decided <= earliest + 500,
        "decided at {decided}, well after it became allowed ({earliest})"
    );
    let state = c.get_state().await.unwrap();
    let p = state.pairs.iter().find(|p| p.pair == PAIR).unwrap();
    let r = p.history.last().unwrap();
    assert_eq!(
        (r.kind.as_str(), r.from_site.as_str(), r.to_site.as_str()),
        ("Failover", "a", "b")
    );
    assert!(r.decided_at_unix_ms >= earliest && r.decided_at_unix_ms <= decided);
}

#[tokio::test]
async fn without_a_quorum_no_amount_of_time_makes_a_failover() {
    let (mut q, c) = steady().await;
    q.stop(2).await;
    q.stop(3).await;
    // Renewals now fail with a clear error.
    let err = c.renew_lease(renew("a")).await.unwrap_err();
    assert!(
        err.message().starts_with("no witness quorum"),
        "{}",
        err.message()
    );
    // Site a silent for an hour of witness time, b heartbeating: the survivor suspects a and
    // would fail over, but nothing it proposes can commit.
    for _ in 0..12 {
        q.clock.advance_ms(300_000);
        let round = c.heartbeat(heartbeat(&q, "b")).await;
        assert!(!round.reached_quorum());
        q.rounds(3).await;
    }
    assert_eq!(
        q.pair_at(1),
        ("a".into(), 1, 0),
        "no failover without quorum"
    );
}
