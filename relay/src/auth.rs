//! Tokens: who may register a tunnel for a host, and who may reach it.
//!
//! Tokens are JWTs with the claims `sub` and `exp` (both required), verified with an
//! HS256 secret, a public key file, or an identity provider's key set ([`crate::jwks`]),
//! and `iss` / `aud` when configured. What a token allows is the [`Policy`]'s:
//! - `claims` (the default): `role` (`host` to register a tunnel, `client` to reach one)
//!   and `hosts` (the hostIds the bearer may register or reach, or `["*"]`);
//! - `org`: hostIds are `<org>:<machine>`, and a token allows every host of every org
//!   listed in its org claim (`organizationIds`, superset's), for hosts and clients alike.
//!
//! The relay only verifies; `relay token` and `relay serve --dev` mint with a [`Signer`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::access::{Access, AccessCheck};
use crate::host_id::HostId;
use crate::jwks::{Jwks, Lookup};

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
    /// Every other claim (the org claim of the `org` policy among them).
    #[serde(flatten, default)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    /// Whether these claims let the bearer act on `host`.
    pub fn allows(&self, host: &HostId) -> bool {
        self.hosts
            .iter()
            .any(|h| h == ANY_HOST || h == host.as_str())
    }

    /// Whether the array claim `claim` lists `org`.
    fn lists(&self, claim: &str, org: &str) -> bool {
        self.other
            .get(claim)
            .and_then(serde_json::Value::as_array)
            .is_some_and(|orgs| orgs.iter().any(|o| o.as_str() == Some(org)))
    }
}

/// What a valid token allows (`--auth-policy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// `role` and `hosts` claims.
    Claims,
    /// hostIds `<org>:<machine>`, allowed when `<org>` is in the array claim named here.
    Org {
        /// The claim listing the bearer's orgs (`organizationIds` by default).
        claim: String,
    },
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
    /// `org` policy: the hostId is not `<org>:<machine>`.
    #[error("hostId {0} is not <organizationId>:<machineId>")]
    NotOrgHost(HostId),
    /// `org` policy: the token's org claim does not list the host's org.
    #[error("not a member of this org")]
    NotOrgMember,
    /// The access check said no.
    #[error("no access to this host")]
    AccessDenied,
    /// The access check did not answer: not the caller's fault; try again.
    #[error("cannot check access to this host now")]
    AccessCheckFailed,
    /// The identity provider's keys could not be fetched since startup: not the caller's
    /// fault; try again.
    #[error("cannot check tokens now: the identity provider's keys are unavailable")]
    KeysUnavailable,
}

