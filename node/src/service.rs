//! The gRPC faces of the node: the data API (`Kv`) and the admin API (`Admin`), translating
//! between protobuf and `Node`, recording request metrics, and forwarding one hop when asked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvfleet_proto::bundle::{self, BundleAnswers};
use kvfleet_proto::v1::admin_server::Admin;
use kvfleet_proto::v1::kv_client::KvClient;
use kvfleet_proto::v1::kv_server::Kv;
use kvfleet_proto::v1::*;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::config::Durability as ConfigDurability;
use crate::error::NodeError;
use crate::fencing::{self, Call};
use crate::metrics::Op;
use crate::node::Node;
use crate::replica::ReadMode;

/// Default number of load-weighted key samples and hot keys per range in a load report.
const DEFAULT_SAMPLE_KEYS: usize = 64;
const DEFAULT_HOT_KEYS: usize = 8;
const MAX_REPORT_ITEMS: usize = 1024;

#[derive(Clone)]
pub struct KvService {
    node: Arc<Node>,
}

impl KvService {
    pub fn new(node: Arc<Node>) -> Self {
        KvService { node }
    }

    fn finish<T>(&self, op: Op, started: Instant, result: Result<T, Status>) -> Result<Response<T>, Status> {
        self.node.metrics.observe(op, started.elapsed(), result.as_ref().err().map(Status::code));
        result.map(Response::new)
    }

    /// Where to forward a request the node does not own, if the client allowed it and the node
    /// knows another owner.
    fn forward_target(&self, header: Option<&RequestHeader>, error: &NodeError) -> Option<(String, RequestHeader)> {
        let NodeError::NotOwner(detail) = error else { return None };
        if !header.is_some_and(|h| h.allow_forward) {
            return None;
        }
        let hint = detail.hint.as_ref()?;
        let leader = hint.leader()?;
        if leader.node_id == self.node.config.node_id || leader.address.is_empty() {
            return None;
        }
        self.node.metrics.forwarded.inc();
        let header = RequestHeader { range_id: 0, generation: 0, allow_forward: false };
        Some((leader.address.clone(), header))
    }
}

/// How long a forwarded request may take at the owner.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// The request to send one hop on, with its deadline.
fn forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(FORWARD_TIMEOUT);
    request
}

fn forward_error(address: &str, status: Status) -> Status {
    // Keep the owner's status (and its details) but say it came through a forward.
    Status::with_details(
        status.code(),
        format!("forwarded to {address}: {}", status.message()),
        status.details().to_vec().into(),
    )
}

/// Data requests carry a routing header; forwarding rewrites it.
trait Routed {
    fn header(&self) -> Option<&RequestHeader>;
    fn set_header(&mut self, header: RequestHeader);
}

macro_rules! routed {
    ($($request:ty),*) => {$(
        impl Routed for $request {
            fn header(&self) -> Option<&RequestHeader> {
                self.header.as_ref()
            }
            fn set_header(&mut self, header: RequestHeader) {
                self.header = Some(header);
            }
        }
    )*};
}
routed!(GetRequest, PutRequest, DeleteRequest, ScanRequest, BatchRequest);

