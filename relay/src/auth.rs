//! Tokens: who may register a tunnel for a host, and who may reach it.
//!
//! Tokens are JWTs with the claims `sub`, `exp` (both required), `role` (`host` to
//! register a tunnel, `client` to reach one) and `hosts` (the hostIds the bearer may
//! register or reach, or `["*"]`). The relay only verifies; `relay token` and
//! `relay serve --dev` mint with a [`Signer`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::host_id::HostId;

/// Clock skew tolerated on `exp`, so a token minted on a machine whose clock is slightly
/// ahead is not refused.
pub const CLOCK_LEEWAY: Duration = Duration::from_secs(5);

/// The `hosts` entry that allows every hostId.
pub const ANY_HOST: &str = "*";

/// What a token lets its bearer do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Register a tunnel (a host agent).
    Host,
    /// Reach a host through its tunnel (a client).
    Client,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Client => "client",
        }
    }
}

/// The claims of a relay token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token was issued to (for logs; never the token itself).
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// `host` or `client`. Kept as text so that an unknown role is a 403 ("wrong role"),
    /// not a parse failure.
    #[serde(default)]
    pub role: String,
    /// hostIds the bearer may register or reach; `["*"]` for all.
    #[serde(default)]
    pub hosts: Vec<String>,
}

impl Claims {
    /// Whether these claims let the bearer act on `host`.
    pub fn allows(&self, host: &HostId) -> bool {
        self.hosts
            .iter()
            .any(|h| h == ANY_HOST || h == host.as_str())
    }
}

/// Why a request was not authorized. Always the caller's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in `Authorization: Bearer` nor in `token=`.
    #[error("missing token: send Authorization: Bearer <token> or ?token=<token>")]
    Missing,
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// Bad signature, wrong algorithm, malformed, or a required claim is missing.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// A valid token for the other role.
    #[error("token role is not {expected}")]
    WrongRole {
        /// The role this endpoint needs.
        expected: &'static str,
    },
    /// A valid token that does not list this host.
    #[error("token does not allow host {0}")]
    HostNotAllowed(HostId),
}

impl AuthError {
    /// 401 when the bearer is unknown, 403 when it is known but not allowed.
    pub fn status(&self) -> http::StatusCode {
        match self {
            AuthError::Missing | AuthError::Expired | AuthError::Invalid(_) => {
                http::StatusCode::UNAUTHORIZED
            }
            AuthError::WrongRole { .. } | AuthError::HostNotAllowed(_) => {
                http::StatusCode::FORBIDDEN
            }
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Expired => "expired",
            AuthError::Invalid(_) => "invalid",
            AuthError::WrongRole { .. } => "wrong_role",
            AuthError::HostNotAllowed(_) => "host_not_allowed",
        }
    }
}

/// Verifies tokens with the relay's configured key.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Tokens whose signature and claims were already verified, by their exact text, so a
    /// client that sends the same token with every request costs one hash lookup instead
    /// of a signature check (~11 % of the relay's CPU per request, BENCHMARKS.md). Only
    /// the identical string hits; expiry is checked again on every hit. Bounded by
    /// [`VERIFIED_CACHE_SIZE`]: when full, expired entries are dropped, then all.
    verified: Arc<Mutex<HashMap<Box<str>, Arc<Claims>>>>,
}

