//! Raft messages between nodes. Outgoing: one queue and one task per peer node, which sends
//! whatever queued up as one batch (messages of every group two nodes share travel together) on
//! a long-lived `RaftTransport.DeliverStream` call (one `Deliver` call per batch to an older
//! peer), and probes the peer with an empty batch when there is nothing to say.
//! Incoming: the gRPC service hands envelopes to the driver. Which peers answered lately
//! (`Liveness`) lets quiet groups led by a silent node wake up and elect a new leader.
//!
//! Snapshots travel beside the messages: a MsgSnapshot carries only which file to fetch; the
//! follower fetches it from the sender (`RaftTransport.FetchSnapshot`, `SnapshotFetcher`) and
//! only then hands the message to its group, so a group never takes a snapshot whose data the
//! node does not have.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfleet_client::ChannelPool;
use kvfleet_proto::admin_auth::AdminToken;
use kvfleet_proto::v1::raft_envelope::Body;
use kvfleet_proto::v1::raft_transport_client::RaftTransportClient;
use kvfleet_proto::v1::raft_transport_server::RaftTransport;
use kvfleet_proto::v1::{
    FetchSnapshotRequest, Quiesce, RaftBatch, RaftBatchAck, RaftEnvelope, RaftSnapshotData, Removed, SnapshotChunk,
};
use kvfleet_replication::{Envelope, MessageType, decode_message, encode_message};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::Replication;
use super::snapshot::{self, Side, SnapshotFiles};

/// Bytes per chunk of a snapshot file.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// How long fetching one snapshot may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);

/// A peer with nothing to send is probed this often.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How long one Deliver call may take.
const DELIVER_TIMEOUT: Duration = Duration::from_secs(1);
/// Batches a stream may hold unacked (beyond, the sender waits: the peer is behind).
const STREAM_IN_FLIGHT: usize = 64;
/// A stream that brings nothing for this long (its sender probes every `PROBE_EVERY`) is ended
/// by its receiver: the sender went away without closing it.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer that took no stream (an older version) is asked again this often.
const ASK_FOR_A_STREAM_AGAIN_AFTER: Duration = Duration::from_secs(60);
/// Most envelopes in one call.
const MAX_BATCH: usize = 4096;
/// Most bytes in one call (a message past it goes in the next call; raft-rs keeps one append
/// under 1 MiB).
pub const MAX_BATCH_BYTES: usize = 16 << 20;
/// A peer not heard from for this long is taken as down: the quiet groups it leads wake up.
pub const SILENT_AFTER: Duration = Duration::from_millis(1000);

/// When each peer last answered (or sent something).
#[derive(Clone, Default)]
pub struct Liveness(Arc<Mutex<HashMap<u64, Instant>>>);

impl Liveness {
    pub fn heard_from(&self, raft_id: u64) {
        self.0.lock().insert(raft_id, Instant::now());
    }

    /// Peers not heard from within `SILENT_AFTER`.
    pub fn silent(&self) -> Vec<u64> {
        self.0.lock().iter().filter(|(_, at)| at.elapsed() > SILENT_AFTER).map(|(id, _)| *id).collect()
    }
}

/// The queues to every peer node, and the tasks that drain them.
pub struct PeerLinks {
    from_node_id: String,
    from_raft_id: u64,
    runtime: tokio::runtime::Handle,
    channels: ChannelPool,
    token: AdminToken,
    links: HashMap<u64, mpsc::UnboundedSender<RaftEnvelope>>,
    liveness: Liveness,
}

impl PeerLinks {
    pub fn new(node_id: &str, raft_id: u64, channels: ChannelPool, token: AdminToken) -> Self {
        PeerLinks {
            from_node_id: node_id.to_string(),
            from_raft_id: raft_id,
            runtime: tokio::runtime::Handle::current(),
            channels,
            token,
            links: HashMap::new(),
            liveness: Liveness::default(),
        }
    }

    pub fn liveness(&self) -> Liveness {
        self.liveness.clone()
    }

