//! The automatic failover rule: when may a pair leave its active site X for its other site Y?
//!
//! All of these must hold (evaluated by the raft leader, every detector tick):
//! 1. the pair's mode is `Automatic`;
//! 2. X's lease has expired, plus the clock-skew margin;
//! 3. a majority of the witnesses have not heard from X for `siteLossTimeout` (logged
//!    [`Command::Suspect`](crate::state::Command::Suspect) entries, so the count is the quorum's,
//!    not the leader's opinion);
//! 4. Y is healthy: this witness heard from it within `siteLossTimeout`, and a majority does
//!    not suspect it;
//! 5. Y's newest committed generation is within the pair's data-loss allowance: the window
//!    between its capture and the last time any witness heard from X.
//!
//! [`evaluate`] is pure: the caller passes the clock and what it heard, so the rule is tested
//! table-driven, without time or network.

use std::collections::BTreeMap;

use crate::state::{DecisionRecord, Mode, PairRecord, WitnessState};

/// The rule's tunables.
#[derive(Clone, Copy, Debug)]
pub struct RuleConfig {
    /// How long a witness goes without a heartbeat before it suspects a site, ms.
    pub site_loss_timeout_ms: u64,
    /// Added to a lease's expiry before it counts as expired, ms: covers clock skew between
    /// the witness that granted the lease and the one judging it.
    pub skew_margin_ms: u64,
    /// Number of voting witnesses (3 or 5).
    pub voters: usize,
}

impl RuleConfig {
    /// The majority of [`RuleConfig::voters`].
    pub fn quorum(&self) -> usize {
        self.voters / 2 + 1
    }
}

/// What one site last told this witness about one pair (a heartbeat's `PairReport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Newest committed generation held at the site (0: none).
    pub generation: u64,
    /// Its capture time, Unix ms.
    pub capture_time_ms: i64,
    /// The pair's epoch as the site knows it.
    pub epoch: u64,
}

/// This witness's soft state about one site, from heartbeats (never logged one by one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteView {
    /// When the last heartbeat arrived, Unix ms on this witness's clock.
    pub last_heard_ms: Option<i64>,
    /// By pair.
    pub reports: BTreeMap<String, Report>,
}

/// The rule's answer for one pair.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Nothing to do: manual mode, or the active site holds a valid lease.
    Hold,
    /// Failover is wanted but not allowed; the reason names the failed condition.
    Blocked(String),
    /// Fail over: the decision to propose (kind `Failover`).
    Failover(DecisionRecord),
}

/// The site a pair would move to: the one of its two sites that is not active.
pub fn other_site(pair: &PairRecord) -> &str {
    if pair.active == pair.config.primary {
        &pair.config.secondary
    } else {
        &pair.config.primary
    }
}

