//! Streamed bodies through `h2` tunnels, end to end: gigabytes both ways byte for byte
//! in bounded memory, a slow client holding back the upstream, cancellation reaching the
//! upstream, Server-Sent Events as they are sent, trailers, gRPC, and a streamed
//! download forwarded from one relay to another.
//!
//! Memory figures are RSS of the real child processes (`/proc`), so the bounds are
//! generous: they separate "streams in bounded buffers" (a few MiB) from "buffers a
//! body" (hundreds of MiB), not one allocator from another.

use std::time::{Duration, Instant};

use relay_tests::bulk::{BulkUpstream, DownloadOutcome, expected_sha256};
use relay_tests::grpc::{CountRequest, GrpcClient, GrpcServer};
use relay_tests::memory::{RssSampler, peak_rss_kib, rss_kib};
use relay_tests::stream_client::{DownloadOptions, UploadOptions, download, upload};
use relay_tests::{DEADLINE, TestAgent, TestRedis, TestRelay, wait_until};

const MIB: u64 = 1024 * 1024;

/// A relay with an `h2` agent for `host` in front of `upstream_url`.
async fn h2_stack(host: &str, upstream_url: &str) -> (TestRelay, TestAgent) {
    let relay = TestRelay::spawn().await;
    let agent = TestAgent::builder(host)
        .relay(&relay.ws_url(""))
        .token(&relay.host_token(host))
        .to(upstream_url)
        .protocol("h2")
        .spawn();
    agent.wait_connected_to(&relay).await;
    (relay, agent)
}

/// The client's `Authorization` header for `host` on `relay`.
fn bearer(relay: &TestRelay, host: &str) -> String {
    format!("Bearer {}", relay.client_token(&[host]))
}

#[tokio::test]
async fn a_gibibyte_download_and_a_100_mib_upload_cross_byte_exact_in_bounded_relay_memory() {
    let bulk = BulkUpstream::spawn().await;
    let (relay, _agent) = h2_stack("bulk", &bulk.url("")).await;
    let auth = bearer(&relay, "bulk");
    let headers = [("authorization", auth.as_str())];
    let sampler = RssSampler::start(relay.pid());

    let n = 1024 * MIB;
    let got = download(
        &relay.http_url(&format!("/hosts/bulk/bytes?n={n}&seed=7")),
        &headers,
        DownloadOptions::default(),
    )
    .await
    .expect("the download completes");
    assert_eq!(got.status, 200);
    assert_eq!(got.bytes, n);
    assert_eq!(
        got.sha256,
        expected_sha256(n, 7),
        "the body arrives byte exact"
    );
    assert_eq!(got.body_error, None);

    let n = 100 * MIB;
    let sent = upload(
        &relay.http_url("/hosts/bulk/upload"),
        &headers,
        n,
        11,
        UploadOptions::default(),
    )
    .await
    .expect("the upload completes");
    assert_eq!(sent.status, 200);
    let answer = sent.json().expect("the upstream answers JSON");
    assert_eq!(answer["bytes"], n);
    assert_eq!(answer["sha256"], expected_sha256(n, 11));

    let samples = sampler.finish();
    let peak = samples
        .max_kib()
        .max(peak_rss_kib(relay.pid()).unwrap_or(0));
    assert!(
        peak < 64 * 1024,
        "relay peak RSS {peak} KiB while 1.1 GiB crossed it (bound: 64 MiB)"
    );
}

#[tokio::test]
async fn binary_bodies_cross_byte_exact_over_http1_and_h2c_clients() {
    let bulk = BulkUpstream::spawn().await;
    let (relay, _agent) = h2_stack("bin", &bulk.url("")).await;
    let auth = bearer(&relay, "bin");
    let headers = [("authorization", auth.as_str())];
    for h2c in [false, true] {
        let options = if h2c {
            DownloadOptions::default().h2c()
        } else {
            DownloadOptions::default()
        };
        // Known length this time: content-length passes through.
        let n = 3 * MIB + 17;
        let got = download(
            &relay.http_url(&format!("/hosts/bin/bytes?n={n}&seed=3&length=1")),
            &headers,
            options,
        )
        .await
        .expect("download");
        assert_eq!(got.status, 200);
        assert_eq!(got.header("content-length"), Some(n.to_string().as_str()));
        assert_eq!(got.sha256, expected_sha256(n, 3), "h2c client: {h2c}");

        let upload_options = if h2c {
            UploadOptions::default().h2c()
        } else {
            UploadOptions::default()
        };
        let sent = upload(
            &relay.http_url("/hosts/bin/upload"),
            &headers,
            n,
            5,
            upload_options,
        )
        .await
        .expect("upload");
        let answer = sent.json().expect("JSON");
        assert_eq!(answer["sha256"], expected_sha256(n, 5), "h2c client: {h2c}");
    }
}