impl AuthError {
    /// 401 when the bearer is unknown, 403 when it is known but not allowed.
    pub fn status(&self) -> http::StatusCode {
        match self {
            AuthError::Missing | AuthError::Expired | AuthError::Invalid(_) => {
                http::StatusCode::UNAUTHORIZED
            }
            AuthError::WrongRole { .. }
            | AuthError::HostNotAllowed(_)
            | AuthError::NotOrgHost(_)
            | AuthError::NotOrgMember
            | AuthError::AccessDenied => http::StatusCode::FORBIDDEN,
            AuthError::KeysUnavailable | AuthError::AccessCheckFailed => {
                http::StatusCode::SERVICE_UNAVAILABLE
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
            AuthError::NotOrgHost(_) => "not_org_host",
            AuthError::NotOrgMember => "not_org_member",
            AuthError::KeysUnavailable => "keys_unavailable",
            AuthError::AccessDenied => "access_denied",
            AuthError::AccessCheckFailed => "access_check_failed",
        }
    }
}

/// Verifies tokens with the relay's configured key.
#[derive(Clone)]
pub struct Verifier {
    keys: Keys,
    /// `iss` and `aud` every token must carry, when set.
    issuer: Option<String>,
    audience: Option<String>,
    policy: Policy,
    /// Asked after the policy allows, when configured.
    access: Option<Arc<Access>>,
    /// `relay serve --dev`'s verifier ([`Verifier::in_dev_mode`]).
    dev: bool,
    /// Tokens whose signature and claims were already verified, by their exact text, so a
    /// client that sends the same token with every request costs one hash lookup instead
    /// of a signature check (~11 % of the relay's CPU per request, BENCHMARKS.md). Only
    /// the identical string hits; expiry is checked again on every hit. Bounded by
    /// [`VERIFIED_CACHE_SIZE`]: when full, expired entries are dropped, then all.
    verified: Arc<Mutex<HashMap<Box<str>, Arc<Claims>>>>,
}

/// Most verified tokens remembered (a few hundred bytes each).
pub const VERIFIED_CACHE_SIZE: usize = 10_000;

/// Where the verification keys come from.
#[derive(Clone)]
enum Keys {
    /// One key (a secret or a public key file).
    Static(DecodingKey, Algorithm),
    /// An identity provider's key set.
    Jwks(Arc<Jwks>),
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = match &self.keys {
            Keys::Static(_, alg) => format!("{alg:?}"),
            Keys::Jwks(jwks) => format!("{jwks:?}"),
        };
        f.debug_struct("Verifier")
            .field("keys", &keys)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for HS256 tokens signed with `secret`.
    pub fn hs256(secret: &[u8]) -> Verifier {
        Verifier::new(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    #[must_use]
    /// This verifier checks `relay serve --dev`'s tokens: a token that an earlier dev run
    /// minted with a secret since lost is told so, not merely "bad signature".
    pub fn in_dev_mode(mut self) -> Verifier {
        self.dev = true;
        self
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
        Verifier::with_keys(Keys::Static(key, alg))
    }

    /// A verifier for the key set of an identity provider (not fetched yet:
    /// [`Verifier::load_keys`]).
    pub fn jwks(url: http::Uri) -> Verifier {
        Verifier::with_keys(Keys::Jwks(Arc::new(Jwks::new(url))))
    }

    fn with_keys(keys: Keys) -> Verifier {
        Verifier {
            keys,
            issuer: None,
            audience: None,
            policy: Policy::Claims,
            access: None,
            dev: false,
            verified: Arc::default(),
        }
    }

    /// Tokens must carry `iss` = `issuer` and `aud` = (or listing) `audience`.
    #[must_use]
    pub fn expecting(mut self, issuer: Option<String>, audience: Option<String>) -> Verifier {
        self.issuer = issuer;
        self.audience = audience;
        self
    }

    /// What valid tokens allow.
    #[must_use]
    pub fn with_policy(mut self, policy: Policy) -> Verifier {
        self.policy = policy;
        self
    }

    /// After the policy, asks `check` (cached) whether the bearer may use the host.
    #[must_use]
    pub fn with_access_check(mut self, check: Option<AccessCheck>) -> Verifier {
        self.access = check.map(|check| Arc::new(Access::new(check)));
        self
    }

    /// Fetches the identity provider's keys, if that is where they come from (logs
    /// the outcome; never fails: tokens are refused with 503 until they come).
    pub async fn load_keys(&self) {
        if let Keys::Jwks(jwks) = &self.keys {
            jwks.load().await;
        }
    }

    /// The tenant a tunnel registered with `claims` for `host` counts against (its
    /// share of the byte budgets): the org under the `org` policy (every machine of
    /// an org, whoever registered it), the token's subject otherwise.
    pub fn tenant(&self, claims: &Claims, host: &HostId) -> String {
        match (&self.policy, host.org()) {
            (Policy::Org { .. }, Some(org)) => format!("org:{org}"),
            _ => claims.sub.clone(),
        }
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // `nbf` when present: a token minted for later is refused until then.
        validation.validate_nbf = true;
        validation.leeway = CLOCK_LEEWAY.as_secs();
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        validation
    }

    /// Checks `token` and that it grants `role` on `host`.
    ///
    /// # Errors
    /// [`AuthError`] saying exactly why not; it never contains the token.
    pub async fn authorize(
        &self,
        token: &str,
        role: Role,
        host: &HostId,
    ) -> Result<Arc<Claims>, AuthError> {
        self.authorize_at(token, role, host, unix_now()).await
    }

    /// [`Verifier::authorize`] at `now` (seconds since the Unix epoch).
    async fn authorize_at(
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
                let claims = Arc::new(self.verify(token).await?);
                self.remember(token, &claims, now);
                claims
            }
        };
        self.allows(&claims, role, host)?;
        if let Some(access) = &self.access {
            access.check(&claims.sub, token, host).await?;
        }
        Ok(claims)
    }

