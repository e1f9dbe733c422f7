//! ServiceAccount tokens as the lab's API server issues and reviews them: the TokenRequest
//! API (`POST serviceaccounts/<name>/token`), TokenReview (`authentication.k8s.io/v1`) and
//! SubjectAccessReview (`authorization.k8s.io/v1`), which a CSI driver's SnapshotMetadata
//! service uses to authenticate and authorise its clients (KEP-3314).
//!
//! Follows the Kubernetes API reference for TokenRequest, TokenReview and
//! SubjectAccessReview, with two differences a test can rely on being stated:
//! - tokens are random opaque strings held in memory, not signed JWTs; a restarted site
//!   forgets them (clients request short-lived tokens per use, so they ask again);
//! - the lab's API server has no RBAC: every SubjectAccessReview is allowed, and says so in
//!   its `reason`. On a real control plane (`--control-plane kubernetes`) kube-apiserver
//!   answers all three itself.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use axum::http::{Method, StatusCode};
use axum::response::Response;
use lab_apimachinery::status::ApiError;
use rand::RngCore;
use serde_json::{json, Value};

use super::{json_response, verbs, ApiState};

/// Default lifetime of a requested token, as kube-apiserver's: one hour.
const DEFAULT_EXPIRATION: Duration = Duration::from_secs(3600);
/// Shortest lifetime a TokenRequest may ask for (kube-apiserver's validation).
const MIN_EXPIRATION_SECONDS: i64 = 600;
/// Longest lifetime a TokenRequest may ask for (kube-apiserver's validation: 2^32 seconds).
const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;
/// The API server's own audience, which a TokenReview without audiences checks for.
const API_AUDIENCE: &str = "https://kubernetes.default.svc";

/// A token the server issued: whose, for which audiences, until when.
#[derive(Clone, Debug)]
struct Issued {
    namespace: String,
    service_account: String,
    uid: String,
    audiences: Vec<String>,
    expires: SystemTime,
}

/// Tokens issued by this server process.
#[derive(Debug, Default)]
pub struct Tokens(Mutex<HashMap<String, Issued>>);

/// Which of the three endpoints `path` is, if any.
pub enum Endpoint {
    /// `serviceaccounts/<name>/token` in a namespace.
    TokenRequest {
        /// Namespace.
        namespace: String,
        /// ServiceAccount name.
        name: String,
    },
    /// `tokenreviews`.
    TokenReview,
    /// `subjectaccessreviews`.
    SubjectAccessReview,
}

/// The endpoint `path` names, or `None` for every other path.
pub fn endpoint(path: &str) -> Option<Endpoint> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["api", "v1", "namespaces", ns, "serviceaccounts", name, "token"] => {
            Some(Endpoint::TokenRequest {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => Some(Endpoint::TokenReview),
        ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"] => {
            Some(Endpoint::SubjectAccessReview)
        }
        _ => None,
    }
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    k8s_openapi::jiff::Timestamp::from_second(secs as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Serves `endpoint` (only `POST`, as the real server: these are create-only).
///
/// # Errors
/// 405 for another method, 400 for a body that is not the kind's JSON, 404 for a
/// ServiceAccount that does not exist.
pub fn serve(
    state: &ApiState,
    endpoint: Endpoint,
    method: &Method,
    body: &[u8],
) -> Result<Response, ApiError> {
    let (group, plural) = match &endpoint {
        Endpoint::TokenRequest { .. } => ("", "serviceaccounts/token"),
        Endpoint::TokenReview => ("authentication.k8s.io", "tokenreviews"),
        Endpoint::SubjectAccessReview => ("authorization.k8s.io", "subjectaccessreviews"),
    };
    if method != Method::POST {
        return Err(ApiError::method_not_allowed(group, plural, method.as_str()));
    }
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("{plural}: body is not JSON: {e}")))?;
    let answer = match endpoint {
        Endpoint::TokenRequest { namespace, name } => {
            request_token(state, &namespace, &name, request)?
        }
        Endpoint::TokenReview => review(state, request),
        Endpoint::SubjectAccessReview => {
            let mut answer = request;
            answer["status"] = json!({
                "allowed": true,
                "reason": "the lab API server has no RBAC: it authorises every request"
            });
            answer
        }
    };
    Ok(json_response(StatusCode::CREATED, &answer))
}