/// Applies the rule to `pair` at `now_ms` (Unix ms, this witness's clock).
pub fn evaluate(
    pair: &PairRecord,
    state: &WitnessState,
    views: &BTreeMap<String, SiteView>,
    now_ms: i64,
    cfg: &RuleConfig,
) -> Verdict {
    if pair.config.mode != Mode::Automatic {
        return Verdict::Hold;
    }
    let x = pair.active.as_str();
    let y = other_site(pair);
    let margin = cfg.skew_margin_ms as i64;
    // A pair that never renewed at this epoch counts from its decision (not_before).
    let expiry = match &pair.lease {
        Some(l) if l.epoch == pair.epoch => l.expires_at_ms,
        _ => pair.not_before_ms,
    };
    if now_ms < expiry.saturating_add(margin) {
        return Verdict::Hold;
    }
    let suspects = |site: &str| {
        state
            .sites
            .get(site)
            .map(|s| s.suspected_by.len())
            .unwrap_or(0)
    };
    let lost = suspects(x);
    if lost < cfg.quorum() {
        return Verdict::Blocked(format!(
            "lease of site {x} expired but only {lost} of {} witnesses have lost it ({} needed)",
            cfg.voters,
            cfg.quorum()
        ));
    }
    let x_heard = state
        .sites
        .get(x)
        .map(|s| s.last_heard_ms)
        .unwrap_or(0)
        .max(views.get(x).and_then(|v| v.last_heard_ms).unwrap_or(0));
    let pair_timeout = pair.config.site_loss_timeout_ms as i64;
    if now_ms - x_heard < pair_timeout {
        return Verdict::Blocked(format!(
            "site {x} lost by {lost} of {} witnesses; waiting for the pair's siteLossTimeout {}s",
            cfg.voters,
            pair_timeout / 1000
        ));
    }
    let timeout = cfg.site_loss_timeout_ms as i64;
    let y_view = views.get(y);
    let y_heard = y_view.and_then(|v| v.last_heard_ms);
    let y_fresh = y_heard.is_some_and(|t| now_ms - t <= timeout);
    if !y_fresh || suspects(y) >= cfg.quorum() {
        // Stable wording (no running counters): the reason is logged only when it changes.
        let why = match y_heard {
            None => "never heard from".to_string(),
            Some(_) if y_fresh => format!("lost by {} witnesses", suspects(y)),
            Some(_) => format!("no heartbeat for over {}s", timeout / 1000),
        };
        return Verdict::Blocked(format!("site {y} is not healthy: {why}"));
    }
    let report = y_view
        .and_then(|v| v.reports.get(&pair.config.pair))
        .copied()
        .unwrap_or_default();
    if report.generation == 0 {
        return Verdict::Blocked(format!("site {y} holds no complete generation of the pair"));
    }
    let loss_ms = (x_heard - report.capture_time_ms).max(0);
    if loss_ms as u64 > pair.config.allowance_ms {
        return Verdict::Blocked(format!(
            "secondary lag {}s exceeds allowance {}s",
            loss_ms / 1000,
            pair.config.allowance_ms / 1000
        ));
    }
    Verdict::Failover(DecisionRecord {
        kind: "Failover".into(),
        from: x.to_string(),
        to: y.to_string(),
        epoch: 0,
        decided_at_ms: now_ms,
        generation: report.generation,
        capture_time_ms: report.capture_time_ms,
        last_heard_ms: x_heard,
        data_loss_seconds: loss_ms as f64 / 1000.0,
        not_before_ms: expiry.saturating_add(margin),
        index: 0,
        reason: format!(
            "site {x} lost: lease expired, {lost} of {} witnesses have not heard from it",
            cfg.voters
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Lease, PairConfig, SiteRecord};

    const CFG: RuleConfig = RuleConfig {
        site_loss_timeout_ms: 10_000,
        skew_margin_ms: 1_000,
        voters: 3,
    };

    fn pair(mode: Mode) -> PairRecord {
        PairRecord {
            config: PairConfig {
                pair: "shop/ledger".into(),
                primary: "a".into(),
                secondary: "b".into(),
                mode,
                rpo_ms: 300_000,
                allowance_ms: 300_000,
                site_loss_timeout_ms: 0,
            },
            active: "a".into(),
            epoch: 3,
            lease: Some(Lease {
                holder: "a".into(),
                epoch: 3,
                granted_at_ms: 90_000,
                expires_at_ms: 100_000,
            }),
            not_before_ms: 0,
            blocked: None,
            history: vec![],
        }
    }

    /// `a` suspected by `lost` witnesses, last heard at 95 s; `b` heard at `b_heard`.
    fn world(
        lost: u64,
        b_heard: Option<i64>,
        capture_ms: i64,
    ) -> (WitnessState, BTreeMap<String, SiteView>) {
        let mut state = WitnessState::default();
        state.sites.insert(
            "a".into(),
            SiteRecord {
                suspected_by: (1..=lost).collect(),
                last_heard_ms: 95_000,
            },
        );
        let mut views = BTreeMap::new();
        let report = Report {
            generation: 12,
            capture_time_ms: capture_ms,
            epoch: 3,
        };
        views.insert(
            "b".into(),
            SiteView {
                last_heard_ms: b_heard,
                reports: BTreeMap::from([("shop/ledger".to_string(), report)]),
            },
        );
        (state, views)
    }

    #[test]
    fn the_rule_table() {
        struct Case {
            name: &'static str,
            mode: Mode,
            now: i64,
            lost: u64,
            b_heard: Option<i64>,
            capture: i64,
            allowance: u64,
            want: &'static str,
        }
        let ok = |name, now| Case {
            name,
            mode: Mode::Automatic,
            now,
            lost: 2,
            b_heard: Some(now - 500),
            capture: 80_000,
            allowance: 300_000,
            want: "failover",
        };
        let cases = [
            ok("all conditions hold", 120_000),
            Case {
                mode: Mode::Manual,
                want: "hold",
                ..ok("manual mode never fails over", 120_000)
            },
            Case {
                want: "hold",
                ..ok("lease still valid", 99_000)
            },
            Case {
                want: "hold",
                ..ok("inside the skew margin", 100_500)
            },
            ok("just past the margin", 101_000),
            Case {
                lost: 1,
                want: "only 1 of 3 witnesses",
                ..ok("minority lost a", 120_000)
            },
            Case {
                lost: 0,
                want: "only 0 of 3",
                ..ok("nobody lost a", 120_000)
            },
            Case {
                b_heard: None,
                want: "site b is not healthy: never heard from",
                ..ok("b never heard", 120_000)
            },
            Case {
                b_heard: Some(100_000),
                want: "site b is not healthy: no heartbeat for over 10s",
                ..ok("b silent", 120_000)
            },
            Case {
                capture: 0,
                allowance: 90_000,
                want: "secondary lag 95s exceeds allowance 90s",
                ..ok("secondary too far behind", 120_000)
            },
            Case {
                capture: 0,
                want: "failover",
                ..ok("lag within a wide allowance", 120_000)
            },
        ];
        for c in cases {
            let mut p = pair(c.mode);
            p.config.allowance_ms = c.allowance;
            let (state, views) = world(c.lost, c.b_heard, c.capture);
            let v = evaluate(&p, &state, &views, c.now, &CFG);
            match (&v, c.want) {
                (Verdict::Hold, "hold") => {}
                (Verdict::Failover(d), "failover") => {
                    assert_eq!(
                        (d.from.as_str(), d.to.as_str(), d.generation),
                        ("a", "b", 12)
                    );
                    assert_eq!(d.last_heard_ms, 95_000);
                    let loss = (95_000 - c.capture) as f64 / 1000.0;
                    assert_eq!(d.data_loss_seconds, loss, "{}", c.name);
                    assert_eq!(d.not_before_ms, 101_000);
                }
                (Verdict::Blocked(why), want) => {
                    assert!(why.contains(want), "{}: {why:?} lacks {want:?}", c.name)
                }
                _ => panic!("{}: got {v:?}, want {}", c.name, c.want),
            }
        }
    }

    #[test]
    fn a_pair_with_no_lease_at_its_epoch_counts_from_its_decision() {
        let mut p = pair(Mode::Automatic);
        p.epoch = 4;
        p.not_before_ms = 110_000;
        let (state, views) = world(2, Some(119_000), 80_000);
        assert_eq!(evaluate(&p, &state, &views, 110_500, &CFG), Verdict::Hold);
        assert!(matches!(
            evaluate(&p, &state, &views, 120_000, &CFG),
            Verdict::Failover(_)
        ));
    }

    #[test]
    fn the_pairs_own_site_loss_timeout_is_waited_out() {
        let mut p = pair(Mode::Automatic);
        p.config.site_loss_timeout_ms = 30_000;
        let (state, views) = world(2, Some(119_000), 80_000);
        // a was last heard at 95 s: lost for 25 s at 120 s, 30 s at 125 s.
        let v = evaluate(&p, &state, &views, 120_000, &CFG);
        assert_eq!(
            v,
            Verdict::Blocked(
                "site a lost by 2 of 3 witnesses; waiting for the pair's siteLossTimeout 30s"
                    .into()
            )
        );
        let (state, views) = world(2, Some(124_500), 80_000);
        assert!(matches!(
            evaluate(&p, &state, &views, 125_000, &CFG),
            Verdict::Failover(_)
        ));
    }

    #[test]
    fn a_site_with_no_generation_blocks_failover() {
        let p = pair(Mode::Automatic);
        let (state, mut views) = world(2, Some(119_000), 80_000);
        views.get_mut("b").unwrap().reports.clear();
        assert_eq!(
            evaluate(&p, &state, &views, 120_000, &CFG),
            Verdict::Blocked("site b holds no complete generation of the pair".into())
        );
    }
}
