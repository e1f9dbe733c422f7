//! The witness quorum's replicated state machine: per pair, the active site, the epoch, the
//! lease and the failover history; per site, which witnesses have lost it.
//!
//! Every change is a [`Command`] in one raft log entry, applied in log order on every witness by
//! [`WitnessState::apply`], a pure function of the state and the entry: no clocks, no I/O. Times
//! inside commands were stamped by the proposing witness, so every replica computes the same
//! result. A command that no longer fits (an old epoch, a site that is not active) is refused
//! at apply time, deterministically, and the refusal is returned to whoever proposed it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// How many decisions each pair keeps in its history.
pub const HISTORY_LEN: usize = 32;

/// Whether a pair may fail over without a human (the DRPair's `spec.failover.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Only a Migration of type Failover, decided by a human, moves the pair.
    #[default]
    Manual,
    /// The quorum fails the pair over when the failover rule holds (see `rule`).
    Automatic,
}

/// What a pair declares to the quorum (RegisterPair).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairConfig {
    /// `namespace/name` of the DRPair.
    pub pair: String,
    /// `spec.primarySite` and `spec.secondarySite`.
    pub primary: String,
    /// See `primary`.
    pub secondary: String,
    /// `spec.failover.mode`.
    pub mode: Mode,
    /// `spec.rpo`, in milliseconds.
    pub rpo_ms: u64,
    /// Data-loss allowance, in milliseconds: the most a failover may lose (default: the RPO).
    pub allowance_ms: u64,
    /// The pair's siteLossTimeout, ms (0: the witnesses' own timeout only).
    #[serde(default)]
    pub site_loss_timeout_ms: u64,
}

/// A lease on a pair, held by its active site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The site holding it.
    pub holder: String,
    /// The epoch it was granted at.
    pub epoch: u64,
    /// When the proposing witness granted it, Unix ms on that witness's clock.
    pub granted_at_ms: i64,
    /// `granted_at_ms` plus the duration, Unix ms.
    pub expires_at_ms: i64,
}

/// One migration or failover decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// `Failover`, `ManualFailover` or `Migration`.
    pub kind: String,
    /// The site the pair left.
    pub from: String,
    /// The site now active.
    pub to: String,
    /// The new epoch.
    pub epoch: u64,
    /// Unix ms, proposer's clock.
    pub decided_at_ms: i64,
    /// Failovers: the generation the new site starts from (0 for migrations).
    pub generation: u64,
    /// Its capture time, Unix ms.
    pub capture_time_ms: i64,
    /// The last time a witness heard from the lost site, Unix ms.
    pub last_heard_ms: i64,
    /// `last_heard_ms - capture_time_ms`, in seconds, never negative.
    pub data_loss_seconds: f64,
    /// The new site must not start the app before this instant, Unix ms.
    pub not_before_ms: i64,
    /// The raft index of the entry.
    pub index: u64,
    /// Free text: who asked and why.
    pub reason: String,
}

/// The quorum's view of one pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairRecord {
    /// What the pair declared.
    pub config: PairConfig,
    /// The site allowed to run the app at `epoch`.
    pub active: String,
    /// Bumped by every migration and failover; never decreases.
    pub epoch: u64,
    /// The active site's lease, if it ever renewed one at this epoch.
    pub lease: Option<Lease>,
    /// After a failover: the new site starts the app no earlier than this, Unix ms.
    pub not_before_ms: i64,
    /// Why an automatic failover is not happening (the leader's last verdict), if it is blocked.
    pub blocked: Option<String>,
    /// The newest decisions, oldest first, at most [`HISTORY_LEN`].
    pub history: Vec<DecisionRecord>,
}

/// What the quorum knows of one site.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    /// Witnesses that have not heard from the site for siteLossTimeout.
    pub suspected_by: BTreeSet<u64>,
    /// The newest last-heard time any witness logged for the site, Unix ms.
    pub last_heard_ms: i64,
}

/// The whole replicated state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WitnessState {
    /// By `namespace/name`.
    pub pairs: BTreeMap<String, PairRecord>,
    /// By site name.
    pub sites: BTreeMap<String, SiteRecord>,
    /// Witness raft ids and their `host:port`.
    pub members: BTreeMap<u64, String>,
    /// The raft index of the last applied entry.
    pub applied_index: u64,
}

