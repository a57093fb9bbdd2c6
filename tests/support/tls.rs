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
