//! Bounded waiting on a condition: poll, and on timeout say what was last seen (as
//! kube-runtime's `wait` leaves the timeout to the caller, this takes it as an argument).

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Result};

/// How often [`until`] polls.
pub const POLL: Duration = Duration::from_millis(100);

/// Polls `f` every [`POLL`] until it returns `Ok`, for at most `timeout`.
///
/// # Errors
/// After `timeout`: "timed out after … waiting for `what`; last state: …" with the last `Err`.
pub async fn until<V, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<V>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<V, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match f().await {
            Ok(v) => return Ok(v),
            Err(s) => s,
        };
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        tokio::time::sleep(POLL).await;
    }
}
