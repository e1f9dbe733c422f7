//! `DRPairSpec::validate` and the parsed `ValidPairSpec` it returns.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::names;
use super::{
    SpecError, DEFAULT_HOOK_TIMEOUT, DEFAULT_SITE_LOSS_TIMEOUT, MIN_DRILL_EVERY, MIN_RPO,
    MIN_SITE_LOSS_TIMEOUT,
};
use crate::drpair::{
    DRPairSpec, FailoverMode, FailoverSpec, Hook, Hooks, LabelTransform, PatchOp, ReplicaPolicy,
    ResourcePatch, StandbyMode, Transform,
};
use crate::duration::parse_duration;

/// A [`DRPairSpec`] that passed [`DRPairSpec::validate`], with every string
/// parsed and every default applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidPairSpec {
    /// Selects the application's objects; not empty, operators and labels valid.
    pub selector: LabelSelector,
    /// Site the application normally runs on (a valid, and if checked known, Site name).
    pub primary_site: String,
    /// Site receiving replicas; differs from `primary_site`.
    pub secondary_site: String,
    /// Recovery point objective; at least [`MIN_RPO`].
    pub rpo: Duration,
    /// Which PVCs to replicate.
    pub volumes: VolumeSelection,
    /// Manifest rewrites at the destination.
    pub transform: ValidTransform,
    /// What the destination does with complete generations.
    pub standby: StandbyMode,
    /// Capture hooks, with timeouts resolved.
    pub hooks: ValidHooks,
    /// Failover policy, with durations parsed and defaults applied.
    pub failover: ValidFailover,
    /// Complete generations kept at each destination (at least one).
    pub retain_generations: NonZeroU32,
    /// What deleting the pair does to the copy at the other site.
    pub deletion_policy: crate::drpair::DeletionPolicy,
    /// Every this many generations volumes are read whole (no quick check, no changed block
    /// tracking).
    pub full_scan_every: NonZeroU32,
    /// How often the DR site drills the pair (`spec.drill.every`), if it does.
    pub drill_every: Option<Duration>,
}

impl ValidPairSpec {
    /// Whether generation `generation` may use the quick check on filesystem volumes: every
    /// generation but those whose number is a multiple of `spec.fullScanEvery`.
    #[must_use]
    pub fn quick_check(&self, generation: u64) -> bool {
        generation % u64::from(self.full_scan_every.get()) != 0
    }
}

/// Which PersistentVolumeClaims a pair replicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeSelection {
    /// Every PVC matched by the selector, Filesystem and Block mode (`spec.volumes` omitted).
    AllMatched,
    /// Exactly these PVC names, no duplicates; empty means manifests only.
    Named(Vec<String>),
}

/// Validated `spec.transform`.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidTransform {
    /// Labels set and removed (keys and values valid, no key both set and removed).
    pub labels: LabelTransform,
    /// Replica counts at the destination.
    pub replicas: ReplicaRule,
    /// Source to destination StorageClass names (all valid names).
    pub storage_class_map: BTreeMap<String, String>,
    /// RFC 6902 patches: pointers valid, each operation has the members it needs.
    pub patches: Vec<ResourcePatch>,
}

/// Replica counts at the destination, the tagged choice of `spec.transform.replicas`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaRule {
    /// The count captured at the source.
    Restore,
    /// This many replicas (never negative) for every workload.
    Fixed(i32),
    /// Zero replicas.
    Zero,
}

/// Validated `spec.hooks`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidHooks {
    /// Runs before capture.
    pub pre_capture: Option<ValidHook>,
    /// Runs after capture.
    pub post_capture: Option<ValidHook>,
}

/// One validated hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidHook {
    /// Program and arguments (non-empty; the program is non-empty).
    pub command: Vec<String>,
    /// Container name (a valid RFC 1123 label), or the pod's first container.
    pub container: Option<String>,
    /// Kill and fail the hook after this long; [`DEFAULT_HOOK_TIMEOUT`] if unset.
    pub timeout: Duration,
}

