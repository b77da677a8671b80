//! What operators look at: gRPC health, server reflection (what grpcurl uses), Prometheus
//! metrics, and the per-range load report with hot keys.

use std::time::Duration;

use bytes::Bytes;
use kvfleet_e2e::NodeProcess;
use kvfleet_proto::v1::LoadReportRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start("n1", dir.path(), &["--bootstrap"]);
    let mut health = HealthClient::new(node.channel());
    for service in ["", "kvfleet.v1.Kv", "kvfleet.v1.Admin"] {
        let response = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "service {service:?}");
    }

    let mut reflection = ServerReflectionClient::new(node.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let response = responses.message().await.unwrap().expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["kvfleet.v1.Kv", "kvfleet.v1.Admin", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_load_report_show_the_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let node = NodeProcess::start("n1", dir.path(), &["--bootstrap", "--metrics-listen", &metrics_addr]);
    let client = node.client();
    for i in 0..3000u32 {
        let key = if i % 2 == 0 { Bytes::from_static(b"hot") } else { Bytes::from(format!("cold{i}")) };
        client.put(key, Bytes::from_static(b"v")).await.unwrap();
    }
    // Rates are closed once a second; wait for a tick to include this traffic.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = std::time::Instant::now();
    let report = loop {
        let report =
            node.admin().load_report(LoadReportRequest { sample_keys: 16, hot_keys: 3 }).await.unwrap().into_inner();
        if report.ranges.first().is_some_and(|r| r.writes_per_sec > 0.0) || started.elapsed() > Duration::from_secs(10)
        {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(report.load_accounting);
    let range = &report.ranges[0];
    assert!(range.writes_per_sec > 0.0, "{range:?}");
    assert!(range.key_samples.len() <= 16);
    assert_eq!(range.hot_keys.first().map(|h| h.key.as_ref()), Some(&b"hot"[..]), "{:?}", range.hot_keys);

    let mut stream = tokio::net::TcpStream::connect(&metrics_addr).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut body)).await.unwrap().unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{}", &body[..body.len().min(200)]);
    let line =
        body.lines().find(|l| l.starts_with("kvfleet_requests_total{op=\"put\",code=\"ok\"}")).expect("put counter");
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 3000.0, "{line}");
    assert!(body.contains("kvfleet_commit_group_size"));
}
