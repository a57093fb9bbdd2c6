//! The usual fixture: one relay, one upstream, one [`TestHost`] forwarding to
//! it, already registered.

use crate::host::TestHost;
use crate::relay_process::{RelayBuilder, TestRelay};
use crate::upstream::Upstream;

/// A relay with one connected host in front of a real upstream.
///
/// Fields drop in declaration order: the host disconnects first, then the
/// upstream stops, then the relay is killed.
pub struct Stack {
    /// The connected host agent.
    pub host: TestHost,
    /// The service behind the host.
    pub upstream: Upstream,
    /// The relay process.
    pub relay: TestRelay,
    /// The host id the tunnel registered.
    pub host_id: String,
}

// === impl Stack ===

impl Stack {
    /// A default relay with host `host_id` connected.
    pub async fn spawn(host_id: &str) -> Self {
        Self::spawn_with(TestRelay::builder(), host_id).await
    }

    /// A relay from `builder` with host `host_id` connected.
    pub async fn spawn_with(builder: RelayBuilder, host_id: &str) -> Self {
        let relay = builder.spawn().await;
        let upstream = Upstream::spawn().await;
        let host = TestHost::connect(&relay, host_id, &upstream).await;
        Self {
            host,
            upstream,
            relay,
            host_id: host_id.to_owned(),
        }
    }

    /// A valid client token for this host only.
    pub fn client_token(&self) -> String {
        self.relay.client_token(&[&self.host_id])
    }

    /// `http://RELAY/hosts/{host_id}{path}`.
    pub fn url(&self, path: &str) -> String {
        self.relay
            .http_url(&format!("/hosts/{}{path}", self.host_id))
    }

    /// `ws://RELAY/hosts/{host_id}{path}`.
    pub fn ws_url(&self, path: &str) -> String {
        self.relay.ws_url(&format!("/hosts/{}{path}", self.host_id))
    }
}
