//! The metrics endpoint: values recorded through `Metrics` come back from `GET /metrics` in the
//! OpenMetrics text format, and `GET /healthz` answers `ok`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ferry_replicator::metrics::{serve_listener, Metrics, PairLabels, OPENMETRICS_CONTENT_TYPE};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(10);

#[tokio::test]
async fn serves_metrics_and_healthz() {
    let metrics = Arc::new(Metrics::new());
    let pair = PairLabels::new("shop", "orders-db");
    metrics.observe_sync(&pair, 42.0, 1_048_576, 256);
    metrics.set_lag(&pair, 7.25);
    metrics.rpo_violation(&pair);
    metrics.chunk_rejected(&pair, "checksum");
    metrics.chunk_rejected(&pair, "checksum");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_listener(listener, metrics.clone(), async {
        let _ = stopped.await;
    }));

    let client = Client::builder(TokioExecutor::new()).build_http::<Body>();
    let get = |path: &str| {
        let request = Request::get(format!("http://{addr}{path}"))
            .body(Body::empty())
            .unwrap();
        let client = client.clone();
        async move {
            let response = timeout(STEP, client.request(request))
                .await
                .expect("request timed out")
                .unwrap();
            let status = response.status();
            let content_type = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = timeout(
                STEP,
                axum::body::to_bytes(Body::new(response.into_body()), 1 << 20),
            )
            .await
            .expect("body timed out")
            .unwrap();
            (
                status,
                content_type,
                String::from_utf8(body.to_vec()).unwrap(),
            )
        }
    };

    let (status, content_type, text) = get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type.as_deref(), Some(OPENMETRICS_CONTENT_TYPE));
    for line in [
        r#"ferry_replication_lag_seconds{namespace="shop",pair="orders-db"} 7.25"#,
        r#"ferry_sync_duration_seconds_sum{namespace="shop",pair="orders-db"} 42.0"#,
        r#"ferry_sync_duration_seconds_count{namespace="shop",pair="orders-db"} 1"#,
        r#"ferry_sync_duration_seconds_bucket{le="30.0",namespace="shop",pair="orders-db"} 0"#,
        r#"ferry_sync_duration_seconds_bucket{le="60.0",namespace="shop",pair="orders-db"} 1"#,
        r#"ferry_bytes_shipped_total{namespace="shop",pair="orders-db"} 1048576"#,
        r#"ferry_blocks_scanned_total{namespace="shop",pair="orders-db"} 256"#,
        r#"ferry_rpo_violations_total{namespace="shop",pair="orders-db"} 1"#,
        r#"ferry_chunks_rejected_total{namespace="shop",pair="orders-db",reason="checksum"} 2"#,
        "# EOF",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }

    // Values are live: a later observation shows in the next scrape.
    metrics.set_lag(&pair, 1.5);
    let (_, _, text) = get("/metrics").await;
    assert!(
        text.contains(r#"ferry_replication_lag_seconds{namespace="shop",pair="orders-db"} 1.5"#)
    );

    let (status, _, body) = get("/healthz").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    let (status, _, _) = get("/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    drop(client);
    stop.send(()).unwrap();
    timeout(STEP, server)
        .await
        .expect("server did not shut down")
        .unwrap()
        .unwrap();
}
