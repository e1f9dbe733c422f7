//! Mutual TLS material for Ferry's gRPC services: replicator to replicator, site controller to
//! witness, and witness to witness.
//!
//! Every lab (or cluster set) has one [`CertificateAuthority`]; each site's replicator gets a
//! leaf certificate from it, valid both as a TLS server certificate and as a TLS client
//! certificate, so the source and destination replicators authenticate each other (mutual TLS,
//! RFC 8446 §4.3.2 `CertificateRequest` and §4.4.2 `Certificate`). A peer presenting no
//! certificate, or one issued by another CA, fails the handshake.
//!
//! The material travels as a Kubernetes Secret: [`TlsMaterial::to_secret_data`] produces the
//! `stringData` of a `kubernetes.io/tls` Secret (keys [`TLS_CERT_KEY`], [`TLS_KEY_KEY`]) plus
//! [`CA_CERT_KEY`] for the CA, and [`TlsMaterial::from_dir`] reads the same Secret mounted as a
//! volume. [`server_tls_config`] and [`client_tls_config`] turn it into tonic's rustls
//! configuration (aws-lc-rs provider, the same as kube's, so a single rustls crypto provider is
//! in the binary).
//!
//! Certificates follow RFC 5280: the CA has `basicConstraints cA=TRUE, pathLen=0` and
//! `keyCertSign`; leaves have `digitalSignature`, extended key usages `serverAuth` and
//! `clientAuth` (§4.2.1.12), and subject alternative names (§4.2.1.6) of type dNSName or
//! iPAddress. Keys are ECDSA P-256 with SHA-256.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Secret data key of the CA certificate (PEM), as mounted at `<dir>/ca.crt`.
///
/// Not part of the `kubernetes.io/tls` type itself, but the key cert-manager and the
/// Kubernetes service-account token volumes use for the trust anchor.
pub const CA_CERT_KEY: &str = "ca.crt";
/// Secret data key of the leaf certificate (PEM), as mounted at `<dir>/tls.crt`
/// (Kubernetes `kubernetes.io/tls` Secret type).
pub const TLS_CERT_KEY: &str = "tls.crt";
/// Secret data key of the leaf's private key (PKCS#8 PEM), as mounted at `<dir>/tls.key`
/// (Kubernetes `kubernetes.io/tls` Secret type).
pub const TLS_KEY_KEY: &str = "tls.key";

/// Validity of a generated CA certificate, in days (10 years).
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Validity of an issued leaf certificate, in days (1 year).
pub const LEAF_VALIDITY_DAYS: i64 = 365;
/// How far back `notBefore` is set, in seconds (1 hour), to tolerate clock skew between sites.
pub const CLOCK_SKEW_SECONDS: i64 = 3600;

/// Errors while generating, issuing or loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen could not generate the CA key pair or self-sign its certificate.
    #[error("generating the certificate authority {common_name:?}: {source}")]
    GenerateCa {
        /// The CA's requested common name.
        common_name: String,
        /// The cause reported by rcgen.
        #[source]
        source: rcgen::Error,
    },
    /// rcgen could not issue a leaf certificate, e.g. a SAN that is neither an IP address nor
    /// a valid DNS name (IA5String).
    #[error("issuing the certificate for site {site:?}: {source}")]
    Issue {
        /// The site the certificate was for.
        site: String,
        /// The cause reported by rcgen.
        #[source]
        source: rcgen::Error,
    },
    /// A file of the mounted Secret could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file of the mounted Secret holds no PEM block (`-----BEGIN ...`).
    #[error("{}: not PEM (no \"-----BEGIN\" line)", path.display())]
    NotPem {
        /// The file that is not PEM.
        path: PathBuf,
    },
}

