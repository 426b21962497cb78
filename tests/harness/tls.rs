//! A throw-away certificate authority and one server certificate for all test hosts.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::run;
use super::topology::NAMED_HOSTS;

/// Files made by [`TestCa::generate`], all inside the world's temp dir.
#[derive(Debug, Clone)]
pub struct TestCa {
    /// The CA certificate: give it to clients (`curl --cacert`).
    pub ca_cert: PathBuf,
    /// The server certificate (SANs: every test host name, its subdomains and addresses).
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestCa {
    /// Makes a P-256 CA and a server certificate signed by it, valid for two days.
    pub fn generate(dir: &Path) -> Result<TestCa, String> {
        let ca_key = dir.join("ca.key");
        let ca_cert = dir.join("ca.crt");
        let server_key = dir.join("server.key");
        let server_cert = dir.join("server.crt");
        let new_p256_cert = |subject: &str, key: &Path, cert: &Path| {
            let mut cmd = Command::new("openssl");
            cmd.args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
                .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
                .args(["-subj", subject])
                .arg("-keyout")
                .arg(key)
                .arg("-out")
                .arg(cert);
            cmd
        };
        run(new_p256_cert("/CN=agent-egress test CA", &ca_key, &ca_cert)
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]))?;
        // OpenSSL 3's `req -x509 -CA` signs with the CA at once: no CSR round trip.
        run(new_p256_cert("/CN=allowed.test", &server_key, &server_cert)
            .arg("-CA")
            .arg(&ca_cert)
            .arg("-CAkey")
            .arg(&ca_key)
            .args(["-addext", "basicConstraints=CA:FALSE"])
            .args(["-addext", "keyUsage=critical,digitalSignature"])
            .args(["-addext", "extendedKeyUsage=serverAuth"])
            .args(["-addext", &subject_alt_names()]))?;
        Ok(TestCa {
            ca_cert,
            server_cert,
            server_key,
        })
    }

    /// Makes an NSS database in `home/.pki/nssdb` (where Chromium on Linux looks
    /// when HOME is `home`) that trusts the test CA for TLS servers: Chromium has no
    /// `--cacert`, and trusting the CA keeps its certificate checks whole.
    pub fn trust_in_nss_db(&self, home: &Path) -> Result<(), String> {
        let nssdb = home.join(".pki").join("nssdb");
        std::fs::create_dir_all(&nssdb)
            .map_err(|e| format!("cannot create {}: {e}", nssdb.display()))?;
        let db = format!("sql:{}", nssdb.display());
        let certutil = |args: &[&str]| {
            let mut cmd = Command::new("certutil");
            cmd.arg("-d").arg(&db).args(args);
            run(&mut cmd).map_err(|e| {
                format!("NSS database for Chromium (certutil is in libnss3-tools): {e}")
            })
        };
        certutil(&["-N", "--empty-password"])?;
        let ca_cert = self.ca_cert.to_string_lossy();
        // "C,,": a CA trusted to issue TLS server certificates, nothing else.
        certutil(&[
            "-A",
            "-n",
            "agent-egress test CA",
            "-t",
            "C,,",
            "-i",
            &ca_cert,
        ])?;
        Ok(())
    }
}

fn subject_alt_names() -> String {
    let mut names = Vec::new();
    for host in NAMED_HOSTS {
        names.push(format!("DNS:{}", host.name));
        names.push(format!("DNS:*.{}", host.name));
        names.push(format!("IP:{}", host.v4));
        if let Some(v6) = host.v6 {
            names.push(format!("IP:{v6}"));
        }
    }
    format!("subjectAltName={}", names.join(","))
}
