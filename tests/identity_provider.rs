//! Bring your own identity provider: tokens shaped like superset's (RS256 from the API's
//! key set, `iss` and `aud` the API's URL, `organizationIds`, no `role` / `hosts`), hostIds
//! `<org>:<machine>`, `--auth-policy org`. A local JWKS server plays the provider and
//! counts its fetches; keys are generated per test (`openssl`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use futures_util::StreamExt;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use relay_tests::keys::RSA;
use relay_tests::{
    DEADLINE, KeyPair, TestHost, TestRelay, Upstream, run_relay_cli, unix_now, unused_port,
    wait_until_async,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const API: &str = "https://api.example.test";

/// A signing key of the provider, with its `kid`.
struct SigningKey {
    kid: String,
    key: EncodingKey,
    jwk: Jwk,
}

impl SigningKey {
    fn rsa(kid: &str, pair: &KeyPair) -> SigningKey {
        let pem = std::fs::read(pair.private()).unwrap();
        let key = EncodingKey::from_rsa_pem(&pem).unwrap();
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        SigningKey {
            kid: kid.to_owned(),
            key,
            jwk,
        }
    }

    /// A token with `claims`, `kid` in its header.
    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

/// Claims as superset's API mints them: for `sub`, a member of `orgs`.
fn superset_claims(sub: &str, orgs: &[&str]) -> Value {
    json!({
        "sub": sub,
        "email": format!("{sub}@example.test"),
        "organizationIds": orgs,
        "iss": API,
        "aud": API,
        "iat": unix_now(),
        "exp": unix_now() + 600,
    })
}

/// The provider: serves `/.well-known/jwks.json` with the keys of the moment, counting
/// requests.
#[derive(Clone, Default)]
struct Provider {
    keys: Arc<Mutex<Vec<Jwk>>>,
    fetches: Arc<AtomicUsize>,
}

impl Provider {
    fn publish(&self, keys: &[&SigningKey]) {
        *self.keys.lock().unwrap() = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Serves on `addr` until the returned task is aborted.
    async fn serve(&self, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
        async fn jwks(State(provider): State<Provider>) -> axum::Json<JwkSet> {
            provider.fetches.fetch_add(1, Ordering::SeqCst);
            axum::Json(JwkSet {
                keys: provider.keys.lock().unwrap().clone(),
            })
        }
        let app = Router::new()
            .route("/.well-known/jwks.json", get(jwks))
            .with_state(self.clone());
        let listener = TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    }
}

/// A provider publishing `keys` on a free port: the provider, its port and its task.
async fn provider_with(keys: &[&SigningKey]) -> (Provider, u16, tokio::task::JoinHandle<()>) {
    let provider = Provider::default();
    provider.publish(keys);
    let port = unused_port();
    let server = provider
        .serve(SocketAddr::from(([127, 0, 0, 1], port)))
        .await;
    (provider, port, server)
}

/// A host agent for `host_id` registered with `token`, in front of `upstream`.
async fn host_with(relay: &TestRelay, host_id: &str, token: &str, upstream: &Upstream) -> TestHost {
    TestHost::connect_url(&relay.tunnel_url(host_id, token), None, upstream.addr()).await
}

/// A relay verifying with the provider at `port`, superset's way.
async fn relay_for(port: u16) -> TestRelay {
    TestRelay::builder()
        .no_secret()
        .arg(
            "--jwks-url",
            &format!("http://127.0.0.1:{port}/.well-known/jwks.json"),
        )
        .arg("--jwt-issuer", API)
        .arg("--jwt-audience", API)
        .arg("--auth-policy", "org")
        .spawn()
        .await
}

/// The status and `error` of a GET of `path` on `host_id` with `token`.
async fn get_as(relay: &TestRelay, host_id: &str, token: &str) -> (u16, String) {
    let resp = relay
        .http()
        .get(relay.http_url(&format!("/hosts/{host_id}/echo")))
        .bearer(token)
        .send()
        .await;
    let error = if resp.status == 200 {
        String::new()
    } else {
        resp.json()["error"].as_str().unwrap_or_default().to_owned()
    };
    (resp.status.as_u16(), error)
}

/// The Close frame a tunnel registration gets: code and reason.
async fn tunnel_refusal(relay: &TestRelay, host_id: &str, token: &str) -> (u16, String) {
    let (mut ws, _) = tokio_tungstenite::connect_async(relay.tunnel_url(host_id, token))
        .await
        .expect("the relay upgrades, then closes");
    let next = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap();
    match next {
        Some(Ok(Message::Close(Some(frame)))) => (u16::from(frame.code), frame.reason.to_string()),
        other => panic!("expected a Close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn superset_tokens_from_a_key_set_reach_their_orgs_hosts_and_each_denial_says_why() {
    let pair = KeyPair::generate("jwks-org", RSA);
    let key = SigningKey::rsa("k1", &pair);
    let (_provider, port, _server) = provider_with(&[&key]).await;
    let relay = relay_for(port).await;
    let upstream = Upstream::spawn().await;

    // The host service registers with its user's token; a member of the org reaches it.
    let host_token = key.sign(&superset_claims("user-1", &["org-a"]));
    let _host = host_with(&relay, "org-a:machine-1", &host_token, &upstream).await;
    let member = key.sign(&superset_claims("user-2", &["org-z", "org-a"]));
    relay
        .wait_host_connected_with("org-a:machine-1", &member)
        .await;
    assert_eq!(get_as(&relay, "org-a:machine-1", &member).await.0, 200);

    // Every denial says why, in the HTTP body and in the tunnel's close reason.
    let outsider = key.sign(&superset_claims("user-3", &["org-b"]));
    assert_eq!(
        get_as(&relay, "org-a:machine-1", &outsider).await,
        (403, "not a member of this org".into())
    );
    assert_eq!(
        tunnel_refusal(&relay, "org-a:machine-2", &outsider).await,
        (1008, "not a member of this org".into())
    );
    let (status, why) = get_as(&relay, "machine-1", &member).await;
    assert_eq!(status, 403);
    assert!(why.contains("<organizationId>:<machineId>"), "{why}");
    let mut claims = superset_claims("user-2", &["org-a"]);
    claims["iss"] = json!("https://elsewhere.test");
    assert_eq!(
        get_as(&relay, "org-a:machine-1", &key.sign(&claims)).await,
        (401, "invalid token: wrong issuer (iss)".into())
    );
    let mut claims = superset_claims("user-2", &["org-a"]);
    claims["aud"] = json!("https://elsewhere.test");
    assert_eq!(
        get_as(&relay, "org-a:machine-1", &key.sign(&claims)).await,
        (401, "invalid token: wrong audience (aud)".into())
    );
    let mut claims = superset_claims("user-2", &["org-a"]);
    claims["nbf"] = json!(unix_now() + 3600);
    assert_eq!(
        get_as(&relay, "org-a:machine-1", &key.sign(&claims)).await,
        (401, "invalid token: token not valid yet".into())
    );
    let mut claims = superset_claims("user-2", &["org-a"]);
    claims["exp"] = json!(unix_now() - 3600);
    assert_eq!(
        get_as(&relay, "org-a:machine-1", &key.sign(&claims)).await,
        (401, "token expired".into())
    );
    // Signed by a key the provider does not list (same kid, another key pair).
    let stranger = SigningKey::rsa("k1", &KeyPair::generate("jwks-stranger", RSA));
    assert_eq!(
        get_as(
            &relay,
            "org-a:machine-1",
            &stranger.sign(&superset_claims("user-2", &["org-a"]))
        )
        .await,
        (401, "invalid token: bad signature".into())
    );
    // No token text in any reason.
    let (_, why) = tunnel_refusal(&relay, "org-a:machine-3", &outsider).await;
    assert!(!why.contains(&outsider[..20]), "{why}");
}

#[tokio::test]
async fn a_rotated_key_is_fetched_when_a_token_names_it_and_made_up_key_ids_do_not_flood_the_provider()
 {
    let old = SigningKey::rsa("old", &KeyPair::generate("jwks-rotate-old", RSA));
    let new_pair = KeyPair::generate("jwks-rotate-new", RSA);
    let (provider, port, _server) = provider_with(&[&old]).await;
    let relay = relay_for(port).await;
    let upstream = Upstream::spawn().await;
    let host_token = old.sign(&superset_claims("user-1", &["org-a"]));
    let _host = host_with(&relay, "org-a:m", &host_token, &upstream).await;
    let client = old.sign(&superset_claims("user-2", &["org-a"]));
    relay.wait_host_connected_with("org-a:m", &client).await;
    let at_start = provider.fetches();
    assert!(at_start >= 1, "the relay fetched the key set at startup");

    // Tokens naming keys nobody published, as fast as a client can send them: at most
    // one fetch per 5 s, each refused with a reason.
    for i in 0..40 {
        let bogus = SigningKey::rsa(&format!("made-up-{i}"), &new_pair);
        let (status, why) = get_as(
            &relay,
            "org-a:m",
            &bogus.sign(&superset_claims("x", &["org-a"])),
        )
        .await;
        assert_eq!(status, 401);
        assert!(why.contains("does not list"), "{why}");
    }
    let flood_fetches = provider.fetches() - at_start;
    assert!(
        flood_fetches <= 2,
        "{flood_fetches} fetches for 40 unknown key ids"
    );

    // The provider rotates: a token signed with the new key is served once the relay
    // has fetched the set again (within the 5 s rate limit), the old key still works.
    let new = SigningKey::rsa("new", &new_pair);
    provider.publish(&[&old, &new]);
    let rotated = new.sign(&superset_claims("user-2", &["org-a"]));
    wait_until_async(
        "a token signed with the rotated key is served",
        Duration::from_secs(15),
        || async { get_as(&relay, "org-a:m", &rotated).await.0 == 200 },
    )
    .await;
    assert_eq!(get_as(&relay, "org-a:m", &client).await.0, 200);
}

#[tokio::test]
async fn a_provider_down_at_startup_gets_503_until_it_answers_and_known_keys_outlive_it() {
    let key = SigningKey::rsa("k1", &KeyPair::generate("jwks-down", RSA));
    let provider = Provider::default();
    provider.publish(&[&key]);
    let port = unused_port();
    // Nothing listens on `port` yet: the relay starts anyway.
    let relay = relay_for(port).await;
    let member = key.sign(&superset_claims("user-1", &["org-a"]));
    let (status, why) = get_as(&relay, "org-a:m", &member).await;
    assert_eq!(status, 503, "{why}");
    assert!(why.contains("keys are unavailable"), "{why}");

    // The provider comes up: tokens are checked again (a 503 for the host that is not
    // connected, no longer one for the keys).
    let server = provider
        .serve(SocketAddr::from(([127, 0, 0, 1], port)))
        .await;
    wait_until_async(
        "tokens are checked once the provider answers",
        Duration::from_secs(15),
        || async {
            !get_as(&relay, "org-a:m", &member)
                .await
                .1
                .contains("keys are unavailable")
        },
    )
    .await;
    let upstream = Upstream::spawn().await;
    let _host = host_with(&relay, "org-a:m", &member, &upstream).await;
    relay.wait_host_connected_with("org-a:m", &member).await;

    // The provider goes away again: tokens signed with the keys already known keep
    // working, a new one included (not a cache hit of the same text).
    server.abort();
    let fresh = key.sign(&superset_claims("user-9", &["org-a"]));
    assert_eq!(get_as(&relay, "org-a:m", &fresh).await.0, 200);
}

/// The deployment's API, for the access check: superset's tRPC `host.checkAccess`
/// shape. Allows the hostIds in `allowed`; records every call (bearer and hostId).
#[derive(Clone, Default)]
struct Api {
    allowed: Arc<Mutex<Vec<String>>>,
    calls: Arc<Mutex<Vec<(String, String)>>>,
}

impl Api {
    fn calls_for(&self, host_id: &str) -> Vec<String> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|(_, h)| h == host_id)
            .map(|(bearer, _)| bearer.clone())
            .collect()
    }

    async fn serve(&self, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
        async fn check(
            State(api): State<Api>,
            axum::extract::Query(query): axum::extract::Query<
                std::collections::HashMap<String, String>,
            >,
            headers: http::HeaderMap,
        ) -> axum::Json<Value> {
            let input: Value = serde_json::from_str(&query["input"]).unwrap();
            let host_id = input["json"]["hostId"].as_str().unwrap().to_owned();
            let bearer = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            api.calls.lock().unwrap().push((bearer, host_id.clone()));
            let allowed = api.allowed.lock().unwrap().contains(&host_id);
            axum::Json(json!({"result": {"data": {"json": {"allowed": allowed}}}}))
        }
        let app = Router::new()
            .route("/trpc/host.checkAccess", get(check))
            .with_state(self.clone());
        let listener = TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })
    }
}

#[tokio::test]
async fn the_access_check_asks_the_api_with_the_callers_token_and_caches_its_answers() {
    let key = SigningKey::rsa("k1", &KeyPair::generate("jwks-access", RSA));
    let (_provider, jwks_port, _jwks) = provider_with(&[&key]).await;
    let api = Api::default();
    api.allowed.lock().unwrap().push("org-a:m1".into());
    let api_port = unused_port();
    let api_server = api
        .serve(SocketAddr::from(([127, 0, 0, 1], api_port)))
        .await;
    // Superset's tRPC call, expressed with the template and the pointer.
    let template = format!(
        "http://127.0.0.1:{api_port}/trpc/host.checkAccess?input=%7B%22json%22%3A%7B%22hostId%22%3A%22{{hostId}}%22%7D%7D"
    );
    let relay = TestRelay::builder()
        .no_secret()
        .arg(
            "--jwks-url",
            &format!("http://127.0.0.1:{jwks_port}/.well-known/jwks.json"),
        )
        .arg("--auth-policy", "org")
        .arg("--access-check-url", &template)
        .arg("--access-check-allow-pointer", "/result/data/json/allowed")
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;
    let host_token = key.sign(&superset_claims("user-1", &["org-a"]));
    let _host = host_with(&relay, "org-a:m1", &host_token, &upstream).await;
    let client = key.sign(&superset_claims("user-2", &["org-a"]));
    relay.wait_host_connected_with("org-a:m1", &client).await;

    // Allowed: asked once per (user, host) with the caller's own token, then cached.
    for _ in 0..5 {
        assert_eq!(get_as(&relay, "org-a:m1", &client).await.0, 200);
    }
    let client_calls: Vec<_> = api
        .calls_for("org-a:m1")
        .into_iter()
        .filter(|bearer| *bearer == format!("Bearer {client}"))
        .collect();
    assert_eq!(
        client_calls.len(),
        1,
        "{:?}",
        api.calls_for("org-a:m1").len()
    );
    assert!(
        api.calls_for("org-a:m1")
            .contains(&format!("Bearer {host_token}")),
        "the host's registration was checked with the host's token"
    );

    // Denied by the API although the org matches: 403 with the reason, cached too.
    for _ in 0..3 {
        assert_eq!(
            get_as(&relay, "org-a:m2", &client).await,
            (403, "no access to this host".into())
        );
    }
    assert_eq!(api.calls_for("org-a:m2").len(), 1);

    // The API goes down: what is cached still stands; a question it cannot answer
    // is a 503, never an allowance.
    api_server.abort();
    assert_eq!(get_as(&relay, "org-a:m1", &client).await.0, 200);
    let other = key.sign(&superset_claims("user-3", &["org-a"]));
    let (status, why) = get_as(&relay, "org-a:m1", &other).await;
    assert_eq!(
        (status, why.as_str()),
        (503, "cannot check access to this host now")
    );
}

#[tokio::test]
async fn unusable_provider_and_access_check_settings_exit_64_naming_the_setting() {
    let cases: [(&[&str], &str); 4] = [
        (&["--jwks-url", "ftp://keys.example/jwks"], "RELAY_JWKS_URL"),
        (&["--jwks-url", "not a url"], "RELAY_JWKS_URL"),
        (
            &[
                "--jwt-secret",
                "0123456789abcdef",
                "--access-check-url",
                "http://api.example/check",
            ],
            "{hostId}",
        ),
        (
            &[
                "--jwt-secret",
                "0123456789abcdef",
                "--access-check-url",
                "http://api.example/check/{hostId}",
                "--access-check-allow-pointer",
                "result.allowed",
            ],
            "RELAY_ACCESS_CHECK_ALLOW_POINTER",
        ),
    ];
    for (args, named) in cases {
        let mut argv = vec!["serve", "--bind", "127.0.0.1", "--port", "0"];
        argv.extend_from_slice(args);
        let out = run_relay_cli(&argv, &[("RUST_LOG", "info")]).await;
        assert_eq!(out.code, Some(64), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(named), "{args:?}: {}", out.stderr);
    }
}

#[tokio::test]
async fn a_key_set_url_that_answers_something_else_is_logged_and_tokens_get_503() {
    // Any JSON that is not a JWK set: the echo upstream's answer.
    let upstream = Upstream::spawn().await;
    let relay = TestRelay::builder()
        .no_secret()
        .arg(
            "--jwks-url",
            &format!("http://{}/echo/jwks", upstream.addr()),
        )
        .arg("--auth-policy", "org")
        .spawn()
        .await;
    let key = SigningKey::rsa("k1", &KeyPair::generate("jwks-garbage", RSA));
    let (status, why) = get_as(
        &relay,
        "org-a:m",
        &key.sign(&superset_claims("u", &["org-a"])),
    )
    .await;
    assert_eq!(
        (status, why.as_str()),
        (
            503,
            "cannot check tokens now: the identity provider's keys are unavailable"
        )
    );
    relay
        .wait_for_log("cannot fetch the identity provider's keys", DEADLINE)
        .await;
}

#[tokio::test]
async fn supersets_v2_host_registers_with_its_users_token_and_a_non_member_is_refused_4403() {
    use relay_tests::v2_host::{V2Control, V2Host};
    let pair = KeyPair::generate("jwks-v2", RSA);
    let key = SigningKey::rsa("k1", &pair);
    let (_provider, port, _server) = provider_with(&[&key]).await;
    let relay = relay_for(port).await;
    let upstream = Upstream::spawn().await;
    let base = relay.http_url("");

    let host_token = key.sign(&superset_claims("user-1", &["org-a"]));
    let host = V2Host::builder("org-a:machine-1", &host_token, upstream.addr())
        .relay(&base)
        .spawn();
    host.wait_connected(DEADLINE).await;
    let member = key.sign(&superset_claims("user-2", &["org-a"]));
    relay
        .wait_host_connected_with("org-a:machine-1", &member)
        .await;
    assert_eq!(get_as(&relay, "org-a:machine-1", &member).await.0, 200);
    assert_eq!(
        host.dials("http"),
        1,
        "one dial for the one request (_whoowns is the relay's own)"
    );

    let outsider = key.sign(&superset_claims("user-3", &["org-b"]));
    let mut refused = V2Control::connect(&base, "org-a:machine-2", &outsider)
        .await
        .expect("the upgrade completes, then the relay closes");
    assert_eq!(
        refused.ws_mut().recv_close(DEADLINE).await,
        (4403, "not a member of this org".to_owned())
    );
    let mut expired_claims = superset_claims("user-1", &["org-a"]);
    expired_claims["exp"] = json!(unix_now() - 3600);
    let mut expired = V2Control::connect(&base, "org-a:machine-2", &key.sign(&expired_claims))
        .await
        .expect("the upgrade completes, then the relay closes");
    assert_eq!(expired.ws_mut().recv_close_code(DEADLINE).await, 4401);
}

/// Serves `app` over HTTPS with `ca`'s certificate for 127.0.0.1, on a free port.
async fn serve_https(app: Router, ca: &relay_tests::TestCa) -> (u16, tokio::task::JoinHandle<()>) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(ca.server_cert())
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(ca.server_key()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request| {
                    tower::ServiceExt::oneshot(app.clone(), request)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, task)
}

#[tokio::test]
async fn a_key_set_over_https_is_fetched_when_its_ca_is_trusted_and_refused_otherwise() {
    let pair = KeyPair::generate("jwks-https", RSA);
    let key = SigningKey::rsa("k1", &pair);
    let provider = Provider::default();
    provider.publish(&[&key]);
    let ca = relay_tests::TestCa::generate();
    let app = Router::new()
        .route(
            "/.well-known/jwks.json",
            get(|State(provider): State<Provider>| async move {
                provider.fetches.fetch_add(1, Ordering::SeqCst);
                axum::Json(JwkSet {
                    keys: provider.keys.lock().unwrap().clone(),
                })
            }),
        )
        .with_state(provider.clone());
    let (port, _server) = serve_https(app, &ca).await;
    let url = format!("https://127.0.0.1:{port}/.well-known/jwks.json");
    let relay_with = |trust: bool| {
        let mut builder = TestRelay::builder()
            .no_secret()
            .arg("--jwks-url", &url)
            .arg("--jwt-issuer", API)
            .arg("--jwt-audience", API)
            .arg("--auth-policy", "org");
        if trust {
            builder = builder.arg("--fetch-ca-file", ca.ca_file().to_str().unwrap());
        }
        builder.spawn()
    };
    let member = key.sign(&superset_claims("user-2", &["org-a"]));

    let trusting = relay_with(true).await;
    let (status, why) = get_as(&trusting, "org-a:machine-1", &member).await;
    assert_eq!(
        (status, why.as_str()),
        (503, "host not connected"),
        "the token is good"
    );

    // The provider's certificate is not one of the web's: without the CA, no keys.
    let fetches = provider.fetches();
    let wary = relay_with(false).await;
    let (status, why) = get_as(&wary, "org-a:machine-1", &member).await;
    assert_eq!(status, 503);
    assert!(why.contains("keys are unavailable"), "{why}");
    assert_eq!(
        provider.fetches(),
        fetches,
        "no request got past the TLS handshake"
    );
    wary.wait_for_log("TLS", DEADLINE).await;
}
