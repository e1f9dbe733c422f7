//! Changed block tracking through the Kubernetes SnapshotMetadata API (KEP-3314, CSI
//! changed block tracking; kubernetes-csi/external-snapshot-metadata v1.1.0).
//!
//! For a Block volume, the source keeps the VolumeSnapshot of the last generation the
//! destination committed (the *base*) until the next generation commits. When the CSI driver
//! of the new snapshot advertises a SnapshotMetadataService (`cbt.storage.k8s.io/v1beta1`,
//! named after the driver), the replicator:
//!
//! 1. requests a token for its own ServiceAccount with the service's `spec.audience`
//!    (TokenRequest, `serviceaccounts/<name>/token`), as the KEP's backup clients do;
//! 2. dials `spec.address` over TLS, trusting only `spec.caCert`;
//! 3. asks `GetMetadataDelta` for the ranges that differ between the base snapshot (its
//!    VolumeSnapshotContent's `snapshotHandle`) and the new VolumeSnapshot, page by page,
//!    resuming from the next offset if the stream breaks.
//!
//! The mover then reads and hashes only those ranges. Any doubt (no service, base gone, a
//! refused token, an error, a resized volume) gives [`ChangedBlocks::Unknown`] with the
//! reason, and the volume is read whole: the result is the same, only slower.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use ferry_schemas::proto::snapshotmetadata::{
    snapshot_metadata_client::SnapshotMetadataClient, GetMetadataDeltaRequest,
};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, PostParams};
use kube::{Api, Client};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::source::{ChangedBlocks, FullScanReason};
use ferry_runtime::volumes::{content_resource, snapshot_resource};

/// Group of the SnapshotMetadataService CRD.
pub const CBT_GROUP: &str = "cbt.storage.k8s.io";
/// Environment variable naming the replicator's ServiceAccount (the chart sets it).
pub const SERVICE_ACCOUNT_ENV: &str = "FERRY_SERVICE_ACCOUNT";
/// Environment variable naming the replicator's namespace (the chart sets it).
pub const NAMESPACE_ENV: &str = "POD_NAMESPACE";
/// Lifetime asked for the audience-scoped token, in seconds: one query's worth.
const TOKEN_SECONDS: i64 = 600;
/// Ranges asked per response message (the service may send fewer).
const MAX_RESULTS: i32 = 1024;
/// How long one GetMetadataDelta call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Resumptions after a broken stream, from the next offset not yet reported.
const MAX_RESUMES: u32 = 3;

/// `cbt.storage.k8s.io/v1beta1` SnapshotMetadataService, cluster-scoped.
pub fn service_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(CBT_GROUP, "v1beta1", "SnapshotMetadataService"),
        "snapshotmetadataservices",
    )
}

fn no_such_service(driver: &str, target: &str) -> ChangedBlocks {
    unknown(
        "no_service",
        format!("no SnapshotMetadataService {driver} (the CSI driver of {target})"),
    )
}

fn unknown(code: &'static str, message: String) -> ChangedBlocks {
    ChangedBlocks::Unknown(FullScanReason { code, message })
}

/// The base of a changed block tracking query: this site's source VolumeSnapshot of an
/// earlier generation, and the digest of its index of that generation.
#[derive(Clone, Copy, Debug)]
pub struct Base<'a> {
    /// The VolumeSnapshot's name.
    pub snapshot: &'a str,
    /// Its generation.
    pub generation: u64,
    /// [`crate::delta::BlockIndex::digest`] of this site's index of it.
    pub digest: [u8; 32],
}

/// What [`changed_blocks`] found: the answer, and whether the driver serves changed block
/// tracking at all (then the new snapshot is kept as the next sync's base).
#[derive(Debug)]
pub struct Answer {
    /// Changed ranges, or why they are not known.
    pub changed: ChangedBlocks,
    /// Whether a SnapshotMetadataService exists for the snapshot's driver.
    pub service: bool,
}

