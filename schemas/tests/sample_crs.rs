//! The sample CRs in `schemas/fixtures/` parse, and validate (or fail) as their names say.

use std::path::Path;
use std::time::Duration;

use ferry_schemas::drpair::{FailoverMode, ReplicaPolicy};
use ferry_schemas::migration::MigrationType;
use ferry_schemas::validation::{ReplicaRule, VolumeSelection};
use ferry_schemas::{DRPair, Migration, Site, SpecError};
use serde::de::DeserializeOwned;

fn known_sites() -> Vec<String> {
    vec!["site-a".to_owned(), "site-b".to_owned()]
}

/// Reads and deserialises `schemas/fixtures/<name>`, panicking with the file
/// name and the serde error on failure.
fn load<T: DeserializeOwned>(name: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn messages(errors: &[SpecError]) -> Vec<String> {
    errors.iter().map(ToString::to_string).collect()
}

#[test]
fn drpair_good_parses_and_validates() {
    let pair: DRPair = load("drpair-good.yaml");
    assert_eq!(pair.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(pair.spec.transform.replicas.policy, ReplicaPolicy::Fixed);
    let valid = pair
        .spec
        .validate(Some(&known_sites()))
        .unwrap_or_else(|e| panic!("drpair-good.yaml should validate, got {:#?}", messages(&e)));
    assert_eq!(valid.rpo, Duration::from_secs(90));
    assert_eq!(
        valid.volumes,
        VolumeSelection::Named(vec!["ledger-data".into()])
    );
    assert_eq!(valid.transform.replicas, ReplicaRule::Fixed(1));
    assert_eq!(valid.failover.mode, FailoverMode::Automatic);
    assert_eq!(valid.failover.data_loss_allowance, Duration::from_secs(300));
    assert_eq!(valid.failover.site_loss_timeout, Duration::from_secs(120));
    let hook = valid.hooks.pre_capture.expect("preCapture hook");
    assert_eq!(hook.timeout, Duration::from_secs(20));
    assert_eq!(valid.transform.patches.len(), 2);
}

#[test]
fn drpair_good_round_trips() {
    let pair: DRPair = load("drpair-good.yaml");
    let again: DRPair = serde_json::from_value(serde_json::to_value(&pair).unwrap()).unwrap();
    assert_eq!(pair, again);
}

#[test]
fn drpair_bad_breaks_the_schema_pattern() {
    // serde accepts any string; the apiserver rejects it by the rpo pattern, and
    // validation, which accepts exactly the pattern's language, agrees.
    let pair: DRPair = load("drpair-bad.yaml");
    let errors = pair
        .spec
        .validate(None)
        .expect_err("drpair-bad.yaml must not validate");
    assert_eq!(errors.len(), 1, "{:#?}", messages(&errors));
    assert_eq!(errors[0].field(), "spec.rpo");
    assert_eq!(errors[0].reason(), "invalid_duration");
    assert!(
        errors[0]
            .to_string()
            .starts_with("spec.rpo: invalid duration \"5 minutes\""),
        "{}",
        errors[0]
    );
}

#[test]
fn drpair_illegal_fails_validation_naming_the_field() {
    let pair: DRPair = load("drpair-illegal.yaml");
    let errors = pair
        .spec
        .validate(Some(&known_sites()))
        .expect_err("drpair-illegal.yaml must not validate");
    assert_eq!(
        messages(&errors),
        ["spec.secondarySite: must differ from spec.primarySite (both are \"site-a\")"]
    );
    assert_eq!(errors[0].reason(), "not_distinct");
}

#[test]
fn migration_good_parses_and_validates() {
    let migration: Migration = load("migration-good.yaml");
    let valid = migration
        .spec
        .validate(Some(&known_sites()))
        .unwrap_or_else(|e| {
            panic!(
                "migration-good.yaml should validate, got {:#?}",
                messages(&e)
            )
        });
    assert_eq!(valid.type_, MigrationType::Planned);
    let pair: DRPair = load("drpair-good.yaml");
    let pair = pair
        .spec
        .validate(None)
        .expect("drpair-good.yaml validates");
    valid
        .check_against_pair(&pair, Some("site-a"))
        .expect("site-b is the pair's inactive site");
}

#[test]
fn site_good_parses_and_validates() {
    let site: Site = load("site-good.yaml");
    assert_eq!(site.metadata.namespace, None, "sites are cluster-scoped");
    let valid = site
        .spec
        .validate()
        .unwrap_or_else(|e| panic!("site-good.yaml should validate, got {:#?}", messages(&e)));
    assert_eq!(
        (valid.host.as_str(), valid.port),
        ("replicator.site-b.example", 7443)
    );
}
