//! `SiteSpec::validate`: endpoint and secret reference checks.

use super::{names, SpecError};
use crate::site::{SecretRef, SiteSpec};

/// A [`SiteSpec`] that passed [`SiteSpec::validate`], with the endpoint split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidSiteSpec {
    /// Host of the replicator endpoint: a DNS name, an IPv4 address, or an
    /// IPv6 address without its brackets.
    pub host: String,
    /// Port of the replicator endpoint (1 to 65535).
    pub port: u16,
    /// TLS secret (valid name and namespace).
    pub tls_secret_ref: SecretRef,
    /// Kubeconfig secret, if any (valid name and namespace).
    pub kubeconfig_secret_ref: Option<SecretRef>,
}

impl SiteSpec {
    /// Checks what the CRD schema cannot and splits the endpoint.
    ///
    /// # Errors
    ///
    /// [`SpecError`]s for a malformed `spec.replicatorEndpoint` (no port, port
    /// outside 1 to 65535, bad host) and for secret references with an empty or
    /// malformed name or namespace.
    pub fn validate(&self) -> Result<ValidSiteSpec, Vec<SpecError>> {
        let mut errors = Vec::new();
        let endpoint = split_endpoint(&self.replicator_endpoint).map_err(|detail| {
            SpecError::InvalidEndpoint {
                field: "spec.replicatorEndpoint".into(),
                value: self.replicator_endpoint.clone(),
                detail,
            }
        });
        check_secret_ref("spec.tlsSecretRef", &self.tls_secret_ref, &mut errors);
        if let Some(secret) = &self.kubeconfig_secret_ref {
            check_secret_ref("spec.kubeconfigSecretRef", secret, &mut errors);
        }
        match endpoint {
            Ok((host, port)) if errors.is_empty() => Ok(ValidSiteSpec {
                host,
                port,
                tls_secret_ref: self.tls_secret_ref.clone(),
                kubeconfig_secret_ref: self.kubeconfig_secret_ref.clone(),
            }),
            Ok(_) => Err(errors),
            Err(error) => {
                errors.insert(0, error);
                Err(errors)
            }
        }
    }
}

/// Splits `host:port` / `[v6]:port`.
fn split_endpoint(endpoint: &str) -> Result<(String, u16), &'static str> {
    let (host, port) = if let Some(rest) = endpoint.strip_prefix('[') {
        let (host, port) = rest
            .split_once("]:")
            .ok_or("an IPv6 host must be written [address]:port")?;
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return Err("the bracketed host must be an IPv6 address");
        }
        (host, port)
    } else {
        let (host, port) = endpoint.rsplit_once(':').ok_or("must be host:port")?;
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            && host.starts_with(|c: char| c.is_ascii_alphanumeric())
            && host.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !host_ok {
            return Err("the host must be a DNS name or an IPv4 address (IPv6 in brackets)");
        }
        (host, port)
    };
    let port_ok = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    match port.parse::<u16>() {
        Ok(port) if port_ok && port != 0 => Ok((host.to_owned(), port)),
        _ => Err("the port must be a number from 1 to 65535"),
    }
}

fn check_secret_ref(field: &str, secret: &SecretRef, errors: &mut Vec<SpecError>) {
    let parts = [
        (
            "name",
            &secret.name,
            names::dns1123_subdomain as fn(&str) -> Result<(), &'static str>,
        ),
        ("namespace", &secret.namespace, names::dns1123_label),
    ];
    for (part, value, check) in parts {
        let field = format!("{field}.{part}");
        if value.is_empty() {
            errors.push(SpecError::Required { field });
        } else if let Err(detail) = check(value) {
            errors.push(SpecError::InvalidName {
                field,
                value: value.clone(),
                detail,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::fixtures::site;

    #[test]
    fn endpoint_table() {
        let cases: &[(&str, Option<(&str, u16)>)] = &[
            (
                "replicator.site-a.svc:7443",
                Some(("replicator.site-a.svc", 7443)),
            ),
            ("10.0.0.1:443", Some(("10.0.0.1", 443))),
            ("[::1]:7443", Some(("::1", 7443))),
            ("[fd00::1]:1", Some(("fd00::1", 1))),
            ("host", None),
            ("host:", None),
            ("host:0", None),
            ("host:65536", None),
            ("host:-1", None),
            (":7443", None),
            ("-host:7443", None),
            ("::1:7443", None),
            ("[::1]7443", None),
            ("[zz]:7443", None),
            ("host:+80", None),
        ];
        for (endpoint, want) in cases {
            let got = site("a").endpoint(endpoint).spec().validate();
            match (want, got) {
                (Some((host, port)), Ok(valid)) => {
                    assert_eq!(
                        (valid.host.as_str(), valid.port),
                        (*host, *port),
                        "{endpoint}"
                    );
                }
                (None, Err(errors)) => {
                    assert_eq!(
                        errors[0].reason(),
                        "invalid_endpoint",
                        "{endpoint}: {errors:?}"
                    );
                    assert!(errors[0]
                        .to_string()
                        .starts_with("spec.replicatorEndpoint: invalid endpoint"));
                }
                (want, got) => panic!("{endpoint}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn secret_refs_are_checked() {
        let errors = site("a")
            .kubeconfig("", "Bad_NS")
            .spec()
            .validate()
            .unwrap_err();
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 2, "{messages:#?}");
        assert_eq!(messages[0], "spec.kubeconfigSecretRef.name: required");
        assert!(
            messages[1].starts_with("spec.kubeconfigSecretRef.namespace: invalid name \"Bad_NS\"")
        );
    }
}
