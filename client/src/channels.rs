//! Lazily connected gRPC channels, one pool per address, shared by every caller in a process:
//! the client's routed requests, the resharding loop's admin calls, a node's calls to its peers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone)]
pub struct ChannelConfig {
    pub connect_timeout: Duration,
    /// HTTP/2 pings on each connection this often (none: no pings), so that a peer that
    /// vanished without a FIN (a partitioned or frozen machine) is noticed ...
    pub keepalive_interval: Option<Duration>,
    /// ... when a ping goes unanswered this long.
    pub keepalive_timeout: Duration,
    /// HTTP/2 connections per address; calls take them in turn.
    pub connections_per_address: usize,
    /// The local address connections come from (none: the system picks).
    pub local_address: Option<std::net::IpAddr>,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Some(Duration::from_secs(10)),
            keepalive_timeout: Duration::from_secs(20),
            connections_per_address: 1,
            local_address: None,
        }
    }
}

/// An address that is not a `host:port` a channel can be made for.
#[derive(Debug, Clone, thiserror::Error)]
#[error("bad address {address:?}: {reason}")]
pub struct BadAddress {
    pub address: String,
    pub reason: String,
}

/// Channels by address, created on first use and kept; cheap to clone (clones share them).
#[derive(Clone, Default)]
pub struct ChannelPool {
    config: ChannelConfig,
    pools: Arc<Mutex<HashMap<String, Arc<Connections>>>>,
}

struct Connections {
    channels: Vec<Channel>,
    next: AtomicUsize,
}

impl ChannelPool {
    pub fn new(config: ChannelConfig) -> Self {
        ChannelPool { config, pools: Arc::default() }
    }

    pub fn config(&self) -> &ChannelConfig {
        &self.config
    }

    /// A channel to `address` (`host:port`), taken in turn from its connections. Connects on the
    /// first call made through it, not here.
    pub fn channel(&self, address: &str) -> Result<Channel, BadAddress> {
        let connections = {
            let mut pools = self.pools.lock();
            match pools.get(address) {
                Some(connections) => connections.clone(),
                None => {
                    let connections = Arc::new(self.connect_lazy(address)?);
                    pools.insert(address.to_string(), connections.clone());
                    connections
                }
            }
        };
        let index = connections.next.fetch_add(1, Ordering::Relaxed) % connections.channels.len();
        Ok(connections.channels[index].clone())
    }

    fn connect_lazy(&self, address: &str) -> Result<Connections, BadAddress> {
        let mut endpoint = endpoint(address)?
            .connect_timeout(self.config.connect_timeout)
            .tcp_nodelay(true)
            .local_address(self.config.local_address);
        if let Some(interval) = self.config.keepalive_interval {
            endpoint = endpoint.http2_keep_alive_interval(interval).keep_alive_timeout(self.config.keepalive_timeout);
        }
        let channels = (0..self.config.connections_per_address.max(1)).map(|_| endpoint.connect_lazy()).collect();
        Ok(Connections { channels, next: AtomicUsize::new(0) })
    }
}

/// The endpoint of `address` (`host:port`, without a scheme).
pub fn endpoint(address: &str) -> Result<Endpoint, BadAddress> {
    Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| BadAddress { address: address.to_string(), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_pool_per_address_shared_by_clones_and_bad_addresses_named() {
        let pool = ChannelPool::new(ChannelConfig { connections_per_address: 3, ..ChannelConfig::default() });
        let clone = pool.clone();
        pool.channel("127.0.0.1:1").unwrap();
        clone.channel("127.0.0.1:1").unwrap();
        clone.channel("127.0.0.1:2").unwrap();
        assert_eq!(pool.pools.lock().len(), 2);
        let connections = pool.pools.lock()["127.0.0.1:1"].clone();
        assert_eq!((connections.channels.len(), connections.next.load(Ordering::Relaxed)), (3, 2));
        let error = pool.channel("bad address with spaces").unwrap_err();
        assert_eq!(error.address, "bad address with spaces");
        assert!(error.to_string().starts_with("bad address \"bad address with spaces\": "), "{error}");
    }
}
