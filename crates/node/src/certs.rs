//! Server certificates chosen by SNI and replaced without a restart.
//!
//! A node serves one or more certificates (`[tls] cert, key` and any number of
//! `[[tls.certs]] cert, key`; the first is the default). For each TLS handshake,
//! over TCP or QUIC alike, [`Certs`] picks the certificate whose names match the
//! client's SNI: an exact name, then a wildcard (`*.cdn.test` for `a.cdn.test`),
//! then the default.
//!
//! Certificate files are read again when they change on disk (checked every
//! [`POLL`]) and on `SIGHUP` ([`Certs::watch`]), and the whole set is swapped at
//! once: a handshake in progress keeps the certificate it started with, and
//! connections already open are not touched. A file that does not read or parse (a
//! half-written renewal, a key that does not match) keeps the certificate it
//! replaced, logs why, and counts in `cdn_tls_reload_errors_total`; never an
//! outage. Certificates can also be installed at run time ([`Certs::install`], for
//! certificates the control plane issues).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntGaugeVec, Opts, Registry};
use rustls::{
    crypto::ring as ring_provider,
    server::{ClientHello, ResolvesServerCert},
    sign,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{Error, tls::CertifiedKey};

/// How often certificate files are checked for changes.
pub const POLL: Duration = Duration::from_secs(2);

/// One certificate, ready for handshakes.
#[derive(Debug)]
struct Loaded {
    /// The DNS names it is valid for (lowercase; `*.x` wildcards).
    names: Vec<String>,
    /// The `name` label of its expiry metric: its first name, else its file.
    label: String,
    /// Its end of validity, seconds since the Unix epoch.
    not_after: i64,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<sign::CertifiedKey>,
}

impl Loaded {
    fn new(certified: &CertifiedKey, fallback_label: &str) -> Result<Self, Error> {
        let provider = ring_provider::default_provider();
        let signing = provider.key_provider.load_private_key(certified.key.clone_key())?;
        let key = Arc::new(sign::CertifiedKey::new(certified.chain.clone(), signing));
        // A key that does not belong to the certificate would fail every handshake.
        key.keys_match()?;
        let (names, not_after) = describe(&certified.chain[0])?;
        let label = names.first().cloned().unwrap_or_else(|| fallback_label.to_string());
        Ok(Self { names, label, not_after, chain: certified.chain.clone(), key })
    }
}

/// The DNS names (subjectAltName) and end of validity of a certificate.
fn describe(der: &CertificateDer<'_>) -> Result<(Vec<String>, i64), Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| Error::Tls(rustls::Error::General(format!("certificate does not parse: {e}"))))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// A certificate's files and what was read from them last.
#[derive(Debug)]
struct Source {
    cert: PathBuf,
    key: PathBuf,
    /// Modification times and lengths of both files when last read.
    stamp: Mutex<Option<[(SystemTime, u64); 2]>>,
}

impl Source {
    fn stamp(&self) -> Option<[(SystemTime, u64); 2]> {
        let read = |path: &PathBuf| {
            std::fs::metadata(path).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
        };
        Some([read(&self.cert)?, read(&self.key)?])
    }

    fn load(&self) -> Result<Loaded, Error> {
        let certified = CertifiedKey::from_pem_files(&self.cert, &self.key)?;
        Loaded::new(&certified, &self.cert.display().to_string())
    }
}

/// Every certificate in use, indexed by name.
#[derive(Debug, Default)]
struct Table {
    /// In order: the configured ones (the first is the default), then installed ones.
    loaded: Vec<Arc<Loaded>>,
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
}

impl Table {
    fn new(loaded: Vec<Arc<Loaded>>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (index, cert) in loaded.iter().enumerate() {
            for name in &cert.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(index),
                    None => exact.entry(name.clone()).or_insert(index),
                };
            }
        }
        Self { loaded, exact, wildcard }
    }

    fn find(&self, sni: Option<&str>) -> Option<&Arc<Loaded>> {
        let by_name = sni.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let index = self.exact.get(&name).or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent)
            })?;
            self.loaded.get(*index)
        });
        by_name.or_else(|| self.loaded.first())
    }
}

/// The certificates a node serves (see the module documentation).
#[derive(Debug)]
pub struct Certs {
    table: ArcSwap<Table>,
    /// Configured files, in order; `None` for a generated (self-signed) one.
    sources: Vec<Option<Source>>,
    /// The configured certificates as last loaded (a failed reload keeps these).
    configured: Mutex<Vec<Arc<Loaded>>>,
    /// Installed at run time, by name.
    installed: Mutex<Vec<(String, Arc<Loaded>)>>,
    expiry: Mutex<Option<IntGaugeVec>>,
    errors: Mutex<Option<IntCounter>>,
}