/// Validated `spec.failover`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValidFailover {
    /// Manual or Automatic.
    pub mode: FailoverMode,
    /// Most data, as time, an automatic failover may lose; defaults to the RPO.
    pub data_loss_allowance: Duration,
    /// How long the primary must be unreachable before it counts as lost;
    /// at least [`MIN_SITE_LOSS_TIMEOUT`], default
    /// [`DEFAULT_SITE_LOSS_TIMEOUT`].
    pub site_loss_timeout: Duration,
}

impl DRPairSpec {
    /// Checks what the CRD schema cannot and parses the spec into a [`ValidPairSpec`].
    ///
    /// `known_sites` are the names of the `Site` objects that exist; with
    /// `None` site names are checked for syntax only.
    ///
    /// # Errors
    ///
    /// Every failed check, in field order, as [`SpecError`]s naming the field
    /// and the bad value, among them: `spec.rpo` not in duration syntax or
    /// below [`MIN_RPO`]; `spec.secondarySite` equal to
    /// `spec.primarySite`; an empty `spec.selector` (it would select the whole
    /// namespace) or a bad operator or label in it; an unknown site;
    /// `spec.transform.replicas.count` missing with policy `Fixed` (or set
    /// without it); bad label keys or values; a label both set and removed;
    /// bad or duplicate PVC names; patches without the members their `op`
    /// needs (RFC 6902) or with bad JSON Pointers; empty hook commands;
    /// `spec.failover` durations not in duration syntax or a `siteLossTimeout`
    /// below [`MIN_SITE_LOSS_TIMEOUT`];
    /// `spec.retainGenerations` or `spec.fullScanEvery` of 0.
    pub fn validate(
        &self,
        known_sites: Option<&[String]>,
    ) -> Result<ValidPairSpec, Vec<SpecError>> {
        let mut errors = Vec::new();
        check_selector(&self.selector, &mut errors);
        check_site_ref(
            "spec.primarySite",
            &self.primary_site,
            known_sites,
            &mut errors,
        );
        check_site_ref(
            "spec.secondarySite",
            &self.secondary_site,
            known_sites,
            &mut errors,
        );
        if !self.primary_site.is_empty() && self.primary_site == self.secondary_site {
            errors.push(SpecError::NotDistinct {
                field: "spec.secondarySite".into(),
                other: "spec.primarySite",
                value: self.secondary_site.clone(),
            });
        }
        let rpo = duration("spec.rpo", &self.rpo, Some(MIN_RPO), &mut errors).unwrap_or(MIN_RPO);
        let volumes = check_volumes(self.volumes.as_deref(), &mut errors);
        let transform = check_transform(&self.transform, &mut errors);
        let hooks = check_hooks(self.hooks.as_ref(), &mut errors);
        let failover = check_failover(&self.failover, rpo, &mut errors);
        let retain_generations = NonZeroU32::new(self.retain_generations);
        if retain_generations.is_none() {
            errors.push(SpecError::TooSmall {
                field: "spec.retainGenerations".into(),
                min: 1,
                got: 0,
            });
        }
        let drill_every = self.drill.as_ref().and_then(|d| {
            if let Some(ttl) = &d.ttl {
                duration("spec.drill.ttl", ttl, None, &mut errors);
            }
            duration(
                "spec.drill.every",
                &d.every,
                Some(MIN_DRILL_EVERY),
                &mut errors,
            )
        });
        let full_scan_every = NonZeroU32::new(self.full_scan_every);
        if full_scan_every.is_none() {
            errors.push(SpecError::TooSmall {
                field: "spec.fullScanEvery".into(),
                min: 1,
                got: 0,
            });
        }
        match (retain_generations, full_scan_every) {
            (Some(retain_generations), Some(full_scan_every)) if errors.is_empty() => {
                Ok(ValidPairSpec {
                    selector: self.selector.clone(),
                    primary_site: self.primary_site.clone(),
                    secondary_site: self.secondary_site.clone(),
                    rpo,
                    volumes,
                    transform,
                    standby: self.standby,
                    hooks,
                    failover,
                    retain_generations,
                    deletion_policy: self.deletion_policy,
                    full_scan_every,
                    drill_every,
                })
            }
            _ => Err(errors),
        }
    }
}