/// PEM-encoded TLS material of one site: the CA to trust, the site's certificate and key.
///
/// The same material serves as server identity and client identity: the leaf is valid for
/// both `serverAuth` and `clientAuth` (RFC 5280 §4.2.1.12). `Debug` does not print the key.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// The CA certificate (PEM) that peers' certificates must chain to.
    pub ca_pem: String,
    /// This site's leaf certificate (PEM), signed by the CA.
    pub cert_pem: String,
    /// This site's private key (PKCS#8 PEM). Secret.
    pub key_pem: String,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl TlsMaterial {
    /// Reads `ca.crt`, `tls.crt` and `tls.key` from `dir`, a mounted Kubernetes Secret.
    ///
    /// # Errors
    /// [`TlsError::Io`] naming the file that could not be read, or [`TlsError::NotPem`]
    /// naming the file that holds no PEM block. Certificates and key are otherwise parsed
    /// only when a TLS configuration is used.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TlsError> {
        let dir = dir.as_ref();
        let read = |key: &str| -> Result<String, TlsError> {
            let path = dir.join(key);
            let text = std::fs::read_to_string(&path).map_err(|source| TlsError::Io {
                path: path.clone(),
                source,
            })?;
            if !text.contains("-----BEGIN ") {
                return Err(TlsError::NotPem { path });
            }
            Ok(text)
        };
        Ok(Self {
            ca_pem: read(CA_CERT_KEY)?,
            cert_pem: read(TLS_CERT_KEY)?,
            key_pem: read(TLS_KEY_KEY)?,
        })
    }

    /// Writes `ca.crt`, `tls.crt` and `tls.key` into the existing directory `dir`, the layout
    /// [`TlsMaterial::from_dir`] reads (what a mounted Secret looks like). The key file is
    /// created with mode 0600.
    ///
    /// # Errors
    /// [`TlsError::Io`] naming the file that could not be written.
    pub fn write_dir(&self, dir: impl AsRef<Path>) -> Result<(), TlsError> {
        let dir = dir.as_ref();
        for (key, text, mode) in [
            (CA_CERT_KEY, &self.ca_pem, 0o644),
            (TLS_CERT_KEY, &self.cert_pem, 0o644),
            (TLS_KEY_KEY, &self.key_pem, 0o600),
        ] {
            let path = dir.join(key);
            let io = |source| TlsError::Io {
                path: path.clone(),
                source,
            };
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
                .map_err(io)?;
            file.write_all(text.as_bytes()).map_err(io)?;
        }
        Ok(())
    }

    /// The `stringData` of a Kubernetes Secret holding this material: keys `ca.crt`, `tls.crt`
    /// and `tls.key` with PEM values. Store it with type `kubernetes.io/tls`.
    pub fn to_secret_data(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (CA_CERT_KEY.to_owned(), self.ca_pem.clone()),
            (TLS_CERT_KEY.to_owned(), self.cert_pem.clone()),
            (TLS_KEY_KEY.to_owned(), self.key_pem.clone()),
        ])
    }
}

