//! Events of the node's storage controllers (core/v1 Events, with series counts as the
//! kubelet's recorder keeps them).

use super::*;

/// Severity of an Event (core/v1 `Event.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `Normal`.
    Normal,
    /// `Warning`.
    Warning,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

/// Key of an Event series: same object, severity, reason and message.
type SeriesKey = (String, EventKind, String, String);

/// Records core/v1 Events for objects, aggregating repeats into one Event whose `count` and
/// `lastTimestamp` grow, as client-go's event correlator does, so a controller retrying every
/// second does not flood the namespace. Best effort: failures are logged, never returned.
pub struct EventRecorder {
    client: Client,
    component: String,
    host: String,
    series: Mutex<HashMap<SeriesKey, (String, String, i32)>>,
}

/// Series remembered before the recorder starts over (bounds memory on long runs).
const MAX_SERIES: usize = 4096;

impl EventRecorder {
    /// A recorder whose Events name `component` as `source.component` and
    /// `reportingController`, and `host` (the node name) as `source.host`.
    pub fn new(client: Client, component: &str, host: &str) -> Self {
        Self {
            client,
            component: component.to_string(),
            host: host.to_string(),
            series: Mutex::new(HashMap::new()),
        }
    }

    /// Records an Event about `object` (its `involvedObject`), in the object's namespace or
    /// `default` for cluster-scoped objects.
    pub async fn publish(
        &self,
        object: &ObjectReference,
        kind: EventKind,
        reason: &str,
        message: &str,
    ) {
        let namespace = object
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let key = (
            object.uid.clone().unwrap_or_default(),
            kind,
            reason.to_string(),
            message.to_string(),
        );
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let api: Api<CoreEvent> = Api::namespaced(self.client.clone(), &namespace);
        let seen = self
            .series
            .lock()
            .expect("event series lock poisoned")
            .get(&key)
            .cloned();
        if let Some((ns, name, count)) = seen {
            let patch = json!({"count": count + 1, "lastTimestamp": now});
            let patched = Api::<CoreEvent>::namespaced(self.client.clone(), &ns)
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            if patched.is_ok() {
                self.remember(key, ns, name, count + 1);
                return;
            }
        }
        let object_name = object.name.clone().unwrap_or_default();
        let nanos = now.0.as_nanosecond();
        let event = CoreEvent {
            metadata: ObjectMeta {
                // `<object>.<hex time>`, the name client-go gives Events.
                name: Some(format!("{object_name}.{nanos:x}")),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: object.clone(),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            type_: Some(kind.as_str().to_string()),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: Some(self.host.clone()),
            }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(self.host.clone()),
            ..CoreEvent::default()
        };
        match api.create(&PostParams::default(), &event).await {
            Ok(created) => self.remember(key, namespace, created.name_any(), 1),
            Err(error) => tracing::debug!(%error, reason, "recording an Event failed"),
        }
    }

    fn remember(&self, key: SeriesKey, namespace: String, name: String, count: i32) {
        let mut series = self.series.lock().expect("event series lock poisoned");
        if series.len() >= MAX_SERIES {
            series.clear();
        }
        series.insert(key, (namespace, name, count));
    }
}
