//! A node paused for a few seconds (SIGSTOP: what a stalled disk or an overloaded machine looks
//! like from outside) resumes to a backlog of requests whose clients gave up meanwhile. Those
//! ordinary timeouts (streams reset before the node accepted them) must not cost the whole
//! connection: h2's rapid-reset guard answers more than its limit with a GOAWAY that fails
//! every stream, the patient ones too.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use kvfleet_e2e::NodeProcess;
use kvfleet_proto::v1::kv_client::KvClient;
use kvfleet_proto::v1::{GetRequest, PutRequest};
use tonic::transport::Channel;

fn signal(node: &NodeProcess, signal: &str) {
    let pid = node.pid().expect("the node runs").to_string();
    assert!(Command::new("kill").args([signal, &pid]).status().expect("kill(1)").success());
}

type Answer = Result<tonic::Response<kvfleet_proto::v1::GetResponse>, tonic::Status>;

/// `count` GETs of `k` on the connection of `kv`, each with its own deadline.
fn gets(kv: &KvClient<Channel>, count: usize, timeout: Duration) -> Vec<tokio::task::JoinHandle<Answer>> {
    (0..count)
        .map(|_| {
            let mut kv = kv.clone();
            let mut request = tonic::Request::new(GetRequest {
                header: None,
                key: Bytes::from("k"),
                consistency: 0,
                max_staleness_ms: 0,
            });
            request.set_timeout(timeout);
            tokio::spawn(async move { kv.get(request).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_timeouts_piled_up_on_a_paused_node_do_not_kill_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start("n1", dir.path(), &["--bootstrap"]);
    // One HTTP/2 connection for everything below.
    let mut kv = node.kv();
    kv.put(PutRequest { header: None, key: Bytes::from("k"), value: Bytes::from("v") }).await.unwrap();

    signal(&node, "-STOP");
    let impatient = gets(&kv, 300, Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let patient = gets(&kv, 10, Duration::from_secs(20));
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&node, "-CONT");

    let mut timed_out = 0;
    for task in impatient {
        if task.await.unwrap().is_err() {
            timed_out += 1;
        }
    }
    assert!(timed_out > 200, "the pause was meant to make the impatient requests time out ({timed_out})");
    for task in patient {
        let answer = tokio::time::timeout(Duration::from_secs(30), task).await.expect("bounded").unwrap();
        let answer = answer.expect("a patient request on the same connection is answered after the pause");
        assert_eq!(answer.into_inner().value, Bytes::from("v"));
    }
}
