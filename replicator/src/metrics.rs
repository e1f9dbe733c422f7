//! Prometheus metrics of the replicator, exposed in the OpenMetrics 1.0 text format
//! (<https://github.com/prometheus/OpenMetrics/blob/main/specification/OpenMetrics.md>).
//!
//! | metric | type | labels | unit |
//! |---|---|---|---|
//! | `ferry_replication_lag_seconds` | gauge | namespace, pair | seconds |
//! | `ferry_sync_duration_seconds` | histogram | namespace, pair | seconds |
//! | `ferry_bytes_shipped_total` | counter | namespace, pair | bytes |
//! | `ferry_blocks_scanned_total` | counter | namespace, pair | blocks |
//! | `ferry_rpo_violations_total` | counter | namespace, pair | violations |
//! | `ferry_chunks_rejected_total` | counter | namespace, pair, reason | chunks |
//! | `ferry_status_write_failures_total` | counter | namespace, pair | writes |
//!
//! [`Metrics`] owns the registry and offers typed helpers; [`serve`] (or [`serve_listener`])
//! exposes `GET /metrics` and `GET /healthz` over HTTP with axum.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;
use tokio::net::TcpListener;

/// Content type of the `/metrics` response: OpenMetrics text 1.0.0 (OpenMetrics spec,
/// "Protocol Negotiation").
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the `ferry_sync_duration_seconds` buckets, in seconds: 0.1 s to 10 min
/// (600 s); longer syncs land in the implicit `+Inf` bucket.
pub const SYNC_DURATION_BUCKETS_SECONDS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 180.0, 300.0, 450.0, 600.0,
];

/// Labels identifying a DR pair: the `DRPair`'s namespace and name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairLabels {
    /// Namespace of the `DRPair` object.
    pub namespace: String,
    /// Name of the `DRPair` object.
    pub pair: String,
}

impl PairLabels {
    /// Labels for the pair `namespace/pair`.
    pub fn new(namespace: impl Into<String>, pair: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            pair: pair.into(),
        }
    }
}

/// Labels of `ferry_chunks_rejected_total` and `ferry_full_scans_total`: the pair plus a reason
/// from a small fixed set (why a chunk was rejected, why a volume was read whole).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    namespace: String,
    pair: String,
    reason: String,
}

type SyncHistograms = Family<PairLabels, Histogram, fn() -> Histogram>;

fn sync_histogram() -> Histogram {
    Histogram::new(SYNC_DURATION_BUCKETS_SECONDS)
}