fn request_token(
    state: &ApiState,
    namespace: &str,
    name: &str,
    mut request: Value,
) -> Result<Value, ApiError> {
    let info = state
        .registry
        .get("", "v1", "serviceaccounts")
        .ok_or_else(|| ApiError::not_found("", "serviceaccounts", name))?;
    let account = verbs::read(&state.store, &info, namespace, name)?
        .ok_or_else(|| ApiError::not_found("", "serviceaccounts", name))?;
    let spec = &request["spec"];
    let seconds = spec["expirationSeconds"]
        .as_i64()
        .unwrap_or(DEFAULT_EXPIRATION.as_secs() as i64);
    if seconds < MIN_EXPIRATION_SECONDS {
        return Err(ApiError::bad_request(format!(
            "spec.expirationSeconds: may not specify a duration less than {MIN_EXPIRATION_SECONDS} seconds"
        )));
    }
    if seconds > MAX_EXPIRATION_SECONDS {
        return Err(ApiError::bad_request(format!(
            "spec.expirationSeconds: may not specify a duration larger than {MAX_EXPIRATION_SECONDS} seconds"
        )));
    }
    // No audience: the API server's own, as kube-apiserver's default.
    let audiences: Vec<String> = match spec["audiences"].as_array() {
        Some(list) if !list.is_empty() => list
            .iter()
            .filter_map(|a| a.as_str().map(String::from))
            .collect(),
        _ => vec![API_AUDIENCE.to_string()],
    };
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let expires = SystemTime::now() + Duration::from_secs(seconds as u64);
    let issued = Issued {
        namespace: namespace.to_string(),
        service_account: name.to_string(),
        uid: account["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        audiences: audiences.clone(),
        expires,
    };
    let mut tokens = state.tokens.0.lock().unwrap_or_else(|p| p.into_inner());
    // Forget expired tokens as new ones are issued, so the map stays small.
    let now = SystemTime::now();
    tokens.retain(|_, t| t.expires > now);
    tokens.insert(token.clone(), issued);
    request["apiVersion"] = json!("authentication.k8s.io/v1");
    request["kind"] = json!("TokenRequest");
    request["spec"]["audiences"] = json!(audiences);
    request["spec"]["expirationSeconds"] = json!(seconds);
    request["status"] = json!({"token": token, "expirationTimestamp": rfc3339(expires)});
    Ok(request)
}

fn review(state: &ApiState, mut request: Value) -> Value {
    let token = request["spec"]["token"].as_str().unwrap_or_default();
    // No audiences asked for: the API server's own, as kube-apiserver reviews.
    let mut wanted: Vec<String> = request["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if wanted.is_empty() {
        wanted.push(API_AUDIENCE.to_string());
    }
    let issued = state
        .tokens
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(token)
        .cloned();
    let status = match issued {
        None => json!({"authenticated": false, "error": "token is not one this server issued"}),
        Some(t) if t.expires <= SystemTime::now() => {
            json!({"authenticated": false, "error": "token has expired"})
        }
        Some(t) => {
            // The token must carry one of the audiences asked for (TokenReview spec).
            let audiences: Vec<&String> =
                t.audiences.iter().filter(|a| wanted.contains(a)).collect();
            if audiences.is_empty() {
                json!({"authenticated": false, "error": "token audiences do not match the requested audiences"})
            } else {
                json!({
                    "authenticated": true,
                    "audiences": audiences,
                    "user": {
                        "username": format!("system:serviceaccount:{}:{}", t.namespace, t.service_account),
                        "uid": t.uid,
                        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", t.namespace), "system:authenticated"],
                    }
                })
            }
        }
    };
    request["status"] = status;
    request
}