    /// Starts the link to `raft_id` at `address` if there is none (addresses are fixed for now:
    /// a node that comes back at another address is not followed).
    pub fn connect(&mut self, raft_id: u64, address: &str) {
        if raft_id == self.from_raft_id || self.links.contains_key(&raft_id) {
            return;
        }
        let (queue, receiver) = mpsc::unbounded_channel();
        self.links.insert(raft_id, queue);
        self.liveness.heard_from(raft_id);
        let link = Link {
            from_node_id: self.from_node_id.clone(),
            from_raft_id: self.from_raft_id,
            to: raft_id,
            address: address.to_string(),
            channels: self.channels.clone(),
            token: self.token.clone(),
            liveness: self.liveness.clone(),
        };
        self.runtime.spawn(link.run(receiver));
    }

    /// Queues `envelopes` to their nodes; those for nodes without a link are dropped (Raft
    /// retries what matters).
    pub fn send(&self, envelopes: Vec<Envelope>) {
        for envelope in envelopes {
            if let Some(queue) = self.links.get(&envelope.to()) {
                let _ = queue.send(to_wire(&envelope));
            }
        }
    }
}

fn to_wire(envelope: &Envelope) -> RaftEnvelope {
    match envelope {
        Envelope::Raft { group, message } => {
            RaftEnvelope { range_id: *group, body: Some(Body::RaftMessage(encode_message(message).into())) }
        }
        Envelope::Quiesce { group, from, to, term, commit } => RaftEnvelope {
            range_id: *group,
            body: Some(Body::Quiesce(Quiesce { from: *from, to: *to, term: *term, commit: *commit })),
        },
        Envelope::Removed { group, from, to, conf_version } => RaftEnvelope {
            range_id: *group,
            body: Some(Body::Removed(Removed { from: *from, to: *to, conf_version: *conf_version })),
        },
    }
}

fn from_wire(envelope: RaftEnvelope) -> Result<Envelope, String> {
    let group = envelope.range_id;
    match envelope.body {
        Some(Body::RaftMessage(bytes)) => Ok(Envelope::Raft { group, message: decode_message(&bytes)? }),
        Some(Body::Quiesce(q)) => {
            Ok(Envelope::Quiesce { group, from: q.from, to: q.to, term: q.term, commit: q.commit })
        }
        Some(Body::Removed(r)) => Ok(Envelope::Removed { group, from: r.from, to: r.to, conf_version: r.conf_version }),
        None => Err(format!("an envelope for range {group} has no body")),
    }
}

struct Link {
    from_node_id: String,
    from_raft_id: u64,
    to: u64,
    address: String,
    channels: ChannelPool,
    token: AdminToken,
    liveness: Liveness,
}

impl Link {
    async fn run(self, mut queue: mpsc::UnboundedReceiver<RaftEnvelope>) {
        let mut stream: Option<OutboundStream> = None;
        // Set while the peer has no DeliverStream (an older version): calls until then.
        let mut calls_until: Option<Instant> = None;
        loop {
            let mut envelopes = match tokio::time::timeout(PROBE_EVERY, queue.recv()).await {
                Ok(Some(first)) => vec![first],
                Ok(None) => return,
                Err(_) => Vec::new(),
            };
            let mut bytes: usize = envelopes.iter().map(prost::Message::encoded_len).sum();
            while envelopes.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES / 2 {
                match queue.try_recv() {
                    Ok(envelope) => {
                        bytes += prost::Message::encoded_len(&envelope);
                        envelopes.push(envelope);
                    }
                    Err(_) => break,
                }
            }
            let batch = RaftBatch {
                from_node_id: self.from_node_id.clone(),
                from_raft_id: self.from_raft_id,
                envelopes,
                features: crate::merges::advertised_features().to_vec(),
            };
            let channel = match self.channels.channel(&self.address) {
                Ok(channel) => channel,
                Err(error) => {
                    tracing::warn!(peer = %self.address, %error, "cannot reach a Raft peer");
                    tokio::time::sleep(PROBE_EVERY).await;
                    continue;
                }
            };
            let calls_only = |until: Option<Instant>| until.is_some_and(|until| Instant::now() < until);
            if !calls_only(calls_until) && stream.as_ref().is_none_or(OutboundStream::broken) {
                stream = None;
                match OutboundStream::open(&self, channel.clone()).await {
                    Ok(opened) => stream = Some(opened),
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        tracing::info!(peer = %self.address, "the Raft peer takes no stream (an older version): one call per batch");
                        calls_until = Some(Instant::now() + ASK_FOR_A_STREAM_AGAIN_AFTER);
                    }
                    Err(status) => {
                        tracing::debug!(peer = %self.address, code = ?status.code(), message = status.message(), "no Raft stream to the peer")
                    }
                }
            }
            let delivered = match &stream {
                _ if calls_only(calls_until) => self.call(channel, batch).await,
                Some(open) => open.send(batch).await,
                None => false,
            };
            if !delivered {
                stream = None;
                // Raft resends what matters; what queued while this peer did not answer is
                // dropped rather than piled up.
                while queue.try_recv().is_ok() {}
                tokio::time::sleep(PROBE_EVERY / 2).await;
            }
        }
    }

    /// Sends `batch` as one `Deliver` call; whether the peer took it.
    async fn call(&self, channel: tonic::transport::Channel, batch: RaftBatch) -> bool {
        let mut request = Request::new(batch);
        request.set_timeout(DELIVER_TIMEOUT);
        self.token.attach(&mut request);
        match RaftTransportClient::new(channel).deliver(request).await {
            Ok(_) => {
                self.liveness.heard_from(self.to);
                true
            }
            Err(status) => {
                tracing::debug!(peer = %self.address, code = ?status.code(), message = status.message(), "Raft messages not delivered");
                false
            }
        }
    }
}

