//! The lab API server: one per site, serving the Kubernetes REST API over HTTP on loopback.
//!
//! Requests flow one way: [`request`] resolves the path and query, [`discovery`] answers the
//! discovery documents, [`verbs`] runs get/list/create/update/patch/delete against the
//! [`store`], [`watch`] streams changes, and [`lifecycle`] carries out what a write implies
//! (finalizers, garbage collection, namespace termination, CRD establishment). Everything a
//! client sees as an error is a `metav1.Status` ([`lab_apimachinery::status`]).

pub mod authn;
pub mod discovery;
pub mod errors;
pub mod exec;
pub mod lifecycle;
pub mod objects;
pub mod printers;
pub mod protobuf;
pub mod registry;
pub mod request;
pub mod scale;
pub mod store;
pub mod table;
pub mod verbs;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use lab_apimachinery::status::ApiError;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch as tokio_watch;
use tokio::task::JoinHandle;

use registry::Registry;
use request::{route, Query, Route};
use store::Store;

/// Largest request body accepted, in bytes (the apiserver's default is 3 MiB per object; the
/// lab allows more so that large manifests in tests are not the limiting factor).
const MAX_BODY_BYTES: usize = 64 << 20;

/// How to start one site's API server.
#[derive(Clone, Debug)]
pub struct ApiServerConfig {
    /// Directory for the sled database; the same directory brings the same state back.
    pub data_dir: PathBuf,
    /// Address to listen on, e.g. `127.0.1.1:0` (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Bearer token every request must carry; `None` disables authentication.
    pub token: Option<String>,
    /// How many recent events watches can resume from ([`store::WATCH_WINDOW`] by default).
    pub watch_window: usize,
}

/// Shared state of a running server.
pub struct ApiState {
    /// Durable objects.
    pub store: Store,
    /// Served resources.
    pub registry: Registry,
    /// Required bearer token, if any.
    pub token: Option<String>,
    /// The address clients reach the server on.
    pub addr: SocketAddr,
    /// Becomes `true` when the server stops; open watches end on it.
    pub stopping: tokio_watch::Receiver<bool>,
    /// The node's side of `pods/exec`, set once the node runs ([`ApiServer::serve_exec`]).
    pub exec: std::sync::OnceLock<Arc<dyn exec::ExecBackend>>,
    /// Requests served, by verb, as `GET /metrics` reports them.
    pub requests: RequestCounts,
    /// ServiceAccount tokens issued through the TokenRequest API.
    pub tokens: authn::Tokens,
}

/// Requests an API server received, by verb and resource, like kube-apiserver's
/// `apiserver_request_total` without its other labels. `get`, `list` and `watch` are all
/// HTTP `GET`; here `WATCH` counts GETs with `watch=true` or `watch=1`, the rest go by HTTP
/// method. The resource is the plural in the path (`drpairs`, `pods`), with its subresource
/// (`drpairs/status`).
#[derive(Debug, Default)]
pub struct RequestCounts(std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>>);

/// `pods` of `/api/v1/namespaces/x/pods/p`, `drpairs/status` of
/// `/apis/ferry.dev/v1alpha1/namespaces/x/drpairs/p/status`; empty for discovery paths.
fn resource_of(path: &str) -> String {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return String::new(),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    };
    match rest {
        [resource, _name, sub, ..] => format!("{resource}/{sub}"),
        [resource, ..] => (*resource).to_string(),
        [] => String::new(),
    }
}

impl RequestCounts {
    fn count(&self, method: &Method, path: &str, query: Option<&str>) {
        let watch =
            query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
        let verb = if watch {
            "WATCH".to_string()
        } else {
            method.as_str().to_string()
        };
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((verb, resource_of(path)))
            .or_default() += 1;
    }

    /// Prometheus text exposition, one line per verb and resource:
    /// `apiserver_request_total{verb="GET",resource="drpairs"} 12`.
    pub fn exposition(&self) -> String {
        let counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::from(
            "# HELP apiserver_request_total Requests received, by verb and resource.\n# TYPE apiserver_request_total counter\n",
        );
        for ((verb, resource), count) in counts.iter() {
            out.push_str(&format!(
                "apiserver_request_total{{verb=\"{verb}\",resource=\"{resource}\"}} {count}\n"
            ));
        }
        out
    }
}

/// A running API server. Dropping it does not stop it; call [`ApiServer::shutdown`].
pub struct ApiServer {
    state: Arc<ApiState>,
    stop: tokio_watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error("opening the object store in {dir}")]
    Store {
        /// The data directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: store::StoreError,
    },
    /// The listen address could not be bound.
    #[error("binding {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl ApiServer {
    /// Opens the store, re-serves stored CRDs and starts listening.
    ///
    /// # Errors
    /// [`StartError`] when the store cannot be opened or the address cannot be bound.
    pub async fn start(config: ApiServerConfig) -> Result<Self, StartError> {
        let store = Store::open(&config.data_dir, config.watch_window).map_err(|source| {
            StartError::Store {
                dir: config.data_dir.clone(),
                source,
            }
        })?;
        let registry = Registry::new();
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let (stop, mut stopped) = tokio_watch::channel(false);
        let state = Arc::new(ApiState {
            store,
            registry,
            token: config.token,
            addr,
            stopping: stopped.clone(),
            exec: std::sync::OnceLock::new(),
            requests: RequestCounts::default(),
            tokens: authn::Tokens::default(),
        });
        lifecycle::serve_stored_crds(&state).map_err(|source| StartError::Store {
            dir: config.data_dir.clone(),
            source,
        })?;
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "api server stopped with an error");
            }
        });
        tracing::info!(%addr, "lab api server listening");
        Ok(Self { state, stop, task })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// Serves `pods/exec` through `backend` (the site's kubelet); the first call wins.
    pub fn serve_exec(&self, backend: Arc<dyn exec::ExecBackend>) {
        let _ = self.state.exec.set(backend);
    }

    /// The shared state (for in-process inspection in tests).
    pub fn state(&self) -> &Arc<ApiState> {
        &self.state
    }

    /// Stops accepting requests, ends open watches, waits for open connections to finish and
    /// releases the store, so the same data directory can be served again.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.state.store.flush().await;
        let Self { state, task, .. } = self;
        drop(state);
        // Watches end on `stopping`; a client holding a request open longer is cut off.
        let abort = task.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

