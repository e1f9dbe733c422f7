//! The lab CSI driver's SnapshotMetadata service: changed block tracking as KEP-3314 defines
//! it (kubernetes-csi/external-snapshot-metadata v1.1.0, `schema.proto`), answered from what
//! the storage knows, as an array's would.
//!
//! Snapshots are `cp --reflink` copies on the lab's XFS node storage (see [`super::backing`]),
//! so two snapshots of one volume share the physical extents of every block that was not
//! written between them. `GetMetadataDelta` compares the two snapshot files' extent maps
//! (`FS_IOC_FIEMAP`): a range is unchanged when both map it to the same physical blocks, and
//! changed otherwise (written, newly allocated, punched to a hole, or not comparable). No data
//! is read. Where snapshots are plain copies (no reflink), no physical block is shared and
//! every allocated range is reported: a correct, if useless, answer. `GetMetadataAllocated`
//! reports the target's allocated ranges.
//!
//! As the upstream sidecar, each call is authenticated and authorised on the site's API
//! server: the `security_token` goes through a TokenReview with this service's audience, and a
//! SubjectAccessReview checks that its user may `get` VolumeSnapshots in the namespace. (The
//! lab's own API server issues and reviews tokens but has no RBAC: it allows every
//! SubjectAccessReview; on `--control-plane kubernetes` kube-apiserver decides both.)
//!
//! On start the service listens on the site's address over TLS (a fresh CA per start) and
//! publishes itself as the cluster-scoped `SnapshotMetadataService` named after the driver,
//! with its address, audience and CA, installing that CRD first when the API server lacks it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use ferry_schemas::proto::snapshotmetadata::{
    snapshot_metadata_server::{SnapshotMetadata, SnapshotMetadataServer},
    BlockMetadata, BlockMetadataType, GetMetadataAllocatedRequest, GetMetadataAllocatedResponse,
    GetMetadataDeltaRequest, GetMetadataDeltaResponse,
};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use super::snapshots::{VolumeSnapshot, VolumeSnapshotContent};
use super::{storage, NodeContext, CSI_DRIVER};

/// The audience tokens presented to the lab's service must carry.
pub const AUDIENCE: &str = "snapshot-metadata.hostpath.lab.ferry.dev";
/// Ranges per response message when the client asks for none in particular.
const DEFAULT_MAX_RESULTS: usize = 256;

/// `spec` of a `cbt.storage.k8s.io/v1beta1` SnapshotMetadataService: where a CSI driver's
/// SnapshotMetadata gRPC service listens, the token audience it expects, and the CA that
/// signed its certificate (the upstream CRD, `client/config/crd/`, v1.1.0).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[kube(
    group = "cbt.storage.k8s.io",
    version = "v1beta1",
    kind = "SnapshotMetadataService",
    plural = "snapshotmetadataservices",
    shortname = "sms"
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotMetadataServiceSpec {
    /// The TCP endpoint address of the gRPC service (`host:port`).
    pub address: String,
    /// The audience a client's token must carry.
    pub audience: String,
    /// Certificate authority bundle (PEM, base64 in JSON) to validate the service.
    pub ca_cert: String,
}

/// One extent of a file, from `FS_IOC_FIEMAP` (linux/fiemap.h), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device.
    pub physical: u64,
    /// Length.
    pub length: u64,
    /// Whether `physical` identifies the data (not delayed, encoded, inline or unknown).
    pub comparable: bool,
}

/// The extents of `file`, in logical order (`FS_IOC_FIEMAP` through the `fiemap` crate),
/// after flushing its dirty data (`FIEMAP_FLAG_SYNC`, so delayed allocations have addresses).
///
/// # Errors
/// The `ioctl`'s error (e.g. `EOPNOTSUPP` on a filesystem without FIEMAP).
pub fn extents(file: &File) -> std::io::Result<Vec<Extent>> {
    use fiemap::{FiemapExtentFlags as F, FiemapFlags};
    // No stable physical address: delayed, encoded, inline, tail-packed or unknown.
    let incomparable = F::UNKNOWN
        | F::DELALLOC
        | F::ENCODED
        | F::DATA_ENCRYPTED
        | F::NOT_ALIGNED
        | F::DATA_INLINE
        | F::DATA_TAIL;
    fiemap::Fiemap::with_flags(file, FiemapFlags::SYNC)
        .map(|e| {
            e.map(|e| Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                length: e.fe_length,
                comparable: !e.fe_flags.intersects(incomparable),
            })
        })
        .collect()
}

