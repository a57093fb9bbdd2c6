//! Pooled HTTP connections to peer relays (proxy routing, [`crate::routing`]).

use axum::body::Body;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::limits::PEER_CONNECT_TIMEOUT;

/// Pooled HTTP connections to peer relays.
#[derive(Debug, Clone)]
pub struct Peers {
    pub(crate) client: Client<HttpConnector, Body>,
}

impl Default for Peers {
    fn default() -> Self {
        Peers::new()
    }
}

impl Peers {
    /// A client with a short connect timeout (peers share a private network: a slow
    /// connect means a dead peer) and Nagle off.
    pub fn new() -> Peers {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(PEER_CONNECT_TIMEOUT));
        Peers {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}