#[tokio::test]
async fn a_slow_client_holds_back_the_upstream_with_flat_relay_and_agent_memory() {
    let bulk = BulkUpstream::spawn().await;
    let (relay, agent) = h2_stack("slow", &bulk.url("")).await;
    let auth = bearer(&relay, "slow");
    let relay_sampler = RssSampler::start(relay.pid());
    let agent_sampler = RssSampler::start(agent.pid());

    // A gibibyte, read at 100 KB/s for a few seconds: everything the client has not read
    // must stay upstream, not pile up in the relay or the agent.
    let url = relay.http_url(&format!("/hosts/slow/bytes?n={}&seed=1", 1024 * MIB));
    let reader = tokio::spawn(async move {
        download(
            &url,
            &[("authorization", auth.as_str())],
            DownloadOptions::default()
                .read_rate(100_000)
                .abort_after(600_000),
        )
        .await
    });
    let got = reader.await.expect("task").expect("the slow download runs");
    assert!(got.aborted);
    let record = bulk.wait_for_aborted_download(DEADLINE).await;
    assert!(
        record.sent < 40 * MIB,
        "the upstream got {} MiB out while the client read 0.6 MB: backpressure did not \
         reach it",
        record.sent / MIB
    );
    let relay = relay_sampler.finish();
    let agent = agent_sampler.finish();
    for (who, samples) in [("relay", &relay), ("agent", &agent)] {
        assert!(
            samples.growth_kib() < 24 * 1024,
            "{who} RSS grew {} KiB during a slow download (from {} to a max of {} KiB)",
            samples.growth_kib(),
            samples.first_kib(),
            samples.max_kib()
        );
    }
}

#[tokio::test]
async fn a_client_that_goes_away_mid_download_cancels_the_upstream_request() {
    let bulk = BulkUpstream::spawn().await;
    let (relay, _agent) = h2_stack("cancel", &bulk.url("")).await;
    let auth = bearer(&relay, "cancel");
    for h2c in [false, true] {
        let options = DownloadOptions::default().abort_after(2 * MIB);
        let options = if h2c { options.h2c() } else { options };
        let got = download(
            &relay.http_url(&format!("/hosts/cancel/bytes?n={}&seed=2", 1024 * MIB)),
            &[("authorization", auth.as_str())],
            options,
        )
        .await
        .expect("the download starts");
        assert!(got.aborted);
        wait_until(
            &format!("the upstream sees the download aborted (h2c client: {h2c})"),
            DEADLINE,
            || bulk.download_count(DownloadOutcome::Aborted) == usize::from(h2c) + 1,
        )
        .await;
    }
    let aborted: Vec<_> = bulk
        .downloads()
        .into_iter()
        .filter(|d| d.outcome == DownloadOutcome::Aborted)
        .collect();
    assert!(
        aborted.iter().all(|d| d.sent < 200 * MIB),
        "the upstream stopped long before the end: {aborted:?}"
    );
}

#[tokio::test]
async fn server_sent_events_reach_the_client_as_they_are_sent() {
    let bulk = BulkUpstream::spawn().await;
    let (relay, _agent) = h2_stack("sse", &bulk.url("")).await;
    let got = download(
        &relay.http_url("/hosts/sse/sse?events=5&interval_ms=200"),
        &[("authorization", bearer(&relay, "sse").as_str())],
        DownloadOptions::default().record_chunks().keep_body(4096),
    )
    .await
    .expect("the event stream");
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("text/event-stream"));
    let streams = bulk.sse_streams();
    let sent_at = &streams.last().expect("one stream").sent_at;
    assert_eq!(sent_at.len(), 5);
    assert!(
        got.chunks.len() >= 5,
        "every event its own chunk: {:?}",
        got.chunks
    );
    // Each event arrives soon after the upstream wrote it, not when the stream ends.
    let mut arrivals = got.chunks.iter().map(|c| c.at);
    for (i, sent) in sent_at.iter().enumerate() {
        let arrived = arrivals.next().expect("an arrival per event");
        let latency = arrived.saturating_duration_since(*sent);
        assert!(
            latency < Duration::from_millis(100),
            "event {i} took {latency:?} from the upstream to the client"
        );
    }
    assert!(got.text().contains("data:"), "{}", got.text());
}

#[tokio::test]
async fn trailers_pass_through_to_an_h2c_client_and_to_an_http1_client_that_asks() {
    let bulk = BulkUpstream::spawn().await;
    let (relay, _agent) = h2_stack("trl", &bulk.url("")).await;
    let auth = bearer(&relay, "trl");
    let url = relay.http_url("/hosts/trl/trailers?chunks=4");
    let over_h2c = download(
        &url,
        &[("authorization", auth.as_str())],
        DownloadOptions::default().h2c().keep_body(4096),
    )
    .await
    .expect("trailers over h2c");
    assert_eq!(over_h2c.trailer("x-chunks"), Some("4"));
    assert!(
        over_h2c
            .trailer("x-checksum")
            .is_some_and(|c| c.len() == 64)
    );
    let over_http1 = download(
        &url,
        &[("authorization", auth.as_str()), ("te", "trailers")],
        DownloadOptions::default().keep_body(4096),
    )
    .await
    .expect("trailers over HTTP/1.1");
    assert_eq!(over_http1.trailer("x-chunks"), Some("4"));
    assert_eq!(
        over_http1.trailer("x-checksum"),
        over_h2c.trailer("x-checksum")
    );
}

