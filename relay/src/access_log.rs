//! The access log (`--access-log text|json`, `RELAY_ACCESS_LOG`; off by default): one
//! line on stdout per client request, written when its response has ended (body and
//! all, so the bytes and the duration are whole), and one per WebSocket channel, written
//! when it closes. Operational logs stay on stderr.
//!
//! A line holds the hostId, the method, the path *without its query* (where `token=`
//! travels), the status, the bytes each way, the duration and the route (`local`,
//! `proxy`, `replay`, `bridge`, `none`). Never a header: no token, no cookie. A channel
//! bridged to the machine that holds the host is logged there, as a local channel.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde_json::json;

/// How access log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `2026-12-07T14:30:00.123Z demo GET /hosts/demo/x 200 in=0 out=123 1.2ms local`.
    Text,
    /// One JSON object per line.
    Json,
}

/// One request or channel, as logged.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `http` or `ws`.
    pub kind: &'static str,
    /// The hostId, as the client wrote it.
    pub host: String,
    /// The method.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The status answered (101 for a channel).
    pub status: u16,
    /// Body (or frame) bytes from the client.
    pub bytes_in: u64,
    /// Body (or frame) bytes to the client.
    pub bytes_out: u64,
    /// From the request's arrival to the end of its response (or channel).
    pub duration: Duration,
    /// How it was served.
    pub route: &'static str,
}

impl Entry {
    /// The line, without its newline.
    pub fn line(&self, format: Format) -> String {
        let at = httpdate_rfc3339(SystemTime::now());
        let ms = self.duration.as_secs_f64() * 1000.0;
        match format {
            Format::Text => format!(
                "{at} {} {} {} {} in={} out={} {ms:.1}ms {}{}",
                self.host,
                self.method,
                self.path,
                self.status,
                self.bytes_in,
                self.bytes_out,
                self.route,
                if self.kind == "ws" { " ws" } else { "" }
            ),
            Format::Json => json!({
                "ts": at,
                "kind": self.kind,
                "host": self.host,
                "method": self.method,
                "path": self.path,
                "status": self.status,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "duration_ms": (ms * 1000.0).round() / 1000.0,
                "route": self.route,
            })
            .to_string(),
        }
    }

    /// Writes the line on stdout. A closed stdout is ignored: the relay serves on.
    pub fn write(&self, format: Format) {
        use std::io::Write as _;
        let mut line = self.line(format);
        line.push('\n');
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
}

/// `t` as RFC 3339 in UTC with milliseconds.
fn httpdate_rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// A body that counts the bytes that pass through it into `counter`.
pub struct Counted<B> {
    inner: B,
    counter: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    /// `inner`, counted into `counter`.
    pub fn new(inner: B, counter: Arc<AtomicU64>) -> Counted<B> {
        Counted { inner, counter }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that writes its request's access log line when it is done with (sent
/// whole, or dropped when the client went away).
pub struct Logged<B> {
    inner: Counted<B>,
    /// Taken (and written) once, on drop.
    pending: Option<Pending>,
}

/// A line waiting for its response to end.
struct Pending {
    entry: Entry,
    format: Format,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
    started: tokio::time::Instant,
}

impl<B> Logged<B> {
    /// `inner`, logged as `entry` once done; `bytes_in` counts the request's body,
    /// `started` is when the request arrived.
    pub fn new(
        inner: B,
        entry: Entry,
        format: Format,
        bytes_in: Arc<AtomicU64>,
        started: tokio::time::Instant,
    ) -> Logged<B> {
        let bytes_out = Arc::new(AtomicU64::new(0));
        Logged {
            inner: Counted::new(inner, bytes_out.clone()),
            pending: Some(Pending {
                entry,
                format,
                bytes_in,
                bytes_out,
                started,
            }),
        }
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        if let Some(Pending {
            mut entry,
            format,
            bytes_in,
            bytes_out,
            started,
        }) = self.pending.take()
        {
            entry.bytes_in = bytes_in.load(Ordering::Relaxed);
            entry.bytes_out = bytes_out.load(Ordering::Relaxed);
            entry.duration = started.elapsed();
            entry.write(format);
        }
    }
}

impl<B> Body for Logged<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            kind: "http",
            host: "org:m1".into(),
            method: "GET".into(),
            path: "/hosts/org:m1/x".into(),
            status: 200,
            bytes_in: 3,
            bytes_out: 1234,
            duration: Duration::from_micros(1500),
            route: "local",
        }
    }

    #[test]
    fn a_text_line_has_every_field_and_no_query() {
        let line = entry().line(Format::Text);
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(
            &fields[1..],
            [
                "org:m1",
                "GET",
                "/hosts/org:m1/x",
                "200",
                "in=3",
                "out=1234",
                "1.5ms",
                "local"
            ]
        );
        assert!(
            fields[0].ends_with('Z') && fields[0].contains('T'),
            "{line}"
        );
    }

    #[test]
    fn a_json_line_is_one_object() {
        let value: serde_json::Value = serde_json::from_str(&entry().line(Format::Json)).unwrap();
        assert_eq!(value["status"], 200);
        assert_eq!(value["bytes_out"], 1234);
        assert_eq!(value["duration_ms"], 1.5);
        assert_eq!(value["route"], "local");
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_765_117_800_123);
        assert_eq!(httpdate_rfc3339(t), "2025-12-07T14:30:00.123Z");
        assert_eq!(
            httpdate_rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
    }
}
