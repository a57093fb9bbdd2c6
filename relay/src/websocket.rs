//! WebSocket plumbing shared by tunnels, client channels and relay-to-relay bridges.

use axum::extract::ws::WebSocketUpgrade;

use crate::limits::{Limits, WS_READ_BUFFER, WS_WRITE_BUFFER};

/// Applies the relay's socket limits and buffer sizes to a WebSocket upgrade.
///
/// The write buffer is left unbounded on purpose: the session writes one batch at a time
/// from a bounded queue, so that queue is the bound, and a cap here would only turn one
/// large message into an error.
pub(crate) fn configure(upgrade: WebSocketUpgrade, limits: &Limits) -> WebSocketUpgrade {
    upgrade
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
}
