//! The local service behind the tunnel: a minimal hyper HTTP/1.1 server answering every
//! request with the same small body.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The body of every response: 64 bytes.
pub const BODY: &[u8; 64] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A running upstream. Stops accepting when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Upstream {
    /// Starts the server on an ephemeral port of 127.0.0.1.
    ///
    /// # Errors
    /// When it cannot bind.
    pub async fn start() -> Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service = service_fn(|_request| async {
                        Ok::<_, Infallible>(
                            http::Response::builder()
                                .header(http::header::CONTENT_TYPE, "text/plain")
                                .body(Full::new(Bytes::from_static(BODY)))
                                .expect("static response is valid"),
                        )
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Upstream { addr, accept })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