/// One raft log entry's payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Declare a pair, or change its configuration. `active`/`epoch` apply only to a new pair.
    RegisterPair {
        /// The configuration.
        config: PairConfig,
        /// Initial active site.
        active: String,
        /// Initial epoch.
        epoch: u64,
    },
    /// The active site renews its lease.
    RenewLease {
        /// `namespace/name`.
        pair: String,
        /// The renewing site.
        site: String,
        /// The epoch it believes current.
        epoch: u64,
        /// Proposer's clock, Unix ms.
        at_ms: i64,
        /// Lease duration, ms.
        duration_ms: u64,
    },
    /// A witness has (or has no longer) lost contact with a site.
    Suspect {
        /// The witness's raft id.
        witness: u64,
        /// The site.
        site: String,
        /// True: lost for siteLossTimeout; false: heard again.
        lost: bool,
        /// When the witness last heard from the site, Unix ms.
        last_heard_ms: i64,
    },
    /// Move a pair to another site and bump its epoch: a failover or a planned migration.
    Move {
        /// `namespace/name`.
        pair: String,
        /// The epoch the decision was taken at; the entry is refused if it moved since.
        expected_epoch: u64,
        /// The decision's details (its `epoch` and `index` are filled in at apply).
        record: DecisionRecord,
    },
    /// The leader's verdict on why a pair cannot fail over (None: nothing blocks it).
    Blocked {
        /// `namespace/name`.
        pair: String,
        /// The reason, e.g. `secondary lag 340s exceeds allowance 300s`.
        reason: Option<String>,
    },
    /// Membership: the addresses of witnesses (applied alongside raft ConfChangeV2 entries).
    Members {
        /// Added or updated members.
        add: BTreeMap<u64, String>,
        /// Removed members.
        remove: Vec<u64>,
    },
}

/// Why a command was refused at apply time.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The pair was never registered.
    #[error("pair {0} is not registered with the witnesses")]
    UnknownPair(String),
    /// The request's epoch is older than the pair's, or names a site that is not active.
    #[error("stale epoch {got} for pair {pair}: current epoch {current}, active site {active}")]
    StaleEpoch {
        /// `namespace/name`.
        pair: String,
        /// The epoch in the request.
        got: u64,
        /// The pair's epoch.
        current: u64,
        /// The pair's active site.
        active: String,
    },
    /// A move to a site that is not one of the pair's two sites, or to the active one.
    #[error("pair {pair} cannot move to site {site}: {why}")]
    BadTarget {
        /// `namespace/name`.
        pair: String,
        /// The requested site.
        site: String,
        /// Why.
        why: String,
    },
}

/// The result of applying one command.
pub type Outcome = Result<Applied, Refusal>;

/// What an applied command produced.
#[derive(Clone, Debug, PartialEq)]
pub enum Applied {
    /// The pair as it is after the command.
    Pair(Box<PairRecord>),
    /// A command that is not about one pair.
    Done,
}