    /// Whether the policy lets `claims` act as `role` on `host`.
    fn allows(&self, claims: &Claims, role: Role, host: &HostId) -> Result<(), AuthError> {
        match &self.policy {
            Policy::Claims => {
                if claims.role != role.as_str() {
                    return Err(AuthError::WrongRole {
                        expected: role.as_str(),
                    });
                }
                if !claims.allows(host) {
                    return Err(AuthError::HostNotAllowed(host.clone()));
                }
            }
            // Hosts and clients alike: superset's tokens carry no role.
            Policy::Org { claim } => {
                let org = host
                    .org()
                    .ok_or_else(|| AuthError::NotOrgHost(host.clone()))?;
                if !claims.lists(claim, org) {
                    return Err(AuthError::NotOrgMember);
                }
            }
        }
        Ok(())
    }

    /// Checks the signature and the registered claims.
    async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let (key, alg) = match &self.keys {
            Keys::Static(key, alg) => (key.clone(), *alg),
            Keys::Jwks(jwks) => {
                let header = jsonwebtoken::decode_header(token)
                    .map_err(|_| AuthError::Invalid("malformed token"))?;
                match jwks.key(header.kid.as_deref()).await {
                    Lookup::Found(found) => (found.key, found.algorithm),
                    Lookup::Unknown => {
                        return Err(AuthError::Invalid(
                            "signed with a key the identity provider does not list",
                        ));
                    }
                    Lookup::Unavailable => return Err(AuthError::KeysUnavailable),
                }
            }
        };
        jsonwebtoken::decode::<Claims>(token, &key, &self.validation(alg))
            .map(|data| data.claims)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature if self.dev && minted_by_dev(token) => {
                    AuthError::Invalid(
                        "minted by an earlier `relay serve --dev` whose secret is gone: use the \
                     tokens this run printed",
                    )
                }
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature"),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("wrong algorithm"),
                ErrorKind::MissingRequiredClaim(_) => AuthError::Invalid(
                    "a required claim is missing (exp, sub, or the configured iss / aud)",
                ),
                ErrorKind::ImmatureSignature => AuthError::Invalid("token not valid yet"),
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer (iss)"),
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience (aud)"),
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
            other: serde_json::Map::new(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.key)
            .map_err(|err| format!("cannot sign the token: {err}"))
    }
}

