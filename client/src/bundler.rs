//! Coalesces the gets, puts and deletes that a process's tasks send one node at the same moment
//! into `Bundle` calls, as TiKV's client batches its commands: under load, one gRPC call carries
//! many requests, which saves the node (and the client) most of a call's cost per request. No
//! request waits for company: a request goes out at once when a call slot is free, and only
//! requests that queued while every slot was busy share a call.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfleet_proto::errors::bundled_status;
use kvfleet_proto::v1::kv_client::KvClient;
use kvfleet_proto::v1::{
    BundleRequest, BundleResponse, BundledRequest, DeleteRequest, DeleteResponse, GetRequest, GetResponse, PutRequest,
    PutResponse, bundled_request, bundled_response,
};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tonic::{Code, Status};

use crate::channels::ChannelPool;

/// How requests to one node are coalesced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleConfig {
    /// Most requests in one call; 1 sends every request in its own call.
    pub max_requests: usize,
    /// Calls in flight to one node at once. Requests arriving while all are in flight queue, and
    /// leave together in the next call.
    pub max_in_flight: usize,
}

impl Default for BundleConfig {
    fn default() -> Self {
        BundleConfig { max_requests: 128, max_in_flight: 8 }
    }
}

/// A bundle's requests stop at about this many bytes (a larger request goes alone), so that a
/// bundle of requests that each fit a node's message limit fits it too.
const MAX_BUNDLE_BYTES: usize = 1 << 20;

/// The largest answer message a bundle call takes: the node splits its answers into messages of
/// about `MAX_BUNDLE_BYTES`, but a single answer (a large value) is as large as it is.
const MAX_ANSWER_MESSAGE_BYTES: usize = 256 << 20;

/// How long a node that refused a bundle gets each request alone before it is asked again (it
/// may have been upgraded meanwhile).
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(60);

/// A call gives its slot up after this long even if unanswered: the slots exist to gather
/// requests while calls are busy, and a call held up (a range electing a leader, a node that
/// stopped answering) must not keep the node's other requests waiting.
const SLOT_HELD_AT_MOST: Duration = Duration::from_millis(50);

/// One queued request and where its answer goes.
struct Pending {
    request: bundled_request::Request,
    reply: oneshot::Sender<Result<bundled_response::Response, Status>>,
}

/// The bundling queues of every node, one task each, started on first use.
pub(crate) struct Bundlers {
    config: BundleConfig,
    channels: ChannelPool,
    call_timeout: Duration,
    nodes: Mutex<HashMap<String, Arc<NodeQueue>>>,
}

impl Bundlers {
    pub(crate) fn new(config: BundleConfig, channels: ChannelPool, call_timeout: Duration) -> Self {
        Bundlers { config, channels, call_timeout, nodes: Mutex::default() }
    }

    pub(crate) async fn get(&self, address: &str, request: GetRequest) -> Result<GetResponse, Status> {
        match self.call(address, bundled_request::Request::Get(request)).await? {
            bundled_response::Response::Get(response) => Ok(response),
            other => Err(mismatch("get", &other)),
        }
    }

    pub(crate) async fn put(&self, address: &str, request: PutRequest) -> Result<PutResponse, Status> {
        match self.call(address, bundled_request::Request::Put(request)).await? {
            bundled_response::Response::Put(response) => Ok(response),
            other => Err(mismatch("put", &other)),
        }
    }

    pub(crate) async fn delete(&self, address: &str, request: DeleteRequest) -> Result<DeleteResponse, Status> {
        match self.call(address, bundled_request::Request::Delete(request)).await? {
            bundled_response::Response::Delete(response) => Ok(response),
            other => Err(mismatch("delete", &other)),
        }
    }

