//! Writes the kubeconfig through which clients (kube-rs, kubectl) reach a lab site.

use std::net::SocketAddr;
use std::path::Path;

/// Renders a kubeconfig for site `site` at `addr` with an optional bearer token.
/// Context, cluster and user are all named `ferry-lab-<site>`.
pub fn render(site: &str, addr: SocketAddr, token: Option<&str>) -> String {
    let name = format!("ferry-lab-{site}");
    let user = match token {
        Some(t) => format!("    token: {t}\n"),
        None => "    {}\n".to_string(),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n    namespace: default\ncurrent-context: {name}\nusers:\n- name: {name}\n  user:\n{user}"
    )
}

/// Writes [`render`]'s output to `path`, creating parent directories.
///
/// # Errors
/// The I/O error when the file cannot be written.
pub fn write(
    path: &Path,
    site: &str,
    addr: SocketAddr,
    token: Option<&str>,
) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, render(site, addr, token))
}

/// Renders a kubeconfig for site `site` whose API server serves TLS at `addr` with a
/// certificate from the CA `ca_pem`, authenticating with bearer token `token`.
/// Names as in [`render`].
pub fn render_tls(site: &str, addr: SocketAddr, ca_pem: &str, token: &str) -> String {
    use base64::Engine as _;
    let name = format!("ferry-lab-{site}");
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: https://{addr}\n    certificate-authority-data: {ca}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n    namespace: default\ncurrent-context: {name}\nusers:\n- name: {name}\n  user:\n    token: {token}\n"
    )
}

/// Writes [`render_tls`]'s output to `path`, creating parent directories.
///
/// # Errors
/// The I/O error when the file cannot be written.
pub fn write_tls(
    path: &Path,
    site: &str,
    addr: SocketAddr,
    ca_pem: &str,
    token: &str,
) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, render_tls(site, addr, ca_pem, token))
}
