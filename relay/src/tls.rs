//! TLS on the relay's own listener (`--tls-cert`, `--tls-key`), for self-hosting without
//! a TLS terminator in front (on Fly the platform's proxy terminates TLS and the relay
//! serves plain HTTP).
//!
//! - HTTP/1.1 and HTTP/2 are offered by ALPN (`h2`, `http/1.1`); TLS 1.2 and 1.3, rustls
//!   with ring, the stack the relay already uses for Redis and HTTPS fetches.
//! - The files are read again every [`crate::limits::TLS_RELOAD_INTERVAL`]: when their
//!   contents change and the new pair parses and matches, new handshakes use it at once
//!   (connections already open keep theirs), so certbot or a rotated mounted secret needs
//!   no restart. A pair that does not load (a renewal half written, a key for another
//!   certificate) is logged and the previous one kept; it is tried again as the files
//!   change.
//! - The handshake is bounded by the head timeout ([`crate::connections`]), as a plain
//!   request head is.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The certificate and key files (`--tls-cert`, `--tls-key`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: PathBuf,
}

/// What the files held when last read.
type Contents = (Vec<u8>, Vec<u8>);

impl TlsFiles {
    fn read(&self) -> Result<Contents, String> {
        let read = |path: &PathBuf, setting: &str| {
            std::fs::read(path).map_err(|e| format!("{setting} {}: {e}", path.display()))
        };
        Ok((
            read(&self.cert, "RELAY_TLS_CERT")?,
            read(&self.key, "RELAY_TLS_KEY")?,
        ))
    }

    /// Reads and checks the pair: a chain, a key of a supported kind, and the key of the
    /// chain's first certificate.
    ///
    /// # Errors
    /// What is wrong, naming the setting (the operator's to fix).
    pub fn load(&self) -> Result<Arc<CertifiedKey>, String> {
        let (cert, key) = self.read()?;
        self.parse(&cert, &key)
    }

    fn parse(&self, cert: &[u8], key: &[u8]) -> Result<Arc<CertifiedKey>, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("RELAY_TLS_CERT {}: {e}", self.cert.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "RELAY_TLS_CERT {}: no PEM certificate in it",
                self.cert.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
            format!(
                "RELAY_TLS_KEY {}: no PEM private key in it ({e})",
                self.key.display()
            )
        })?;
        let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
            format!(
                "RELAY_TLS_KEY {} does not go with RELAY_TLS_CERT {}: {e}",
                self.key.display(),
                self.cert.display()
            )
        })?;
        Ok(Arc::new(certified))
    }
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The certificate handshakes are answered with, swapped when the files change.
#[derive(Debug)]
struct Current {
    /// Held only to clone or replace the `Arc`, never across an await.
    key: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self
                .key
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ))
    }
}

/// The listener's TLS: an acceptor whose certificate follows the files.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    current: Arc<Current>,
    files: TlsFiles,
}

impl Tls {
    /// Loads the files (see [`TlsFiles::load`]).
    ///
    /// # Errors
    /// As [`TlsFiles::load`].
    pub fn new(files: TlsFiles) -> Result<Tls, String> {
        let current = Arc::new(Current {
            key: RwLock::new(files.load()?),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            current,
            files,
        })
    }

    /// The acceptor for new connections.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Re-reads the files every [`crate::limits::TLS_RELOAD_INTERVAL`] until `stop`, and
    /// swaps the certificate when they hold a new pair that loads.
    pub async fn follow_files(self, stop: CancellationToken) {
        let mut seen = self.files.read().ok();
        let mut interval = tokio::time::interval(crate::limits::TLS_RELOAD_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = interval.tick() => {}
            }
            let files = self.files.clone();
            // Blocking file reads, off the runtime's threads.
            let Ok(read) = tokio::task::spawn_blocking(move || files.read()).await else {
                continue;
            };
            let contents = match read {
                Ok(contents) => contents,
                Err(err) => {
                    if seen.take().is_some() {
                        warn!(error = %err, "TLS files unreadable; the certificate loaded before is kept");
                    }
                    continue;
                }
            };
            if seen.as_ref() == Some(&contents) {
                continue;
            }
            match self.files.parse(&contents.0, &contents.1) {
                Ok(key) => {
                    *self
                        .current
                        .key
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = key;
                    info!("TLS certificate reloaded");
                }
                Err(err) => {
                    warn!(error = %err, "TLS files changed but do not load; the certificate loaded before is kept");
                }
            }
            // Either way these contents were looked at: a bad pair is reported once, and
            // tried again when the files change again.
            seen = Some(contents);
        }
    }
}

/// A client's TLS: the web's roots (webpki-roots) and the CA certificates of `pem`
/// (checked by the configuration); ring, TLS 1.2 and 1.3.
pub fn client_config(pem: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in CertificateDer::pem_slice_iter(pem).filter_map(Result::ok) {
        if let Err(err) = roots.add(cert) {
            warn!(error = %err, "ignored a CA certificate");
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}