/// Parses a duration field, checking `min`; `None` (and an error pushed) if bad.
pub(super) fn duration(
    field: &str,
    text: &str,
    min: Option<Duration>,
    errors: &mut Vec<SpecError>,
) -> Option<Duration> {
    match parse_duration(text) {
        Err(detail) => {
            errors.push(SpecError::InvalidDuration {
                field: field.into(),
                value: text.into(),
                detail,
            });
            None
        }
        Ok(got) => match min {
            Some(min) if got < min => {
                errors.push(SpecError::DurationTooShort {
                    field: field.into(),
                    min,
                    got,
                });
                None
            }
            _ => Some(got),
        },
    }
}

/// Checks a reference to a `Site` by name: present, valid syntax, known.
pub(super) fn check_site_ref(
    field: &str,
    site: &str,
    known_sites: Option<&[String]>,
    errors: &mut Vec<SpecError>,
) {
    if site.is_empty() {
        errors.push(SpecError::Required {
            field: field.into(),
        });
    } else if let Err(detail) = names::dns1123_subdomain(site) {
        errors.push(SpecError::InvalidName {
            field: field.into(),
            value: site.into(),
            detail,
        });
    } else if let Some(known) = known_sites {
        if !known.iter().any(|k| k == site) {
            errors.push(SpecError::UnknownSite {
                field: field.into(),
                site: site.into(),
                known: known.to_vec(),
            });
        }
    }
}

const OPERATORS: &[&str] = &["In", "NotIn", "Exists", "DoesNotExist"];

fn check_selector(selector: &LabelSelector, errors: &mut Vec<SpecError>) {
    let labels = selector.match_labels.as_ref().filter(|m| !m.is_empty());
    let expressions = selector.match_expressions.as_deref().unwrap_or_default();
    if labels.is_none() && expressions.is_empty() {
        errors.push(SpecError::EmptySelector {
            field: "spec.selector".into(),
        });
        return;
    }
    for (key, value) in labels.into_iter().flatten() {
        check_label("spec.selector.matchLabels", key, Some(value), errors);
    }
    for (i, requirement) in expressions.iter().enumerate() {
        let field = format!("spec.selector.matchExpressions[{i}]");
        check_label(&format!("{field}.key"), &requirement.key, None, errors);
        let values = requirement.values.as_deref().unwrap_or_default();
        match requirement.operator.as_str() {
            "In" | "NotIn" => {
                if values.is_empty() {
                    errors.push(SpecError::RequiredWhen {
                        field: format!("{field}.values"),
                        when: "operator is In or NotIn",
                    });
                }
                for (j, value) in values.iter().enumerate() {
                    if let Err(detail) = names::label_value(value) {
                        errors.push(SpecError::InvalidLabel {
                            field: format!("{field}.values[{j}]"),
                            value: value.clone(),
                            detail,
                        });
                    }
                }
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    errors.push(SpecError::Forbidden {
                        field: format!("{field}.values"),
                        unless: "operator is In or NotIn",
                        value: format!("{values:?}"),
                    });
                }
            }
            other => errors.push(SpecError::NotSupported {
                field: format!("{field}.operator"),
                value: other.into(),
                supported: OPERATORS,
            }),
        }
    }
}

/// Checks a label key and, if given, its value.
fn check_label(field: &str, key: &str, value: Option<&str>, errors: &mut Vec<SpecError>) {
    if let Err(detail) = names::label_key(key) {
        errors.push(SpecError::InvalidLabel {
            field: field.into(),
            value: key.into(),
            detail,
        });
    }
    if let Some(Err(detail)) = value.map(names::label_value) {
        errors.push(SpecError::InvalidLabel {
            field: format!("{field}[{key:?}]"),
            value: value.unwrap_or_default().into(),
            detail,
        });
    }
}