    async fn call(
        &self,
        address: &str,
        request: bundled_request::Request,
    ) -> Result<bundled_response::Response, Status> {
        let node = self.node(address, false);
        if self.config.max_requests <= 1 {
            return node.call.alone(request).await;
        }
        // A free slot means nothing waits in the queue (slots go to the queue's task first):
        // the request leaves at once from this task, without a hop through the queue.
        if let Ok(slot) = node.slots.clone().try_acquire_owned() {
            return holding(slot, node.call.alone(request)).await;
        }
        let (reply, answer) = oneshot::channel();
        let mut pending = Pending { request, reply };
        if let Err(mpsc::error::SendError(returned)) = node.queue.send(pending) {
            // The queue's task ended (its runtime shut down): a new queue takes the request.
            pending = returned;
            let _ = self.node(address, true).queue.send(pending);
        }
        match answer.await {
            Ok(Ok(bundled_response::Response::Error(error))) => Err(bundled_status(error)),
            Ok(answer) => answer,
            Err(_) => Err(Status::cancelled(format!("the call carrying this request to {address} was dropped"))),
        }
    }

    /// The node's queue; with `replace`, a new one if its task ended (callers racing to replace
    /// it get the same new one).
    fn node(&self, address: &str, replace: bool) -> Arc<NodeQueue> {
        let mut nodes = self.nodes.lock();
        if let Some(node) = nodes.get(address)
            && !(replace && node.queue.is_closed())
        {
            return node.clone();
        }
        let (queue, requests) = mpsc::unbounded_channel();
        let call = Call {
            address: address.to_string(),
            channels: self.channels.clone(),
            call_timeout: self.call_timeout,
            bundles_refused: Arc::default(),
        };
        let slots = Arc::new(Semaphore::new(self.config.max_in_flight.max(1)));
        if self.config.max_requests > 1 {
            tokio::spawn(send_queued(requests, slots.clone(), call.clone(), self.config.max_requests));
        }
        let node = Arc::new(NodeQueue { queue, slots, call });
        nodes.insert(address.to_string(), node.clone());
        node
    }
}

fn mismatch(asked: &str, answer: &bundled_response::Response) -> Status {
    Status::internal(format!("the node answered a {asked} with {answer:?}"))
}

/// One node's queue, call slots and calls.
struct NodeQueue {
    queue: mpsc::UnboundedSender<Pending>,
    /// Calls in flight to the node, lone or bundled, take one each.
    slots: Arc<Semaphore>,
    call: Call,
}