/// A `DeliverStream` call to a peer: batches go out on it, and a task reads the peer's acks
/// (each one says the peer handed the oldest batch not acked yet to its Raft thread).
struct OutboundStream {
    batches: mpsc::Sender<RaftBatch>,
    acked: Arc<Mutex<Acks>>,
    acks: tokio::task::JoinHandle<()>,
    /// Set when this stream is given up: the batches still queued for it are not sent.
    dropped: Arc<std::sync::atomic::AtomicBool>,
}

/// What the peer acked of a stream.
struct Acks {
    /// When each batch not acked yet was queued, oldest first.
    unacked: std::collections::VecDeque<Instant>,
    last_ack: Instant,
}

impl OutboundStream {
    async fn open(link: &Link, channel: tonic::transport::Channel) -> Result<Self, Status> {
        let (batches, outgoing) = mpsc::channel(STREAM_IN_FLIGHT);
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let given_up = dropped.clone();
        let outgoing =
            tokio_stream::StreamExt::take_while(tokio_stream::wrappers::ReceiverStream::new(outgoing), move |_| {
                !given_up.load(std::sync::atomic::Ordering::Relaxed)
            });
        let mut request = Request::new(outgoing);
        link.token.attach(&mut request);
        let mut client = RaftTransportClient::new(channel);
        let mut answers = match tokio::time::timeout(DELIVER_TIMEOUT, client.deliver_stream(request)).await {
            Ok(answer) => answer?.into_inner(),
            Err(_) => return Err(Status::deadline_exceeded("the peer did not answer the stream's opening")),
        };
        let acked = Arc::new(Mutex::new(Acks { unacked: Default::default(), last_ack: Instant::now() }));
        let (liveness, to, acking) = (link.liveness.clone(), link.to, acked.clone());
        let acks = tokio::spawn(async move {
            while let Ok(Some(_)) = answers.message().await {
                let mut acked = acking.lock();
                acked.unacked.pop_front();
                acked.last_ack = Instant::now();
                liveness.heard_from(to);
            }
        });
        Ok(OutboundStream { batches, acked, acks, dropped })
    }

    /// The stream ended, or the peer acked nothing for `DELIVER_TIMEOUT` while a batch waited
    /// (a peer slowly working through a long queue, acking as it goes, is not broken).
    fn broken(&self) -> bool {
        let acked = self.acked.lock();
        let waiting_since = acked.unacked.front().map(|queued| (*queued).max(acked.last_ack));
        self.acks.is_finished() || waiting_since.is_some_and(|since| since.elapsed() > DELIVER_TIMEOUT)
    }

    /// Queues `batch` on the stream; false if the stream is broken or full for `DELIVER_TIMEOUT`.
    async fn send(&self, batch: RaftBatch) -> bool {
        if self.broken() {
            return false;
        }
        self.acked.lock().unacked.push_back(Instant::now());
        tokio::time::timeout(DELIVER_TIMEOUT, self.batches.send(batch)).await.is_ok_and(|sent| sent.is_ok())
    }
}

