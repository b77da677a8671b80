//! Channels to other nodes (forwarding a request one hop, pulling a move's data, asking a move's
//! target how it ended): one lazily connected channel per address, shared by every caller.

use std::time::Duration;

use kvfleet_client::{ChannelConfig, ChannelPool};
use kvfleet_proto::admin_auth::AdminToken;
use kvfleet_proto::v1::admin_client::AdminClient;
use kvfleet_proto::v1::kv_client::KvClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::NodeError;

/// Snapshot chunks and tail batches are larger than tonic's 4 MiB default.
const MAX_ADMIN_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Clone, Default)]
pub struct Peers {
    /// Pings every 10 s, so that a peer that vanished without a FIN (a partitioned or frozen
    /// machine) is noticed (the pool's defaults).
    channels: ChannelPool,
    /// Sent on every admin call to a peer (the cluster's nodes share it).
    admin_token: AdminToken,
}

pub type PeerAdmin = AdminClient<InterceptedService<Channel, AdminToken>>;

impl Peers {
    pub fn new(admin_token: AdminToken) -> Self {
        let config = ChannelConfig { connect_timeout: Duration::from_secs(2), ..ChannelConfig::default() };
        Peers { channels: ChannelPool::new(config), admin_token }
    }

    fn channel(&self, address: &str) -> Result<Channel, NodeError> {
        self.channels.channel(address).map_err(|e| NodeError::Invalid(format!("bad peer {e}")))
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
