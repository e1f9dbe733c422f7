//! This cluster's `Site` objects from one watch that every pair worker shares, so a worker's
//! tick reads memory instead of listing Sites from the API server (kube-rs reflector: a
//! list, then a watch, relisting after a 410 Gone, per the Kubernetes API concepts'
//! "Efficient detection of changes").

use std::sync::Arc;
use std::time::Duration;

use ferry_schemas::Site;
use futures::StreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};

/// How long a caller waits for the first list before giving up for this tick.
const FIRST_LIST: Duration = Duration::from_secs(10);

/// The Sites of this cluster, kept current by a watch. Cheap to clone.
#[derive(Clone)]
pub struct SiteCache {
    store: Store<Site>,
}

/// The cache has not been filled yet (the watch cannot list Sites: no permission, or the API
/// server is unreachable); the watch keeps retrying with back-off.
#[derive(Debug, thiserror::Error)]
#[error("Sites not listed yet: the watch of sites.ferry.dev has not completed a list")]
pub struct NotListed;

impl SiteCache {
    /// Starts the watch on the current tokio runtime; it runs until the process ends.
    pub fn watch(client: Client) -> Self {
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(
            writer,
            watcher(Api::<Site>::all(client), watcher::Config::default()).default_backoff(),
        );
        tokio::spawn(stream.for_each(|event| async move {
            if let Err(e) = event {
                tracing::warn!(error = %e, "watching Sites");
            }
        }));
        Self { store }
    }

    async fn ready(&self) -> Result<(), NotListed> {
        match tokio::time::timeout(FIRST_LIST, self.store.wait_until_ready()).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(NotListed),
        }
    }

    /// Every Site's name.
    ///
    /// # Errors
    /// [`NotListed`] until the first list completed (waits up to 10 s for it).
    pub async fn names(&self) -> Result<Vec<String>, NotListed> {
        self.ready().await?;
        Ok(self.store.state().iter().map(|s| s.name_any()).collect())
    }

    /// The Site called `name`, or `None` when there is none.
    ///
    /// # Errors
    /// [`NotListed`] until the first list completed (waits up to 10 s for it).
    pub async fn get(&self, name: &str) -> Result<Option<Arc<Site>>, NotListed> {
        self.ready().await?;
        Ok(self.store.get(&ObjectRef::new(name)))
    }
}