#[tokio::test]
async fn grpc_unary_and_server_streaming_calls_work_end_to_end_through_an_h2c_upstream() {
    let grpc = GrpcServer::spawn().await;
    let (relay, _agent) = h2_stack("grpc", &format!("h2c://{}", grpc.addr())).await;
    let token = relay.client_token(&["grpc"]);
    let mut client = GrpcClient::new(&relay.http_url("/hosts/grpc"))
        .expect("client")
        .bearer(&token);

    let reply = client
        .say("hello through the tunnel")
        .await
        .expect("unary call");
    assert_eq!(reply.message.message, "hello through the tunnel");

    let started = Instant::now();
    let result = client
        .count(CountRequest {
            count: 5,
            size: 100,
            interval_ms: 150,
        })
        .await
        .expect("server-streaming call");
    assert_eq!(result.replies.len(), 5);
    assert_eq!(
        result.replies.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    // Replies arrive as the server sends them, not all at the end.
    let first = result.arrivals[0].saturating_duration_since(started);
    let last = result.arrivals[4].saturating_duration_since(started);
    assert!(
        last - first >= Duration::from_millis(450),
        "streamed: first after {first:?}, last after {last:?}"
    );
    // A failing call carries its gRPC status, which lives in the trailers.
    let status = client.say("fail:5").await.expect_err("the server fails it");
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert!(
        grpc.paths().iter().all(|p| !p.starts_with("/hosts/")),
        "the upstream sees gRPC paths, not relay paths: {:?}",
        grpc.paths()
    );
}

#[tokio::test]
async fn a_streamed_download_is_forwarded_from_relay_to_relay_byte_exact() {
    let redis = TestRedis::spawn().await;
    let relay = |machine: &str| {
        TestRelay::builder()
            .redis(&redis.url())
            .routing("proxy")
            .machine_id(machine)
            .spawn()
    };
    let front = relay("front").await;
    let owner = relay("owner").await;
    redis.wait_advertised(&front).await;
    redis.wait_advertised(&owner).await;
    let bulk = BulkUpstream::spawn().await;
    let agent = TestAgent::builder("far")
        .relay(&owner.ws_url(""))
        .token(&owner.host_token("far"))
        .to(&bulk.url(""))
        .protocol("h2")
        .spawn();
    agent.wait_connected_to(&owner).await;
    redis.wait_host_owner("far", &owner).await;
    let sampler = RssSampler::start(front.pid());

    let n = 256 * MIB;
    let auth = bearer(&front, "far");
    let got = download(
        &front.http_url(&format!("/hosts/far/bytes?n={n}&seed=9")),
        &[("authorization", auth.as_str())],
        DownloadOptions::default(),
    )
    .await
    .expect("the forwarded download");
    assert_eq!(got.status, 200);
    assert_eq!(got.sha256, expected_sha256(n, 9));
    let sent = upload(
        &front.http_url("/hosts/far/upload"),
        &[("authorization", auth.as_str())],
        64 * MIB,
        4,
        UploadOptions::default(),
    )
    .await
    .expect("the forwarded upload");
    assert_eq!(
        sent.json().expect("JSON")["sha256"],
        expected_sha256(64 * MIB, 4)
    );
    let samples = sampler.finish();
    assert!(
        samples.max_kib() < 64 * 1024,
        "the forwarding relay peaked at {} KiB: it must stream, not buffer",
        samples.max_kib()
    );
    assert!(
        front
            .logs()
            .iter()
            .all(|line| !line.contains("tunnel registered")),
        "the front relay holds no tunnel: it forwarded"
    );
    let _ = rss_kib(owner.pid());
}

#[tokio::test]
async fn a_stalled_download_does_not_slow_the_other_streams_of_its_tunnel() {
    let bulk = BulkUpstream::spawn().await;
    let (relay, _agent) = h2_stack("shared", &bulk.url("")).await;
    let auth = bearer(&relay, "shared");
    // One client asks for a gibibyte and reads 1 KB/s: its stream's window fills and
    // stays full for the rest of the test.
    let stalled = {
        let url = relay.http_url(&format!("/hosts/shared/bytes?n={}&seed=1", 1024 * MIB));
        let auth = auth.clone();
        tokio::spawn(async move {
            download(
                &url,
                &[("authorization", auth.as_str())],
                DownloadOptions::default().read_rate(1_000),
            )
            .await
        })
    };
    wait_until("the stalled download has started", DEADLINE, || {
        !bulk.downloads().is_empty()
    })
    .await;
    // Meanwhile other clients of the same tunnel move megabytes at full speed.
    let started = Instant::now();
    for seed in 10..14 {
        let n = 16 * MIB;
        let got = download(
            &relay.http_url(&format!("/hosts/shared/bytes?n={n}&seed={seed}")),
            &[("authorization", auth.as_str())],
            DownloadOptions::default(),
        )
        .await
        .expect("a download beside the stalled one");
        assert_eq!(got.sha256, expected_sha256(n, seed));
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "64 MiB beside a stalled stream took {took:?}"
    );
    assert!(
        !stalled.is_finished(),
        "the stalled download is still running"
    );
    stalled.abort();
}
