//! Raft messages between nodes. Outgoing: one queue and one task per peer node, which sends
//! whatever queued up as one `RaftTransport.Deliver` call (messages of every group two nodes
//! share travel together), and probes the peer with an empty batch when there is nothing to say.
//! Incoming: the gRPC service hands envelopes to the driver. Which peers answered lately
//! (`Liveness`) lets quiet groups led by a silent node wake up and elect a new leader.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfleet_client::ChannelPool;
use kvfleet_proto::admin_auth::AdminToken;
use kvfleet_proto::v1::raft_envelope::Body;
use kvfleet_proto::v1::raft_transport_client::RaftTransportClient;
use kvfleet_proto::v1::raft_transport_server::RaftTransport;
use kvfleet_proto::v1::{Quiesce, RaftBatch, RaftBatchAck, RaftEnvelope};
use kvfleet_replication::{Envelope, decode_message, encode_message};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::Replication;

/// A peer with nothing to send is probed this often.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How long one Deliver call may take.
const DELIVER_TIMEOUT: Duration = Duration::from_secs(1);
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
    }
}

fn from_wire(envelope: RaftEnvelope) -> Result<Envelope, String> {
    let group = envelope.range_id;
    match envelope.body {
        Some(Body::RaftMessage(bytes)) => Ok(Envelope::Raft { group, message: decode_message(&bytes)? }),
        Some(Body::Quiesce(q)) => {
            Ok(Envelope::Quiesce { group, from: q.from, to: q.to, term: q.term, commit: q.commit })
        }
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
            let channel = match self.channels.channel(&self.address) {
                Ok(channel) => channel,
                Err(error) => {
                    tracing::warn!(peer = %self.address, %error, "cannot reach a Raft peer");
                    tokio::time::sleep(PROBE_EVERY).await;
                    continue;
                }
            };
            let mut request = Request::new(RaftBatch {
                from_node_id: self.from_node_id.clone(),
                from_raft_id: self.from_raft_id,
                envelopes,
            });
            request.set_timeout(DELIVER_TIMEOUT);
            self.token.attach(&mut request);
            match RaftTransportClient::new(channel).deliver(request).await {
                Ok(_) => self.liveness.heard_from(self.to),
                Err(status) => {
                    tracing::debug!(peer = %self.address, code = ?status.code(), message = status.message(), "Raft messages not delivered");
                    // Raft resends what matters; what queued while this peer did not answer is
                    // dropped rather than piled up.
                    while queue.try_recv().is_ok() {}
                    tokio::time::sleep(PROBE_EVERY / 2).await;
                }
            }
        }
    }
}

/// The receiving side: `RaftTransport.Deliver`.
pub struct RaftTransportService {
    replication: Arc<Replication>,
    token: AdminToken,
}

impl RaftTransportService {
    pub fn new(replication: Arc<Replication>, token: AdminToken) -> Self {
        RaftTransportService { replication, token }
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn deliver(&self, request: Request<RaftBatch>) -> Result<Response<RaftBatchAck>, Status> {
        self.token.verify(request.metadata())?;
        let batch = request.into_inner();
        self.replication.liveness.heard_from(batch.from_raft_id);
        let mut envelopes = Vec::with_capacity(batch.envelopes.len());
        for envelope in batch.envelopes {
            match from_wire(envelope) {
                Ok(envelope) => envelopes.push(envelope),
                Err(reason) => {
                    return Err(Status::invalid_argument(format!(
                        "a Raft batch from node {:?}: {reason}",
                        batch.from_node_id
                    )));
                }
            }
        }
        // Empty batches (probes) go through too: the answer says the Raft thread runs.
        self.replication.deliver(envelopes).map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(RaftBatchAck { node_id: String::new() }))
    }
}
