//! The systems a benchmark can drive through the same harness: kvfleet (through the client
//! library), Redis (GET/SET) and etcd (KV Range/Put), so numbers compare like with like.

use std::time::Duration;

use bytes::Bytes;
use kvfleet_proto::etcd::kv_client::KvClient as EtcdKvClient;
use kvfleet_proto::etcd::{PutRequest as EtcdPut, RangeRequest as EtcdRange};
use tonic::transport::{Channel, Endpoint};

use kvfleet_client::{BundleConfig, Client, ClientConfig};
use kvfleet_proto::v1::ReadConsistency;

/// Where to send load, parsed from `--target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSpec {
    /// The kvfleet cluster named by `--endpoints`.
    Kvfleet,
    /// `redis://host:port`
    Redis(String),
    /// `etcd://host:port`
    Etcd(String),
}

impl std::str::FromStr for TargetSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "kvfleet" {
            Ok(TargetSpec::Kvfleet)
        } else if s.starts_with("redis://") {
            Ok(TargetSpec::Redis(s.to_string()))
        } else if let Some(address) = s.strip_prefix("etcd://") {
            Ok(TargetSpec::Etcd(address.to_string()))
        } else {
            Err(format!("unknown target {s:?}: expected kvfleet, redis://host:port or etcd://host:port"))
        }
    }
}

impl std::fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetSpec::Kvfleet => write!(f, "kvfleet"),
            TargetSpec::Redis(url) => write!(f, "{url}"),
            TargetSpec::Etcd(address) => write!(f, "etcd://{address}"),
        }
    }
}

/// A handle to a target; workers share handles round-robin.
#[derive(Clone)]
pub enum Connection {
    /// How its reads are made (kvfleet's read consistencies).
    Kvfleet(Client, ReadChoice),
    Redis(redis::aio::MultiplexedConnection),
    Etcd(EtcdKvClient<Channel>),
}

/// How a kvfleet benchmark reads (`--read-consistency`, `--max-staleness-ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadChoice {
    Linearizable,
    Follower,
    Stale(Duration),
}

impl Connection {
    /// Opens `connections` TCP connections to the target: for kvfleet, one client whose pool
    /// holds that many connections per node; for Redis and etcd, that many handles.
    pub async fn open_all(
        spec: &TargetSpec,
        endpoints: &[String],
        deadline: Duration,
        connections: usize,
        reads: ReadChoice,
        bundling: BundleConfig,
    ) -> Result<Vec<Self>, String> {
        if *spec == TargetSpec::Kvfleet {
            let mut config = ClientConfig::new(endpoints.iter().cloned());
            config.deadline = deadline;
            config.connections_per_node = connections;
            config.bundling = bundling;
            return Ok(vec![Connection::Kvfleet(Client::new(config).map_err(|e| e.to_string())?, reads)]);
        }
        let mut handles = Vec::with_capacity(connections);
        for _ in 0..connections {
            handles.push(Self::open_one(spec).await?);
        }
        Ok(handles)
    }

    async fn open_one(spec: &TargetSpec) -> Result<Self, String> {
        match spec {
            TargetSpec::Kvfleet => Err("kvfleet connections are pooled by the client".into()),
            TargetSpec::Redis(url) => {
                let client = redis::Client::open(url.as_str()).map_err(|e| format!("{url}: {e}"))?;
                let connection =
                    client.get_multiplexed_async_connection().await.map_err(|e| format!("connecting to {url}: {e}"))?;
                Ok(Connection::Redis(connection))
            }
            TargetSpec::Etcd(address) => {
                let channel = Endpoint::from_shared(format!("http://{address}"))
                    .map_err(|e| format!("{address}: {e}"))?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .map_err(|e| format!("connecting to etcd at {address}: {e}"))?;
                Ok(Connection::Etcd(EtcdKvClient::new(channel)))
            }
        }
    }

    pub async fn get(&mut self, key: &[u8]) -> Result<Option<Bytes>, String> {
        match self {
            Connection::Kvfleet(client, reads) => {
                let key = Bytes::copy_from_slice(key);
                let read = match *reads {
                    ReadChoice::Linearizable => client.get(key).await,
                    ReadChoice::Follower => client.get_with(key, ReadConsistency::Follower).await,
                    ReadChoice::Stale(bound) => client.get_stale(key, bound).await,
                };
                read.map_err(|e| e.to_string())
            }
            Connection::Redis(connection) => redis::cmd("GET")
                .arg(key)
                .query_async::<Option<Vec<u8>>>(connection)
                .await
                .map(|v| v.map(Bytes::from))
                .map_err(|e| e.to_string()),
            Connection::Etcd(client) => {
                let request = EtcdRange { key: Bytes::copy_from_slice(key), ..Default::default() };
                let response = client.range(request).await.map_err(|e| e.to_string())?.into_inner();
                Ok(response.kvs.into_iter().next().map(|kv| kv.value))
            }
        }
    }

    pub async fn put(&mut self, key: &[u8], value: Vec<u8>) -> Result<(), String> {
        match self {
            Connection::Kvfleet(client, _) => {
                client.put(Bytes::copy_from_slice(key), value).await.map_err(|e| e.to_string())
            }
            Connection::Redis(connection) => {
                redis::cmd("SET").arg(key).arg(value).query_async::<()>(connection).await.map_err(|e| e.to_string())
            }
            Connection::Etcd(client) => {
                let request = EtcdPut { key: Bytes::copy_from_slice(key), value: value.into(), ..Default::default() };
                client.put(request).await.map(|_| ()).map_err(|e| e.to_string())
            }
        }
    }
}
