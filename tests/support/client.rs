//! A small HTTP/1.1 client for talking to the relay (and, inside
//! [`TestHost`](crate::TestHost), to the upstream).
//!
//! Built on hyper-util's legacy client. Idle connections are not pooled, so
//! every request runs on its own fresh connection and no test depends on the
//! fate of a previous request's connection.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::DEADLINE;

/// An HTTP client with a per-request deadline.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

/// A fully buffered response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

/// A request under construction; see [`HttpClient::request`].
#[must_use = "a request does nothing until `send` is awaited"]
pub struct RequestBuilder<'a> {
    client: &'a HttpClient,
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    timeout: Duration,
}

// === impl HttpClient ===

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A client without connection reuse.
    pub fn new() -> Self {
        let inner = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
        Self { inner }
    }

    /// Starts a request.
    pub fn request(&self, method: Method, url: impl Into<String>) -> RequestBuilder<'_> {
        RequestBuilder {
            client: self,
            method,
            url: url.into(),
            headers: Vec::new(),
            body: Bytes::new(),
            timeout: DEADLINE,
        }
    }

    /// Starts a GET request.
    pub fn get(&self, url: impl Into<String>) -> RequestBuilder<'_> {
        self.request(Method::GET, url)
    }

    /// Sends a ready-made request and buffers the response.
    ///
    /// # Errors
    ///
    /// Connection failures, or `timeout` passing before the whole response
    /// arrived; the error text says which.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<HttpResponse, String> {
        let what = format!("{} {}", req.method(), req.uri());
        let exchange = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|err| format!("{what}: request failed: {err:?}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|err| format!("{what}: reading body failed: {err}"))?
                .to_bytes();
            Ok(HttpResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("{what}: no complete response within {timeout:?}"))?
    }
}

// === impl RequestBuilder ===

impl RequestBuilder<'_> {
    /// Adds a request header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Adds `Authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// Sets the request body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets a JSON body and `content-type: application/json`.
    pub fn json(self, value: &Value) -> Self {
        self.header("content-type", "application/json")
            .body(value.to_string())
    }

    /// Overrides the response deadline (default [`DEADLINE`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends the request.
    ///
    /// # Panics
    ///
    /// On connection failure or when no response arrives before the deadline.
    pub async fn send(self) -> HttpResponse {
        self.try_send().await.unwrap_or_else(|err| panic!("{err}"))
    }

    /// Sends the request, returning failures instead of panicking.
    ///
    /// # Errors
    ///
    /// See [`HttpClient::send`].
    pub async fn try_send(self) -> Result<HttpResponse, String> {
        let mut req = Request::builder().method(self.method).uri(&self.url);
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .unwrap_or_else(|err| panic!("bad header name {name:?}: {err}"));
            let value = HeaderValue::from_str(value)
                .unwrap_or_else(|err| panic!("bad header value {value:?}: {err}"));
            req = req.header(name, value);
        }
        let req = req
            .body(Full::new(self.body))
            .unwrap_or_else(|err| panic!("bad request for {}: {err}", self.url));
        self.client.send(req, self.timeout).await
    }
}

// === impl HttpResponse ===

impl HttpResponse {
    /// The body as UTF-8 text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    ///
    /// # Panics
    ///
    /// If the body is not JSON; the message shows status and body.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "expected a JSON body, got status {} body {:?}: {err}",
                self.status,
                self.text()
            )
        })
    }

    /// The `error` string of a JSON error body `{"error": ".."}`.
    ///
    /// # Panics
    ///
    /// If the body is not JSON with a string `error` field.
    pub fn error(&self) -> String {
        match self.json().get("error") {
            Some(Value::String(error)) => error.clone(),
            _ => panic!(
                "expected a JSON error body {{\"error\": \"..\"}}, got status {} body {:?}",
                self.status,
                self.text()
            ),
        }
    }

    /// A header value as a string, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the status, showing the body on mismatch.
    ///
    /// # Panics
    ///
    /// If the status differs.
    #[track_caller]
    pub fn assert_status(&self, expected: u16) -> &Self {
        assert_eq!(
            self.status.as_u16(),
            expected,
            "unexpected status; body: {:?}",
            self.text()
        );
        self
    }
}
