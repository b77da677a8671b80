//! The kvfleet client: routes each key to the node that owns its range, refreshes the range map
//! on NotOwner or a vanished node, and retries with backoff under a deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvfleet_proto::RangeBounds;
use kvfleet_proto::admin_auth::AdminToken;
use kvfleet_proto::errors::not_owner_detail;
use kvfleet_proto::v1::admin_client::AdminClient;
use kvfleet_proto::v1::kv_client::KvClient;
use kvfleet_proto::v1::*;
use parking_lot::RwLock;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::bundler::{BundleConfig, Bundlers};
use crate::channels::{ChannelConfig, ChannelPool, endpoint};
use crate::error::ClientError;
use crate::routing::RangeCache;

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Addresses (`host:port`, optionally `http://host:port`) to learn the range map from.
    pub seeds: Vec<String>,
    /// How long one operation may take, retries included.
    pub deadline: Duration,
    /// Timeout of one attempt (one RPC).
    pub attempt_timeout: Duration,
    pub connect_timeout: Duration,
    /// HTTP/2 connections per node; requests are spread over them round-robin. A few
    /// connections let the node's I/O work on several cores and coalesce fewer frames per read.
    pub connections_per_node: usize,
    /// Sent on admin calls (`kvctl split`, `merge`): nodes started with an admin token refuse
    /// changes without it. Range metadata, which routing reads, needs none.
    pub admin_token: AdminToken,
    /// How gets, puts and deletes sent to one node at the same moment share calls.
    pub bundling: BundleConfig,
}

impl ClientConfig {
    pub fn new(seeds: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ClientConfig {
            seeds: seeds.into_iter().map(Into::into).collect(),
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            connections_per_node: 4,
            admin_token: AdminToken::none(),
            bundling: BundleConfig::default(),
        }
    }
}

/// Strips a scheme so addresses compare equal however they were written.
pub fn normalize_address(address: &str) -> String {
    address.trim().trim_start_matches("http://").trim_end_matches('/').to_string()
}

/// A handle to a kvfleet cluster; cheap to clone, safe to share between tasks.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    cache: RwLock<RangeCache>,
    channels: ChannelPool,
    bundlers: Bundlers,
    /// One refresh at a time; others wait for it and use its result.
    refresh: tokio::sync::Mutex<Instant>,
}

/// Where one attempt goes: the cached range (its leader is the address) and the header.
struct Route {
    range: Arc<RangeDescriptor>,
    header: RequestHeader,
}

impl Route {
    fn address(&self) -> &str {
        self.range.leader().map_or("", |leader| leader.address.as_str())
    }

    /// A random replica's address (the leader's for a single-copy range).
    fn any_replica(&self) -> &str {
        let replicas: Vec<&str> =
            self.range.replicas.iter().map(|r| r.address.as_str()).filter(|a| !a.is_empty()).collect();
        if replicas.is_empty() {
            return self.address();
        }
        replicas[rand::random::<u64>() as usize % replicas.len()]
    }
}