impl Certs {
    /// The certificates of `[tls]`: its `cert`/`key` (or a self-signed one, made for
    /// `names` and `ips`) first, then each `[[tls.certs]]`.
    pub fn load(config: &crate::tls::TlsConfig, names: &[String], ips: &[std::net::IpAddr]) -> Result<Self, Error> {
        let mut sources = Vec::new();
        let mut loaded = Vec::new();
        match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => {
                let source = Source { cert: cert.clone(), key: key.clone(), stamp: Mutex::new(None) };
                *source.stamp.lock().unwrap_or_else(PoisonError::into_inner) = source.stamp();
                loaded.push(Arc::new(source.load()?));
                sources.push(Some(source));
            }
            _ if config.self_signed || config.certs.is_empty() => {
                let generated = CertifiedKey::self_signed(names, ips)?;
                loaded.push(Arc::new(Loaded::new(&generated, "self-signed")?));
                sources.push(None);
            }
            _ => {}
        }
        for files in &config.certs {
            let source = Source { cert: files.cert.clone(), key: files.key.clone(), stamp: Mutex::new(None) };
            *source.stamp.lock().unwrap_or_else(PoisonError::into_inner) = source.stamp();
            loaded.push(Arc::new(source.load()?));
            sources.push(Some(source));
        }
        Ok(Self {
            table: ArcSwap::from_pointee(Table::new(loaded.clone())),
            sources,
            configured: Mutex::new(loaded),
            installed: Mutex::new(Vec::new()),
            expiry: Mutex::new(None),
            errors: Mutex::new(None),
        })
    }

    /// Registers `cdn_tls_cert_expiry_seconds{name}` and
    /// `cdn_tls_reload_errors_total` in `registry`.
    pub fn register(&self, registry: &Registry) -> Result<(), Error> {
        let expiry = IntGaugeVec::new(
            Opts::new(
                "cdn_tls_cert_expiry_seconds",
                "Seconds until each served certificate expires (negative: expired)",
            ),
            &["name"],
        )
        .map_err(metrics_error)?;
        let errors =
            IntCounter::new("cdn_tls_reload_errors_total", "Certificate files that changed but could not be loaded")
                .map_err(metrics_error)?;
        registry.register(Box::new(expiry.clone())).map_err(metrics_error)?;
        registry.register(Box::new(errors.clone())).map_err(metrics_error)?;
        *self.expiry.lock().unwrap_or_else(PoisonError::into_inner) = Some(expiry);
        *self.errors.lock().unwrap_or_else(PoisonError::into_inner) = Some(errors);
        self.refresh_expiry();
        Ok(())
    }

    /// A rustls server configuration that picks certificates from `self`.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]], tls13_only: bool) -> Result<rustls::ServerConfig, Error> {
        crate::tls::server_config(self.clone(), alpn, tls13_only)
    }

    /// The default certificate's chain (leaf first).
    pub fn default_chain(&self) -> Vec<CertificateDer<'static>> {
        self.table.load().loaded.first().map(|l| l.chain.clone()).unwrap_or_default()
    }

    /// The chain served for `sni` (tests, status).
    pub fn chain_for(&self, sni: Option<&str>) -> Vec<CertificateDer<'static>> {
        self.table.load().find(sni).map(|l| l.chain.clone()).unwrap_or_default()
    }

    /// Installs (or replaces) a certificate under `label` at run time, after the
    /// configured ones; a chain and key that do not make a usable certificate are
    /// refused and change nothing.
    pub fn install(
        &self,
        label: &str,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), Error> {
        let loaded = Arc::new(Loaded::new(&CertifiedKey { chain, key }, label)?);
        {
            let mut installed = self.installed.lock().unwrap_or_else(PoisonError::into_inner);
            installed.retain(|(l, _)| l != label);
            installed.push((label.to_string(), loaded));
        }
        self.rebuild();
        info!(label, "certificate installed");
        Ok(())
    }

    /// Reads every changed file again (every file when `force`), and swaps.
    pub fn reload(&self, force: bool) {
        let mut changed = false;
        {
            let mut configured = self.configured.lock().unwrap_or_else(PoisonError::into_inner);
            for (index, source) in self.sources.iter().enumerate() {
                let Some(source) = source else { continue };
                let stamp = source.stamp();
                let mut last = source.stamp.lock().unwrap_or_else(PoisonError::into_inner);
                if !force && stamp == *last {
                    continue;
                }
                *last = stamp;
                match source.load() {
                    Ok(loaded) => {
                        info!(cert = %source.cert.display(), names = ?loaded.names, "certificate loaded");
                        configured[index] = Arc::new(loaded);
                        changed = true;
                    }
                    Err(error) => {
                        warn!(cert = %source.cert.display(), key = %source.key.display(), %error,
                            "certificate not reloaded; the one before stays in use");
                        if let Some(errors) = &*self.errors.lock().unwrap_or_else(PoisonError::into_inner) {
                            errors.inc();
                        }
                    }
                }
            }
        }
        if changed {
            self.rebuild();
        }
        self.refresh_expiry();
    }

    fn rebuild(&self) {
        let mut loaded = self.configured.lock().unwrap_or_else(PoisonError::into_inner).clone();
        loaded.extend(self.installed.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(_, l)| l.clone()));
        self.table.store(Arc::new(Table::new(loaded)));
    }

    fn refresh_expiry(&self) {
        let Some(expiry) = self.expiry.lock().unwrap_or_else(PoisonError::into_inner).clone() else { return };
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        expiry.reset();
        for loaded in &self.table.load().loaded {
            expiry.with_label_values(&[&loaded.label]).set(loaded.not_after - now);
        }
    }

    /// Reloads changed files every [`POLL`] and all of them on `SIGHUP`, until
    /// `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => false,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            if force {
                info!("SIGHUP: reloading certificates");
            }
            let certs = self.clone();
            // File reads and parsing off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || certs.reload(force)).await;
        }
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<sign::CertifiedKey>> {
        self.table.load().find(hello.server_name()).map(|loaded| loaded.key.clone())
    }
}