impl Drop for OutboundStream {
    fn drop(&mut self) {
        self.dropped.store(true, std::sync::atomic::Ordering::Relaxed);
        self.acks.abort();
    }
}

/// Fetches the snapshot files followers were sent, one fetch per file at a time.
#[derive(Clone)]
pub struct SnapshotFetcher {
    files: SnapshotFiles,
    channels: ChannelPool,
    token: AdminToken,
    /// Files being fetched, each with the latest message that sent it (a new leader may send the
    /// same snapshot again: its message, not the old leader's, must reach the group).
    in_flight: Arc<Mutex<HashMap<SnapshotKey, Envelope>>>,
}

/// A snapshot file: (range, index, term).
type SnapshotKey = (u64, u64, u64);

impl SnapshotFetcher {
    pub fn new(files: SnapshotFiles, channels: ChannelPool, token: AdminToken) -> Self {
        SnapshotFetcher { files, channels, token, in_flight: Arc::default() }
    }

    pub fn files(&self) -> &SnapshotFiles {
        &self.files
    }

    /// Hands `envelope` (a MsgSnapshot described by `info`) to the group once its file is here:
    /// at once if it is (or there is none), else after fetching it from `address`. A failed fetch
    /// drops the message; the leader sends another after `SNAPSHOT_TRANSFER_TIMEOUT`.
    fn receive(&self, replication: Arc<Replication>, envelope: Envelope, info: RaftSnapshotData, address: String) {
        let me = replication.raft_id();
        let key = (info.range_id, info.index, info.term);
        if self.files.path(Side::Fetched, key.0, key.1, key.2).exists() {
            if let Err(error) = replication.deliver(vec![envelope]) {
                tracing::debug!(%error, "a snapshot message not delivered");
            }
            return;
        }
        if self.in_flight.lock().insert(key, envelope).is_some() {
            return;
        }
        let fetcher = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let outcome = tokio::time::timeout(FETCH_TIMEOUT, fetcher.fetch(&address, &info, me)).await;
            let latest = fetcher.in_flight.lock().remove(&key);
            match outcome {
                Ok(Ok(bytes)) => {
                    tracing::info!(range_id = info.range_id, index = info.index, bytes, took = ?started.elapsed(), "snapshot fetched");
                    if let Some(envelope) = latest
                        && let Err(error) = replication.deliver(vec![envelope])
                    {
                        tracing::debug!(%error, "a snapshot message not delivered");
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(range_id = info.range_id, peer = %address, %error, "fetching a snapshot failed")
                }
                Err(_) => tracing::warn!(range_id = info.range_id, peer = %address, "fetching a snapshot timed out"),
            }
        });
    }

    /// Streams the file into a partial file, checks its size, fsyncs it and renames it into
    /// place (durably); its size.
    async fn fetch(&self, address: &str, info: &RaftSnapshotData, me: u64) -> Result<u64, String> {
        let (range_id, index, term) = (info.range_id, info.index, info.term);
        let channel = self.channels.channel(address).map_err(|e| e.to_string())?;
        let mut request = Request::new(FetchSnapshotRequest { range_id, index, term, from_raft_id: me });
        self.token.attach(&mut request);
        let mut stream = RaftTransportClient::new(channel)
            .fetch_snapshot(request)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let partial = self.files.partial(Side::Fetched, range_id, index, term);
        self.files.create_dir(Side::Fetched)?;
        let mut file =
            tokio::fs::File::create(&partial).await.map_err(|e| format!("creating {}: {e}", partial.display()))?;
        let mut size = 0u64;
        while let Some(chunk) = stream.message().await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))? {
            file.write_all(&chunk.data).await.map_err(|e| format!("writing {}: {e}", partial.display()))?;
            size += chunk.data.len() as u64;
        }
        if size != info.file_bytes {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(format!("got {size} bytes of a {}-byte file", info.file_bytes));
        }
        file.sync_all().await.map_err(|e| format!("syncing {}: {e}", partial.display()))?;
        tokio::fs::rename(&partial, self.files.path(Side::Fetched, range_id, index, term))
            .await
            .map_err(|e| format!("renaming {}: {e}", partial.display()))?;
        self.files.sync_dir(Side::Fetched)?;
        Ok(size)
    }
}

