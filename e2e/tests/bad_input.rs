//! Bad input gets a clear error naming the problem and the limit, never a crash and never a
//! partial write.

use bytes::Bytes;
use kvfleet_e2e::NodeProcess;
use kvfleet_proto::errors::{limit_detail, not_owner_detail};
use kvfleet_proto::v1::mutation::Op;
use kvfleet_proto::v1::{
    BatchRequest, GetRequest, ListRangesRequest, Mutation, PublishRoutingRequest, PutRequest, RangeDescriptor,
    RangeState, Replica, ReplicaRole, ScanRequest,
};
use tonic::Code;

fn put(key: Bytes, value: Bytes) -> Mutation {
    Mutation { op: Op::Put as i32, key, value }
}

async fn absent(node: &NodeProcess, key: &[u8]) -> bool {
    !node
        .kv()
        .get(GetRequest { header: None, key: Bytes::copy_from_slice(key), consistency: 0, max_staleness_ms: 0 })
        .await
        .unwrap()
        .into_inner()
        .found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_is_enforced_with_a_named_error() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(
        "n1",
        dir.path(),
        &["--bootstrap", "--max-key-bytes", "64", "--max-value-bytes", "1024", "--max-batch-bytes", "4096"],
    );
    let mut kv = node.kv();

    let long_key = Bytes::from(vec![b'k'; 65]);
    let status = kv.put(PutRequest { header: None, key: long_key.clone(), value: Bytes::from("v") }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "max_key_bytes exceeded: 65 bytes, the limit is 64 bytes");
    let detail = limit_detail(&status).expect("typed LimitExceeded");
    assert_eq!((detail.limit.as_str(), detail.size, detail.max), ("max_key_bytes", 65, 64));
    assert!(
        kv.get(GetRequest { header: None, key: long_key, consistency: 0, max_staleness_ms: 0 }).await.is_err(),
        "reads check the key limit too"
    );

    let status = kv
        .put(PutRequest { header: None, key: Bytes::from("big"), value: Bytes::from(vec![0u8; 1025]) })
        .await
        .unwrap_err();
    assert_eq!(status.message(), "max_value_bytes exceeded: 1025 bytes, the limit is 1024 bytes");
    assert!(absent(&node, b"big").await);

    // A batch over the limit writes none of its mutations.
    let mutations: Vec<Mutation> =
        (0..5).map(|i| put(Bytes::from(format!("b{i}")), Bytes::from(vec![1u8; 1000]))).collect();
    let status = kv.batch(BatchRequest { header: None, mutations }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("max_batch_bytes exceeded: 5010 bytes"), "{}", status.message());
    assert!(absent(&node, b"b0").await);

    // One bad mutation spoils the batch: nothing from it lands.
    let mutations =
        vec![put(Bytes::from("ok1"), Bytes::from("v")), put(Bytes::from("ok2"), Bytes::from(vec![0u8; 2000]))];
    assert!(kv.batch(BatchRequest { header: None, mutations }).await.is_err());
    assert!(absent(&node, b"ok1").await);

    // A message far beyond any limit is refused by the transport, with sizes in the message.
    let huge = Bytes::from(vec![0u8; 32 * 1024 * 1024]);
    let status = kv.put(PutRequest { header: None, key: Bytes::from("huge"), value: huge }).await.unwrap_err();
    assert!(matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument), "{status:?}");
    assert!(absent(&node, b"huge").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::start("n1", dir.path(), &["--bootstrap"]);
    let mut kv = node.kv();

    let status = kv.batch(BatchRequest { header: None, mutations: vec![] }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("at least one mutation"));

    let no_op = Mutation { op: 0, key: Bytes::from("x"), value: Bytes::new() };
    let status = kv.batch(BatchRequest { header: None, mutations: vec![no_op] }).await.unwrap_err();
    assert!(status.message().contains("mutation 0 has no op"), "{}", status.message());

    let status = kv
        .scan(ScanRequest {
            header: None,
            start_key: Bytes::from("m"),
            end_key: Bytes::from("a"),
            limit: 10,
            keys_only: false,
            consistency: 0,
            max_staleness_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("not after start"), "{}", status.message());

    // A batch whose keys straddle a range boundary is refused whole, with a NotOwner detail.
    node.split(1, "m", 3).await;
    let mutations = vec![put(Bytes::from("a"), Bytes::from("1")), put(Bytes::from("z"), Bytes::from("2"))];
    let status = kv.batch(BatchRequest { header: None, mutations }).await.unwrap_err();
    assert!(status.message().contains("batch spans ranges"), "{}", status.message());
    assert_eq!(not_owner_detail(&status).and_then(|d| d.hint).map(|h| h.range_id), Some(3));
    assert!(absent(&node, b"a").await);

    // Bytes that are not a protobuf message, straight onto the Put method.
    let garbage =
        raw_unary(&node, "/kvfleet.v1.Kv/Put", Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x01])).await;
    assert!(matches!(garbage.code(), Code::Internal | Code::InvalidArgument), "{garbage:?}");

    // Junk on the TCP port is not gRPC at all.
    {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(&node.address).await.unwrap();
        let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02garbage").await;
    }

    assert!(node.is_running(), "the node survived");
    kv.put(PutRequest { header: None, key: Bytes::from("alive"), value: Bytes::from("yes") })
        .await
        .expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_routing_maps_and_unknown_methods_get_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start("n1", dir.path(), &["--bootstrap"]);
    let leader = Replica {
        node_id: "n9".into(),
        address: "127.0.0.1:9".into(),
        role: ReplicaRole::Leader as i32,
        raft_id: 0,
        behind_entries: None,
        membership: 0,
    };
    let reversed = RangeDescriptor {
        range_id: 77,
        start_key: Bytes::from("m"),
        end_key: Bytes::from("c"),
        generation: 1,
        state: RangeState::Active as i32,
        replicas: vec![leader],
        ..Default::default()
    };
    let status = node.admin().publish_routing(PublishRoutingRequest { ranges: vec![reversed] }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("range 77 [m, c) is empty or reversed"), "{}", status.message());
    let hints = node.admin().list_ranges(ListRangesRequest {}).await.unwrap().into_inner().routing;
    assert!(hints.is_empty(), "nothing of a refused map is installed: {hints:?}");

    for path in ["/kvfleet.v1.Kv/Frobnicate", "/kvfleet.v1.NoSuchService/Get"] {
        let status = raw_unary(&node, path, Bytes::new()).await;
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
        assert!(
            status.message().starts_with(&format!("unknown method {path}: this node serves kvfleet.v1.Kv")),
            "{status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_answers_each_request_with_its_own_outcome_and_refuses_more_than_its_limit() {
    use kvfleet_proto::v1::{
        BundleRequest, BundledRequest, DeleteRequest, RequestHeader, bundled_request::Request as Asked,
        bundled_response::Response as Answer,
    };
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start("n1", dir.path(), &["--bootstrap", "--max-key-bytes", "64"]);
    let mut kv = node.kv();
    kv.put(PutRequest { header: None, key: Bytes::from("old"), value: Bytes::from("1") }).await.unwrap();
    let wrong_range = RequestHeader { range_id: 99, generation: 1, allow_forward: false };
    let asked = vec![
        Asked::Put(PutRequest { header: None, key: Bytes::from("a"), value: Bytes::from("1") }),
        Asked::Put(PutRequest { header: None, key: Bytes::from(vec![b'k'; 65]), value: Bytes::from("2") }),
        Asked::Delete(DeleteRequest { header: None, key: Bytes::from("old") }),
        Asked::Get(GetRequest {
            header: Some(wrong_range),
            key: Bytes::from("a"),
            consistency: 0,
            max_staleness_ms: 0,
        }),
    ];
    let mut requests: Vec<BundledRequest> = asked.into_iter().map(|r| BundledRequest { request: Some(r) }).collect();
    requests.push(BundledRequest { request: None });
    let mut answers = kv.bundle(BundleRequest { requests }).await.unwrap().into_inner();
    let mut by_index = std::collections::BTreeMap::new();
    while let Some(message) = answers.message().await.unwrap() {
        for answer in message.responses {
            assert!(by_index.insert(answer.index, answer.response.unwrap()).is_none(), "index {} twice", answer.index);
        }
    }
    assert_eq!(by_index.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2, 3, 4], "every request answered once");
    assert!(matches!(by_index[&0], Answer::Put(_)), "{:?}", by_index[&0]);
    assert!(matches!(by_index[&2], Answer::Delete(_)), "{:?}", by_index[&2]);
    let status = |index: u32| match by_index[&index].clone() {
        Answer::Error(error) => kvfleet_proto::errors::bundled_status(error),
        other => panic!("request {index} should have failed: {other:?}"),
    };
    assert_eq!(status(1).message(), "max_key_bytes exceeded: 65 bytes, the limit is 64 bytes");
    assert_eq!(limit_detail(&status(1)).map(|d| d.max), Some(64));
    assert!(not_owner_detail(&status(3)).is_some(), "a typed NotOwner: {:?}", status(3));
    assert_eq!(status(4).code(), Code::InvalidArgument);
    assert!(status(4).message().contains("names no operation"), "{:?}", status(4));
    // The good requests took effect, the bad ones did not spoil them.
    assert!(!absent(&node, b"a").await);
    assert!(absent(&node, b"old").await);

    // Answers too large for one message (6 x 900 KB, over a client's 4 MiB default) come in
    // several.
    for i in 0..6 {
        let value = Bytes::from(vec![b'v'; 900_000]);
        kv.put(PutRequest { header: None, key: Bytes::from(format!("large{i}")), value }).await.unwrap();
    }
    let requests = (0..6)
        .map(|i| BundledRequest {
            request: Some(Asked::Get(GetRequest {
                header: None,
                key: Bytes::from(format!("large{i}")),
                consistency: 0,
                max_staleness_ms: 0,
            })),
        })
        .collect();
    let mut answers = kv.bundle(BundleRequest { requests }).await.unwrap().into_inner();
    let (mut messages, mut values) = (0, 0);
    while let Some(message) = answers.message().await.unwrap() {
        messages += 1;
        for answer in message.responses {
            assert!(
                matches!(answer.response, Some(Answer::Get(ref get)) if get.value.len() == 900_000),
                "{}",
                answer.index
            );
            values += 1;
        }
    }
    assert_eq!(values, 6);
    assert!(messages >= 6, "900 KB answers leave one per message: {messages} messages");

    let too_many = (0..1025)
        .map(|_| BundledRequest {
            request: Some(Asked::Put(PutRequest { header: None, key: Bytes::from("x"), value: Bytes::new() })),
        })
        .collect();
    let refused = kv.bundle(BundleRequest { requests: too_many }).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(refused.message(), "a bundle holds at most 1024 requests; this one holds 1025");
    assert!(absent(&node, b"x").await, "nothing of a refused bundle is written");
}

/// Sends `payload` as the body of a unary gRPC call, bypassing protobuf encoding.
async fn raw_unary(node: &NodeProcess, path: &'static str, payload: Bytes) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(node.channel());
    grpc.ready().await.expect("channel ready");
    let result: Result<tonic::Response<Bytes>, tonic::Status> = grpc
        .unary(tonic::Request::new(payload), tonic::codegen::http::uri::PathAndQuery::from_static(path), RawCodec)
        .await;
    result.expect_err("garbage must be refused")
}

#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
