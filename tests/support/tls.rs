//! Test certificates: a private CA and a server certificate for `127.0.0.1` signed by
//! it, made with the `openssl` command (scripts/setup.sh installs it) in a temporary
//! directory that is removed on drop. For TLS servers the relay must verify against a
//! CA it is given (`RELAY_REDIS_CA_FILE`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A CA with one server certificate for `IP:127.0.0.1`.
pub struct TestCa {
    dir: PathBuf,
}

impl TestCa {
    /// Generates the CA (`ca.pem`) and the server certificate and key (`server.pem`,
    /// `server.key`), P-256, valid for two days.
    ///
    /// # Panics
    ///
    /// If the `openssl` command is missing or fails.
    pub fn generate() -> TestCa {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "relay-test-ca-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the certificate directory");
        let ca = TestCa { dir };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        ca.openssl(
            Command::new("openssl")
                .args(["req", "-x509", "-days", "2", "-subj", "/CN=relay test CA"])
                .args(ec)
                .args(["-keyout", "ca.key", "-out", "ca.pem"]),
        );
        ca.openssl(
            Command::new("openssl")
                .args(["req", "-subj", "/CN=127.0.0.1"])
                .args(ec)
                .args(["-keyout", "server.key", "-out", "server.csr"]),
        );
        std::fs::write(
            ca.dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write the certificate extensions");
        ca.openssl(Command::new("openssl").args([
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]));
        ca
    }

    fn openssl(&self, command: &mut Command) {
        let out = command.current_dir(&self.dir).output().unwrap_or_else(|e| {
            panic!(
                "the `openssl` command is needed to make test certificates \
                 (scripts/setup.sh installs it): {e}"
            )
        });
        assert!(
            out.status.success(),
            "openssl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server certificate (PEM), for `IP:127.0.0.1`.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// The server's private key (PEM).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What [`https_get`] got back.
#[derive(Debug)]
pub struct HttpsAnswer {
    /// The response status.
    pub status: u16,
    /// The protocol ALPN chose (`h2`, `http/1.1`), if any.
    pub alpn: Option<String>,
    /// The response body.
    pub body: String,
}

/// A TLS connection to `addr` (as `127.0.0.1`) trusting only the CA in `ca` (PEM),
/// offering `alpn`.
///
/// # Errors
/// The connection's or the handshake's failure, as text.
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &Path,
    alpn: &[&str],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

/// `GET path` over a new TLS connection to `addr` trusting only `ca`, offering `alpn`,
/// in HTTP/2 when the server chose it, else HTTP/1.1; `headers` added.
///
/// # Errors
/// Any failure (TLS, HTTP), as text.
pub async fn https_get(
    addr: std::net::SocketAddr,
    ca: &Path,
    alpn: &[&str],
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpsAnswer, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let exchange = async {
        let tls = tls_connect(addr, ca, alpn).await?;
        let chosen = tls
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let h2 = chosen.as_deref() == Some("h2");
        let uri = if h2 {
            format!("https://{addr}{path}")
        } else {
            path.to_owned()
        };
        let mut request = http::Request::get(uri);
        if !h2 {
            request = request.header("host", addr.to_string());
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let io = TokioIo::new(tls);
        let response = if h2 {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            send.send_request(request).await
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            send.send_request(request).await
        }
        .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(HttpsAnswer {
            status,
            alpn: chosen,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(crate::DEADLINE, exchange)
        .await
        .map_err(|_| format!("GET {path} over TLS took longer than {:?}", crate::DEADLINE))?
}