impl WitnessState {
    /// Applies `command`, the payload of raft entry `index`. Deterministic.
    pub fn apply(&mut self, index: u64, command: Command) -> Outcome {
        self.applied_index = index;
        match command {
            Command::RegisterPair {
                config,
                active,
                epoch,
            } => {
                let key = config.pair.clone();
                let rec = self.pairs.entry(key).or_insert_with(|| PairRecord {
                    config: config.clone(),
                    active,
                    epoch,
                    lease: None,
                    not_before_ms: 0,
                    blocked: None,
                    history: Vec::new(),
                });
                rec.config = config;
                Ok(Applied::Pair(Box::new(rec.clone())))
            }
            Command::RenewLease {
                pair,
                site,
                epoch,
                at_ms,
                duration_ms,
            } => {
                let rec = self.pair_mut(&pair)?;
                if epoch != rec.epoch || site != rec.active {
                    return Err(stale(rec, epoch));
                }
                rec.lease = Some(Lease {
                    holder: site,
                    epoch,
                    granted_at_ms: at_ms,
                    expires_at_ms: at_ms.saturating_add(duration_ms as i64),
                });
                Ok(Applied::Pair(Box::new(rec.clone())))
            }
            Command::Suspect {
                witness,
                site,
                lost,
                last_heard_ms,
            } => {
                let rec = self.sites.entry(site).or_default();
                if lost {
                    rec.suspected_by.insert(witness);
                } else {
                    rec.suspected_by.remove(&witness);
                }
                rec.last_heard_ms = rec.last_heard_ms.max(last_heard_ms);
                Ok(Applied::Done)
            }
            Command::Move {
                pair,
                expected_epoch,
                mut record,
            } => {
                let rec = self.pair_mut(&pair)?;
                if expected_epoch != rec.epoch || record.from != rec.active {
                    return Err(stale(rec, expected_epoch));
                }
                let sites = [&rec.config.primary, &rec.config.secondary];
                if record.to == rec.active || !sites.contains(&&record.to) {
                    return Err(Refusal::BadTarget {
                        pair,
                        site: record.to,
                        why: format!(
                            "the pair's sites are {} and {}, {} is active",
                            rec.config.primary, rec.config.secondary, rec.active
                        ),
                    });
                }
                rec.epoch += 1;
                rec.active = record.to.clone();
                rec.lease = None;
                rec.blocked = None;
                rec.not_before_ms = record.not_before_ms;
                record.epoch = rec.epoch;
                record.index = index;
                rec.history.push(record);
                if rec.history.len() > HISTORY_LEN {
                    rec.history.remove(0);
                }
                Ok(Applied::Pair(Box::new(rec.clone())))
            }
            Command::Blocked { pair, reason } => {
                let rec = self.pair_mut(&pair)?;
                rec.blocked = reason;
                Ok(Applied::Pair(Box::new(rec.clone())))
            }
            Command::Members { add, remove } => {
                self.members.extend(add);
                for id in remove {
                    self.members.remove(&id);
                }
                Ok(Applied::Done)
            }
        }
    }

    fn pair_mut(&mut self, pair: &str) -> Result<&mut PairRecord, Refusal> {
        self.pairs
            .get_mut(pair)
            .ok_or_else(|| Refusal::UnknownPair(pair.to_string()))
    }

    /// Decisions with raft index at or after `from_index`, in log order.
    pub fn decisions_since(&self, from_index: u64) -> Vec<(String, DecisionRecord)> {
        let mut out: Vec<(String, DecisionRecord)> = self
            .pairs
            .iter()
            .flat_map(|(k, p)| p.history.iter().map(move |d| (k.clone(), d.clone())))
            .filter(|(_, d)| d.index >= from_index)
            .collect();
        out.sort_by_key(|(_, d)| d.index);
        out
    }
}