/// A certificate authority that issues the sites' replicator certificates.
///
/// Self-signed, `basicConstraints cA=TRUE, pathLen=0` (it signs leaves only), key usages
/// `keyCertSign` and `cRLSign` (RFC 5280 §4.2.1.9, §4.2.1.3), valid from
/// [`CLOCK_SKEW_SECONDS`] ago for [`CA_VALIDITY_DAYS`]. The CA key lives only in memory;
/// `Debug` does not print it.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a new CA key pair (ECDSA P-256) and self-signed certificate with subject
    /// `CN=<common_name>, O=Ferry`.
    ///
    /// # Errors
    /// [`TlsError::GenerateCa`] if key generation or signing fails.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let err = |source| TlsError::GenerateCa {
            common_name: common_name.to_owned(),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key).map_err(err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM), the trust anchor every site uses.
    pub fn ca_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf certificate and fresh key (ECDSA P-256) for `site`: subject
    /// `CN=<site>, O=Ferry`, extended key usages `serverAuth` and `clientAuth`, and one subject
    /// alternative name per entry of `sans`: an iPAddress SAN where the string parses as an IPv4
    /// or IPv6 address, a dNSName SAN otherwise. Valid from [`CLOCK_SKEW_SECONDS`] ago for
    /// [`LEAF_VALIDITY_DAYS`].
    ///
    /// Clients check the server's name against these SANs (RFC 6125), so `sans` should hold
    /// every name and address peers dial.
    ///
    /// # Errors
    /// [`TlsError::Issue`] if a SAN is not a valid DNS name, or key generation or signing fails.
    pub fn issue(&self, site: &str, sans: &[String]) -> Result<TlsMaterial, TlsError> {
        let err = |source| TlsError::Issue {
            site: site.to_owned(),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(sans.to_vec()).map_err(err)?;
        params.distinguished_name = distinguished_name(site);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, LEAF_VALIDITY_DAYS);
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(TlsMaterial {
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Ferry");
    dn
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::seconds(CLOCK_SKEW_SECONDS);
    params.not_after = now + Duration::days(days);
}

/// tonic server TLS configuration for a replicator's gRPC server: presents the site's
/// certificate and *requires* a client certificate chaining to `material.ca_pem`
/// (RFC 8446 §4.3.2 `CertificateRequest`; a client sending an empty `Certificate` message is
/// refused with a `certificate_required` alert, §4.4.2.4).
///
/// PEM is parsed when the configuration is applied (`Server::builder().tls_config(..)`), which
/// reports malformed material.
pub fn server_tls_config(material: &TlsMaterial) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(Identity::from_pem(&material.cert_pem, &material.key_pem))
        .client_ca_root(Certificate::from_pem(&material.ca_pem))
}

/// tonic client TLS configuration for dialling a peer replicator: trusts only
/// `material.ca_pem`, presents the site's certificate as client identity, and checks the
/// server's certificate against `server_name` (a DNS name or IP address that must be among the
/// peer's SANs; it is also sent as SNI for DNS names, RFC 8446 §4.4.2.2, RFC 6066 §3).
///
/// PEM is parsed when a channel is built from the configuration, which reports malformed
/// material.
pub fn client_tls_config(material: &TlsMaterial, server_name: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&material.ca_pem))
        .identity(Identity::from_pem(&material.cert_pem, &material.key_pem))
        .domain_name(server_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_round_trip_through_a_directory() {
        let ca = CertificateAuthority::generate("ferry-lab-ca").unwrap();
        let m = ca
            .issue(
                "site-a",
                &["localhost".into(), "127.0.0.1".into(), "::1".into()],
            )
            .unwrap();
        assert_eq!(m.ca_pem, ca.ca_pem());
        assert!(m.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(m.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(!format!("{m:?}").contains(&m.key_pem));

        let data = m.to_secret_data();
        assert_eq!(
            data.keys().map(String::as_str).collect::<Vec<_>>(),
            ["ca.crt", "tls.crt", "tls.key"]
        );

        let dir = tempfile::tempdir().unwrap();
        m.write_dir(dir.path()).unwrap();
        assert_eq!(TlsMaterial::from_dir(dir.path()).unwrap(), m);
    }

    #[test]
    fn from_dir_names_the_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = TlsMaterial::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&err, TlsError::Io { path, .. } if path.ends_with("ca.crt")),
            "{err}"
        );

        let ca = CertificateAuthority::generate("ca").unwrap();
        ca.issue("a", &["a.example".into()])
            .unwrap()
            .write_dir(dir.path())
            .unwrap();
        std::fs::write(dir.path().join("tls.key"), "garbage").unwrap();
        let err = TlsMaterial::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&err, TlsError::NotPem { path } if path.ends_with("tls.key")),
            "{err}"
        );
        assert!(err.to_string().contains("tls.key"));
    }

    #[test]
    fn invalid_san_is_an_issue_error() {
        let ca = CertificateAuthority::generate("ca").unwrap();
        let err = ca.issue("a", &["bad\u{e9}name".into()]).unwrap_err();
        assert!(
            matches!(&err, TlsError::Issue { site, .. } if site == "a"),
            "{err}"
        );
    }
}
