//! Parses request paths and query strings into what the handlers act on.

use serde::Deserialize;

/// A request path resolved against the Kubernetes URL layout
/// (`/api/v1/...`, `/apis/{group}/{version}/...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/version`.
    Version,
    /// `/api`.
    CoreVersions,
    /// `/apis`.
    Groups,
    /// `/apis/{group}`.
    Group(String),
    /// `/api/v1` or `/apis/{group}/{version}`: the APIResourceList.
    Resources {
        /// API group; empty for core.
        group: String,
        /// Version.
        version: String,
    },
    /// Health endpoints: `/healthz`, `/readyz`, `/livez`.
    Health,
    /// `/openapi/v3`: the index of OpenAPI v3 documents.
    OpenApiIndex,
    /// `/openapi/v3/api/v1` or `/openapi/v3/apis/{group}/{version}`.
    OpenApi {
        /// API group; empty for core.
        group: String,
        /// Version.
        version: String,
    },
    /// A resource collection, object or subresource.
    Resource(Target),
}

/// The resource a request addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// API group; empty for core.
    pub group: String,
    /// Version.
    pub version: String,
    /// Plural resource name.
    pub plural: String,
    /// Namespace in the path, if any (absent for cluster-scoped or all-namespace requests).
    pub namespace: Option<String>,
    /// Object name, if the request addresses one object.
    pub name: Option<String>,
    /// Subresource, e.g. `status` or `scale`.
    pub subresource: Option<String>,
}

/// Resolves a URL path. Returns `None` for paths the Kubernetes API does not define.
pub fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => return Some(Route::Version),
        ["healthz" | "readyz" | "livez", ..] => return Some(Route::Health),
        ["api"] => return Some(Route::CoreVersions),
        ["openapi", "v3"] => return Some(Route::OpenApiIndex),
        ["openapi", "v3", "api", v] => {
            return Some(Route::OpenApi {
                group: String::new(),
                version: v.to_string(),
            })
        }
        ["openapi", "v3", "apis", g, v] => {
            return Some(Route::OpenApi {
                group: g.to_string(),
                version: v.to_string(),
            })
        }
        ["apis"] => return Some(Route::Groups),
        ["apis", g] => return Some(Route::Group(g.to_string())),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let target = |plural: &str, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>| {
        Some(Route::Resource(Target {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
            namespace: namespace.map(String::from),
            name: name.map(String::from),
            subresource: sub.map(String::from),
        }))
    };
    match rest {
        [] => Some(Route::Resources {
            group: group.to_string(),
            version: version.to_string(),
        }),
        // The namespace object's own subresources, which otherwise look like a collection.
        ["namespaces", ns, sub @ ("status" | "finalize")] if group.is_empty() => {
            target("namespaces", None, Some(ns), Some(sub))
        }
        ["namespaces", ns, plural] => target(plural, Some(ns), None, None),
        ["namespaces", ns, plural, name] => target(plural, Some(ns), Some(name), None),
        ["namespaces", ns, plural, name, sub] => target(plural, Some(ns), Some(name), Some(sub)),
        [plural] => target(plural, None, None, None),
        [plural, name] => target(plural, None, Some(name), None),
        [plural, name, sub] => target(plural, None, Some(name), Some(sub)),
        _ => None,
    }
}

/// Query parameters of list, watch, write and delete requests (metav1.ListOptions,
/// CreateOptions, PatchOptions, DeleteOptions as query strings).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Query {
    /// Label selector, e.g. `app=web,tier!=db`.
    pub label_selector: Option<String>,
    /// Field selector on `metadata.name` / `metadata.namespace`.
    pub field_selector: Option<String>,
    /// Page size for list.
    pub limit: Option<usize>,
    /// Continue token from a previous page.
    #[serde(rename = "continue")]
    pub continue_token: Option<String>,
    /// `true` (or `1`) turns a list into a watch.
    pub watch: Option<String>,
    /// resourceVersion to list or watch from.
    pub resource_version: Option<String>,
    /// Whether the watcher wants BOOKMARK events.
    pub allow_watch_bookmarks: Option<bool>,
    /// Server-side timeout of a watch, in seconds.
    pub timeout_seconds: Option<u64>,
    /// Streaming-list: send the current state as ADDED events, then a bookmark.
    pub send_initial_events: Option<bool>,
    /// Field manager of a write (required for server-side apply).
    pub field_manager: Option<String>,
    /// Force server-side apply conflicts.
    pub force: Option<bool>,
    /// Deletion propagation: `Orphan`, `Background` or `Foreground`.
    pub propagation_policy: Option<String>,
    /// Dry run (`All`): validate but do not persist.
    pub dry_run: Option<String>,
}

impl Query {
    /// Parses a raw query string.
    ///
    /// # Errors
    /// The parse error, for a malformed query string (a 400 to the client).
    pub fn parse(raw: Option<&str>) -> Result<Self, serde_urlencoded::de::Error> {
        serde_urlencoded::from_str(raw.unwrap_or(""))
    }

    /// Whether the request is a watch.
    pub fn is_watch(&self) -> bool {
        matches!(self.watch.as_deref(), Some("true" | "1"))
    }

    /// Whether this is a dry run.
    pub fn is_dry_run(&self) -> bool {
        self.dry_run.as_deref() == Some("All")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let t = |g: &str, p: &str, ns: Option<&str>, n: Option<&str>, s: Option<&str>| {
            Some(Route::Resource(Target {
                group: g.into(),
                version: "v1".into(),
                plural: p.into(),
                namespace: ns.map(String::from),
                name: n.map(String::from),
                subresource: s.map(String::from),
            }))
        };
        let cases = [
            ("/version", Some(Route::Version)),
            ("/apis", Some(Route::Groups)),
            (
                "/api/v1",
                Some(Route::Resources {
                    group: "".into(),
                    version: "v1".into(),
                }),
            ),
            ("/api/v1/namespaces", t("", "namespaces", None, None, None)),
            (
                "/api/v1/namespaces/a",
                t("", "namespaces", None, Some("a"), None),
            ),
            (
                "/api/v1/namespaces/a/status",
                t("", "namespaces", None, Some("a"), Some("status")),
            ),
            (
                "/api/v1/namespaces/a/pods",
                t("", "pods", Some("a"), None, None),
            ),
            (
                "/apis/apps/v1/namespaces/a/deployments/w/scale",
                t("apps", "deployments", Some("a"), Some("w"), Some("scale")),
            ),
            (
                "/apis/apps/v1/deployments",
                t("apps", "deployments", None, None, None),
            ),
            (
                "/api/v1/persistentvolumes/pv1",
                t("", "persistentvolumes", None, Some("pv1"), None),
            ),
            ("/nonsense", None),
        ];
        for (path, want) in cases {
            assert_eq!(route(path), want, "{path}");
        }
    }

    #[test]
    fn query_parses_kube_rs_watch() {
        let q = Query::parse(Some("watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=12&labelSelector=app%3Dweb")).unwrap();
        assert!(q.is_watch());
        assert_eq!(q.timeout_seconds, Some(290));
        assert_eq!(q.label_selector.as_deref(), Some("app=web"));
        assert_eq!(q.resource_version.as_deref(), Some("12"));
    }
}