fn metrics_error(e: prometheus::Error) -> Error {
    Error::Tls(rustls::Error::General(format!("metrics: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{CertFiles, TlsConfig};

    fn write_cert(dir: &std::path::Path, name: &str, sans: &[&str]) -> CertFiles {
        let generated =
            rcgen::generate_simple_self_signed(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        CertFiles { cert, key }
    }

    fn served(certs: &Certs, sni: Option<&str>) -> Vec<String> {
        let chain = certs.chain_for(sni);
        describe(&chain[0]).unwrap().0
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = write_cert(dir.path(), "a", &["www.cdn.test"]);
        let second = write_cert(dir.path(), "b", &["shop.cdn.test", "*.video.test"]);
        let config =
            TlsConfig { cert: Some(first.cert), key: Some(first.key), certs: vec![second], ..TlsConfig::default() };
        let certs = Certs::load(&config, &[], &[]).unwrap();
        assert_eq!(served(&certs, Some("www.cdn.test")), ["www.cdn.test"]);
        assert_eq!(served(&certs, Some("SHOP.cdn.test.")), ["shop.cdn.test", "*.video.test"]);
        assert_eq!(served(&certs, Some("a.video.test")), ["shop.cdn.test", "*.video.test"]);
        // One label only, and anything else gets the default.
        assert_eq!(served(&certs, Some("a.b.video.test")), ["www.cdn.test"]);
        assert_eq!(served(&certs, None), ["www.cdn.test"]);
    }

    #[test]
    fn a_changed_file_is_picked_up_and_a_broken_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_cert(dir.path(), "a", &["old.cdn.test"]);
        let config = TlsConfig { cert: Some(files.cert.clone()), key: Some(files.key.clone()), ..TlsConfig::default() };
        let certs = Certs::load(&config, &[], &[]).unwrap();
        let registry = Registry::new();
        certs.register(&registry).unwrap();
        assert_eq!(served(&certs, None), ["old.cdn.test"]);
        certs.reload(false);
        assert_eq!(served(&certs, None), ["old.cdn.test"], "nothing changed");
        // Replaced on disk: the new one is served.
        std::thread::sleep(Duration::from_millis(20));
        write_cert(dir.path(), "a", &["new.cdn.test"]);
        certs.reload(false);
        assert_eq!(served(&certs, None), ["new.cdn.test"]);
        // A half-written file: the new certificate stays, the error is counted.
        std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\nMIIB").unwrap();
        certs.reload(false);
        assert_eq!(served(&certs, None), ["new.cdn.test"]);
        // A key that does not match the certificate: refused too.
        let other = write_cert(dir.path(), "other", &["x.test"]);
        write_cert(dir.path(), "a", &["newer.cdn.test"]);
        std::fs::copy(&other.key, &files.key).unwrap();
        certs.reload(false);
        assert_eq!(served(&certs, None), ["new.cdn.test"]);
        let errors = registry.gather().into_iter().find(|f| f.name() == "cdn_tls_reload_errors_total").unwrap();
        assert_eq!(errors.get_metric()[0].get_counter().get_value(), 2.0);
        let expiry = registry.gather().into_iter().find(|f| f.name() == "cdn_tls_cert_expiry_seconds").unwrap();
        let metric = &expiry.get_metric()[0];
        assert_eq!(metric.get_label()[0].value(), "new.cdn.test");
        assert!(metric.get_gauge().get_value() > 86_400.0);
    }

    #[test]
    fn installed_certificates_join_and_replace() {
        let certs =
            Certs::load(&TlsConfig { self_signed: true, ..TlsConfig::default() }, &["edge-1".into()], &[]).unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["www.cdn.test".to_string()]).unwrap();
        let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der()).unwrap();
        certs.install("www", vec![generated.cert.der().clone()], key).unwrap();
        assert_eq!(served(&certs, Some("www.cdn.test")), ["www.cdn.test"]);
        assert!(served(&certs, Some("other.test")).contains(&"edge-1".to_string()));
        // A key that does not match is refused; the installed one stays.
        let other = rcgen::generate_simple_self_signed(vec!["www.cdn.test".to_string()]).unwrap();
        let wrong = PrivateKeyDer::try_from(generated.signing_key.serialize_der()).unwrap();
        assert!(certs.install("www", vec![other.cert.der().clone()], wrong).is_err());
        assert_eq!(certs.chain_for(Some("www.cdn.test"))[0], *generated.cert.der());
    }
}
