//! WebSocket plumbing shared by tunnels, client channels and relay-to-relay bridges.

use axum::extract::ws::{Message, WebSocketUpgrade};

use crate::limits::{Limits, MAX_CLOSE_REASON, WS_READ_BUFFER, WS_WRITE_BUFFER};

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

/// The payload length of a ping or pong; `None` for a data message or a close.
pub fn control_len(message: &Message) -> Option<usize> {
    match message {
        Message::Ping(payload) | Message::Pong(payload) => Some(payload.len()),
        _ => None,
    }
}

/// Whether a WebSocket error is a message over the size limit (tungstenite's `Capacity`,
/// possibly wrapped, as axum does).
pub fn is_too_big(err: &(dyn std::error::Error + 'static)) -> bool {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(WsError::Capacity(_)) = err.downcast_ref::<WsError>() {
            return true;
        }
        current = err.source();
    }
    false
}

/// `reason` cut to what a Close frame may carry (RFC 6455: 123 bytes), on a character
/// boundary.
pub fn close_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_are_cut_on_a_character_boundary() {
        assert_eq!(close_reason("drained"), "drained");
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= MAX_CLOSE_REASON && cut.len() >= MAX_CLOSE_REASON - 1);
        assert!(cut.chars().all(|c| c == 'é'));
    }

    #[test]
    fn capacity_errors_are_recognized_through_wrappers() {
        use tokio_tungstenite::tungstenite::Error as WsError;
        use tokio_tungstenite::tungstenite::error::CapacityError;
        let capacity = WsError::Capacity(CapacityError::MessageTooLong {
            size: 2,
            max_size: 1,
        });
        assert!(is_too_big(&capacity));
        let wrapped = axum::Error::new(capacity);
        assert!(is_too_big(&wrapped));
        assert!(!is_too_big(&WsError::ConnectionClosed));
    }
}