fn check_volumes(volumes: Option<&[String]>, errors: &mut Vec<SpecError>) -> VolumeSelection {
    let Some(volumes) = volumes else {
        return VolumeSelection::AllMatched;
    };
    let mut seen = BTreeSet::new();
    for (i, name) in volumes.iter().enumerate() {
        let field = format!("spec.volumes[{i}]");
        if let Err(detail) = names::dns1123_subdomain(name) {
            errors.push(SpecError::InvalidName {
                field,
                value: name.clone(),
                detail,
            });
        } else if !seen.insert(name.as_str()) {
            errors.push(SpecError::Duplicate {
                field,
                value: name.clone(),
            });
        }
    }
    VolumeSelection::Named(volumes.to_vec())
}

fn check_transform(transform: &Transform, errors: &mut Vec<SpecError>) -> ValidTransform {
    let labels = &transform.labels;
    for (key, value) in &labels.set {
        check_label("spec.transform.labels.set", key, Some(value), errors);
    }
    let mut removed = BTreeSet::new();
    for (i, key) in labels.remove.iter().enumerate() {
        let field = format!("spec.transform.labels.remove[{i}]");
        if let Err(detail) = names::label_key(key) {
            errors.push(SpecError::InvalidLabel {
                field,
                value: key.clone(),
                detail,
            });
        } else if !removed.insert(key.as_str()) {
            errors.push(SpecError::Duplicate {
                field,
                value: key.clone(),
            });
        } else if labels.set.contains_key(key) {
            errors.push(SpecError::LabelSetAndRemoved {
                field,
                key: key.clone(),
            });
        }
    }

    let replicas = &transform.replicas;
    let count_field = "spec.transform.replicas.count";
    let rule = match (replicas.policy, replicas.count) {
        (ReplicaPolicy::Fixed, None) => {
            errors.push(SpecError::RequiredWhen {
                field: count_field.into(),
                when: "policy is Fixed",
            });
            ReplicaRule::Restore
        }
        (ReplicaPolicy::Fixed, Some(count)) if count < 0 => {
            errors.push(SpecError::TooSmall {
                field: count_field.into(),
                min: 0,
                got: count.into(),
            });
            ReplicaRule::Restore
        }
        (ReplicaPolicy::Fixed, Some(count)) => ReplicaRule::Fixed(count),
        (_, Some(count)) => {
            errors.push(SpecError::Forbidden {
                field: count_field.into(),
                unless: "policy is Fixed",
                value: count.to_string(),
            });
            ReplicaRule::Restore
        }
        (ReplicaPolicy::Restore, None) => ReplicaRule::Restore,
        (ReplicaPolicy::Zero, None) => ReplicaRule::Zero,
    };

    for (from, to) in &transform.storage_class_map {
        for name in [from, to] {
            if let Err(detail) = names::dns1123_subdomain(name) {
                errors.push(SpecError::InvalidName {
                    field: "spec.transform.storageClassMap".into(),
                    value: name.clone(),
                    detail,
                });
            }
        }
    }

    for (i, patch) in transform.patches.iter().enumerate() {
        check_patch(&format!("spec.transform.patches[{i}]"), patch, errors);
    }

    ValidTransform {
        labels: labels.clone(),
        replicas: rule,
        storage_class_map: transform.storage_class_map.clone(),
        patches: transform.patches.clone(),
    }
}