/// What a failed attempt means for the next one.
enum Failure {
    /// A NotOwner taught the cache a newer descriptor: retry at once.
    Rerouted(Status),
    /// Retry after a pause and a refresh of the range map (NotOwner without a hint, node gone).
    Retry(Status),
    /// Give up: the request itself is wrong or the cluster refused it.
    Fatal(Status),
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Self, ClientError> {
        if config.seeds.is_empty() {
            return Err(ClientError::Config("at least one seed endpoint is needed".into()));
        }
        let mut cache = RangeCache::default();
        for seed in &config.seeds {
            let address = normalize_address(seed);
            endpoint(&address).map_err(|e| ClientError::Config(format!("bad endpoint {seed:?}: {}", e.reason)))?;
            cache.add_node(&address);
        }
        let channels = ChannelPool::new(ChannelConfig {
            connect_timeout: config.connect_timeout,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(20),
            connections_per_address: config.connections_per_node,
            local_address: None,
        });
        let bundlers = Bundlers::new(config.bundling, channels.clone(), config.attempt_timeout);
        let never = Instant::now().checked_sub(Duration::from_secs(3600)).unwrap_or_else(Instant::now);
        Ok(Client {
            inner: Arc::new(Inner {
                config,
                cache: RwLock::new(cache),
                channels,
                bundlers,
                refresh: tokio::sync::Mutex::new(never),
            }),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// A snapshot of the cached range map.
    pub fn cached_ranges(&self) -> Vec<RangeDescriptor> {
        self.inner.cache.read().ranges().cloned().collect()
    }

    /// Every node address known: seeds plus those learned since.
    pub fn known_nodes(&self) -> Vec<String> {
        self.inner.cache.read().nodes().cloned().collect()
    }

    /// A channel to `address`, taken round-robin from that node's connections.
    pub fn channel(&self, address: &str) -> Result<Channel, ClientError> {
        self.inner.channels.channel(address).map_err(|e| ClientError::Config(format!("bad node address {e}")))
    }

    pub fn admin(&self, address: &str) -> Result<AdminClient<InterceptedService<Channel, AdminToken>>, ClientError> {
        Ok(AdminClient::with_interceptor(self.channel(address)?, self.inner.config.admin_token.clone()))
    }

    /// Re-reads the range map from every known node (unless another task refreshed it after
    /// `stale_since`). Nodes that do not answer are skipped.
    pub async fn refresh(&self, stale_since: Instant) -> Result<(), ClientError> {
        let mut last_refresh = self.inner.refresh.lock().await;
        if *last_refresh > stale_since {
            return Ok(());
        }
        let addresses = self.known_nodes();
        let mut requests = Vec::new();
        for address in &addresses {
            let mut admin = self.admin(address)?;
            let timeout = self.inner.config.attempt_timeout.min(Duration::from_secs(2));
            requests.push(async move {
                let mut request = tonic::Request::new(ListRangesRequest {});
                request.set_timeout(timeout);
                admin.list_ranges(request).await.map(tonic::Response::into_inner)
            });
        }
        let reports: Vec<ListRangesResponse> =
            futures::future::join_all(requests).await.into_iter().filter_map(Result::ok).collect();
        if reports.is_empty() {
            return Err(ClientError::NoNodeReachable { tried: addresses });
        }
        self.inner.cache.write().rebuild(&reports);
        *last_refresh = Instant::now();
        Ok(())
    }

    fn route(&self, key: &[u8]) -> Option<Route> {
        let range = self.inner.cache.read().lookup(key)?.clone();
        range.leader()?;
        let header = RequestHeader { range_id: range.range_id, generation: range.generation, allow_forward: false };
        Some(Route { range, header })
    }

    fn classify(&self, route: &Route, status: Status) -> Failure {
        if let Some(not_owner) = not_owner_detail(&status) {
            let mut cache = self.inner.cache.write();
            if not_owner.hint.is_some_and(|hint| cache.update(hint)) {
                return Failure::Rerouted(status);
            }
            cache.remove(route.range.range_id);
            return Failure::Retry(status);
        }
        match status.code() {
            Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown | Code::Aborted => {
                Failure::Retry(status)
            }
            _ => Failure::Fatal(status),
        }
    }

    /// Runs `attempt` against the owner of `key` until it succeeds, fails for good, or the
    /// deadline passes. `attempt` gets the owner's address, the routing header, and the range.
    async fn execute<T, F, Fut>(&self, key: &[u8], attempt: F) -> Result<T, ClientError>
    where
        F: FnMut(&str, RequestHeader, &RangeDescriptor) -> Result<Fut, ClientError>,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.execute_on(key, false, attempt).await
    }

    /// `execute`, sent to any replica of the range when `any_replica` (follower reads), else to
    /// its leader.
    async fn execute_on<T, F, Fut>(&self, key: &[u8], any_replica: bool, mut attempt: F) -> Result<T, ClientError>
    where
        F: FnMut(&str, RequestHeader, &RangeDescriptor) -> Result<Fut, ClientError>,
        Fut: Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let deadline = started + self.inner.config.deadline;
        let mut backoff = Duration::from_millis(5);
        let mut attempts = 0u32;
        let mut last_error: Option<Status> = None;
        let mut refresh_error: Option<String> = None;
        loop {
            attempts += 1;
            let attempt_started = Instant::now();
            let mut rerouted = false;
            if let Some(route) = self.route(key) {
                let address = if any_replica { route.any_replica() } else { route.address() };
                let call = attempt(address, route.header, &route.range)?;
                let timeout = deadline.saturating_duration_since(Instant::now()).min(self.inner.config.attempt_timeout);
                let status = match tokio::time::timeout(timeout, call).await {
                    Ok(Ok(value)) => return Ok(value),
                    Ok(Err(status)) => status,
                    Err(_) => {
                        Status::deadline_exceeded(format!("no answer from {} within {timeout:?}", route.address()))
                    }
                };
                match self.classify(&route, status) {
                    Failure::Fatal(status) => return Err(ClientError::Rejected(status)),
                    Failure::Rerouted(status) => {
                        rerouted = true;
                        last_error = Some(status);
                    }
                    Failure::Retry(status) => last_error = Some(status),
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Deadline {
                    key: Bytes::copy_from_slice(key),
                    attempts,
                    elapsed: started.elapsed(),
                    last_error: match (last_error, refresh_error) {
                        (Some(s), _) => format!("{:?}: {}", s.code(), s.message()),
                        (None, Some(refresh)) => refresh,
                        (None, None) => "no node reported an owner for the key".to_string(),
                    },
                });
            }
            if rerouted {
                continue;
            }
            if attempts > 1 {
                let jitter = Duration::from_micros(rand::random::<u64>() % (backoff.as_micros() as u64 + 1));
                let pause = (backoff / 2 + jitter).min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            // Best effort: an unreachable cluster shows up in the deadline error above.
            if let Err(error) = self.refresh(attempt_started).await {
                refresh_error = Some(error.to_string());
            }
        }
    }

    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<Bytes>, ClientError> {
        self.get_with(key, ReadConsistency::Linearizable).await
    }

    /// A read with the given consistency: `Follower` goes to a random replica of a replicated
    /// range (see `ReadConsistency`; `Stale` needs a bound: `get_stale`).
    pub async fn get_with(
        &self,
        key: impl Into<Bytes>,
        consistency: ReadConsistency,
    ) -> Result<Option<Bytes>, ClientError> {
        self.read(key.into(), consistency, 0).await
    }

    /// A read of any replica whose data holds every write acknowledged more than
    /// `max_staleness` before it (`ReadConsistency::Stale`: at most 60 s); the lowest latency.
    pub async fn get_stale(
        &self,
        key: impl Into<Bytes>,
        max_staleness: std::time::Duration,
    ) -> Result<Option<Bytes>, ClientError> {
        let millis = u32::try_from(max_staleness.as_millis()).unwrap_or(u32::MAX);
        self.read(key.into(), ReadConsistency::Stale, millis).await
    }

    async fn read(
        &self,
        key: Bytes,
        consistency: ReadConsistency,
        max_staleness_ms: u32,
    ) -> Result<Option<Bytes>, ClientError> {
        let any_replica = matches!(consistency, ReadConsistency::Follower | ReadConsistency::Stale);
        self.execute_on(&key, any_replica, |address, header, _| {
            let request = GetRequest {
                header: Some(header),
                key: key.clone(),
                consistency: consistency as i32,
                max_staleness_ms,
            };
            let address = address.to_string();
            Ok(async move {
                let response = self.inner.bundlers.get(&address, request).await?;
                Ok(response.found.then_some(response.value))
            })
        })
        .await
    }

    pub async fn put(&self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> Result<(), ClientError> {
        let (key, value) = (key.into(), value.into());
        self.execute(&key, |address, header, _| {
            let request = PutRequest { header: Some(header), key: key.clone(), value: value.clone() };
            let address = address.to_string();
            Ok(async move { self.inner.bundlers.put(&address, request).await.map(|_| ()) })
        })
        .await
    }

    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<(), ClientError> {
        let key = key.into();
        self.execute(&key, |address, header, _| {
            let request = DeleteRequest { header: Some(header), key: key.clone() };
            let address = address.to_string();
            Ok(async move { self.inner.bundlers.delete(&address, request).await.map(|_| ()) })
        })
        .await
    }

    /// Applies `mutations` atomically. All keys must lie in one range; otherwise nothing is
    /// written and the error says which ranges they span.
    pub async fn batch(&self, mutations: Vec<Mutation>) -> Result<u32, ClientError> {
        let Some(first) = mutations.first().map(|m| m.key.clone()) else {
            return Err(ClientError::Config("a batch needs at least one mutation".into()));
        };
        self.execute(&first, |address, header, range| {
            if let Some(outside) = mutations.iter().find(|m| !range.contains_key(&m.key)) {
                return Err(ClientError::BatchSpansRanges {
                    key: outside.key.clone(),
                    range: range.span(),
                    range_id: range.range_id,
                });
            }
            let request = BatchRequest { header: Some(header), mutations: mutations.clone() };
            let channel = self.channel(address)?;
            Ok(async move { Ok(KvClient::new(channel).batch(request).await?.into_inner().applied) })
        })
        .await
    }

    /// One page of `[start, end)`: at most `limit` pairs from the range holding `start`, and the
    /// key to continue from if there is more.
    pub async fn scan_page(
        &self,
        start: Bytes,
        end: Bytes,
        limit: u32,
        keys_only: bool,
    ) -> Result<(Vec<KeyValue>, Option<Bytes>), ClientError> {
        self.execute(&start, |address, header, _| {
            let channel = self.channel(address)?;
            let request = ScanRequest {
                header: Some(header),
                start_key: start.clone(),
                end_key: end.clone(),
                limit,
                keys_only,
                consistency: 0,
                max_staleness_ms: 0,
            };
            Ok(async move {
                let response = KvClient::new(channel).scan(request).await?.into_inner();
                Ok((response.kvs, response.more_remaining.then_some(response.resume_key)))
            })
        })
        .await
    }

    /// Up to `limit` pairs of `[start, end)` in key order, stitched across ranges and nodes.
    /// Each range's part is read from one snapshot; different ranges are read at different times.
    pub async fn scan(
        &self,
        start: Bytes,
        end: Bytes,
        limit: usize,
        keys_only: bool,
    ) -> Result<Vec<KeyValue>, ClientError> {
        let mut out = Vec::new();
        let mut cursor = start;
        while out.len() < limit {
            let want = (limit - out.len()).min(u32::MAX as usize) as u32;
            let (page, resume) = self.scan_page(cursor, end.clone(), want, keys_only).await?;
            out.extend(page);
            match resume {
                Some(next) => cursor = next,
                None => break,
            }
        }
        out.truncate(limit);
        Ok(out)
    }
}
