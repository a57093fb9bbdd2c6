//! HS256 tokens the relay accepts (or must refuse).
//!
//! The harness mints its own JWTs with `jsonwebtoken` so tests can build every
//! kind of bad credential: expired, signed with another secret, the wrong role,
//! or for another host.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header, encode};
use serde::{Deserialize, Serialize};

/// How long ago an "expired" token expired: far beyond any clock-skew leeway
/// (`jsonwebtoken` defaults to 60 s).
const EXPIRED_AGO: Duration = Duration::from_secs(3600);

/// Lifetime of a valid test token.
const VALID_FOR: Duration = Duration::from_secs(3600);

/// The claims of a relay token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: who holds the token. Free-form.
    pub sub: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// `"host"` (may open tunnels) or `"client"` (may reach hosts).
    pub role: String,
    /// Host ids this token covers, or `["*"]`.
    pub hosts: Vec<String>,
    /// Not before, unix seconds (absent unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

// === impl Claims ===

impl Claims {
    /// A valid host token for `host_id`.
    pub fn host(host_id: &str) -> Self {
        Self::new("host", &[host_id])
    }

    /// A valid client token for `hosts` (`&["*"]` for every host).
    pub fn client(hosts: &[&str]) -> Self {
        Self::new("client", hosts)
    }

    fn new(role: &str, hosts: &[&str]) -> Self {
        Self {
            sub: format!("relay-tests-{role}"),
            exp: unix_now() + VALID_FOR.as_secs(),
            role: role.to_owned(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            nbf: None,
        }
    }

    /// The same claims, valid only from an hour from now (`nbf`).
    pub fn not_yet_valid(mut self) -> Self {
        self.nbf = Some(unix_now() + VALID_FOR.as_secs());
        self
    }

    /// The same claims, expired an hour ago.
    pub fn expired(mut self) -> Self {
        self.exp = unix_now() - EXPIRED_AGO.as_secs();
        self
    }

    /// The same claims with another subject (to make distinct tokens).
    pub fn with_sub(mut self, sub: &str) -> Self {
        self.sub = sub.to_owned();
        self
    }

    /// Signs these claims with `secret`.
    pub fn sign(&self, secret: &str) -> String {
        mint(secret, self)
    }
}

/// Signs `claims` as an HS256 JWT with `secret`.
///
/// # Panics
///
/// If encoding fails (it cannot for HS256 and serializable claims).
pub fn mint(secret: &str, claims: &Claims) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding cannot fail")
}

/// Reads the claims of `token` as JSON WITHOUT verifying the signature (to
/// inspect tokens the relay printed).
///
/// # Panics
///
/// If `token` is not a JWT with a JSON object payload.
pub fn claims_of(token: &str) -> serde_json::Value {
    jsonwebtoken::dangerous::insecure_decode_claims::<serde_json::Value>(token)
        .unwrap_or_else(|err| panic!("{token:?} is not a relay JWT: {err}"))
}

/// Seconds since the unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}