impl KvService {
    /// Serves `req` locally; if the node does not own it and the client allowed a forward,
    /// sends it one hop to the owner the node knows. Records metrics either way.
    async fn serve<Req: Routed, Resp>(
        &self,
        op: Op,
        mut req: Req,
        local: impl AsyncFnOnce(&Node, &Req) -> Result<Resp, NodeError>,
        remote: impl AsyncFnOnce(KvClient<Channel>, Req) -> Result<Response<Resp>, Status>,
    ) -> Result<Response<Resp>, Status> {
        let started = Instant::now();
        let result = match local(&self.node, &req).await {
            Ok(response) => Ok(response),
            Err(error) => match self.forward_target(req.header(), &error) {
                Some((address, header)) => {
                    req.set_header(header);
                    match self.node.peers.kv(&address) {
                        Ok(peer) => remote(peer, req)
                            .await
                            .map(Response::into_inner)
                            .map_err(|status| forward_error(&address, status)),
                        Err(error) => Err(error.into()),
                    }
                }
                None => Err(error.into()),
            },
        };
        self.finish(op, started, result)
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let local = async |node: &Node, req: &GetRequest| {
            let mode = ReadMode::of(req.consistency(), req.max_staleness_ms).map_err(NodeError::Invalid)?;
            let (header, value) = node.get(req.header.as_ref(), &req.key, mode).await?;
            Ok(GetResponse { header: Some(header), found: value.is_some(), value: value.unwrap_or_default() })
        };
        self.serve(Op::Get, request.into_inner(), local, async |mut peer, req| peer.get(forwarded(req)).await).await
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let local = async |node: &Node, req: &PutRequest| {
            let header = node.put(req.header.as_ref(), req.key.clone(), req.value.clone()).await?;
            Ok(PutResponse { header: Some(header) })
        };
        self.serve(Op::Put, request.into_inner(), local, async |mut peer, req| peer.put(forwarded(req)).await).await
    }

    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        let local = async |node: &Node, req: &DeleteRequest| {
            let header = node.delete(req.header.as_ref(), req.key.clone()).await?;
            Ok(DeleteResponse { header: Some(header) })
        };
        self.serve(Op::Delete, request.into_inner(), local, async |mut peer, req| peer.delete(forwarded(req)).await)
            .await
    }

    async fn scan(&self, request: Request<ScanRequest>) -> Result<Response<ScanResponse>, Status> {
        let local = async |node: &Node, req: &ScanRequest| {
            let mode = ReadMode::of(req.consistency(), req.max_staleness_ms).map_err(NodeError::Invalid)?;
            let page =
                node.scan(req.header.as_ref(), &req.start_key, &req.end_key, req.limit, req.keys_only, mode).await?;
            Ok(ScanResponse {
                header: Some(page.header),
                kvs: page.pairs.into_iter().map(|(key, value)| KeyValue { key, value }).collect(),
                more_remaining: page.resume_key.is_some(),
                resume_key: page.resume_key.unwrap_or_default(),
            })
        };
        self.serve(Op::Scan, request.into_inner(), local, async |mut peer, req| peer.scan(forwarded(req)).await).await
    }

    async fn batch(&self, request: Request<BatchRequest>) -> Result<Response<BatchResponse>, Status> {
        let local = async |node: &Node, req: &BatchRequest| {
            let (header, applied) = node.batch(req.header.as_ref(), &req.mutations).await?;
            Ok(BatchResponse { header: Some(header), applied })
        };
        self.serve(Op::Batch, request.into_inner(), local, async |mut peer, req| peer.batch(forwarded(req)).await).await
    }

    type BundleStream = BundleAnswers;

    async fn bundle(&self, request: Request<BundleRequest>) -> Result<Response<BundleAnswers>, Status> {
        Ok(Response::new(bundle::serve(self, request)?))
    }
}

#[derive(Clone)]
pub struct AdminService {
    node: Arc<Node>,
    /// Set on the data port of a node with a separate admin port: changes are refused here.
    changes_served_on: Option<std::net::SocketAddr>,
}

impl AdminService {
    /// Every admin call (the node's only port, or its admin port).
    pub fn new(node: Arc<Node>) -> Self {
        AdminService { node, changes_served_on: None }
    }

    /// On the data port of a node whose admin changes are served on `admin_listen`: metadata,
    /// exports and move outcomes only.
    pub fn reads_only(node: Arc<Node>, admin_listen: std::net::SocketAddr) -> Self {
        AdminService { node, changes_served_on: Some(admin_listen) }
    }

