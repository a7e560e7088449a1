//! TLS (rustls) from PEM files: the chat port's optional TLS listener (`chat_tls`) and mutual
//! TLS on the raft port (`[tls] raft = true`, peers and operators present certificates signed
//! by `[tls] ca`). The files are reread on SIGHUP: new connections use the new certificates,
//! live ones keep theirs; a reload that fails keeps the old ones.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("key `tls.{key}`: cannot read {path}: {reason}")]
    File {
        key: &'static str,
        path: String,
        reason: String,
    },
    #[error("key `tls.{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The PEM files as read, checked against each other.
struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Option<Arc<RootCertStore>>,
}

/// What is built from the files, swapped whole on reload.
struct Built {
    chat: Arc<ServerConfig>,
    raft_server: Option<Arc<ServerConfig>>,
    raft_client: Option<Arc<ClientConfig>>,
}

pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
    raft: bool,
    built: RwLock<Arc<Built>>,
    /// Moves on at every successful reload: raft clients rebuild their pools when it does.
    generation: AtomicU64,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem<T: PemObject>(key: &'static str, path: &Path) -> Result<Vec<T>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        key,
        path: path.display().to_string(),
        reason,
    };
    let items = T::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<T>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if items.is_empty() {
        return Err(file_error("no PEM item of the expected kind".into()));
    }
    Ok(items)
}

impl Material {
    fn read(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<Material, TlsError> {
        let chain = read_pem::<CertificateDer<'static>>("cert", cert)?;
        let key = read_pem::<PrivateKeyDer<'static>>("key", key)?
            .into_iter()
            .next()
            .ok_or_else(|| TlsError::Invalid {
                key: "key",
                reason: "no private key".into(),
            })?;
        let roots = match ca {
            None => None,
            Some(path) => {
                let mut store = RootCertStore::empty();
                for cert in read_pem::<CertificateDer<'static>>("ca", path)? {
                    store.add(cert).map_err(|e| TlsError::Invalid {
                        key: "ca",
                        reason: format!("{}: {e}", path.display()),
                    })?;
                }
                Some(Arc::new(store))
            }
        };
        Ok(Material { chain, key, roots })
    }

    fn server(
        &self,
        client_roots: Option<&Arc<RootCertStore>>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let invalid = |key: &'static str| {
            move |e: rustls::Error| TlsError::Invalid {
                key,
                reason: e.to_string(),
            }
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(invalid("cert"))?;
        let builder = match client_roots {
            None => builder.with_no_client_auth(),
            Some(roots) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                        .build()
                        .map_err(|e| TlsError::Invalid {
                            key: "ca",
                            reason: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(invalid("key"))?;
        // Resumption would keep state per client; chat and raft connections are long-lived.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Arc::new(config))
    }

    fn client(&self, roots: &Arc<RootCertStore>) -> Result<Arc<ClientConfig>, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid {
                key: "cert",
                reason: e.to_string(),
            })?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Invalid {
                key: "key",
                reason: e.to_string(),
            })?;
        Ok(Arc::new(config))
    }

    fn build(&self, raft: bool) -> Result<Built, TlsError> {
        let chat = self.server(None)?;
        let (raft_server, raft_client) = match (raft, &self.roots) {
            (false, _) => (None, None),
            (true, None) => {
                return Err(TlsError::Invalid {
                    key: "ca",
                    reason: "`tls.raft = true` needs the CA that signs the nodes' certificates"
                        .into(),
                });
            }
            (true, Some(roots)) => (Some(self.server(Some(roots))?), Some(self.client(roots)?)),
        };
        Ok(Built {
            chat,
            raft_server,
            raft_client,
        })
    }
}

impl Tls {
    /// Reads the files named by `[tls]`; `None` when no certificate is configured.
    pub fn load(config: &TlsConfig) -> Result<Option<Arc<Tls>>, TlsError> {
        let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
            return Ok(None);
        };
        let tls = Tls {
            cert: cert.into(),
            key: key.into(),
            ca: config.ca.as_ref().map(PathBuf::from),
            raft: config.raft,
            built: RwLock::new(Arc::new(
                Material::read(
                    Path::new(cert),
                    Path::new(key),
                    config.ca.as_deref().map(Path::new),
                )?
                .build(config.raft)?,
            )),
            generation: AtomicU64::new(0),
        };
        Ok(Some(Arc::new(tls)))
    }

    /// Rereads the files (SIGHUP). On an error the certificates in use stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let built = Material::read(&self.cert, &self.key, self.ca.as_deref())?.build(self.raft)?;
        *self.built.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(built);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    fn current(&self) -> Arc<Built> {
        self.built.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Accepts the chat port's TLS connections with the current certificate.
    pub fn chat_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current().chat.clone())
    }

    /// Accepts the raft port's connections, requiring a client certificate from the CA;
    /// `None` unless `tls.raft`.
    pub fn raft_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.current()
            .raft_server
            .clone()
            .map(tokio_rustls::TlsAcceptor::from)
    }

    /// How this node connects to its peers' raft ports; `None` unless `tls.raft`.
    pub fn raft_client(&self) -> Option<Arc<ClientConfig>> {
        self.current().raft_client.clone()
    }
}

/// A client configuration for operators (`raftchat admin --tls-ca … --tls-cert … --tls-key …`).
pub fn operator_client(ca: &Path, cert: &Path, key: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let material = Material::read(cert, key, Some(ca))?;
    let roots = material.roots.clone().ok_or_else(|| TlsError::Invalid {
        key: "ca",
        reason: "no CA".into(),
    })?;
    material.client(&roots)
}

/// A client configuration that is never used to connect (plain HTTP on the raft port), for
/// connectors that want one. (`builder()` takes ring, the only provider compiled in.)
pub fn plain_client() -> ClientConfig {
    ClientConfig::builder()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}