/// The byte ranges `(offset, length)` of `[0, size)` whose content may differ between a file
/// mapped as `target` and one mapped as `base`: everything except ranges both map to the same
/// physical blocks at the same offsets, and ranges that are holes in both. Ascending, merged.
pub fn changed_ranges(base: &[Extent], target: &[Extent], size: u64) -> Vec<(u64, u64)> {
    // Every extent boundary, so that between two consecutive points each file maps one way.
    let mut points: Vec<u64> = vec![0, size];
    for e in base.iter().chain(target) {
        points.push(e.logical.min(size));
        points.push((e.logical + e.length).min(size));
    }
    points.sort_unstable();
    points.dedup();
    let covering = |extents: &[Extent], at: u64| -> Option<Extent> {
        let i = extents.partition_point(|e| e.logical + e.length <= at);
        extents.get(i).copied().filter(|e| e.logical <= at)
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    for pair in points.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let same = match (covering(base, from), covering(target, from)) {
            (None, None) => true,
            (Some(b), Some(t)) => {
                b.comparable
                    && t.comparable
                    && b.physical.wrapping_sub(b.logical) == t.physical.wrapping_sub(t.logical)
            }
            _ => false,
        };
        if same {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == from => last.1 += to - from,
            _ => out.push((from, to - from)),
        }
    }
    out
}

/// The service: resolves snapshots through the site's API server, reads extent maps from the
/// node's snapshot directory.
#[derive(Clone)]
pub struct Service {
    ctx: Arc<NodeContext>,
}

type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

impl Service {
    /// Checks `token` as the upstream sidecar does: a TokenReview with [`AUDIENCE`], then a
    /// SubjectAccessReview for `get volumesnapshots` in `namespace`.
    async fn authorise(&self, token: &str, namespace: &str) -> Result<(), Status> {
        let reviews: Api<TokenReview> = Api::all(self.ctx.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..TokenReview::default()
        };
        let reviewed = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Status::unavailable(format!("TokenReview: {e}")))?
            .status
            .unwrap_or_default();
        if reviewed.authenticated != Some(true) {
            return Err(Status::unauthenticated(format!(
                "security_token is not valid for audience {AUDIENCE}: {}",
                reviewed.error.unwrap_or_default()
            )));
        }
        let user = reviewed.user.unwrap_or_default();
        let access: Api<SubjectAccessReview> = Api::all(self.ctx.client.clone());
        let check = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username.clone(),
                uid: user.uid.clone(),
                groups: user.groups.clone(),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_string()),
                    verb: Some("get".into()),
                    group: Some("snapshot.storage.k8s.io".into()),
                    resource: Some("volumesnapshots".into()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let decided = access
            .create(&PostParams::default(), &check)
            .await
            .map_err(|e| Status::unavailable(format!("SubjectAccessReview: {e}")))?
            .status
            .unwrap_or_default();
        if !decided.allowed {
            return Err(Status::permission_denied(format!(
                "{} may not get volumesnapshots in namespace {namespace}",
                user.username.unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// The snapshot file of VolumeSnapshot `namespace/name`, which must be ready and this
    /// driver's.
    async fn snapshot_file(&self, namespace: &str, name: &str) -> Result<PathBuf, Status> {
        let snapshots: Api<VolumeSnapshot> = Api::namespaced(self.ctx.client.clone(), namespace);
        let vs = snapshots
            .get_opt(name)
            .await
            .map_err(|e| Status::unavailable(format!("reading VolumeSnapshot: {e}")))?
            .ok_or_else(|| {
                Status::not_found(format!("VolumeSnapshot {namespace}/{name} does not exist"))
            })?;
        let content_name = vs
            .status
            .and_then(|s| s.bound_volume_snapshot_content_name)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "VolumeSnapshot {namespace}/{name} is not bound"
                ))
            })?;
        let contents: Api<VolumeSnapshotContent> = Api::all(self.ctx.client.clone());
        let content = contents
            .get_opt(&content_name)
            .await
            .map_err(|e| Status::unavailable(format!("reading VolumeSnapshotContent: {e}")))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "VolumeSnapshotContent {content_name} does not exist"
                ))
            })?;
        if content.spec.driver != CSI_DRIVER {
            return Err(Status::invalid_argument(format!(
                "VolumeSnapshot {namespace}/{name} belongs to driver {}, not {CSI_DRIVER}",
                content.spec.driver
            )));
        }
        let handle = content
            .status
            .and_then(|s| s.snapshot_handle)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "VolumeSnapshot {namespace}/{name} is not ready"
                ))
            })?;
        self.handle_file(&handle)
    }

    /// The file of snapshot handle `handle`: a `snapcontent-*` file in the node's snapshot
    /// directory, nothing else.
    fn handle_file(&self, handle: &str) -> Result<PathBuf, Status> {
        let dir = self.ctx.snapshots_dir();
        let path = Path::new(handle);
        let inside = path.parent() == Some(dir.as_path())
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snapcontent-"));
        if !inside {
            return Err(Status::invalid_argument(format!(
                "{handle} is not a snapshot handle of driver {CSI_DRIVER}"
            )));
        }
        if !path.is_file() {
            return Err(Status::not_found(format!(
                "snapshot {handle} does not exist (deleted?) or is not a Block volume's"
            )));
        }
        Ok(path.to_path_buf())
    }
}

