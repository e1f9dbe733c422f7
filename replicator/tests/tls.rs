//! Mutual TLS between replicators: a tonic server with `server_tls_config` serving the standard
//! gRPC health service accepts a client whose certificate comes from the same CA and refuses
//! clients with no certificate or one from another CA.

use std::net::SocketAddr;
use std::time::Duration;

use ferry_replicator::tls::{
    client_tls_config, server_tls_config, CertificateAuthority, TlsMaterial,
};
use tokio::time::timeout;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Server};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Upper bound for one connect + health check, in seconds.
const STEP: Duration = Duration::from_secs(10);

fn sans() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}

/// Connects with `tls` and asks for the overall health ("" service).
async fn check(addr: SocketAddr, tls: ClientTlsConfig) -> Result<i32, String> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| format!("tls config: {e}"))?
        .connect_timeout(STEP)
        .timeout(STEP)
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|e| format!("check: {e:?}"))?;
    Ok(response.into_inner().status)
}

#[tokio::test]
async fn mutual_tls_accepts_only_clients_of_the_same_ca() {
    let ca = CertificateAuthority::generate("ferry-test-ca").unwrap();
    let server = ca.issue("site-a", &sans()).unwrap();
    let good_client = ca.issue("site-b", &sans()).unwrap();
    let other_ca = CertificateAuthority::generate("other-ca").unwrap();
    let foreign = other_ca.issue("site-x", &sans()).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(
        Server::builder()
            .tls_config(server_tls_config(&server))
            .unwrap()
            .add_service(health)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );

    // Same CA: SERVING, with the server name checked against "localhost" and against the IP.
    for name in ["localhost", "127.0.0.1"] {
        let status = timeout(STEP, check(addr, client_tls_config(&good_client, name)))
            .await
            .expect("health check timed out")
            .unwrap_or_else(|e| panic!("client of the same CA via {name}: {e}"));
        assert_eq!(status, ServingStatus::Serving as i32);
    }

    // No client certificate: the server requires one.
    let anonymous = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&good_client.ca_pem))
        .domain_name("localhost");
    let result = timeout(STEP, check(addr, anonymous))
        .await
        .expect("anonymous client timed out instead of failing");
    // RFC 8446 §4.4.2.4: the server aborts with a `certificate_required` alert.
    let err = result.expect_err("client without certificate was served");
    assert!(err.contains("CertificateRequired"), "{err}");

    // Client certificate from another CA (the client itself trusts our CA).
    let impostor = TlsMaterial {
        ca_pem: ca.ca_pem().to_owned(),
        ..foreign.clone()
    };
    let result = timeout(STEP, check(addr, client_tls_config(&impostor, "localhost")))
        .await
        .expect("foreign client timed out instead of failing");
    // RFC 8446 §6.2: the server aborts with an `unknown_ca` alert.
    let err = result.expect_err("client of another CA was served");
    assert!(err.contains("UnknownCA"), "{err}");

    // And a client trusting only the other CA refuses our server.
    let result = timeout(STEP, check(addr, client_tls_config(&foreign, "localhost")))
        .await
        .expect("client of another CA timed out instead of failing");
    let err = result.expect_err("server of another CA was accepted");
    assert!(err.contains("UnknownIssuer"), "{err}");

    // Still serving after the refusals; then shut down.
    let status = timeout(
        STEP,
        check(addr, client_tls_config(&good_client, "localhost")),
    )
    .await
    .expect("health check timed out")
    .unwrap();
    assert_eq!(status, ServingStatus::Serving as i32);
    stop.send(()).unwrap();
    timeout(STEP, server_task)
        .await
        .expect("server did not shut down")
        .unwrap()
        .unwrap();
}