fn stale(rec: &PairRecord, got: u64) -> Refusal {
    Refusal::StaleEpoch {
        pair: rec.config.pair.clone(),
        got,
        current: rec.epoch,
        active: rec.active.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PairConfig {
        PairConfig {
            pair: "shop/ledger".into(),
            primary: "a".into(),
            secondary: "b".into(),
            mode: Mode::Automatic,
            rpo_ms: 30_000,
            allowance_ms: 30_000,
            site_loss_timeout_ms: 0,
        }
    }

    fn registered() -> WitnessState {
        let mut s = WitnessState::default();
        let cmd = Command::RegisterPair {
            config: config(),
            active: "a".into(),
            epoch: 1,
        };
        s.apply(1, cmd).unwrap();
        s
    }

    fn renew(site: &str, epoch: u64, at_ms: i64) -> Command {
        Command::RenewLease {
            pair: "shop/ledger".into(),
            site: site.into(),
            epoch,
            at_ms,
            duration_ms: 10_000,
        }
    }

    fn failover(from: &str, to: &str, expected_epoch: u64) -> Command {
        Command::Move {
            pair: "shop/ledger".into(),
            expected_epoch,
            record: DecisionRecord {
                kind: "Failover".into(),
                from: from.into(),
                to: to.into(),
                epoch: 0,
                decided_at_ms: 50_000,
                generation: 7,
                capture_time_ms: 30_000,
                last_heard_ms: 35_000,
                data_loss_seconds: 5.0,
                not_before_ms: 45_000,
                index: 0,
                reason: String::new(),
            },
        }
    }

    #[test]
    fn registering_again_changes_config_but_not_the_active_site_or_epoch() {
        let mut s = registered();
        let mut c = config();
        c.mode = Mode::Manual;
        let again = Command::RegisterPair {
            config: c,
            active: "b".into(),
            epoch: 9,
        };
        let Ok(Applied::Pair(p)) = s.apply(2, again) else {
            panic!("register refused")
        };
        assert_eq!(
            (p.active.as_str(), p.epoch, p.config.mode),
            ("a", 1, Mode::Manual)
        );
    }

    #[test]
    fn only_the_active_site_at_the_current_epoch_renews() {
        let cases = [
            ("a", 1, true),
            ("a", 0, false),
            ("a", 2, false),
            ("b", 1, false),
        ];
        for (site, epoch, ok) in cases {
            let mut s = registered();
            let out = s.apply(2, renew(site, epoch, 1_000));
            assert_eq!(out.is_ok(), ok, "{site} at epoch {epoch}");
            if !ok {
                assert!(matches!(out, Err(Refusal::StaleEpoch { current: 1, .. })));
            }
        }
        let mut s = registered();
        s.apply(2, renew("a", 1, 1_000)).unwrap();
        let lease = s.pairs["shop/ledger"].lease.clone().unwrap();
        assert_eq!((lease.granted_at_ms, lease.expires_at_ms), (1_000, 11_000));
    }

    #[test]
    fn a_move_bumps_the_epoch_clears_the_lease_and_fences_the_old_site() {
        let mut s = registered();
        s.apply(2, renew("a", 1, 1_000)).unwrap();
        let Ok(Applied::Pair(p)) = s.apply(3, failover("a", "b", 1)) else {
            panic!("failover refused")
        };
        assert_eq!(
            (p.active.as_str(), p.epoch, p.lease.clone()),
            ("b", 2, None)
        );
        assert_eq!(p.history[0].index, 3);
        assert_eq!(p.history[0].epoch, 2);
        // The old primary comes back with the old epoch: refused, it learns epoch 2.
        let out = s.apply(4, renew("a", 1, 60_000));
        assert_eq!(
            out,
            Err(Refusal::StaleEpoch {
                pair: "shop/ledger".into(),
                got: 1,
                current: 2,
                active: "b".into()
            })
        );
        // A second decision taken at the old epoch is refused: one move per epoch.
        assert!(s.apply(5, failover("a", "b", 1)).is_err());
        assert_eq!(s.pairs["shop/ledger"].epoch, 2);
        assert_eq!(s.decisions_since(0).len(), 1);
        assert!(s.decisions_since(4).is_empty());
    }

    #[test]
    fn a_move_to_an_unknown_or_the_active_site_is_refused() {
        let mut s = registered();
        assert!(matches!(
            s.apply(2, failover("a", "c", 1)),
            Err(Refusal::BadTarget { .. })
        ));
        assert!(matches!(
            s.apply(3, failover("a", "a", 1)),
            Err(Refusal::BadTarget { .. })
        ));
        assert_eq!(s.pairs["shop/ledger"].epoch, 1);
    }

    #[test]
    fn suspicions_are_counted_per_witness() {
        let mut s = registered();
        let suspect = |w, lost, t| Command::Suspect {
            witness: w,
            site: "a".into(),
            lost,
            last_heard_ms: t,
        };
        s.apply(2, suspect(1, true, 100)).unwrap();
        s.apply(3, suspect(2, true, 120)).unwrap();
        s.apply(4, suspect(2, true, 120)).unwrap();
        assert_eq!(s.sites["a"].suspected_by.len(), 2);
        s.apply(5, suspect(1, false, 90)).unwrap();
        assert_eq!(s.sites["a"].suspected_by, BTreeSet::from([2]));
        assert_eq!(s.sites["a"].last_heard_ms, 120);
    }

    #[test]
    fn the_state_round_trips_through_a_snapshot() {
        let mut s = registered();
        s.apply(2, renew("a", 1, 1_000)).unwrap();
        s.apply(3, failover("a", "b", 1)).unwrap();
        let bytes = serde_json::to_vec(&s).unwrap();
        let back: WitnessState = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, s);
    }
}