fn check_patch(field: &str, patch: &ResourcePatch, errors: &mut Vec<SpecError>) {
    if !patch.group.is_empty() {
        if let Err(detail) = names::dns1123_subdomain(&patch.group) {
            errors.push(SpecError::InvalidName {
                field: format!("{field}.group"),
                value: patch.group.clone(),
                detail,
            });
        }
    }
    if let Err(detail) = names::kind(&patch.kind) {
        errors.push(SpecError::InvalidName {
            field: format!("{field}.kind"),
            value: patch.kind.clone(),
            detail,
        });
    }
    if let Some(Err(detail)) = patch.name.as_deref().map(names::dns1123_subdomain) {
        errors.push(SpecError::InvalidName {
            field: format!("{field}.name"),
            value: patch.name.clone().unwrap_or_default(),
            detail,
        });
    }
    if patch.patch.is_empty() {
        errors.push(SpecError::Required {
            field: format!("{field}.patch"),
        });
    }
    for (j, op) in patch.patch.iter().enumerate() {
        let field = format!("{field}.patch[{j}]");
        if let Err(detail) = names::json_pointer(&op.path) {
            errors.push(SpecError::InvalidJsonPointer {
                field: format!("{field}.path"),
                value: op.path.clone(),
                detail,
            });
        }
        match op.op {
            PatchOp::Add | PatchOp::Replace | PatchOp::Test if op.value.is_none() => {
                errors.push(SpecError::RequiredWhen {
                    field: format!("{field}.value"),
                    when: "op is add, replace or test",
                });
            }
            PatchOp::Move | PatchOp::Copy => match op.from.as_deref() {
                None => errors.push(SpecError::RequiredWhen {
                    field: format!("{field}.from"),
                    when: "op is move or copy",
                }),
                Some(from) => {
                    if let Err(detail) = names::json_pointer(from) {
                        errors.push(SpecError::InvalidJsonPointer {
                            field: format!("{field}.from"),
                            value: from.into(),
                            detail,
                        });
                    }
                }
            },
            _ => {}
        }
    }
}

fn check_hooks(hooks: Option<&Hooks>, errors: &mut Vec<SpecError>) -> ValidHooks {
    let Some(hooks) = hooks else {
        return ValidHooks::default();
    };
    ValidHooks {
        pre_capture: hooks
            .pre_capture
            .as_ref()
            .map(|hook| check_hook("spec.hooks.preCapture", hook, errors)),
        post_capture: hooks
            .post_capture
            .as_ref()
            .map(|hook| check_hook("spec.hooks.postCapture", hook, errors)),
    }
}

fn check_hook(field: &str, hook: &Hook, errors: &mut Vec<SpecError>) -> ValidHook {
    match hook.command.first() {
        None => errors.push(SpecError::Required {
            field: format!("{field}.command"),
        }),
        Some(program) if program.is_empty() => errors.push(SpecError::Required {
            field: format!("{field}.command[0]"),
        }),
        Some(_) => {}
    }
    if let Some(Err(detail)) = hook.container.as_deref().map(names::dns1123_label) {
        errors.push(SpecError::InvalidName {
            field: format!("{field}.container"),
            value: hook.container.clone().unwrap_or_default(),
            detail,
        });
    }
    let timeout = match hook.timeout_seconds {
        None => DEFAULT_HOOK_TIMEOUT,
        Some(0) => {
            errors.push(SpecError::TooSmall {
                field: format!("{field}.timeoutSeconds"),
                min: 1,
                got: 0,
            });
            DEFAULT_HOOK_TIMEOUT
        }
        Some(seconds) => Duration::from_secs(seconds.into()),
    };
    ValidHook {
        command: hook.command.clone(),
        container: hook.container.clone(),
        timeout,
    }
}