    /// Every admin call passes here first: the cluster's admin token, then the operator fence
    /// (see `fencing`).
    async fn admit<T>(&self, request: &Request<T>, call: Call) -> Result<(), Status> {
        match self.node.admin_token.verify(request.metadata()) {
            Ok(()) => {}
            // Without the token, an open call is answered, but its epoch (if any) is ignored.
            Err(_) if call == Call::Open => return Ok(()),
            Err(refused) => return Err(refused),
        }
        if let (Call::Change, Some(admin_port)) = (call, self.changes_served_on) {
            return Err(Status::failed_precondition(format!(
                "this node serves admin changes on its admin port ({}), not on its data port",
                admin_port.port()
            )));
        }
        let epoch = fencing::epoch_of(request.metadata())?;
        Ok(self.node.admit_operator(epoch, call).await?)
    }
}

/// Runs an admin step to its end even if its caller goes away. A step persists, then updates
/// memory: a handler dropped in between (the caller's deadline, a disconnect) would leave disk
/// and memory disagreeing until a restart.
async fn to_completion<T, F>(node: &Arc<Node>, step: impl FnOnce(Arc<Node>) -> F) -> Result<T, Status>
where
    T: Send + 'static,
    F: Future<Output = Result<T, NodeError>> + Send + 'static,
{
    tokio::spawn(step(node.clone()))
        .await
        .map_err(|e| Status::internal(format!("the admin step failed to run to its end: {e}")))?
        .map_err(Status::from)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn node_info(&self, request: Request<NodeInfoRequest>) -> Result<Response<NodeInfoResponse>, Status> {
        self.admit(&request, Call::Open).await?;
        let config = &self.node.config;
        Ok(Response::new(NodeInfoResponse {
            node_id: config.node_id.clone(),
            address: self.node.address.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            durability: match config.durability {
                ConfigDurability::Sync => Durability::Sync,
                ConfigDurability::Async => Durability::Async,
            } as i32,
            fsync_interval_ms: config.fsync_interval_ms,
            range_count: self.node.owned_ranges().len() as u32,
            uptime_seconds: self.node.uptime().as_secs(),
            limits: Some(Limits {
                max_key_bytes: config.max_key_bytes as u64,
                max_value_bytes: config.max_value_bytes as u64,
                max_batch_bytes: config.max_batch_bytes as u64,
                max_scan_limit: config.max_scan_limit,
            }),
            load_accounting: config.load_accounting,
            features: crate::merges::advertised_features().to_vec(),
        }))
    }

    async fn list_ranges(&self, request: Request<ListRangesRequest>) -> Result<Response<ListRangesResponse>, Status> {
        self.admit(&request, Call::Open).await?;
        Ok(Response::new(ListRangesResponse {
            node_id: self.node.config.node_id.clone(),
            address: self.node.address.clone(),
            ranges: self.node.owned_ranges_with_lag().await,
            routing: self.node.routing_hints(),
            max_range_id: self.node.max_range_id(),
            operator_epoch: self.node.operator_epoch(),
        }))
    }

    async fn split_range(&self, request: Request<SplitRangeRequest>) -> Result<Response<SplitRangeResponse>, Status> {
        self.admit(&request, Call::Change).await?;
        let started = Instant::now();
        let req = request.into_inner();
        let result = to_completion(&self.node, move |node| async move { node.split(req).await })
            .await
            .map(|[left, right]| SplitRangeResponse { left: Some(left), right: Some(right) });
        self.node.metrics.observe(Op::Split, started.elapsed(), result.as_ref().err().map(Status::code));
        result.map(Response::new)
    }

    async fn merge_ranges(
        &self,
        request: Request<MergeRangesRequest>,
    ) -> Result<Response<MergeRangesResponse>, Status> {
        self.admit(&request, Call::Change).await?;
        let started = Instant::now();
        let request = request.into_inner();
        let result = to_completion(&self.node, move |node| async move { node.merge(request).await })
            .await
            .map(|plan| MergeRangesResponse { merged: Some(plan.merged) });
        self.node.metrics.observe(Op::Merge, started.elapsed(), result.as_ref().err().map(Status::code));
        result.map(Response::new)
    }

    async fn abort_merge(&self, request: Request<AbortMergeRequest>) -> Result<Response<AbortMergeResponse>, Status> {
        self.admit(&request, Call::Change).await?;
        let started = Instant::now();
        let request = request.into_inner();
        let result = to_completion(&self.node, move |node| async move { node.abort_merge(request).await })
            .await
            .map(|(right, left)| AbortMergeResponse { right: Some(right), left });
        self.node.metrics.observe(Op::Merge, started.elapsed(), result.as_ref().err().map(Status::code));
        result.map(Response::new)
    }

    async fn load_report(&self, request: Request<LoadReportRequest>) -> Result<Response<LoadReportResponse>, Status> {
        self.admit(&request, Call::Open).await?;
        let req = request.into_inner();
        let pick = |asked: u32, default: usize| match asked {
            0 => default,
            n => (n as usize).min(MAX_REPORT_ITEMS),
        };
        let report =
            self.node.load_report(pick(req.sample_keys, DEFAULT_SAMPLE_KEYS), pick(req.hot_keys, DEFAULT_HOT_KEYS))?;
        Ok(Response::new(report))
    }

    async fn publish_routing(
        &self,
        request: Request<PublishRoutingRequest>,
    ) -> Result<Response<PublishRoutingResponse>, Status> {
        self.admit(&request, Call::Change).await?;
        let ranges = request.into_inner().ranges;
        if let Some(bad) = ranges.iter().find(|d| d.leader().is_none()) {
            return Err(Status::invalid_argument(format!("range {} has no replica to route to", bad.range_id)));
        }
        if let Some(bad) = ranges.iter().find(|d| !d.end_key.is_empty() && d.end_key <= d.start_key) {
            return Err(Status::invalid_argument(format!(
                "range {} {} is empty or reversed: its end key must be after its start key (or empty for +inf)",
                bad.range_id,
                bad.span()
            )));
        }
        let accepted = self.node.set_routing(ranges) as u32;
        Ok(Response::new(PublishRoutingResponse { accepted }))
    }

    async fn change_replicas(
        &self,
        request: Request<ChangeReplicasRequest>,
    ) -> Result<Response<ChangeReplicasResponse>, Status> {
        self.admit(&request, Call::Change).await?;
        let request = request.into_inner();
        let range = to_completion(&self.node, move |node| async move { node.change_replicas(request).await }).await?;
        Ok(Response::new(ChangeReplicasResponse { range: Some(range) }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.admit(&request, Call::Change).await?;
        let request = request.into_inner();
        let range = to_completion(&self.node, move |node| async move { node.transfer_leader(request).await }).await?;
        Ok(Response::new(TransferLeaderResponse { range: Some(range) }))
    }

    async fn create_replica(
        &self,
        request: Request<CreateReplicaRequest>,
    ) -> Result<Response<CreateReplicaResponse>, Status> {
        self.admit(&request, Call::Change).await?;
        let range =
            request.into_inner().range.ok_or_else(|| Status::invalid_argument("CreateReplica needs the range"))?;
        to_completion(&self.node, move |node| async move { node.create_replica(range).await }).await?;
        Ok(Response::new(CreateReplicaResponse {}))
    }

    async fn bootstrap(&self, request: Request<BootstrapRequest>) -> Result<Response<BootstrapResponse>, Status> {
        self.admit(&request, Call::Change).await?;
        let members: Vec<(String, String)> =
            request.into_inner().replicas.into_iter().map(|r| (r.node_id, r.address)).collect();
        let range = to_completion(&self.node, move |node| async move {
            if members.is_empty() { node.bootstrap().await } else { node.bootstrap_replicated(members).await }
        })
        .await?;
        Ok(Response::new(BootstrapResponse { range: Some(range) }))
    }
}