/// Serialises `value` as a JSON response with `code`.
pub fn json_response(code: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).expect("JSON values serialise");
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Turns an [`ApiError`] into its `metav1.Status` response.
pub fn error_response(err: &ApiError) -> Response {
    let code = StatusCode::from_u16(err.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &err.to_status_json())
}

async fn handle(State(state): State<Arc<ApiState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if let Some(token) = &state.token {
        let expected = format!("Bearer {token}");
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            return error_response(&ApiError::unauthorized("Unauthorized"));
        }
    }
    if parts.uri.path() == "/metrics" && parts.method == Method::GET {
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            state.requests.exposition(),
        )
            .into_response();
    }
    state
        .requests
        .count(&parts.method, parts.uri.path(), parts.uri.query());
    if let Some((namespace, pod)) = exec::exec_target(parts.uri.path()) {
        return exec::serve(state.clone(), parts, namespace, pod).await;
    }
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(e) => {
            return error_response(&ApiError::bad_request(format!("reading request body: {e}")))
        }
    };
    let query = match Query::parse(parts.uri.query()) {
        Ok(q) => q,
        Err(e) => {
            return error_response(&ApiError::bad_request(format!("invalid query string: {e}")))
        }
    };
    let method = parts.method.clone();
    let path = parts.uri.path().to_string();
    if let Some(endpoint) = authn::endpoint(&path) {
        return authn::serve(&state, endpoint, &method, &body)
            .unwrap_or_else(|e| error_response(&e));
    }
    let result = dispatch(&state, &method, &path, query, &parts.headers, &body).await;
    match result {
        Ok(resp) => resp,
        Err(err) => {
            tracing::debug!(%method, %path, code = err.code, message = %err, "request failed");
            error_response(&err)
        }
    }
}

async fn dispatch(
    state: &Arc<ApiState>,
    method: &Method,
    path: &str,
    query: Query,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let not_found = || errors::not_found_path();
    let route = route(path).ok_or_else(not_found)?;
    if !matches!(route, Route::Resource(_)) && method != Method::GET {
        return Err(ApiError::new(
            lab_apimachinery::status::StatusReason::MethodNotAllowed,
            format!("{method} is not supported on {path}"),
        ));
    }
    match route {
        Route::Version => Ok(json_response(StatusCode::OK, &discovery::version())),
        Route::Health => Ok((StatusCode::OK, "ok").into_response()),
        Route::CoreVersions => Ok(json_response(
            StatusCode::OK,
            &discovery::core_versions(state.addr),
        )),
        Route::Groups => Ok(json_response(
            StatusCode::OK,
            &discovery::groups(&state.registry),
        )),
        Route::OpenApiIndex => Ok(json_response(
            StatusCode::OK,
            &discovery::openapi_index(&state.registry),
        )),
        Route::OpenApi { group, version } => {
            discovery::openapi_group_version(&state.registry, &group, &version)
                .map(|v| json_response(StatusCode::OK, &v))
                .ok_or_else(not_found)
        }
        Route::Group(g) => discovery::group(&state.registry, &g)
            .map(|v| json_response(StatusCode::OK, &v))
            .ok_or_else(not_found),
        Route::Resources { group, version } => {
            discovery::resources(&state.registry, &group, &version)
                .map(|v| json_response(StatusCode::OK, &v))
                .ok_or_else(not_found)
        }
        Route::Resource(target) => {
            let info = state
                .registry
                .get(&target.group, &target.version, &target.plural)
                .ok_or_else(not_found)?;
            if !info.namespaced && target.namespace.is_some() {
                return Err(not_found());
            }
            let req = verbs::Req {
                state,
                info: &info,
                target: &target,
                query: &query,
                headers,
                body,
            };
            verbs::serve(method, req).await
        }
    }
}

/// An empty body response, used for streaming responses.
pub fn stream_response(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_verb_and_resource_with_watches_apart() {
        let counts = RequestCounts::default();
        let pods = "/api/v1/namespaces/x/pods";
        counts.count(&Method::GET, "/api/v1/namespaces/x/pods/p", None);
        counts.count(&Method::GET, pods, Some("labelSelector=a&watch=true"));
        counts.count(&Method::GET, pods, Some("watch=1"));
        counts.count(&Method::GET, pods, Some("watch=false"));
        counts.count(
            &Method::PATCH,
            "/apis/ferry.dev/v1alpha1/namespaces/x/drpairs/p/status",
            Some("fieldManager=x"),
        );
        counts.count(&Method::GET, "/apis/ferry.dev/v1alpha1/sites", None);
        let text = counts.exposition();
        for line in [
            "apiserver_request_total{verb=\"GET\",resource=\"pods\"} 2\n",
            "apiserver_request_total{verb=\"WATCH\",resource=\"pods\"} 2\n",
            "apiserver_request_total{verb=\"PATCH\",resource=\"drpairs/status\"} 1\n",
            "apiserver_request_total{verb=\"GET\",resource=\"sites\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert!(text.starts_with("# HELP apiserver_request_total"));
    }
}