/// Whether `token`, whose signature did not check, names one of `relay serve --dev`'s
/// subjects: it was minted by a dev run with another secret. The payload is read
/// unverified, only to choose the error message.
fn minted_by_dev(token: &str) -> bool {
    use base64::Engine as _;
    let Some(payload) = token.split('.').nth(1) else {
        return false;
    };
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|claims| claims["sub"].as_str().map(str::to_owned))
        .is_some_and(|sub| crate::dev::DEV_SUBJECTS.contains(&sub.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> HostId {
        HostId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn minted_token_authorizes_its_role_and_hosts_only() {
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
                .await
                .unwrap()
                .sub,
            "alice"
        );
        assert_eq!(
            verifier
                .authorize(&token, Role::Client, &host("h2"))
                .await
                .unwrap_err(),
            AuthError::HostNotAllowed(host("h2"))
        );
        assert_eq!(
            verifier
                .authorize(&token, Role::Host, &host("h1"))
                .await
                .unwrap_err(),
            AuthError::WrongRole { expected: "host" }
        );
    }

    #[tokio::test]
    async fn a_cached_token_is_refused_once_it_expires() {
        let signer = Signer::hs256(b"0123456789abcdef");
        let verifier = Verifier::hs256(b"0123456789abcdef");
        let token = signer
            .mint("c", Role::Client, &["h".into()], Duration::from_secs(60))
            .unwrap();
        let now = unix_now();
        assert!(
            verifier
                .authorize_at(&token, Role::Client, &host("h"), now)
                .await
                .is_ok()
        );
        // Served from the cache now; still checked for role, host and expiry.
        assert!(
            verifier
                .authorize_at(&token, Role::Client, &host("h"), now)
                .await
                .is_ok()
        );
        assert_eq!(
            verifier
                .authorize_at(&token, Role::Host, &host("h"), now)
                .await
                .unwrap_err(),
            AuthError::WrongRole { expected: "host" }
        );
        assert_eq!(
            verifier
                .authorize_at(&token, Role::Client, &host("other"), now)
                .await
                .unwrap_err(),
            AuthError::HostNotAllowed(host("other"))
        );
        let later = now + 60 + CLOCK_LEEWAY.as_secs() + 1;
        assert_eq!(
            verifier
                .authorize_at(&token, Role::Client, &host("h"), later)
                .await
                .unwrap_err(),
            AuthError::Expired
        );
    }

    #[tokio::test]
    async fn only_the_identical_token_string_hits_the_cache() {
        let verifier = Verifier::hs256(b"0123456789abcdef");
        let token = Signer::hs256(b"0123456789abcdef")
            .mint("c", Role::Client, &["h".into()], Duration::from_secs(60))
            .unwrap();
        verifier
            .authorize(&token, Role::Client, &host("h"))
            .await
            .unwrap();
        // One character of the signature changed: verified again, and refused.
        let mut forged = token.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(
            verifier
                .authorize(&forged, Role::Client, &host("h"))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn wildcard_allows_every_host() {
        let token = Signer::hs256(b"k")
            .mint("ops", Role::Host, &["*".into()], Duration::from_secs(60))
            .unwrap();
        assert!(
            Verifier::hs256(b"k")
                .authorize(&token, Role::Host, &host("anything"))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn wrong_secret_and_garbage_are_401() {
        let token = Signer::hs256(b"one")
            .mint("x", Role::Host, &["*".into()], Duration::from_secs(60))
            .unwrap();
        let err = Verifier::hs256(b"two")
            .authorize(&token, Role::Host, &host("h"))
            .await
            .unwrap_err();
        assert_eq!(err, AuthError::Invalid("bad signature"));
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
        let err = Verifier::hs256(b"two")
            .authorize("not-a-jwt", Role::Host, &host("h"))
            .await
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn the_org_policy_allows_members_of_the_hosts_org_whatever_their_role() {
        let verifier = Verifier::hs256(b"0123456789abcdef").with_policy(Policy::Org {
            claim: "organizationIds".into(),
        });
        let claims = serde_json::json!({
            "sub": "u1", "exp": unix_now() + 60, "organizationIds": ["org-a", "org-b"]
        });
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"0123456789abcdef"),
        )
        .unwrap();
        for role in [Role::Host, Role::Client] {
            let allowed = verifier.authorize(&token, role, &host("org-b:m1")).await;
            assert_eq!(allowed.unwrap().sub, "u1");
        }
        assert_eq!(
            verifier
                .authorize(&token, Role::Client, &host("org-c:m1"))
                .await
                .unwrap_err(),
            AuthError::NotOrgMember
        );
        assert_eq!(
            verifier
                .authorize(&token, Role::Client, &host("m1"))
                .await
                .unwrap_err(),
            AuthError::NotOrgHost(host("m1"))
        );
        // A tunnel's share of the budgets is its org's, not its registrant's.
        let claims = verifier
            .authorize(&token, Role::Host, &host("org-a:m2"))
            .await
            .unwrap();
        assert_eq!(verifier.tenant(&claims, &host("org-a:m2")), "org:org-a");
        assert_eq!(
            Verifier::hs256(b"k").tenant(&claims, &host("org-a:m2")),
            "u1"
        );
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