/// Most verified tokens remembered (a few hundred bytes each).
pub const VERIFIED_CACHE_SIZE: usize = 10_000;

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for HS256 tokens signed with `secret`.
    pub fn hs256(secret: &[u8]) -> Verifier {
        Verifier::new(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// A verifier for a public key in PEM form. Without `algorithm`, it is taken from the
    /// key: Ed25519 → EdDSA, RSA → RS256, P-256 → ES256.
    ///
    /// # Errors
    /// When the PEM is not a public key of a supported kind, or does not fit `algorithm`.
    pub fn from_public_pem(pem: &[u8], algorithm: Option<Algorithm>) -> Result<Verifier, String> {
        let guesses: &[Algorithm] = match algorithm {
            Some(alg) => &[alg][..],
            None => &[Algorithm::EdDSA, Algorithm::RS256, Algorithm::ES256],
        };
        for &alg in guesses {
            let key = match alg {
                Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512 => DecodingKey::from_rsa_pem(pem),
                Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                    return Err("HMAC algorithms take RELAY_JWT_SECRET, not a key file".into());
                }
                other => return Err(format!("algorithm {other:?} is not supported")),
            };
            if let Ok(key) = key {
                return Ok(Verifier::new(key, alg));
            }
        }
        Err(match algorithm {
            Some(alg) => format!("the key file is not a PEM public key for {alg:?}"),
            None => "the key file is not a PEM public key (Ed25519, RSA or P-256)".into(),
        })
    }

    fn new(key: DecodingKey, alg: Algorithm) -> Verifier {
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // `nbf` when present: a token minted for later is refused until then.
        validation.validate_nbf = true;
        validation.leeway = CLOCK_LEEWAY.as_secs();
        Verifier {
            key,
            validation,
            verified: Arc::default(),
        }
    }

    /// Checks `token` and that it grants `role` on `host`.
    ///
    /// # Errors
    /// [`AuthError`] saying exactly why not; it never contains the token.
    pub fn authorize(
        &self,
        token: &str,
        role: Role,
        host: &HostId,
    ) -> Result<Arc<Claims>, AuthError> {
        self.authorize_at(token, role, host, unix_now())
    }

    /// [`Verifier::authorize`] at `now` (seconds since the Unix epoch).
    fn authorize_at(
        &self,
        token: &str,
        role: Role,
        host: &HostId,
        now: u64,
    ) -> Result<Arc<Claims>, AuthError> {
        let claims = match self.cached(token) {
            Some(claims) => {
                if claims.exp.saturating_add(CLOCK_LEEWAY.as_secs()) < now {
                    self.cache().remove(token);
                    return Err(AuthError::Expired);
                }
                claims
            }
            None => {
                let claims = Arc::new(self.verify(token)?);
                self.remember(token, &claims, now);
                claims
            }
        };
        if claims.role != role.as_str() {
            return Err(AuthError::WrongRole {
                expected: role.as_str(),
            });
        }
        if !claims.allows(host) {
            return Err(AuthError::HostNotAllowed(host.clone()));
        }
        Ok(claims)
    }

    /// Checks the signature and the registered claims.
    fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature"),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("wrong algorithm"),
                ErrorKind::MissingRequiredClaim(_) => {
                    AuthError::Invalid("a required claim (exp, sub) is missing")
                }
                ErrorKind::ImmatureSignature => AuthError::Invalid("token not valid yet"),
                _ => AuthError::Invalid("malformed token"),
            })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Arc<Claims>>> {
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached(&self, token: &str) -> Option<Arc<Claims>> {
        self.cache().get(token).cloned()
    }

    fn remember(&self, token: &str, claims: &Arc<Claims>, now: u64) {
        let mut cache = self.cache();
        if cache.len() >= VERIFIED_CACHE_SIZE {
            let leeway = CLOCK_LEEWAY.as_secs();
            cache.retain(|_, c| c.exp.saturating_add(leeway) >= now);
            if cache.len() >= VERIFIED_CACHE_SIZE {
                cache.clear();
            }
        }
        cache.insert(token.into(), Arc::clone(claims));
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The bearer token of a request: `Authorization: Bearer <t>` first, then `token=` in the
/// query string.
pub fn bearer_token(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION)
        && let Ok(value) = value.to_str()
        && let Some((scheme, token)) = value.split_once(' ')
        && scheme.eq_ignore_ascii_case("bearer")
        && !token.trim().is_empty()
    {
        return Some(token.trim().to_owned());
    }
    query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, v)| k == "token" && !v.is_empty())
            .map(|(_, v)| v.into_owned())
    })
}

/// Mints tokens (for `relay token` and `relay serve --dev`).
pub struct Signer {
    key: EncodingKey,
    algorithm: Algorithm,
}

impl Signer {
    /// A signer for HS256 with `secret`.
    pub fn hs256(secret: &[u8]) -> Signer {
        Signer {
            key: EncodingKey::from_secret(secret),
            algorithm: Algorithm::HS256,
        }
    }