fn open_extents(path: &Path) -> Result<(Vec<Extent>, u64), Status> {
    let file = File::open(path)
        .map_err(|e| Status::internal(format!("opening {}: {e}", path.display())))?;
    let size = file
        .metadata()
        .map_err(|e| Status::internal(format!("stat {}: {e}", path.display())))?
        .len();
    let extents = extents(&file)
        .map_err(|e| Status::internal(format!("FIEMAP of {}: {e}", path.display())))?;
    Ok((extents, size))
}

/// Pages `ranges` from `starting_offset` into messages of at most `max_results` ranges.
fn pages(
    ranges: Vec<(u64, u64)>,
    capacity: u64,
    starting_offset: i64,
    max_results: i32,
) -> Vec<(i64, Vec<BlockMetadata>)> {
    let from = u64::try_from(starting_offset).unwrap_or(0);
    let per = usize::try_from(max_results)
        .ok()
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_MAX_RESULTS);
    let blocks: Vec<BlockMetadata> = ranges
        .into_iter()
        .filter(|(o, l)| o + l > from)
        .map(|(o, l)| {
            // A range the starting offset falls in starts there.
            let start = o.max(from);
            BlockMetadata {
                byte_offset: start as i64,
                size_bytes: (o + l - start) as i64,
            }
        })
        .collect();
    let capacity = capacity as i64;
    if blocks.is_empty() {
        return vec![(capacity, Vec::new())];
    }
    blocks.chunks(per).map(|c| (capacity, c.to_vec())).collect()
}