/// The replicator's metrics and the registry they are registered in.
///
/// Cheap to share behind an [`Arc`]; every method takes `&self` and is thread-safe.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    lag_seconds: Family<PairLabels, Gauge<f64, AtomicU64>>,
    sync_duration_seconds: SyncHistograms,
    bytes_shipped: Family<PairLabels, Counter>,
    blocks_scanned: Family<PairLabels, Counter>,
    rpo_violations: Family<PairLabels, Counter>,
    chunks_rejected: Family<RejectLabels, Counter>,
    status_write_failures: Family<PairLabels, Counter>,
    changed_block_reads: Family<PairLabels, Counter>,
    full_scans: Family<RejectLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates the metrics, registered in a new empty [`Registry`].
    pub fn new() -> Self {
        Self::with_registry(Registry::default())
    }

    /// Creates the metrics and registers them in `registry`, which may carry a prefix or
    /// constant labels (e.g. [`Registry::with_labels`] for a `site` label) or other metrics.
    ///
    /// Names (counters get the `_total` suffix and unit-bearing metrics their unit suffix
    /// when encoded, OpenMetrics "Metric types"): `ferry_replication_lag_seconds`,
    /// `ferry_sync_duration_seconds`, `ferry_bytes_shipped_total`,
    /// `ferry_blocks_scanned_total`, `ferry_rpo_violations_total`,
    /// `ferry_chunks_rejected_total`, `ferry_status_write_failures_total`,
    /// `ferry_changed_block_reads_total`, `ferry_full_scans_total`.
    pub fn with_registry(mut registry: Registry) -> Self {
        let lag_seconds = Family::<PairLabels, Gauge<f64, AtomicU64>>::default();
        let sync_duration_seconds = SyncHistograms::new_with_constructor(sync_histogram);
        let bytes_shipped = Family::<PairLabels, Counter>::default();
        let blocks_scanned = Family::<PairLabels, Counter>::default();
        let rpo_violations = Family::<PairLabels, Counter>::default();
        let chunks_rejected = Family::<RejectLabels, Counter>::default();
        let status_write_failures = Family::<PairLabels, Counter>::default();
        let changed_block_reads = Family::<PairLabels, Counter>::default();
        let full_scans = Family::<RejectLabels, Counter>::default();
        registry.register_with_unit(
            "ferry_replication_lag",
            "Age of the newest generation committed at the destination, in seconds",
            Unit::Seconds,
            lag_seconds.clone(),
        );
        registry.register_with_unit(
            "ferry_sync_duration",
            "Duration of one sync (capture to commit of a generation), in seconds",
            Unit::Seconds,
            sync_duration_seconds.clone(),
        );
        registry.register(
            "ferry_bytes_shipped",
            "Bytes shipped to the destination (after compression), in bytes",
            bytes_shipped.clone(),
        );
        registry.register(
            "ferry_blocks_scanned",
            "Blocks scanned by the delta engine while looking for changes",
            blocks_scanned.clone(),
        );
        registry.register(
            "ferry_rpo_violations",
            "Times the replication lag exceeded the pair's RPO",
            rpo_violations.clone(),
        );
        registry.register(
            "ferry_chunks_rejected",
            "Chunks the destination rejected, by reason",
            chunks_rejected.clone(),
        );
        registry.register(
            "ferry_status_write_failures",
            "DRPair status writes the API server refused or did not answer (retried)",
            status_write_failures.clone(),
        );
        registry.register(
            "ferry_changed_block_reads",
            "Block volumes of a sync read through CSI changed block tracking (KEP-3314)",
            changed_block_reads.clone(),
        );
        registry.register(
            "ferry_full_scans",
            "Block volumes with a base read whole instead of through changed block tracking, by reason",
            full_scans.clone(),
        );
        Self {
            registry,
            changed_block_reads,
            full_scans,
            lag_seconds,
            sync_duration_seconds,
            bytes_shipped,
            blocks_scanned,
            rpo_violations,
            chunks_rejected,
            status_write_failures,
        }
    }

    /// Records one finished sync of `pair`: observes `duration_seconds` (seconds) in
    /// `ferry_sync_duration_seconds`, adds `bytes` (bytes shipped) to
    /// `ferry_bytes_shipped_total` and `blocks` (blocks scanned) to `ferry_blocks_scanned_total`.
    pub fn observe_sync(&self, pair: &PairLabels, duration_seconds: f64, bytes: u64, blocks: u64) {
        self.sync_duration_seconds
            .get_or_create(pair)
            .observe(duration_seconds);
        self.bytes_shipped.get_or_create(pair).inc_by(bytes);
        self.blocks_scanned.get_or_create(pair).inc_by(blocks);
    }

    /// Counts one Block volume of `pair` read through changed block tracking in
    /// `ferry_changed_block_reads_total`.
    pub fn changed_blocks_read(&self, pair: &PairLabels) {
        self.changed_block_reads.get_or_create(pair).inc();
    }

    /// Counts one Block volume of `pair` read whole in `ferry_full_scans_total` with label
    /// `reason`, one of the fixed codes of [`crate::source::FullScanReason::code`].
    pub fn full_scan(&self, pair: &PairLabels, reason: &str) {
        self.full_scans
            .get_or_create(&RejectLabels {
                namespace: pair.namespace.clone(),
                pair: pair.pair.clone(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Sets `ferry_replication_lag_seconds` of `pair` to `lag_seconds` (seconds since the
    /// capture time of the newest generation committed at the destination).
    pub fn set_lag(&self, pair: &PairLabels, lag_seconds: f64) {
        self.lag_seconds.get_or_create(pair).set(lag_seconds);
    }

    /// Counts one RPO violation of `pair` in `ferry_rpo_violations_total`.
    pub fn rpo_violation(&self, pair: &PairLabels) {
        self.rpo_violations.get_or_create(pair).inc();
    }

    /// Counts one chunk of `pair` rejected by the destination in `ferry_chunks_rejected_total`
    /// with label `reason` (keep it to a small fixed set, e.g. `checksum`, `decode`,
    /// `out_of_order`: every distinct value is a new time series).
    pub fn chunk_rejected(&self, pair: &PairLabels, reason: &str) {
        self.chunks_rejected
            .get_or_create(&RejectLabels {
                namespace: pair.namespace.clone(),
                pair: pair.pair.clone(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one failed DRPair status write of `pair` in `ferry_status_write_failures_total`.
    pub fn status_write_failed(&self, pair: &PairLabels) {
        self.status_write_failures.get_or_create(pair).inc();
    }

    /// The registry the metrics are registered in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Encodes every metric of the registry in the OpenMetrics 1.0 text format, ending with
    /// the `# EOF` line; serve it with [`OPENMETRICS_CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Writing into a String cannot fail; only an unencodable metric can.
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        metrics.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

/// The axum router: `GET /metrics` (OpenMetrics text, [`OPENMETRICS_CONTENT_TYPE`]) and
/// `GET /healthz` (200, body `ok`). Other paths answer 404.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .with_state(metrics)
}

/// Binds `addr` and serves [`router`] until `shutdown` completes, then finishes in-flight
/// requests and returns.
///
/// # Errors
/// The I/O error of binding `addr` (e.g. address in use) or of accepting connections.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_listener(TcpListener::bind(addr).await?, metrics, shutdown).await
}

/// Like [`serve`] on an already bound `listener`: bind `127.0.0.1:0` yourself and read
/// `listener.local_addr()` to learn the port (what tests do).
///
/// # Errors
/// The I/O error of accepting connections.
pub async fn serve_listener(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_names_units_and_values() {
        let m = Metrics::new();
        let p = PairLabels::new("shop", "db");
        m.observe_sync(&p, 3.0, 4096, 16);
        m.observe_sync(&p, 700.0, 1, 1);
        m.set_lag(&p, 12.5);
        m.rpo_violation(&p);
        m.chunk_rejected(&p, "checksum");
        let text = m.encode();
        for line in [
            "# TYPE ferry_replication_lag_seconds gauge",
            "# UNIT ferry_replication_lag_seconds seconds",
            r#"ferry_replication_lag_seconds{namespace="shop",pair="db"} 12.5"#,
            "# TYPE ferry_sync_duration_seconds histogram",
            r#"ferry_sync_duration_seconds_bucket{le="0.1",namespace="shop",pair="db"} 0"#,
            r#"ferry_sync_duration_seconds_bucket{le="5.0",namespace="shop",pair="db"} 1"#,
            r#"ferry_sync_duration_seconds_bucket{le="600.0",namespace="shop",pair="db"} 1"#,
            r#"ferry_sync_duration_seconds_bucket{le="+Inf",namespace="shop",pair="db"} 2"#,
            r#"ferry_sync_duration_seconds_count{namespace="shop",pair="db"} 2"#,
            r#"ferry_bytes_shipped_total{namespace="shop",pair="db"} 4097"#,
            r#"ferry_blocks_scanned_total{namespace="shop",pair="db"} 17"#,
            r#"ferry_rpo_violations_total{namespace="shop",pair="db"} 1"#,
            r#"ferry_chunks_rejected_total{namespace="shop",pair="db",reason="checksum"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
