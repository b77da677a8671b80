//! Channels to other nodes (forwarding a request one hop, pulling a move's data, asking a move's
//! target how it ended): one lazily connected channel per address, shared by every caller.

use std::collections::HashMap;
use std::time::Duration;

use kvfleet_proto::admin_auth::AdminToken;
use kvfleet_proto::v1::admin_client::AdminClient;
use kvfleet_proto::v1::kv_client::KvClient;
use parking_lot::Mutex;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::NodeError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Snapshot chunks and tail batches are larger than tonic's 4 MiB default.
const MAX_ADMIN_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Default)]
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
    /// Sent on every admin call to a peer (the cluster's nodes share it).
    admin_token: AdminToken,
}

pub type PeerAdmin = AdminClient<InterceptedService<Channel, AdminToken>>;

impl Peers {
    pub fn new(admin_token: AdminToken) -> Self {
        Peers { channels: Default::default(), admin_token }
    }

    fn channel(&self, address: &str) -> Result<Channel, NodeError> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| NodeError::Invalid(format!("bad peer address {address:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // A peer that vanished without a FIN (a partitioned or frozen machine) is noticed.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .connect_lazy();
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    pub fn kv(&self, address: &str) -> Result<KvClient<Channel>, NodeError> {
        Ok(KvClient::new(self.channel(address)?))
    }

    pub fn admin(&self, address: &str) -> Result<PeerAdmin, NodeError> {
        Ok(AdminClient::with_interceptor(self.channel(address)?, self.admin_token.clone())
            .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_ADMIN_MESSAGE_BYTES))
    }
}