#[tonic::async_trait]
impl SnapshotMetadata for Service {
    type GetMetadataAllocatedStream = Stream<GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Stream<GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        request: Request<GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = request.into_inner();
        self.authorise(&r.security_token, &r.namespace).await?;
        let path = self.snapshot_file(&r.namespace, &r.snapshot_name).await?;
        let (target, size) = tokio::task::spawn_blocking(move || open_extents(&path))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let ranges = changed_ranges(&[], &target, size);
        let messages = pages(ranges, size, r.starting_offset, r.max_results)
            .into_iter()
            .map(|(capacity, block_metadata)| {
                Ok(GetMetadataAllocatedResponse {
                    block_metadata_type: BlockMetadataType::VariableLength as i32,
                    volume_capacity_bytes: capacity,
                    block_metadata,
                })
            });
        Ok(Response::new(Box::pin(tokio_stream::iter(
            messages.collect::<Vec<_>>(),
        ))))
    }

    async fn get_metadata_delta(
        &self,
        request: Request<GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = request.into_inner();
        self.authorise(&r.security_token, &r.namespace).await?;
        let target = self
            .snapshot_file(&r.namespace, &r.target_snapshot_name)
            .await?;
        let base = self.handle_file(&r.base_snapshot_id)?;
        let (ranges, size) = tokio::task::spawn_blocking(move || {
            let (base, _) = open_extents(&base)?;
            let (target, size) = open_extents(&target)?;
            Ok::<_, Status>((changed_ranges(&base, &target, size), size))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        tracing::debug!(
            target = %r.target_snapshot_name,
            ranges = ranges.len(),
            bytes = ranges.iter().map(|r| r.1).sum::<u64>(),
            "GetMetadataDelta"
        );
        let messages = pages(ranges, size, r.starting_offset, r.max_results)
            .into_iter()
            .map(|(capacity, block_metadata)| {
                Ok(GetMetadataDeltaResponse {
                    block_metadata_type: BlockMetadataType::VariableLength as i32,
                    volume_capacity_bytes: capacity,
                    block_metadata,
                })
            });
        Ok(Response::new(Box::pin(tokio_stream::iter(
            messages.collect::<Vec<_>>(),
        ))))
    }
}

/// Serves the SnapshotMetadata service of this node and publishes its
/// SnapshotMetadataService until aborted. Failures to start or publish are logged and retried.
pub async fn run(ctx: Arc<NodeContext>) {
    loop {
        match serve(ctx.clone()).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "snapshot metadata service; retrying"
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn serve(ctx: Arc<NodeContext>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let ca =
        ferry_tls::CertificateAuthority::generate(&format!("lab-{}-snapshot-metadata", ctx.site))
            .context("generating the service's CA")?;
    let material = ca
        .issue(&ctx.node_name, &[ctx.ip.to_string()])
        .context("issuing the service's certificate")?;
    let listener = tokio::net::TcpListener::bind((ctx.ip, 0))
        .await
        .context("binding the service's port")?;
    let address = listener.local_addr()?;
    let tls = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(&material.cert_pem, &material.key_pem),
    );
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("TLS configuration")?
        .add_service(SnapshotMetadataServer::new(Service { ctx: ctx.clone() }));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let serving = tokio::spawn(server.serve_with_incoming(incoming));
    publish(&ctx, &address.to_string(), material.ca_pem.as_bytes())
        .await
        .context("publishing the SnapshotMetadataService")?;
    tracing::info!(%address, "snapshot metadata service listening");
    serving.await?.context("serving")?;
    Ok(())
}

/// Installs the CRD if the API server lacks it, then applies the service object.
async fn publish(ctx: &NodeContext, address: &str, ca_pem: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    let mut crd = SnapshotMetadataService::crd();
    // kube-apiserver refuses CRDs of `*.k8s.io` groups without the API review's approval
    // (KEP-1111); upstream's CRD carries this one.
    crd.metadata.annotations = Some(
        [(
            "api-approved.kubernetes.io".to_string(),
            "https://github.com/kubernetes-csi/external-snapshot-metadata/pull/2".to_string(),
        )]
        .into(),
    );
    let name = crd.metadata.name.clone().unwrap_or_default();
    if crds.get_opt(&name).await?.is_none() {
        crds.create(&PostParams::default(), &crd)
            .await
            .with_context(|| format!("creating CRD {name}"))?;
    }
    let object = SnapshotMetadataService::new(
        CSI_DRIVER,
        SnapshotMetadataServiceSpec {
            address: address.to_string(),
            audience: AUDIENCE.to_string(),
            ca_cert: base64::engine::general_purpose::STANDARD.encode(ca_pem),
        },
    );
    let services: Api<SnapshotMetadataService> = Api::all(ctx.client.clone());
    // The CRD may take a moment to be served after it is created.
    crate::wait::until(
        "SnapshotMetadataService published",
        Duration::from_secs(30),
        || {
            let (services, object) = (services.clone(), object.clone());
            async move {
                services
                    .patch(
                        CSI_DRIVER,
                        &PatchParams::apply(storage::FIELD_MANAGER).force(),
                        &Patch::Apply(&object),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            comparable: true,
        }
    }

    #[test]
    fn shared_extents_are_unchanged_and_everything_else_is_reported() {
        // Base: [0,100) at 1000, [200,300) at 5000. Target shares [0,40) and [60,100) with
        // the base, has [40,60) rewritten elsewhere, a hole where the base had [200,300), and
        // new data at [400,450).
        let base = [e(0, 1000, 100), e(200, 5000, 100)];
        let target = [
            e(0, 1000, 40),
            e(40, 9000, 20),
            e(60, 1060, 40),
            e(400, 7000, 50),
        ];
        let changed = changed_ranges(&base, &target, 500);
        assert_eq!(changed, vec![(40, 20), (200, 100), (400, 50)]);
        // Unknown physical addresses are never trusted.
        let mut unknown = target;
        unknown[0].comparable = false;
        assert_eq!(changed_ranges(&base, &unknown, 500)[0], (0, 60));
        // A target shorter than its extents is clipped to its size.
        assert_eq!(changed_ranges(&[], &[e(0, 1, 1000)], 10), vec![(0, 10)]);
    }

    #[test]
    fn pages_start_at_the_offset_and_respect_max_results() {
        let ranges = vec![(0, 10), (20, 10), (40, 10)];
        let p = pages(ranges.clone(), 100, 25, 1);
        let got: Vec<(i64, i64)> = p
            .iter()
            .flat_map(|(_, b)| b.iter().map(|b| (b.byte_offset, b.size_bytes)))
            .collect();
        assert_eq!(got, vec![(25, 5), (40, 10)]);
        assert_eq!(p.len(), 2);
        assert_eq!(pages(Vec::new(), 100, 0, 0), vec![(100, Vec::new())]);
    }
}
