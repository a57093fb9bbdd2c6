//! An identity provider's signing keys, from its JWKS URL (`--jwks-url`, RFC 7517).
//!
//! The set is fetched at startup, again every [`REFRESH_INTERVAL`] (in the background,
//! on the first token after it), and at once when a token names a key the relay does not
//! know (a rotation): that token waits for the fetch. Fetches are at most one per
//! [`MIN_REFETCH_INTERVAL`], one at a time. A provider that cannot be reached costs
//! nothing but a log line: the keys already known keep working.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use http::{StatusCode, Uri};
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::fetch::{self, FetchError};
use crate::limits::jwks::{FETCH_TIMEOUT, MAX_BYTES, MIN_REFETCH_INTERVAL, REFRESH_INTERVAL};

/// One verification key of the set.
#[derive(Clone)]
pub struct Key {
    /// The key.
    pub key: DecodingKey,
    /// What it signs with.
    pub algorithm: Algorithm,
}

/// A key set as fetched: the keys by `kid`, and when.
type Fetched = (Arc<HashMap<String, Key>>, Instant);

/// What looking a key up found.
pub enum Lookup {
    /// The key.
    Found(Key),
    /// The set (as last fetched) has no such key.
    Unknown,
    /// No set was ever fetched: the provider has not answered since startup.
    Unavailable,
}

/// The key set of one provider. Cheap to share (`Arc`).
pub struct Jwks {
    url: Uri,
    /// The keys by `kid` (`""` for a key without one), and when they were fetched;
    /// `None` until a fetch succeeds. Replaced whole by each fetch.
    keys: RwLock<Option<Fetched>>,
    /// When the last fetch started (rate limit).
    last_fetch: Mutex<Option<Instant>>,
    /// A fetch is running.
    fetching: AtomicBool,
    /// Bumped when a fetch ends, for tokens waiting on it.
    fetched: watch::Sender<u64>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// The key set at `url`, not fetched yet ([`Jwks::load`]).
    pub fn new(url: Uri) -> Jwks {
        Jwks {
            url,
            keys: RwLock::new(None),
            last_fetch: Mutex::new(None),
            fetching: AtomicBool::new(false),
            fetched: watch::Sender::new(0),
        }
    }

    /// The first fetch, at startup: logs what it found or why it failed.
    pub async fn load(self: &Arc<Self>) {
        self.fetch().await;
    }

    /// The key named `kid` (`None`: the token names none), fetching the set again first
    /// if it does not have it (a rotation), within the rate limit.
    pub async fn key(self: &Arc<Self>, kid: Option<&str>) -> Lookup {
        let kid = kid.unwrap_or("");
        match self.lookup(kid) {
            Some(Lookup::Unknown) | None => {}
            Some(found) => {
                self.refresh_if_old();
                return found;
            }
        }
        self.fetch_or_wait().await;
        self.lookup(kid).unwrap_or(Lookup::Unavailable)
    }

    /// `None` when no set was ever fetched.
    fn lookup(&self, kid: &str) -> Option<Lookup> {
        let keys = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (keys, _) = keys.as_ref()?;
        Some(match keys.get(kid) {
            Some(key) => Lookup::Found(key.clone()),
            // A token without `kid` against a set of one key: that key.
            None if kid.is_empty() && keys.len() == 1 => {
                Lookup::Found(keys.values().next().expect("one key").clone())
            }
            None => Lookup::Unknown,
        })
    }

