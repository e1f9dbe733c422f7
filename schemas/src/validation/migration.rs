//! `MigrationSpec::validate` and the checks of a Migration against its DRPair.

use super::drpair::check_site_ref;
use super::{names, SpecError, ValidPairSpec};
use crate::migration::{MigrationSpec, MigrationType};

/// A [`MigrationSpec`] that passed [`MigrationSpec::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidMigrationSpec {
    /// Name of the DRPair (a valid object name) in the Migration's namespace.
    pub pair: String,
    /// Site to move to (valid, and if checked known).
    pub target_site: String,
    /// Planned, Failover or Failback.
    pub type_: MigrationType,
}

impl MigrationSpec {
    /// Checks what the CRD schema cannot, on the Migration alone.
    ///
    /// `known_sites` are the names of existing `Site` objects; with `None`
    /// the target is checked for syntax only. Checks that need the pair are in
    /// [`ValidMigrationSpec::check_against_pair`].
    ///
    /// # Errors
    ///
    /// [`SpecError`]s for an empty or malformed `spec.pair` and an empty,
    /// malformed or unknown `spec.targetSite`.
    pub fn validate(
        &self,
        known_sites: Option<&[String]>,
    ) -> Result<ValidMigrationSpec, Vec<SpecError>> {
        let mut errors = Vec::new();
        if self.pair.is_empty() {
            errors.push(SpecError::Required {
                field: "spec.pair".into(),
            });
        } else if let Err(detail) = names::dns1123_subdomain(&self.pair) {
            errors.push(SpecError::InvalidName {
                field: "spec.pair".into(),
                value: self.pair.clone(),
                detail,
            });
        }
        check_site_ref(
            "spec.targetSite",
            &self.target_site,
            known_sites,
            &mut errors,
        );
        if errors.is_empty() {
            Ok(ValidMigrationSpec {
                pair: self.pair.clone(),
                target_site: self.target_site.clone(),
                type_: self.type_,
            })
        } else {
            Err(errors)
        }
    }
}

impl ValidMigrationSpec {
    /// Checks the migration against its pair's validated spec and, if known,
    /// the pair's `status.activeSite`.
    ///
    /// # Errors
    ///
    /// - [`SpecError::TargetNotInPair`]: the target is neither of the pair's sites;
    /// - [`SpecError::FailbackNotToPrimary`]: a Failback whose target is not the
    ///   pair's primarySite;
    /// - [`SpecError::TargetAlreadyActive`]: the target already runs the application.
    pub fn check_against_pair(
        &self,
        pair: &ValidPairSpec,
        active_site: Option<&str>,
    ) -> Result<(), SpecError> {
        let field = || "spec.targetSite".to_owned();
        let target = &self.target_site;
        if target != &pair.primary_site && target != &pair.secondary_site {
            return Err(SpecError::TargetNotInPair {
                field: field(),
                target: target.clone(),
                primary: pair.primary_site.clone(),
                secondary: pair.secondary_site.clone(),
            });
        }
        if self.type_ == MigrationType::Failback && target != &pair.primary_site {
            return Err(SpecError::FailbackNotToPrimary {
                field: field(),
                target: target.clone(),
                primary: pair.primary_site.clone(),
            });
        }
        if active_site == Some(target.as_str()) {
            return Err(SpecError::TargetAlreadyActive {
                field: field(),
                target: target.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{known_sites, migration, SITE_A, SITE_B};
    use crate::DRPair;

    /// (case name, spec, known sites, expected message prefixes)
    type ValidateCase<'a> = (&'a str, MigrationSpec, Option<&'a [String]>, &'a [&'a str]);
    /// (case name, target, type, active site, expected reason)
    type PairCase<'a> = (
        &'a str,
        &'a str,
        MigrationType,
        Option<&'a str>,
        Option<&'a str>,
    );

    #[test]
    fn validate_table() {
        let known = known_sites();
        let cases: Vec<ValidateCase> = vec![
            (
                "default is valid",
                migration("m", "ns").spec(),
                Some(&known),
                &[],
            ),
            (
                "empty pair",
                migration("m", "ns").pair("").spec(),
                None,
                &["spec.pair: required"],
            ),
            (
                "bad pair name",
                migration("m", "ns").pair("My_Pair").spec(),
                None,
                &["spec.pair: invalid name \"My_Pair\""],
            ),
            (
                "unknown target",
                migration("m", "ns").target("site-c").spec(),
                Some(&known),
                &["spec.targetSite: unknown site \"site-c\" (known: \"site-a\", \"site-b\")"],
            ),
            (
                "unknown target unchecked without known sites",
                migration("m", "ns").target("site-c").spec(),
                None,
                &[],
            ),
        ];
        for (name, spec, known, want) in cases {
            let got: Vec<String> = match spec.validate(known) {
                Ok(_) => vec![],
                Err(errors) => errors.iter().map(ToString::to_string).collect(),
            };
            assert_eq!(
                got.len(),
                want.len(),
                "{name}: got {got:#?}, want {want:#?}"
            );
            for (g, w) in got.iter().zip(want) {
                assert!(
                    g.starts_with(w),
                    "{name}: got {g:?}, want it to start with {w:?}"
                );
            }
        }
    }

    #[test]
    fn against_pair_table() {
        let pair = DRPair::test()
            .spec()
            .validate(None)
            .expect("fixture pair is valid");
        let cases: &[PairCase] = &[
            (
                "planned to secondary",
                SITE_B,
                MigrationType::Planned,
                Some(SITE_A),
                None,
            ),
            (
                "failover to secondary",
                SITE_B,
                MigrationType::Failover,
                None,
                None,
            ),
            (
                "failback to primary",
                SITE_A,
                MigrationType::Failback,
                Some(SITE_B),
                None,
            ),
            (
                "not in pair",
                "site-c",
                MigrationType::Planned,
                None,
                Some("target_not_in_pair"),
            ),
            (
                "failback to secondary",
                SITE_B,
                MigrationType::Failback,
                Some(SITE_A),
                Some("failback_not_to_primary"),
            ),
            (
                "already active",
                SITE_B,
                MigrationType::Planned,
                Some(SITE_B),
                Some("target_already_active"),
            ),
        ];
        for (case, target, type_, active, want) in cases {
            let spec = migration("m", "ns").target(target).of_type(*type_).spec();
            let valid = spec.validate(None).expect("syntactically valid");
            let got = valid.check_against_pair(&pair, *active).err();
            assert_eq!(
                got.as_ref().map(SpecError::reason),
                *want,
                "{case}: got {got:?}"
            );
        }
    }
}