/// The receiving side: `RaftTransport.Deliver`.
/// Paces the snapshot files this node sends, every transfer together, to a byte rate: each
/// chunk reserves its share of time after the one before it, and waits for its turn.
#[derive(Clone)]
pub struct SendPacer {
    bytes_per_sec: u64,
    next_free: Arc<parking_lot::Mutex<tokio::time::Instant>>,
}

impl SendPacer {
    /// 0: unlimited.
    pub fn new(bytes_per_sec: u64) -> Self {
        SendPacer { bytes_per_sec, next_free: Arc::new(parking_lot::Mutex::new(tokio::time::Instant::now())) }
    }

    /// Waits until `bytes` more may leave.
    pub async fn pace(&self, bytes: usize) {
        if self.bytes_per_sec == 0 {
            return;
        }
        let turn = {
            let mut next_free = self.next_free.lock();
            let turn = (*next_free).max(tokio::time::Instant::now());
            *next_free = turn + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
            turn
        };
        tokio::time::sleep_until(turn).await;
    }
}

/// Hands a batch's envelopes to the Raft thread (a snapshot message only once its file is
/// fetched), and the ack that says so. Empty batches (probes) go through too: the ack says the
/// Raft thread runs.
fn take_batch(replication: &Arc<Replication>, batch: RaftBatch) -> Result<RaftBatchAck, Status> {
    replication.liveness.heard_from(batch.from_raft_id);
    // Only a sender whose Raft id is its node id's, as every node's is.
    if batch.from_raft_id == super::raft_id_of(&batch.from_node_id) {
        replication.peer_features.heard(batch.from_raft_id, &batch.features);
    }
    let mut envelopes = Vec::with_capacity(batch.envelopes.len());
    for envelope in batch.envelopes {
        match from_wire(envelope) {
            Ok(Envelope::Raft { group, message }) if message.get_msg_type() == MessageType::MsgSnapshot => {
                let info = match snapshot::describe(group, &message.get_snapshot().data) {
                    Ok(info) => info,
                    Err(reason) => {
                        tracing::warn!(group, from = message.from, %reason, "a Raft snapshot message refused");
                        continue;
                    }
                };
                let Some(address) = replication.address_of(message.from) else {
                    tracing::warn!(
                        group,
                        from = message.from,
                        "a snapshot from a node this one does not know; dropped"
                    );
                    continue;
                };
                let envelope = Envelope::Raft { group, message };
                replication.fetcher.receive(replication.clone(), envelope, info, address);
            }
            Ok(envelope) => envelopes.push(envelope),
            Err(reason) => {
                return Err(Status::invalid_argument(format!(
                    "a Raft batch from node {:?}: {reason}",
                    batch.from_node_id
                )));
            }
        }
    }
    replication.deliver(envelopes).map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(RaftBatchAck { node_id: String::new() })
}

pub struct RaftTransportService {
    replication: Arc<Replication>,
    token: AdminToken,
    files: SnapshotFiles,
    /// Turns true when the node stops: its streams end, so that the server's graceful shutdown
    /// does not wait on them (a peer keeps a stream open for good).
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl RaftTransportService {
    pub fn new(replication: Arc<Replication>, token: AdminToken, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        let files = replication.snapshot_files().clone();
        RaftTransportService { replication, token, files, stopping }
    }
}

type ChunkStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<SnapshotChunk, Status>> + Send>>;
type AckStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<RaftBatchAck, Status>> + Send>>;

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn deliver(&self, request: Request<RaftBatch>) -> Result<Response<RaftBatchAck>, Status> {
        self.token.verify(request.metadata())?;
        take_batch(&self.replication, request.into_inner()).map(Response::new)
    }

    type DeliverStreamStream = AckStream;