    /// A signer with a PEM private key (RSA → RS256, Ed25519 → EdDSA, P-256 → ES256).
    ///
    /// # Errors
    /// When the PEM is not a private key of a supported kind.
    pub fn from_private_pem(pem: &[u8]) -> Result<Signer, String> {
        if let Ok(key) = EncodingKey::from_ed_pem(pem) {
            return Ok(Signer {
                key,
                algorithm: Algorithm::EdDSA,
            });
        }
        if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
            return Ok(Signer {
                key,
                algorithm: Algorithm::RS256,
            });
        }
        if let Ok(key) = EncodingKey::from_ec_pem(pem) {
            return Ok(Signer {
                key,
                algorithm: Algorithm::ES256,
            });
        }
        Err("the key file is not a PEM private key (Ed25519, RSA or P-256)".into())
    }

    /// A token for `sub` with `role` on `hosts`, valid for `ttl`.
    ///
    /// # Errors
    /// When the key cannot sign (a broken key file).
    pub fn mint(
        &self,
        sub: &str,
        role: Role,
        hosts: &[String],
        ttl: Duration,
    ) -> Result<String, String> {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(ttl)
            .as_secs();
        let claims = Claims {
            sub: sub.to_owned(),
            exp,
            role: role.as_str().to_owned(),
            hosts: hosts.to_vec(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.key)
            .map_err(|err| format!("cannot sign the token: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> HostId {
        HostId::parse(s).unwrap()
    }

    #[test]
    fn minted_token_authorizes_its_role_and_hosts_only() {
        let signer = Signer::hs256(b"s3cret");
        let verifier = Verifier::hs256(b"s3cret");
        let token = signer
            .mint(
                "alice",
                Role::Client,
                &["h1".into()],
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(
            verifier
                .authorize(&token, Role::Client, &host("h1"))
                .unwrap()
                .sub,
            "alice"
        );
        assert_eq!(
            verifier
                .authorize(&token, Role::Client, &host("h2"))
                .unwrap_err(),
            AuthError::HostNotAllowed(host("h2"))
        );
        assert_eq!(
            verifier
                .authorize(&token, Role::Host, &host("h1"))
                .unwrap_err(),
            AuthError::WrongRole { expected: "host" }
        );
    }

    #[test]
    fn a_cached_token_is_refused_once_it_expires() {
        let signer = Signer::hs256(b"0123456789abcdef");
        let verifier = Verifier::hs256(b"0123456789abcdef");
        let token = signer
            .mint("c", Role::Client, &["h".into()], Duration::from_secs(60))
            .unwrap();
        let now = unix_now();
        assert!(
            verifier
                .authorize_at(&token, Role::Client, &host("h"), now)
                .is_ok()
        );
        // Served from the cache now; still checked for role, host and expiry.
        assert!(
            verifier
                .authorize_at(&token, Role::Client, &host("h"), now)
                .is_ok()
        );
        assert_eq!(
            verifier
                .authorize_at(&token, Role::Host, &host("h"), now)
                .unwrap_err(),
            AuthError::WrongRole { expected: "host" }
        );
        assert_eq!(
            verifier
                .authorize_at(&token, Role::Client, &host("other"), now)
                .unwrap_err(),
            AuthError::HostNotAllowed(host("other"))
        );
        let later = now + 60 + CLOCK_LEEWAY.as_secs() + 1;
        assert_eq!(
            verifier
                .authorize_at(&token, Role::Client, &host("h"), later)
                .unwrap_err(),
            AuthError::Expired
        );
    }

    #[test]
    fn only_the_identical_token_string_hits_the_cache() {
        let verifier = Verifier::hs256(b"0123456789abcdef");
        let token = Signer::hs256(b"0123456789abcdef")
            .mint("c", Role::Client, &["h".into()], Duration::from_secs(60))
            .unwrap();
        verifier
            .authorize(&token, Role::Client, &host("h"))
            .unwrap();
        // One character of the signature changed: verified again, and refused.
        let mut forged = token.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(
            verifier
                .authorize(&forged, Role::Client, &host("h"))
                .is_err()
        );
    }

    #[test]
    fn wildcard_allows_every_host() {
        let token = Signer::hs256(b"k")
            .mint("ops", Role::Host, &["*".into()], Duration::from_secs(60))
            .unwrap();
        assert!(
            Verifier::hs256(b"k")
                .authorize(&token, Role::Host, &host("anything"))
                .is_ok()
        );
    }

    #[test]
    fn wrong_secret_and_garbage_are_401() {
        let token = Signer::hs256(b"one")
            .mint("x", Role::Host, &["*".into()], Duration::from_secs(60))
            .unwrap();
        let err = Verifier::hs256(b"two")
            .authorize(&token, Role::Host, &host("h"))
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid("bad signature"));
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
        let err = Verifier::hs256(b"two")
            .authorize("not-a-jwt", Role::Host, &host("h"))
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn bearer_header_wins_over_query() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            bearer_token(&headers, Some("a=1&token=q")),
            Some("q".into())
        );
        headers.insert(http::header::AUTHORIZATION, "Bearer h".parse().unwrap());
        assert_eq!(bearer_token(&headers, Some("token=q")), Some("h".into()));
        assert_eq!(bearer_token(&HeaderMap::new(), Some("token=")), None);
        assert_eq!(bearer_token(&HeaderMap::new(), None), None);
    }
}
