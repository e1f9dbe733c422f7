//! The failure detector: turns heartbeat soft state into the few log entries decisions need.
//!
//! Every witness tracks, in memory, when each site last sent it a heartbeat ([`SiteView`]).
//! Heartbeats are never logged. Only *changes* are: when this witness has not heard from a site
//! for `siteLossTimeout` it proposes [`Command::Suspect`] `lost: true`, and `lost: false` when
//! the site is heard again. So "a majority of witnesses have lost X" is a fact in the replicated
//! state, not the leader's guess.
//!
//! On the leader, every tick also runs [`crate::rule::evaluate`] for each pair and proposes the
//! resulting failover ([`Command::Move`]) or records why it is blocked ([`Command::Blocked`],
//! only when the reason changes). Proposals are throttled per subject, so a slow commit never
//! floods the log; the state machine refuses any duplicate that slips through (one move per
//! epoch).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::SharedClock;
use crate::rule::{evaluate, RuleConfig, SiteView, Verdict};
use crate::state::{Command, WitnessState};

/// The same proposal is not repeated sooner than this.
const RETRY: Duration = Duration::from_secs(2);

/// Per-witness detector state.
pub struct Detector {
    id: u64,
    rule: RuleConfig,
    views: Arc<Mutex<BTreeMap<String, SiteView>>>,
    clock: SharedClock,
    started_ms: i64,
    proposed: HashMap<String, Instant>,
}

impl Detector {
    /// A detector for witness `id`, reading heartbeat soft state from `views` and the time
    /// from `clock` (heartbeats are stamped with the same clock by [`crate::service`]).
    pub fn new(
        id: u64,
        rule: RuleConfig,
        views: Arc<Mutex<BTreeMap<String, SiteView>>>,
        clock: SharedClock,
    ) -> Self {
        Detector {
            id,
            rule,
            views,
            started_ms: clock.now_ms(),
            clock,
            proposed: HashMap::new(),
        }
    }

    fn throttle(&mut self, key: String, now: Instant) -> bool {
        match self.proposed.get(&key) {
            Some(t) if now.duration_since(*t) < RETRY => false,
            _ => {
                self.proposed.insert(key, now);
                true
            }
        }
    }

    /// The commands to propose now (the detector's clock, Unix ms), given the applied `state`,
    /// whether this node leads, and the number of voters. `now` (monotonic) only throttles
    /// repeated proposals.
    pub fn tick(
        &mut self,
        state: &WitnessState,
        is_leader: bool,
        voters: usize,
        now: Instant,
    ) -> Vec<Command> {
        let now_ms = self.clock.now_ms();
        let views = self.views.lock().map(|v| v.clone()).unwrap_or_default();
        let mut out = Vec::new();
        let mut sites: BTreeSet<String> = views.keys().cloned().collect();
        sites.extend(state.sites.keys().cloned());
        for p in state.pairs.values() {
            sites.insert(p.config.primary.clone());
            sites.insert(p.config.secondary.clone());
        }
        let timeout = self.rule.site_loss_timeout_ms as i64;
        for site in sites {
            let heard = views.get(&site).and_then(|v| v.last_heard_ms);
            // A witness that just started gives every site a full timeout to show up.
            let last = heard.unwrap_or(0).max(self.started_ms);
            let lost = now_ms - last > timeout;
            let mine = state
                .sites
                .get(&site)
                .is_some_and(|s| s.suspected_by.contains(&self.id));
            if lost != mine && self.throttle(format!("suspect/{site}/{lost}"), now) {
                out.push(Command::Suspect {
                    witness: self.id,
                    site,
                    lost,
                    last_heard_ms: heard.unwrap_or(0),
                });
            }
        }
        if !is_leader {
            return out;
        }
        let cfg = RuleConfig {
            voters,
            ..self.rule
        };
        for pair in state.pairs.values() {
            match evaluate(pair, state, &views, now_ms, &cfg) {
                Verdict::Failover(record) => {
                    let key = format!("move/{}/{}", pair.config.pair, pair.epoch);
                    if self.throttle(key, now) {
                        tracing::warn!(
                            pair = %pair.config.pair, from = %record.from, to = %record.to,
                            generation = record.generation, data_loss_seconds = record.data_loss_seconds,
                            "failover decided"
                        );
                        out.push(Command::Move {
                            pair: pair.config.pair.clone(),
                            expected_epoch: pair.epoch,
                            record,
                        });
                    }
                }
                Verdict::Blocked(reason) => {
                    let key = format!("blocked/{}/{reason}", pair.config.pair);
                    if pair.blocked.as_deref() != Some(&reason) && self.throttle(key, now) {
                        tracing::info!(pair = %pair.config.pair, %reason, "failover blocked");
                        out.push(Command::Blocked {
                            pair: pair.config.pair.clone(),
                            reason: Some(reason),
                        });
                    }
                }
                Verdict::Hold => {
                    let key = format!("blocked/{}/", pair.config.pair);
                    if pair.blocked.is_some() && self.throttle(key, now) {
                        out.push(Command::Blocked {
                            pair: pair.config.pair.clone(),
                            reason: None,
                        });
                    }
                }
            }
        }
        out
    }
}