/// The task of one node's queue: sends what queued up, a bundle per free slot. It ends when the
/// queue's sender is gone (the client was dropped).
async fn send_queued(
    mut requests: mpsc::UnboundedReceiver<Pending>,
    slots: Arc<Semaphore>,
    call: Call,
    max_requests: usize,
) {
    // A request taken from the queue that did not fit in the last bundle.
    let mut left_over: Option<Pending> = None;
    loop {
        let first = match left_over.take() {
            Some(first) => first,
            None => match requests.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut bytes = first.request.encoded_len();
        let mut bundle = vec![first];
        while bundle.len() < max_requests
            && let Ok(next) = requests.try_recv()
        {
            bytes += next.request.encoded_len();
            if bytes > MAX_BUNDLE_BYTES {
                left_over = Some(next);
                break;
            }
            bundle.push(next);
        }
        // Requests whose callers stopped waiting (their attempt timed out) are not sent.
        bundle.retain(|pending| !pending.reply.is_closed());
        let call = call.clone();
        tokio::spawn(async move { holding(slot, call.send(bundle)).await });
    }
}

/// Runs `call` holding a call slot until it ends or for `SLOT_HELD_AT_MOST`, whichever is first.
async fn holding<T>(slot: OwnedSemaphorePermit, call: impl Future<Output = T>) -> T {
    tokio::pin!(call);
    tokio::select! {
        ended = &mut call => ended,
        () = tokio::time::sleep(SLOT_HELD_AT_MOST) => {
            drop(slot);
            call.await
        }
    }
}

/// Calls to one node: a bundle, or a lone request.
#[derive(Clone)]
struct Call {
    address: String,
    channels: ChannelPool,
    call_timeout: Duration,
    /// When the node last answered a bundle UNIMPLEMENTED (a version without `Bundle`): for
    /// `ASK_AGAIN_AFTER` from then, every request goes in its own call.
    bundles_refused: Arc<Mutex<Option<Instant>>>,
}

impl Call {
    async fn send(&self, bundle: Vec<Pending>) {
        let refused_lately = self.bundles_refused.lock().is_some_and(|at| at.elapsed() < ASK_AGAIN_AFTER);
        if bundle.len() > 1 && !refused_lately {
            match self.bundle(bundle).await {
                Ok(()) => return,
                Err(unserved) => {
                    tracing::info!(node = %self.address, "the node does not serve Bundle; sending requests one by one");
                    *self.bundles_refused.lock() = Some(Instant::now());
                    return self.each_alone(unserved).await;
                }
            }
        }
        self.each_alone(bundle).await
    }

    /// Sends `bundle` as one call and hands each answer to its caller as it arrives. Gives the
    /// requests back if the node does not serve `Bundle`.
    async fn bundle(&self, bundle: Vec<Pending>) -> Result<(), Vec<Pending>> {
        let requests = bundle.iter().map(|p| BundledRequest { request: Some(p.request.clone()) }).collect();
        let mut replies: Vec<Option<Pending>> = bundle.into_iter().map(Some).collect();
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let mut answers = match self.open_bundle(requests).await {
            Ok(answers) => answers,
            Err(status) if status.code() == Code::Unimplemented => return Err(replies.into_iter().flatten().collect()),
            Err(status) => {
                answer_rest(replies, &status);
                return Ok(());
            }
        };
        let ended = loop {
            let Ok(message) = tokio::time::timeout_at(deadline, answers.message()).await else {
                // Dropping the stream stops the node's work on the rest, as with a lone call.
                let timeout = self.call_timeout;
                break Status::deadline_exceeded(format!(
                    "{} answered only part of a bundle within {timeout:?}",
                    self.address
                ));
            };
            match message {
                Ok(Some(message)) => {
                    for answer in message.responses {
                        let Some(pending) = replies.get_mut(answer.index as usize).and_then(Option::take) else {
                            continue;
                        };
                        let answer = answer.response.ok_or_else(|| Status::internal("the node sent an empty answer"));
                        let _ = pending.reply.send(answer);
                    }
                    if replies.iter().all(Option::is_none) {
                        return Ok(());
                    }
                }
                Ok(None) => {
                    // Like a connection lost mid-call: whether the rest took effect is unknown.
                    break Status::unavailable(format!(
                        "{} ended a bundle before answering every request",
                        self.address
                    ));
                }
                Err(status) => break status,
            }
        };
        answer_rest(replies, &ended);
        Ok(())
    }

    async fn open_bundle(&self, requests: Vec<BundledRequest>) -> Result<tonic::Streaming<BundleResponse>, Status> {
        let mut client = self.client()?.max_decoding_message_size(MAX_ANSWER_MESSAGE_BYTES);
        let mut request = tonic::Request::new(BundleRequest { requests });
        request.set_timeout(self.call_timeout);
        Ok(client.bundle(request).await?.into_inner())
    }

    async fn each_alone(&self, bundle: Vec<Pending>) {
        let alone = bundle.into_iter().map(|pending| async move {
            let answer = self.alone(pending.request).await;
            let _ = pending.reply.send(answer);
        });
        futures::future::join_all(alone).await;
    }

    async fn alone(&self, asked: bundled_request::Request) -> Result<bundled_response::Response, Status> {
        use bundled_request::Request as Asked;
        use bundled_response::Response as Answer;
        let mut client = self.client()?;
        let timeout = self.call_timeout;
        Ok(match asked {
            Asked::Get(req) => Answer::Get(client.get(timed(req, timeout)).await?.into_inner()),
            Asked::Put(req) => Answer::Put(client.put(timed(req, timeout)).await?.into_inner()),
            Asked::Delete(req) => Answer::Delete(client.delete(timed(req, timeout)).await?.into_inner()),
        })
    }

    fn client(&self) -> Result<KvClient<tonic::transport::Channel>, Status> {
        let channel = self.channels.channel(&self.address).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(KvClient::new(channel))
    }
}

fn timed<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Answers every request not answered yet with `status`.
fn answer_rest(replies: Vec<Option<Pending>>, status: &Status) {
    for pending in replies.into_iter().flatten() {
        let _ = pending.reply.send(Err(status.clone()));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use kvfleet_proto::bundle::{self, BundleAnswers};
    use kvfleet_proto::errors::{limit_detail, limit_status};
    use kvfleet_proto::v1::kv_server::{Kv, KvServer};
    use kvfleet_proto::v1::*;
    use tokio::task::JoinHandle;
    use tonic::{Request, Response};

    use super::*;
    use crate::channels::ChannelConfig;

    /// A Kv server for these tests: puts succeed, a get of `pause` takes `PAUSE` and one of `slow`
    /// takes `SLOW`, a put of `big` fails with a limit, and it counts the calls it gets (a request
    /// that came over the network rather than out of a bundle has a remote address).
    #[derive(Clone, Default)]
    struct Server {
        serves_bundles: bool,
        bundles: Arc<AtomicUsize>,
        bundled: Arc<AtomicUsize>,
        alone: Arc<AtomicUsize>,
        /// Slow gets served to their end.
        slow_finished: Arc<AtomicUsize>,
    }

    impl Server {
        fn count_alone<T>(&self, request: &Request<T>) {
            if request.remote_addr().is_some() {
                self.alone.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    const PAUSE: Duration = Duration::from_millis(300);
    const SLOW: Duration = Duration::from_millis(3000);

    #[tonic::async_trait]
    impl Kv for Server {
        async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
            self.count_alone(&request);
            let key = request.into_inner().key;
            match &key[..] {
                b"pause" => tokio::time::sleep(PAUSE).await,
                b"slow" => {
                    tokio::time::sleep(SLOW).await;
                    self.slow_finished.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            Ok(Response::new(GetResponse { header: None, found: true, value: key }))
        }

        async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
            self.count_alone(&request);
            if request.get_ref().key == "big" {
                return Err(limit_status("max_value_bytes", 9, 8));
            }
            Ok(Response::new(PutResponse { header: None }))
        }

        async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
            Ok(Response::new(DeleteResponse { header: None }))
        }

        async fn scan(&self, _: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn batch(&self, _: Request<BatchRequest>) -> Result<Response<BatchResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        type BundleStream = BundleAnswers;

        async fn bundle(&self, request: Request<BundleRequest>) -> Result<Response<BundleAnswers>, Status> {
            if !self.serves_bundles {
                return Err(Status::unimplemented("an older node"));
            }
            self.bundles.fetch_add(1, Ordering::Relaxed);
            self.bundled.fetch_add(request.get_ref().requests.len(), Ordering::Relaxed);
            Ok(Response::new(bundle::serve(self, request)?))
        }
    }

    /// Starts `server` on a loopback port; returns its address.
    async fn start(server: Server) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(KvServer::new(server))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        address
    }

    /// A server for one test and bundlers calling it (one call slot), each request its own task.
    struct Caller {
        server: Server,
        address: String,
        bundlers: Arc<Bundlers>,
    }

    impl Caller {
        async fn start(server: Server, max_requests: usize, call_timeout: Duration) -> Self {
            let address = start(server.clone()).await;
            let config = BundleConfig { max_requests, max_in_flight: 1 };
            let bundlers = Bundlers::new(config, ChannelPool::new(ChannelConfig::default()), call_timeout);
            Caller { server, address, bundlers: Arc::new(bundlers) }
        }

        async fn bundling(serves_bundles: bool) -> Self {
            Self::start(Server { serves_bundles, ..Server::default() }, 128, Duration::from_secs(5)).await
        }

        fn get(&self, key: &'static str) -> JoinHandle<Result<GetResponse, Status>> {
            let (bundlers, address) = (self.bundlers.clone(), self.address.clone());
            let request = GetRequest { header: None, key: Bytes::from(key), consistency: 0, max_staleness_ms: 0 };
            tokio::spawn(async move { bundlers.get(&address, request).await })
        }

        fn put(&self, key: &'static str, value_bytes: usize) -> JoinHandle<Result<PutResponse, Status>> {
            let (bundlers, address) = (self.bundlers.clone(), self.address.clone());
            let request =
                PutRequest { header: None, key: Bytes::from(key), value: Bytes::from(vec![1u8; value_bytes]) };
            tokio::spawn(async move { bundlers.put(&address, request).await })
        }

        fn count(&self, calls: &AtomicUsize) -> usize {
            calls.load(Ordering::Relaxed)
        }
    }

    #[tokio::test]
    async fn concurrent_requests_share_calls_and_a_slow_one_holds_up_no_other() {
        let caller = Caller::bundling(true).await;
        // The first request takes the one call slot; the rest, sent at the same moment, queue
        // behind it and leave together when it gives the slot up.
        let first = caller.get("pause");
        let started = Instant::now();
        let slow = caller.get("slow");
        let refused = caller.put("big", 1);
        let puts: Vec<_> = (0..48).map(|_| caller.put("k", 1)).collect();
        for put in puts {
            put.await.unwrap().unwrap();
        }
        // Answered while the slow get of their bundle still runs.
        assert!(started.elapsed() < SLOW / 2, "the puts waited {:?} for a slow get", started.elapsed());
        let refused = refused.await.unwrap().unwrap_err();
        assert_eq!(limit_detail(&refused).map(|d| d.limit), Some("max_value_bytes".to_string()), "{refused:?}");
        assert_eq!(slow.await.unwrap().unwrap().value, Bytes::from("slow"));
        assert!(started.elapsed() >= SLOW);
        assert_eq!(first.await.unwrap().unwrap().value, Bytes::from("pause"));
        // The first request went alone; the 50 behind it shared one call.
        let server = &caller.server;
        let calls = (caller.count(&server.alone), caller.count(&server.bundles), caller.count(&server.bundled));
        assert_eq!(calls, (1, 1, 50));
    }

    #[tokio::test]
    async fn a_bundle_stops_at_its_byte_budget() {
        let caller = Caller::bundling(true).await;
        let first = caller.get("pause");
        // 12 puts of 400 KB: 4.8 MB together, more than the server decodes in one message.
        let puts: Vec<_> = (0..12).map(|_| caller.put("k", 400_000)).collect();
        for put in puts {
            put.await.unwrap().unwrap();
        }
        first.await.unwrap().unwrap();
        // Two of them fit in MAX_BUNDLE_BYTES, three do not.
        assert_eq!((caller.count(&caller.server.bundles), caller.count(&caller.server.bundled)), (6, 12));
    }

    #[tokio::test]
    async fn a_call_held_up_gives_its_slot_up() {
        let caller = Caller::bundling(true).await;
        let slow = caller.get("slow");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started = Instant::now();
        caller.put("k", 1).await.unwrap().unwrap();
        assert!(started.elapsed() < SLOW / 2, "a put waited {:?} for the only slot", started.elapsed());
        slow.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_bundle_past_its_deadline_is_answered_and_the_node_stops_its_work() {
        let server = Server { serves_bundles: true, ..Server::default() };
        let caller = Caller::start(server, 128, Duration::from_millis(500)).await;
        let first = caller.get("pause");
        let started = Instant::now();
        let slow = caller.get("slow");
        caller.put("k", 1).await.unwrap().unwrap();
        let late = slow.await.unwrap().unwrap_err();
        assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
        assert!(started.elapsed() < SLOW / 2, "answered after {:?}", started.elapsed());
        first.await.unwrap().unwrap();
        assert_eq!(caller.count(&caller.server.bundles), 1, "the slow get and the put shared a call");
        tokio::time::sleep(SLOW).await;
        assert_eq!(caller.count(&caller.server.slow_finished), 0, "the node stopped serving the late get");
    }

    #[tokio::test]
    async fn a_node_without_bundles_gets_each_request_alone() {
        let caller = Caller::bundling(false).await;
        let first = caller.get("pause");
        let puts: Vec<_> = (0..10).map(|_| caller.put("k", 1)).collect();
        for put in puts {
            put.await.unwrap().unwrap();
        }
        first.await.unwrap().unwrap();
        assert_eq!((caller.count(&caller.server.bundles), caller.count(&caller.server.alone)), (0, 11));
    }

    #[tokio::test]
    async fn bundling_off_sends_every_request_alone() {
        let server = Server { serves_bundles: true, ..Server::default() };
        let caller = Caller::start(server, 1, Duration::from_secs(5)).await;
        let puts: Vec<_> = (0..10).map(|_| caller.put("k", 1)).collect();
        for put in puts {
            put.await.unwrap().unwrap();
        }
        assert_eq!((caller.count(&caller.server.bundles), caller.count(&caller.server.alone)), (0, 10));
    }
}