    async fn deliver_stream(
        &self,
        request: Request<tonic::Streaming<RaftBatch>>,
    ) -> Result<Response<Self::DeliverStreamStream>, Status> {
        self.token.verify(request.metadata())?;
        let mut batches = request.into_inner();
        let (acks, answers) = mpsc::channel(STREAM_IN_FLIGHT);
        let (replication, mut stopping) = (self.replication.clone(), self.stopping.clone());
        tokio::spawn(async move {
            // Ends with the sender's stream, when a batch is refused (with the reason), when the
            // sender sends nothing for `STREAM_IDLE_TIMEOUT` (it went away without closing), or
            // when this node stops.
            loop {
                let next = tokio::select! {
                    next = tokio::time::timeout(STREAM_IDLE_TIMEOUT, batches.message()) => next,
                    _ = stopping.wait_for(|stop| *stop) => return,
                };
                let Ok(Ok(Some(batch))) = next else { return };
                let ack = take_batch(&replication, batch);
                let refused = ack.is_err();
                if acks.send(ack).await.is_err() || refused {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(answers))))
    }

    type FetchSnapshotStream = ChunkStream;

    async fn fetch_snapshot(
        &self,
        request: Request<FetchSnapshotRequest>,
    ) -> Result<Response<Self::FetchSnapshotStream>, Status> {
        self.token.verify(request.metadata())?;
        let FetchSnapshotRequest { range_id, index, term, from_raft_id } = request.into_inner();
        let path = self.files.path(Side::Made, range_id, index, term);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(error) => {
                // The group waits on this follower: let it send a snapshot it has.
                self.replication.report_snapshot(range_id, from_raft_id, false);
                return Err(Status::not_found(format!(
                    "the snapshot of range {range_id} at index {index} (term {term}) is not here ({error}): a newer one replaced it, or this node restarted"
                )));
            }
        };
        let (sender, receiver) = mpsc::channel(4);
        let replication = self.replication.clone();
        tokio::spawn(async move {
            let delivered = loop {
                let mut buffer = vec![0u8; SNAPSHOT_CHUNK_BYTES];
                match file.read(&mut buffer).await {
                    Ok(0) => break true,
                    Ok(read) => {
                        buffer.truncate(read);
                        replication.send_pacer.pace(read).await;
                        if sender.send(Ok(SnapshotChunk { data: buffer.into() })).await.is_err() {
                            break false;
                        }
                    }
                    Err(error) => {
                        let _ =
                            sender.send(Err(Status::internal(format!("reading {}: {error}", path.display())))).await;
                        break false;
                    }
                }
            };
            // The group waits on this follower until told: sent, go on from the snapshot's
            // index; not, send another.
            replication.report_snapshot(range_id, from_raft_id, delivered);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(receiver))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvfleet_client::ChannelConfig;
    use kvfleet_proto::v1::raft_transport_server::RaftTransportServer;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A peer node's transport that records what reaches it: over a stream, or (as an older
    /// version, `streams == false`) only by calls. `stalled`: takes nothing from its streams.
    #[derive(Clone, Default)]
    struct Peer {
        streams: bool,
        stalled: Arc<AtomicBool>,
        by_call: Arc<Mutex<Vec<u64>>>,
        by_stream: Arc<Mutex<Vec<u64>>>,
        streams_opened: Arc<Mutex<usize>>,
    }

    fn commits(batch: &RaftBatch) -> impl Iterator<Item = u64> + '_ {
        batch.envelopes.iter().filter_map(|e| match &e.body {
            Some(Body::Quiesce(q)) => Some(q.commit),
            _ => None,
        })
    }

    #[tonic::async_trait]
    impl RaftTransport for Peer {
        async fn deliver(&self, request: Request<RaftBatch>) -> Result<Response<RaftBatchAck>, Status> {
            self.by_call.lock().extend(commits(request.get_ref()));
            Ok(Response::new(RaftBatchAck::default()))
        }

        type DeliverStreamStream = AckStream;

        async fn deliver_stream(
            &self,
            request: Request<tonic::Streaming<RaftBatch>>,
        ) -> Result<Response<AckStream>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("an older version"));
            }
            *self.streams_opened.lock() += 1;
            let mut batches = request.into_inner();
            let (acks, answers) = mpsc::channel(STREAM_IN_FLIGHT);
            let peer = self.clone();
            tokio::spawn(async move {
                while let Ok(Some(batch)) = batches.message().await {
                    if peer.stalled.load(Ordering::SeqCst) {
                        // A stalled peer: holds the stream, takes and answers nothing.
                        std::future::pending::<()>().await;
                    }
                    peer.by_stream.lock().extend(commits(&batch));
                    if acks.send(Ok(RaftBatchAck::default())).await.is_err() {
                        return;
                    }
                }
            });
            Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(answers))))
        }

        type FetchSnapshotStream = ChunkStream;

        async fn fetch_snapshot(&self, _: Request<FetchSnapshotRequest>) -> Result<Response<ChunkStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    /// Serves `peer` on a loopback port; links from node 1 to it as node 2.
    async fn linked(peer: Peer) -> (PeerLinks, Liveness) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let address = listener.local_addr().expect("its address").to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftTransportServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut links = PeerLinks::new("n1", 1, ChannelPool::new(ChannelConfig::default()), AdminToken::none());
        links.connect(2, &address);
        let liveness = links.liveness();
        (links, liveness)
    }

    fn quiesce(commit: u64) -> Envelope {
        Envelope::Quiesce { group: 7, from: 1, to: 2, term: 1, commit }
    }

    async fn wait_for(what: &str, done: impl Fn() -> bool) {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn messages_go_in_order_over_one_stream_which_is_replaced_when_the_peer_stops_answering() {
        let peer = Peer { streams: true, ..Peer::default() };
        let (links, liveness) = linked(peer.clone()).await;
        for commit in 1..=500 {
            links.send(vec![quiesce(commit)]);
        }
        wait_for("500 messages", || peer.by_stream.lock().len() == 500).await;
        assert_eq!(*peer.by_stream.lock(), (1..=500).collect::<Vec<_>>(), "every message once, in order");
        assert!(peer.by_call.lock().is_empty());
        assert_eq!(*peer.streams_opened.lock(), 1, "one stream carried them all");
        assert!(liveness.silent().is_empty(), "the acks say the peer answers");

        // The peer stalls: it goes silent, and the link gives the stream up and opens another,
        // which carries what is sent once the peer takes messages again.
        peer.stalled.store(true, Ordering::SeqCst);
        links.send(vec![quiesce(501)]);
        wait_for("the stalled peer to count as silent", || liveness.silent() == vec![2]).await;
        peer.stalled.store(false, Ordering::SeqCst);
        // Sent again until one arrives: a replacement stream opened just before the stall ended
        // stalls too, and is replaced in turn.
        wait_for("a message after the stall", || {
            links.send(vec![quiesce(502)]);
            peer.by_stream.lock().contains(&502)
        })
        .await;
        assert!(*peer.streams_opened.lock() >= 2, "the stalled stream was replaced");
        assert!(liveness.silent().is_empty());
    }

    #[tokio::test]
    async fn a_peer_without_streams_gets_one_call_per_batch() {
        let peer = Peer { streams: false, ..Peer::default() };
        let (links, liveness) = linked(peer.clone()).await;
        for commit in 1..=200 {
            links.send(vec![quiesce(commit)]);
        }
        wait_for("200 messages", || peer.by_call.lock().len() == 200).await;
        assert_eq!(*peer.by_call.lock(), (1..=200).collect::<Vec<_>>(), "every message once, in order");
        assert!(peer.by_stream.lock().is_empty());
        assert!(liveness.silent().is_empty(), "the calls' answers say the peer answers");
    }

    #[tokio::test]
    async fn the_pacer_holds_every_transfer_together_to_its_rate() {
        let pacer = SendPacer::new(1_000_000);
        let started = std::time::Instant::now();
        // Two transfers at once, 200 kB each in 100 kB chunks: 400 kB at 1 MB/s. The first chunk
        // goes at once, the last waits for the 300 kB before it.
        let transfer = |pacer: SendPacer| async move {
            for _ in 0..2 {
                pacer.pace(100_000).await;
            }
        };
        tokio::join!(transfer(pacer.clone()), transfer(pacer.clone()));
        assert!(started.elapsed() >= Duration::from_millis(300), "400 kB left in {:?}", started.elapsed());
        let unlimited = SendPacer::new(0);
        let started = std::time::Instant::now();
        unlimited.pace(1 << 30).await;
        assert!(started.elapsed() < Duration::from_secs(1), "an unlimited pacer waited");
    }
}
