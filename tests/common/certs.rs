//! Certificates made at test time (rcgen): a CA and the leaf certificates it signs.

use std::path::Path;

use super::{Cluster, free_ports};

/// A certificate authority and what it signs.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A leaf certificate for 127.0.0.1 and localhost, as (cert PEM, key PEM).
    pub fn issue(&self, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes `ca.pem`, `{name}.pem` and `{name}.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) {
        std::fs::write(dir.join("ca.pem"), self.cert.pem()).unwrap();
        let (cert, key) = self.issue(name);
        std::fs::write(dir.join(format!("{name}.pem")), cert).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    }
}

/// A one-node cluster (not started) with a `chat_tls` listener and certificates from `ca` in
/// its directory, `extra` TOML appended; returns it and the TLS address.
pub fn configure_chat_tls(ca: &Ca, extra: &str) -> (Cluster, String) {
    let tls_addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let cluster = Cluster::configure(1, "");
    let dir = cluster.dir.path().to_path_buf();
    ca.write(&dir, "node");
    let mut config = std::fs::read_to_string(&cluster.config).unwrap();
    config.push_str(&format!(
        "chat_tls = \"{tls_addr}\"\n[tls]\ncert = \"{d}/node.pem\"\nkey = \"{d}/node.key\"\n{extra}",
        d = dir.display()
    ));
    std::fs::write(&cluster.config, config).unwrap();
    (cluster, tls_addr)
}