/// The driver and bound content of a ready VolumeSnapshot: `(driver, snapshotHandle)`.
async fn driver_and_handle(
    client: &Client,
    namespace: &str,
    snapshot: &str,
) -> Result<Option<(String, String)>, String> {
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &snapshot_resource());
    let Some(vs) = snapshots
        .get_opt(snapshot)
        .await
        .map_err(|e| format!("reading VolumeSnapshot {namespace}/{snapshot}: {e}"))?
    else {
        return Ok(None);
    };
    let Some(content) = vs.data["status"]["boundVolumeSnapshotContentName"].as_str() else {
        return Ok(None);
    };
    let contents: Api<DynamicObject> = Api::all_with(client.clone(), &content_resource());
    let Some(content) = contents
        .get_opt(content)
        .await
        .map_err(|e| format!("reading VolumeSnapshotContent {content}: {e}"))?
    else {
        return Ok(None);
    };
    let driver = content.data["spec"]["driver"].as_str().unwrap_or_default();
    let handle = content.data["status"]["snapshotHandle"].as_str();
    Ok(handle.map(|h| (driver.to_string(), h.to_string())))
}

/// A token for this replicator's ServiceAccount, scoped to `audience`.
async fn token(client: &Client, audience: &str) -> Result<String, String> {
    let (Ok(name), Ok(namespace)) = (
        std::env::var(SERVICE_ACCOUNT_ENV),
        std::env::var(NAMESPACE_ENV),
    ) else {
        return Err(format!(
            "{SERVICE_ACCOUNT_ENV} and {NAMESPACE_ENV} are not set: no ServiceAccount to request \
             a token for"
        ));
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_string()],
            expiration_seconds: Some(TOKEN_SECONDS),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    api.create_token_request(&name, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("TokenRequest for serviceaccount {namespace}/{name}: {e}"))?
        .status
        .map(|s| s.token)
        .ok_or_else(|| "the TokenRequest answer has no status".to_string())
}

/// Asks the CSI driver which byte ranges of `target` (a ready VolumeSnapshot in `namespace`)
/// differ from `base` (this site's snapshot and index of an earlier generation), or `None` when the volume has
/// no committed generation yet (then only whether the driver serves changed block tracking is
/// found out). Never fails: every problem becomes [`ChangedBlocks::Unknown`] naming the
/// object or step.
pub async fn changed_blocks(
    client: &Client,
    namespace: &str,
    base: Option<Base<'_>>,
    target: &str,
) -> Answer {
    let no_service = |changed| Answer {
        changed,
        service: false,
    };
    let driver = match driver_and_handle(client, namespace, target).await {
        Ok(Some((driver, _))) => driver,
        Ok(None) => {
            return no_service(unknown(
                "error",
                format!("VolumeSnapshot {namespace}/{target} is not bound to a ready content"),
            ))
        }
        Err(e) => return no_service(unknown("error", e)),
    };
    let services: Api<DynamicObject> = Api::all_with(client.clone(), &service_resource());
    let service = match services.get_opt(&driver).await {
        Ok(Some(service)) => service,
        // No such object, or no such CRD: the driver does not serve changed block tracking.
        Ok(None) => return no_service(no_such_service(&driver, target)),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            return no_service(no_such_service(&driver, target))
        }
        Err(e) => {
            return no_service(unknown(
                "error",
                format!("reading SnapshotMetadataService {driver}: {e}"),
            ))
        }
    };
    let with_service = |changed| Answer {
        changed,
        service: true,
    };
    let Some(Base {
        snapshot: base,
        generation: base_generation,
        digest: base_digest,
    }) = base
    else {
        return with_service(unknown(
            "no_base",
            format!("{target} is the volume's first generation: nothing to compare with"),
        ));
    };
    let base_handle = match driver_and_handle(client, namespace, base).await {
        Ok(Some((_, handle))) => handle,
        Ok(None) => {
            return with_service(unknown(
                "no_base",
                format!(
                    "the base VolumeSnapshot {namespace}/{base} of generation {base_generation} \
                     is gone or not ready"
                ),
            ))
        }
        Err(e) => return with_service(unknown("error", e)),
    };
    let spec = &service.data["spec"];
    let (Some(address), Some(audience), Some(ca)) = (
        spec["address"].as_str(),
        spec["audience"].as_str(),
        spec["caCert"].as_str(),
    ) else {
        return with_service(unknown(
            "error",
            format!("SnapshotMetadataService {driver}: spec.address, audience or caCert missing"),
        ));
    };
    let token = match token(client, audience).await {
        Ok(token) => token,
        Err(e) => return with_service(unknown("unauthorised", e)),
    };
    let request = GetMetadataDeltaRequest {
        security_token: token,
        namespace: namespace.to_string(),
        base_snapshot_id: base_handle,
        target_snapshot_name: target.to_string(),
        starting_offset: 0,
        max_results: MAX_RESULTS,
    };
    match query(address, ca, request).await {
        Ok(extents) => with_service(ChangedBlocks::Known {
            base_generation,
            base_digest,
            extents,
        }),
        Err((code, e)) => with_service(unknown(
            code,
            format!("GetMetadataDelta at SnapshotMetadataService {driver} ({address}): {e}"),
        )),
    }
}