    /// Starts a background fetch if the set is older than [`REFRESH_INTERVAL`].
    fn refresh_if_old(self: &Arc<Self>) {
        let old = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() >= REFRESH_INTERVAL);
        if old && !self.fetching.load(Ordering::Relaxed) {
            let jwks = self.clone();
            // Bounded by FETCH_TIMEOUT; nothing waits for it.
            tokio::spawn(async move { jwks.fetch().await });
        }
    }

    /// Fetches the set, or waits for the fetch already running (bounded).
    async fn fetch_or_wait(self: &Arc<Self>) {
        let mut done = self.fetched.subscribe();
        if self.fetching.load(Ordering::Acquire) {
            let _ = tokio::time::timeout(FETCH_TIMEOUT, done.changed()).await;
            return;
        }
        self.fetch().await;
    }

    /// One fetch, unless one ran less than [`MIN_REFETCH_INTERVAL`] ago or is running.
    async fn fetch(&self) {
        {
            let mut last = self
                .last_fetch
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < MIN_REFETCH_INTERVAL)
                || self.fetching.swap(true, Ordering::AcqRel)
            {
                return;
            }
            *last = Some(Instant::now());
        }
        match self.fetch_keys().await {
            Ok(keys) => {
                info!(url = %self.url, keys = keys.len(), "fetched the identity provider's keys");
                *self
                    .keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some((Arc::new(keys), Instant::now()));
            }
            Err(why) => {
                let known = self
                    .keys
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .as_ref()
                    .map_or(0, |(keys, _)| keys.len());
                warn!(
                    url = %self.url,
                    error = %why,
                    known_keys = known,
                    "cannot fetch the identity provider's keys (JWKS); the keys already known \
                     keep working, tokens signed with others are refused until it answers"
                );
            }
        }
        self.fetching.store(false, Ordering::Release);
        self.fetched.send_modify(|n| *n += 1);
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, Key>, String> {
        let (status, body) = fetch::get(&self.url, None, MAX_BYTES, FETCH_TIMEOUT)
            .await
            .map_err(|e: FetchError| e.to_string())?;
        if status != StatusCode::OK {
            return Err(format!("the key set URL answered {status}"));
        }
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("not a JWK set: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            match key_of(jwk) {
                Ok(key) => {
                    keys.insert(jwk.common.key_id.clone().unwrap_or_default(), key);
                }
                Err(why) => warn!(
                    kid = jwk.common.key_id.as_deref().unwrap_or(""),
                    %why,
                    "ignored a key of the identity provider's set"
                ),
            }
        }
        if keys.is_empty() {
            return Err("the key set has no usable signing key".into());
        }
        Ok(keys)
    }
}

/// A verification key from a JWK: RS256 (and the other RSA algorithms it names), ES256 /
/// ES384, EdDSA. Symmetric keys and encryption keys are refused: a public key set has
/// no business holding either.
fn key_of(jwk: &Jwk) -> Result<Key, String> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key".into());
    }
    let named = jwk
        .common
        .key_algorithm
        .map(|alg| match alg {
            KeyAlgorithm::RS256 => Ok(Algorithm::RS256),
            KeyAlgorithm::RS384 => Ok(Algorithm::RS384),
            KeyAlgorithm::RS512 => Ok(Algorithm::RS512),
            KeyAlgorithm::PS256 => Ok(Algorithm::PS256),
            KeyAlgorithm::PS384 => Ok(Algorithm::PS384),
            KeyAlgorithm::PS512 => Ok(Algorithm::PS512),
            KeyAlgorithm::ES256 => Ok(Algorithm::ES256),
            KeyAlgorithm::ES384 => Ok(Algorithm::ES384),
            KeyAlgorithm::EdDSA => Ok(Algorithm::EdDSA),
            other => Err(format!(
                "algorithm {other} is not for signatures the relay checks"
            )),
        })
        .transpose()?;
    let algorithm = match (&jwk.algorithm, named) {
        (AlgorithmParameters::OctetKey(_), _) => return Err("a symmetric key".into()),
        (_, Some(alg)) => alg,
        (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
        (AlgorithmParameters::EllipticCurve(p), None) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return Err("an unsupported curve".into()),
        },
        (AlgorithmParameters::OctetKeyPair(_), None) => Algorithm::EdDSA,
        (_, None) => return Err("an unknown key type".into()),
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("unusable: {e}"))?;
    Ok(Key { key, algorithm })
}
