//! Key pairs for tests of public-key tokens, generated per test with the `openssl`
//! command line: nothing secret is committed.

use std::path::PathBuf;
use std::process::Command;

/// A key pair in a fresh directory, removed on drop.
pub struct KeyPair {
    dir: PathBuf,
}

impl KeyPair {
    /// `openssl genpkey` with `args` ([`RSA`], …), then the public half with
    /// `openssl pkey -pubout`.
    pub fn generate(name: &str, args: &[&str]) -> KeyPair {
        let dir = std::env::temp_dir().join(format!("relay-keys-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let private = dir.join("private.pem");
        let public = dir.join("public.pem");
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap_or_else(|e| {
                panic!("the `openssl` command is needed to generate test keys: {e}")
            });
            assert!(
                out.status.success(),
                "openssl failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("openssl")
            .args(["genpkey", "-out"])
            .arg(&private)
            .args(args));
        run(Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public));
        KeyPair { dir }
    }

    pub fn private(&self) -> PathBuf {
        self.dir.join("private.pem")
    }

    pub fn public(&self) -> PathBuf {
        self.dir.join("public.pem")
    }
}

impl Drop for KeyPair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `openssl genpkey` arguments for a 2048-bit RSA key.
pub const RSA: &[&str] = &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
