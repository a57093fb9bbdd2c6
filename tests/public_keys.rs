//! Tokens signed with a private key and verified with a public key file
//! (`RELAY_JWT_PUBLIC_KEY_FILE`): RS256, EdDSA and ES256, minted by
//! `relay token --jwt-private-key-file`. Keys are generated per test with the
//! `openssl` command line; nothing secret is committed.

use std::path::Path;

use relay_tests::{
    Claims, KeyPair, TEST_SECRET, TestHost, TestRelay, Upstream, mint, run_relay_cli,
};

/// `relay token` signed with the private key file.
async fn mint_with_key(key: &Path, role: &str, host: &str) -> String {
    let key = key.to_str().unwrap();
    let out = run_relay_cli(
        &["token", "--role", role, "--host", host, "--ttl", "10m"],
        &[("RELAY_JWT_PRIVATE_KEY_FILE", key), ("RUST_LOG", "info")],
    )
    .await;
    assert_eq!(out.code, Some(0), "relay token failed: {}", out.stderr);
    out.stdout.trim().to_owned()
}

/// A relay verifying with `keys`' public half serves a host and a client whose tokens
/// were minted with the private half, and refuses tokens from another key pair and
/// HS256 tokens (no algorithm confusion).
async fn public_key_tokens_are_verified(name: &str, genpkey_args: &[&str]) {
    let keys = KeyPair::generate(name, genpkey_args);
    let other = KeyPair::generate(&format!("{name}-other"), genpkey_args);
    let relay = TestRelay::builder()
        .no_secret()
        .arg("--jwt-public-key-file", keys.public().to_str().unwrap())
        .spawn()
        .await;
    let upstream = Upstream::spawn().await;

    let host_token = mint_with_key(&keys.private(), "host", "pk-host").await;
    let client_token = mint_with_key(&keys.private(), "client", "pk-host").await;
    let _host = TestHost::connect_url(
        &relay.tunnel_url("pk-host", &host_token),
        None,
        upstream.addr(),
    )
    .await;
    relay
        .wait_host_connected_with("pk-host", &client_token)
        .await;
    let resp = relay
        .http()
        .get(relay.http_url("/hosts/pk-host/echo?via=public-key"))
        .bearer(&client_token)
        .send()
        .await;
    resp.assert_status(200);
    assert_eq!(resp.json()["query"], "via=public-key");

    let foreign = mint_with_key(&other.private(), "client", "pk-host").await;
    relay
        .http()
        .get(relay.http_url("/hosts/pk-host/echo"))
        .bearer(&foreign)
        .send()
        .await
        .assert_status(401);
    let hs256 = mint(TEST_SECRET, &Claims::client(&["pk-host"]));
    relay
        .http()
        .get(relay.http_url("/hosts/pk-host/echo"))
        .bearer(&hs256)
        .send()
        .await
        .assert_status(401);
}

#[tokio::test]
async fn eddsa_tokens_verify_against_an_ed25519_public_key_file() {
    public_key_tokens_are_verified("ed25519", &["-algorithm", "ed25519"]).await;
}

#[tokio::test]
async fn rs256_tokens_verify_against_an_rsa_public_key_file() {
    public_key_tokens_are_verified(
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    )
    .await;
}

#[tokio::test]
async fn es256_tokens_verify_against_a_p256_public_key_file() {
    public_key_tokens_are_verified(
        "p256",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    )
    .await;
}

#[tokio::test]
async fn a_key_file_that_is_not_a_public_key_exits_64() {
    let dir = std::env::temp_dir().join(format!("relay-keys-{}-bad", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let out = run_relay_cli(
        &[
            "serve",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--jwt-public-key-file",
            bad.to_str().unwrap(),
        ],
        &[("RUST_LOG", "info")],
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.code, Some(64), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("RELAY_JWT_PUBLIC_KEY_FILE"),
        "{}",
        out.stderr
    );
}