/// Dials `address` trusting `ca_base64` (a base64 PEM bundle, as the CRD's `caCert`) and
/// collects every range of the delta, resuming a broken stream from its next offset.
async fn query(
    address: &str,
    ca_base64: &str,
    mut request: GetMetadataDeltaRequest,
) -> Result<Vec<(u64, u64)>, (&'static str, String)> {
    let error = |e: String| ("error", e);
    let ca = base64::engine::general_purpose::STANDARD
        .decode(ca_base64)
        .map_err(|e| error(format!("spec.caCert is not base64: {e}")))?;
    let endpoint = Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| error(format!("spec.address: {e}")))?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .map_err(|e| error(format!("TLS: {e}")))?
        .timeout(CALL_TIMEOUT)
        .connect_timeout(Duration::from_secs(10));
    let channel = endpoint.connect().await.map_err(|e| {
        error(format!(
            "connecting: {}",
            crate::mover::agent::error_chain(&e)
        ))
    })?;
    let mut client = SnapshotMetadataClient::new(channel);
    // Ranges by offset: a resumed stream may repeat the range it broke in.
    let mut ranges: BTreeMap<u64, u64> = BTreeMap::new();
    let mut resumes = 0;
    loop {
        let outcome: Result<(), tonic::Status> = async {
            let mut stream = client
                .get_metadata_delta(request.clone())
                .await?
                .into_inner();
            while let Some(message) = stream.message().await? {
                for block in message.block_metadata {
                    let (Ok(offset), Ok(size)) = (
                        u64::try_from(block.byte_offset),
                        u64::try_from(block.size_bytes),
                    ) else {
                        return Err(tonic::Status::data_loss(format!(
                            "a negative range: offset {} size {}",
                            block.byte_offset, block.size_bytes
                        )));
                    };
                    let end = ranges.entry(offset).or_default();
                    *end = (*end).max(size);
                }
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => break,
            Err(status) => {
                let code = match status.code() {
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => "unauthorised",
                    tonic::Code::NotFound => "no_base",
                    _ => "error",
                };
                let retriable = matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Aborted | tonic::Code::DeadlineExceeded
                );
                if !retriable || resumes >= MAX_RESUMES {
                    return Err((code, format!("{}: {}", status.code(), status.message())));
                }
                resumes += 1;
                let next = ranges.iter().next_back().map_or(0, |(o, s)| o + s);
                request.starting_offset = i64::try_from(next).unwrap_or(i64::MAX);
            }
        }
    }
    Ok(ranges.into_iter().collect())
}
