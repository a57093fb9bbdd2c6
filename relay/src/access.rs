//! The access check (`--access-check-url`): after a token passes the policy, an HTTP call
//! to the deployment's own API asks whether its bearer may use this host, with the
//! bearer's token (superset's `host.checkAccess`). Answers are cached per (subject,
//! hostId): allowed for [`ALLOWED_FOR`], denied for [`DENIED_FOR`], at most
//! [`CACHE_ENTRIES`] of them (least recently used dropped first).
//!
//! An API that does not answer (down, slow, 5xx) denies nothing for good: the request
//! gets 503 and the next one asks again; nothing is cached.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use http::Uri;
use tokio::time::Instant;
use tracing::warn;

use crate::auth::AuthError;
use crate::fetch;
use crate::host_id::HostId;
use crate::limits::access::{ALLOWED_FOR, CACHE_ENTRIES, DENIED_FOR, MAX_ANSWER_BYTES, TIMEOUT};

/// Where and how to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessCheck {
    /// The URL, `{hostId}` standing where the hostId goes (percent-encoded there).
    pub url_template: String,
    /// When set, a 2xx answer allows only if this JSON pointer in it is `true`.
    pub allow_pointer: Option<String>,
}

impl AccessCheck {
    /// The URL for `host`.
    fn url(&self, host: &HostId) -> Result<Uri, AuthError> {
        let encoded: String = form_urlencoded::byte_serialize(host.as_str().as_bytes()).collect();
        self.url_template
            .replace("{hostId}", &encoded)
            .parse()
            .map_err(|_| AuthError::AccessCheckFailed)
    }
}

/// An [`AccessCheck`] and its cache.
pub struct Access {
    check: AccessCheck,
    cache: Mutex<lru::LruCache<(String, HostId), (bool, Instant)>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}

impl Access {
    /// `check`, with an empty cache.
    pub fn new(check: AccessCheck) -> Access {
        Access {
            check,
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(CACHE_ENTRIES).expect("not zero"),
            )),
        }
    }

    /// Whether `sub` (bearing `token`) may use `host`.
    ///
    /// # Errors
    /// [`AuthError::AccessDenied`] when the API says no, [`AuthError::AccessCheckFailed`]
    /// when it did not answer.
    pub async fn check(&self, sub: &str, token: &str, host: &HostId) -> Result<(), AuthError> {
        let key = (sub.to_owned(), host.clone());
        if let Some(allowed) = self.cached(&key) {
            return if allowed {
                Ok(())
            } else {
                Err(AuthError::AccessDenied)
            };
        }
        let allowed = self.ask(token, host).await?;
        self.lock().put(key, (allowed, Instant::now()));
        if allowed {
            Ok(())
        } else {
            Err(AuthError::AccessDenied)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, lru::LruCache<(String, HostId), (bool, Instant)>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached(&self, key: &(String, HostId)) -> Option<bool> {
        let mut cache = self.lock();
        let &(allowed, at) = cache.get(key)?;
        let ttl = if allowed { ALLOWED_FOR } else { DENIED_FOR };
        if at.elapsed() < ttl {
            return Some(allowed);
        }
        cache.pop(key);
        None
    }

    /// One call to the API: `Ok(allowed)` for an answer, `Err` for none.
    async fn ask(&self, token: &str, host: &HostId) -> Result<bool, AuthError> {
        let url = self.check.url(host)?;
        let (status, body) = fetch::get(&url, Some(token), MAX_ANSWER_BYTES, TIMEOUT)
            .await
            .map_err(|err| {
                warn!(error = %err, "the access check did not answer");
                AuthError::AccessCheckFailed
            })?;
        if status.is_server_error() {
            warn!(%status, "the access check failed");
            return Err(AuthError::AccessCheckFailed);
        }
        if !status.is_success() {
            return Ok(false);
        }
        let Some(pointer) = &self.check.allow_pointer else {
            return Ok(true);
        };
        let answer: serde_json::Value = serde_json::from_slice(&body).map_err(|err| {
            warn!(error = %err, "the access check answered something that is not JSON");
            AuthError::AccessCheckFailed
        })?;
        Ok(answer.pointer(pointer) == Some(&serde_json::Value::Bool(true)))
    }
}