fn check_failover(
    failover: &FailoverSpec,
    rpo: Duration,
    errors: &mut Vec<SpecError>,
) -> ValidFailover {
    let data_loss_allowance = match &failover.data_loss_allowance {
        None => rpo,
        Some(text) => {
            duration("spec.failover.dataLossAllowance", text, None, errors).unwrap_or(rpo)
        }
    };
    let site_loss_timeout = match &failover.site_loss_timeout {
        None => DEFAULT_SITE_LOSS_TIMEOUT,
        Some(text) => duration(
            "spec.failover.siteLossTimeout",
            text,
            Some(MIN_SITE_LOSS_TIMEOUT),
            errors,
        )
        .unwrap_or(DEFAULT_SITE_LOSS_TIMEOUT),
    };
    ValidFailover {
        mode: failover.mode,
        data_loss_allowance,
        site_loss_timeout,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
    use serde_json::json;

    use super::*;
    use crate::fixtures::{drpair, known_sites, SITE_A};

    fn requirement(key: &str, operator: &str, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: key.into(),
                operator: operator.into(),
                values: (!values.is_empty())
                    .then(|| values.iter().map(|v| (*v).to_owned()).collect()),
            }]),
        }
    }

    #[test]
    fn every_full_scan_every_th_generation_reads_every_file() {
        let valid = |every| {
            drpair("p", "ns")
                .full_scan_every(every)
                .spec()
                .validate(None)
                .unwrap()
        };
        let default = valid(crate::drpair::DEFAULT_FULL_SCAN_EVERY);
        let full: Vec<u64> = (1..=72).filter(|g| !default.quick_check(*g)).collect();
        assert_eq!(full, [24, 48, 72]);
        assert!(
            (1..=10).all(|g| !valid(1).quick_check(g)),
            "1: always a full scan"
        );
        let parsed: DRPairSpec = serde_json::from_value(json!({
            "selector": {"matchLabels": {"app": "p"}},
            "primarySite": "a", "secondarySite": "b", "rpo": "1m"
        }))
        .unwrap();
        assert_eq!(parsed.full_scan_every, 24, "the default when omitted");
    }

    /// (case name, spec, known sites, expected (message prefix, reason) pairs)
    type Case<'a> = (
        &'a str,
        DRPairSpec,
        Option<&'a [String]>,
        &'a [(&'a str, &'a str)],
    );

    /// Each case: a spec with one fault and the exact messages expected
    /// (prefix match, so long rule texts need not be repeated), with reasons.
    #[test]
    fn rejects_each_fault_naming_field_and_value() {
        let known = known_sites();
        let d = || drpair("db", "shop");
        let cases: Vec<Case> = vec![
            ("rpo too short", d().with_rpo("5s").spec(), None, &[("spec.rpo: must be at least 10s, got 5s", "duration_too_short")]),
            (
                "rpo with words",
                d().with_rpo("5 minutes").spec(),
                None,
                &[("spec.rpo: invalid duration \"5 minutes\": spaces are not allowed", "invalid_duration")],
            ),
            ("rpo without unit", d().with_rpo("30").spec(), None, &[("spec.rpo: invalid duration \"30\": missing unit", "invalid_duration")]),
            (
                "same sites",
                d().sites("x", "x").spec(),
                None,
                &[("spec.secondarySite: must differ from spec.primarySite (both are \"x\")", "not_distinct")],
            ),
            (
                "empty selector",
                d().selector(LabelSelector::default()).spec(),
                None,
                &[("spec.selector: must not be empty (it would select every object in the namespace)", "empty_selector")],
            ),
            (
                "selector with empty maps is empty",
                d().selector(LabelSelector {
                    match_labels: Some(BTreeMap::new()),
                    match_expressions: Some(vec![]),
                })
                .spec(),
                None,
                &[("spec.selector: must not be empty", "empty_selector")],
            ),
            (
                "unknown primary",
                d().sites("x", "site-b").spec(),
                Some(&known),
                &[("spec.primarySite: unknown site \"x\" (known: \"site-a\", \"site-b\")", "unknown_site")],
            ),
            ("empty secondary", d().sites(SITE_A, "").spec(), None, &[("spec.secondarySite: required", "required")]),
            ("site name syntax", d().sites("Site A", "site-b").spec(), None, &[("spec.primarySite: invalid name \"Site A\"", "invalid_name")]),
            (
                "fixed without count",
                d().replicas(ReplicaPolicy::Fixed, None).spec(),
                None,
                &[("spec.transform.replicas.count: required when policy is Fixed", "required")],
            ),
            (
                "negative fixed count",
                d().replicas(ReplicaPolicy::Fixed, Some(-1)).spec(),
                None,
                &[("spec.transform.replicas.count: must be at least 0, got -1", "too_small")],
            ),
            (
                "count without fixed",
                d().replicas(ReplicaPolicy::Zero, Some(2)).spec(),
                None,
                &[("spec.transform.replicas.count: must not be set unless policy is Fixed, got 2", "forbidden")],
            ),
            (
                "bad operator",
                d().selector(requirement("tier", "Equals", &["db"])).spec(),
                None,
                &[(
                    "spec.selector.matchExpressions[0].operator: unsupported value \"Equals\": supported values: \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\"",
                    "not_supported",
                )],
            ),
            (
                "In without values",
                d().selector(requirement("tier", "In", &[])).spec(),
                None,
                &[("spec.selector.matchExpressions[0].values: required when operator is In or NotIn", "required")],
            ),
            (
                "Exists with values",
                d().selector(requirement("tier", "Exists", &["db"])).spec(),
                None,
                &[("spec.selector.matchExpressions[0].values: must not be set unless operator is In or NotIn, got [\"db\"]", "forbidden")],
            ),
            ("duplicate volume", d().volumes(&["data", "data"]).spec(), None, &[("spec.volumes[1]: duplicate value \"data\"", "duplicate")]),
            ("bad volume name", d().volumes(&["Data"]).spec(), None, &[("spec.volumes[0]: invalid name \"Data\"", "invalid_name")]),
            (
                "label set and removed",
                d().set_label("role", "standby").remove_label("role").spec(),
                None,
                &[("spec.transform.labels.remove[0]: label \"role\" is also in spec.transform.labels.set", "label_set_and_removed")],
            ),
            (
                "bad label key",
                d().set_label("bad key", "x").spec(),
                None,
                &[("spec.transform.labels.set: invalid label \"bad key\"", "invalid_label")],
            ),
            (
                "bad label value",
                d().set_label("role", "not ok").spec(),
                None,
                &[("spec.transform.labels.set[\"role\"]: invalid label \"not ok\"", "invalid_label")],
            ),
            (
                "bad storage class",
                d().storage_class("fast", "Fast_SSD").spec(),
                None,
                &[("spec.transform.storageClassMap: invalid name \"Fast_SSD\"", "invalid_name")],
            ),
            (
                "add without value",
                d().patch("Service", PatchOp::Add, "/spec/type", None).spec(),
                None,
                &[("spec.transform.patches[0].patch[0].value: required when op is add, replace or test", "required")],
            ),
            (
                "move without from",
                d().patch("Service", PatchOp::Move, "/a", None).spec(),
                None,
                &[("spec.transform.patches[0].patch[0].from: required when op is move or copy", "required")],
            ),
            (
                "relative pointer",
                d().patch("Service", PatchOp::Remove, "spec/type", None).spec(),
                None,
                &[("spec.transform.patches[0].patch[0].path: invalid JSON pointer \"spec/type\": must be empty or start with '/'", "invalid_json_pointer")],
            ),
            (
                "lower-case kind",
                d().patch("service", PatchOp::Remove, "/spec", None).spec(),
                None,
                &[("spec.transform.patches[0].kind: invalid name \"service\"", "invalid_name")],
            ),
            ("empty hook command", d().pre_capture(&[]).spec(), None, &[("spec.hooks.preCapture.command: required", "required")]),
            (
                "site loss timeout too short",
                d().automatic_failover(None, Some("3s")).spec(),
                None,
                &[("spec.failover.siteLossTimeout: must be at least 10s, got 3s", "duration_too_short")],
            ),
            (
                "bad data loss allowance",
                d().automatic_failover(Some("1 hour"), None).spec(),
                None,
                &[("spec.failover.dataLossAllowance: invalid duration \"1 hour\"", "invalid_duration")],
            ),
            ("zero retained generations", d().retain(0).spec(), None, &[("spec.retainGenerations: must be at least 1, got 0", "too_small")]),
            ("a full scan every 0 generations", d().full_scan_every(0).spec(), None, &[("spec.fullScanEvery: must be at least 1, got 0", "too_small")]),
            (
                "every fault is reported, in field order",
                d().sites("x", "x").with_rpo("1s").retain(0).spec(),
                Some(&known),
                &[
                    ("spec.primarySite: unknown site \"x\"", "unknown_site"),
                    ("spec.secondarySite: unknown site \"x\"", "unknown_site"),
                    ("spec.secondarySite: must differ from spec.primarySite", "not_distinct"),
                    ("spec.rpo: must be at least 10s, got 1s", "duration_too_short"),
                    ("spec.retainGenerations: must be at least 1, got 0", "too_small"),
                ],
            ),
        ];
        for (case, spec, known, want) in cases {
            let errors = match spec.validate(known) {
                Ok(valid) => panic!("{case}: expected errors {want:#?}, got valid spec {valid:#?}"),
                Err(errors) => errors,
            };
            let got: Vec<(String, &str)> =
                errors.iter().map(|e| (e.to_string(), e.reason())).collect();
            assert_eq!(
                got.len(),
                want.len(),
                "{case}: got {got:#?}, want {want:#?}"
            );
            for ((message, reason), (want_message, want_reason)) in got.iter().zip(want.iter()) {
                assert!(
                    message.starts_with(want_message),
                    "{case}: got message {message:?}, want it to start with {want_message:?}"
                );
                assert_eq!(reason, want_reason, "{case}: reason of {message:?}");
            }
        }
    }

    #[test]
    fn accepts_valid_specs_and_parses_them() {
        let known = known_sites();
        let valid = drpair("db", "shop")
            .with_rpo("1h30m")
            .volumes(&["data", "wal"])
            .replicas(ReplicaPolicy::Fixed, Some(2))
            .set_label("ferry.dev/role", "standby")
            .remove_label("canary")
            .storage_class("fast", "standard")
            .patch(
                "Service",
                PatchOp::Replace,
                "/spec/type",
                Some(json!("ClusterIP")),
            )
            .patch(
                "ConfigMap",
                PatchOp::Add,
                "/data/x",
                Some(serde_json::Value::Null),
            )
            .pre_capture(&["sh", "-c", "sync"])
            .automatic_failover(Some("5m"), Some("90s"))
            .retain(5)
            .spec()
            .validate(Some(&known))
            .expect("valid");
        assert_eq!(valid.rpo, Duration::from_secs(5400));
        assert_eq!(
            valid.volumes,
            VolumeSelection::Named(vec!["data".into(), "wal".into()])
        );
        assert_eq!(valid.transform.replicas, ReplicaRule::Fixed(2));
        assert_eq!(valid.failover.mode, FailoverMode::Automatic);
        assert_eq!(valid.failover.data_loss_allowance, Duration::from_secs(300));
        assert_eq!(valid.failover.site_loss_timeout, Duration::from_secs(90));
        assert_eq!(
            valid.hooks.pre_capture.map(|h| h.timeout),
            Some(DEFAULT_HOOK_TIMEOUT)
        );
        assert_eq!(valid.retain_generations.get(), 5);
    }

    #[test]
    fn defaults_are_applied() {
        let valid = drpair("db", "shop").spec().validate(None).expect("valid");
        assert_eq!(valid.rpo, Duration::from_secs(60));
        assert_eq!(valid.volumes, VolumeSelection::AllMatched);
        assert_eq!(valid.transform.replicas, ReplicaRule::Restore);
        assert_eq!(valid.failover.mode, FailoverMode::Manual);
        assert_eq!(
            valid.failover.data_loss_allowance, valid.rpo,
            "defaults to the RPO"
        );
        assert_eq!(valid.failover.site_loss_timeout, DEFAULT_SITE_LOSS_TIMEOUT);
        assert_eq!(valid.retain_generations.get(), 3);
        assert_eq!(valid.standby, StandbyMode::Stored);
        assert_eq!(valid.hooks, ValidHooks::default());
        let zero = drpair("db", "shop")
            .replicas(ReplicaPolicy::Zero, None)
            .spec()
            .validate(None);
        assert_eq!(zero.map(|v| v.transform.replicas), Ok(ReplicaRule::Zero));
        let minimum = drpair("db", "shop").with_rpo("10s").spec().validate(None);
        assert_eq!(
            minimum.map(|v| v.rpo),
            Ok(MIN_RPO),
            "the minimum itself is allowed"
        );
    }
}
