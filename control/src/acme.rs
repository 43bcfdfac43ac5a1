//! Certificates for the fleet through ACME (RFC 8555) DNS-01, answered by our own
//! geo-DNS.
//!
//! With `[acme]`, one control node (the live control node with the smallest id)
//! orders one certificate for `names` (wildcards included) from the ACME
//! `directory`: for each name it publishes the challenge's TXT value in the cluster
//! state (`acme:_acme-challenge.<name>`), which every geo node answers
//! authoritatively; after [`AcmeConfig::dns_wait`] it tells the CA to validate,
//! finalizes the order with a new key, stores certificate and key in
//! `data_dir/acme/` (key file mode 0600) and publishes the certificate in the
//! cluster state with its key sealed under the cluster secret ([`CertSeal`]): edges
//! install it without a restart. It orders again `renew_before` the certificate
//! expires, or when an operator asks (`POST /v1/certificates/renew`).
//!
//! The other control nodes do not order; each adopts (stores) the newest
//! certificate it sees in the cluster, so whichever becomes the orderer after a
//! failure has it. The ACME account key is kept in `data_dir/acme/account.json`
//! (mode 0600) and reused.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use cdn_cluster::{CertSeal, Cluster, MemberState, Role, state::SealedCert};
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// `[acme]` of a control node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The ACME directory URL (`https://acme-v02.api.letsencrypt.org/directory`).
    pub directory: String,
    /// A PEM file with the root that the ACME server's own HTTPS certificate comes
    /// from, when it is not a public one (a test CA such as pebble).
    pub ca: Option<PathBuf>,
    /// Contact URIs for the account (`mailto:ops@example.com`).
    #[serde(default)]
    pub contact: Vec<String>,
    /// The names of the certificate (`www.cdn.test`, `*.cdn.test`); the first names it.
    pub names: Vec<String>,
    /// Order a new certificate this long before the current one expires.
    #[serde(default = "default_renew_before", with = "humantime_serde")]
    pub renew_before: Duration,
    /// How often the certificate's expiry is looked at.
    #[serde(default = "default_check", with = "humantime_serde")]
    pub check: Duration,
    /// How long the challenge's TXT value is given to reach every geo node before
    /// the CA is asked to look.
    #[serde(default = "default_dns_wait", with = "humantime_serde")]
    pub dns_wait: Duration,
}

fn default_renew_before() -> Duration {
    Duration::from_secs(30 * 86_400)
}

fn default_check() -> Duration {
    Duration::from_secs(60)
}

fn default_dns_wait() -> Duration {
    Duration::from_secs(2)
}

impl AcmeConfig {
    /// Problems with the section, each naming its key.
    pub fn problems(&self, has_cluster: bool) -> Vec<String> {
        let mut problems = Vec::new();
        match self.directory.parse::<http::Uri>() {
            Ok(uri) if uri.scheme_str() == Some("https") && uri.authority().is_some() => {}
            _ => problems.push(format!("acme.directory: {:?} is not an https:// URL", self.directory)),
        }
        if self.names.is_empty() {
            problems.push("acme.names: at least one name".into());
        }
        for (i, name) in self.names.iter().enumerate() {
            let bare = name.strip_prefix("*.").unwrap_or(name);
            let valid = !bare.is_empty()
                && bare.len() <= 253
                && bare.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                });
            if !valid {
                problems.push(format!("acme.names[{i}]: {name:?} is not a lowercase DNS name or *.name"));
            }
        }
        for (i, contact) in self.contact.iter().enumerate() {
            if !contact.starts_with("mailto:") {
                problems.push(format!("acme.contact[{i}]: {contact:?} is not a mailto: URI"));
            }
        }
        if let Some(ca) = &self.ca
            && !ca.is_file()
        {
            problems.push(format!("acme.ca: {} is not a readable file", ca.display()));
        }
        if self.check.is_zero() {
            problems.push("acme.check: must be more than 0s".into());
        }
        if !has_cluster {
            problems.push("acme: needs [cluster] (geo answers the challenges from the cluster state)".into());
        }
        problems
    }

    /// The label the certificate travels under: its first name.
    fn label(&self) -> &str {
        &self.names[0]
    }
}

/// The ACME client of a control node.
pub(crate) struct Acme {
    config: AcmeConfig,
    dir: PathBuf,
    node_id: String,
    cluster: Arc<Cluster>,
    seal: CertSeal,
    renew: Notify,
}

/// A certificate and key as stored in `data_dir/acme/`.
struct Stored {
    chain: String,
    key: String,
    not_after: i64,
}

impl Acme {
    pub(crate) fn new(
        config: AcmeConfig,
        data_dir: &Path,
        node_id: &str,
        cluster: Arc<Cluster>,
        seal: CertSeal,
    ) -> Self {
        Self { config, dir: data_dir.join("acme"), node_id: node_id.to_string(), cluster, seal, renew: Notify::new() }
    }

    /// Asks for a new certificate now (`POST /v1/certificates/renew`).
    pub(crate) fn renew_now(&self) {
        self.renew.notify_one();
    }

    /// The stored certificate's label and end of validity, if any.
    pub(crate) fn current(&self) -> Option<(String, i64)> {
        self.load().map(|stored| (self.config.label().to_string(), stored.not_after))
    }

    fn load(&self) -> Option<Stored> {
        let chain = std::fs::read_to_string(self.dir.join("cert.pem")).ok()?;
        let key = std::fs::read_to_string(self.dir.join("key.pem")).ok()?;
        let not_after = not_after(&chain)?;
        Some(Stored { chain, key, not_after })
    }

    fn store(&self, stored: &Stored) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(&self.dir)?;
        let key = self.dir.join("key.pem");
        crate::durable::replace(&key, stored.key.as_bytes())?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        crate::durable::replace(&self.dir.join("cert.pem"), stored.chain.as_bytes())
    }

    async fn publish(&self, stored: &Stored) {
        let sealed = SealedCert {
            label: self.config.label().to_string(),
            not_after: stored.not_after,
            chain: stored.chain.clone(),
            key: self.seal.seal(stored.key.as_bytes()),
        };
        self.cluster.publish_cert(sealed).await;
    }

    /// Whether this node orders: the live control node with the smallest id.
    fn orders(&self) -> bool {
        let members = self.cluster.members();
        let first = members
            .iter()
            .filter(|m| m.role == Role::Control && matches!(m.state, MemberState::Alive | MemberState::Drained))
            .map(|m| m.node_id.as_str())
            .min();
        first.is_none_or(|first| first == self.node_id)
    }

    /// Keeps a current certificate until `shutdown`. Orders only once this node has
    /// `settled` (heard from the cluster, or waited long enough alone): a node that
    /// just started may not see yet the control node that orders.
    pub(crate) async fn run(
        self: Arc<Self>,
        mut settled: tokio::sync::watch::Receiver<bool>,
        shutdown: CancellationToken,
    ) {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = settled.wait_for(|settled| *settled) => {}
        }
        // A gossip round more, for the other control nodes' entries to arrive.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut stored = self.load();
        if let Some(stored) = &stored {
            self.publish(stored).await;
        }
        // A failed order is tried again after a pause that grows to the check period.
        let mut backoff = Duration::from_secs(5);
        let mut force = false;
        loop {
            // Adopt a newer certificate another control node ordered.
            if let Some(theirs) = self.cluster.certs().await.remove(self.config.label())
                && stored.as_ref().is_none_or(|ours| theirs.not_after > ours.not_after)
                && let Some(key) = self.seal.open(&theirs.key).and_then(|key| String::from_utf8(key).ok())
            {
                let adopted = Stored { chain: theirs.chain, key, not_after: theirs.not_after };
                match self.store(&adopted) {
                    Ok(()) => {
                        info!(label = self.config.label(), "adopted the certificate another control node ordered");
                        stored = Some(adopted);
                    }
                    Err(error) => warn!(%error, "the issued certificate could not be stored"),
                }
            }
            let now = cdn_cluster::now_ms() as i64 / 1000;
            let due = stored.as_ref().is_none_or(|s| s.not_after - now <= self.config.renew_before.as_secs() as i64);
            let mut wait = self.config.check;
            if (due || force) && self.orders() {
                match self.order().await {
                    Ok(issued) => {
                        info!(label = self.config.label(), not_after = issued.not_after, "certificate issued");
                        if let Err(error) = self.store(&issued) {
                            warn!(%error, "the issued certificate could not be stored; it is published all the same");
                        }
                        self.publish(&issued).await;
                        stored = Some(issued);
                        force = false;
                        backoff = Duration::from_secs(5);
                    }
                    Err(error) => {
                        warn!(%error, retry_in = ?backoff, "ACME order failed");
                        wait = backoff.min(self.config.check);
                        backoff = (backoff * 2).min(self.config.check.max(Duration::from_secs(5)));
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                () = self.renew.notified() => force = true,
            }
        }
    }

    async fn account(&self) -> Result<Account, String> {
        let path = self.dir.join("account.json");
        let builder = || match &self.config.ca {
            Some(ca) => Account::builder_with_root(ca).map_err(|e| format!("acme.ca: {e}")),
            None => Account::builder().map_err(|e| e.to_string()),
        };
        if let Ok(text) = std::fs::read_to_string(&path)
            && let Ok(credentials) = serde_json::from_str::<AccountCredentials>(&text)
        {
            return builder()?.from_credentials(credentials).await.map_err(|e| format!("account: {e}"));
        }
        let contact: Vec<&str> = self.config.contact.iter().map(String::as_str).collect();
        let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
        let (account, credentials) = builder()?
            .create(&new, self.config.directory.clone(), None)
            .await
            .map_err(|e| format!("new account: {e}"))?;
        let json = serde_json::to_vec(&credentials).map_err(|e| e.to_string())?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
            crate::durable::replace(&path, &json).map_err(|e| format!("{}: {e}", path.display()))?;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        info!(id = account.id(), "ACME account created");
        Ok(account)
    }

    /// One order, start to end; the challenge names are withdrawn whatever happens.
    async fn order(&self) -> Result<Stored, String> {
        let account = self.account().await?;
        let mut published: Vec<String> = Vec::new();
        let result = self.order_with(&account, &mut published).await;
        for name in &published {
            self.cluster.withdraw_acme(name).await;
        }
        result
    }

    async fn order_with(&self, account: &Account, published: &mut Vec<String>) -> Result<Stored, String> {
        let identifiers: Vec<Identifier> = self.config.names.iter().map(|n| Identifier::Dns(n.clone())).collect();
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await.map_err(|e| format!("new order: {e}"))?;
        // Every challenge's TXT value first (a name and its wildcard share one
        // challenge name, with two values) ...
        let mut values: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(|e| format!("authorization: {e}"))?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                status => return Err(format!("authorization is {status:?}")),
            }
            let challenge = authorization.challenge(ChallengeType::Dns01).ok_or("the CA offers no dns-01 challenge")?;
            let Identifier::Dns(domain) = challenge.identifier().identifier else {
                return Err("not a DNS identifier".into());
            };
            let name = format!("_acme-challenge.{domain}");
            values.entry(name).or_default().push(challenge.key_authorization().dns_value());
        }
        for (name, values) in &values {
            self.cluster.publish_acme(name, values.clone()).await;
            published.push(name.clone());
        }
        tokio::time::sleep(self.config.dns_wait).await;
        // ... then the CA is asked to look.
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(|e| format!("authorization: {e}"))?;
            if authorization.status != AuthorizationStatus::Pending {
                continue;
            }
            let mut challenge =
                authorization.challenge(ChallengeType::Dns01).ok_or("the CA offers no dns-01 challenge")?;
            challenge.set_ready().await.map_err(|e| format!("challenge: {e}"))?;
        }
        let retries = RetryPolicy::new().timeout(Duration::from_secs(60));
        let status = order.poll_ready(&retries).await.map_err(|e| format!("order: {e}"))?;
        if status != OrderStatus::Ready {
            return Err(format!("order is {status:?}, not ready (the CA could not validate the challenges)"));
        }
        let key = order.finalize().await.map_err(|e| format!("finalize: {e}"))?;
        let chain = order.poll_certificate(&retries).await.map_err(|e| format!("certificate: {e}"))?;
        let not_after = not_after(&chain).ok_or("the CA's certificate does not parse")?;
        Ok(Stored { chain, key, not_after })
    }
}

/// The end of validity of the first certificate of a PEM chain.
fn not_after(chain: &str) -> Option<i64> {
    use rustls_pki_types::pem::PemObject as _;
    let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes()).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(names: &[&str]) -> AcmeConfig {
        AcmeConfig {
            directory: "https://127.0.0.1:14000/dir".into(),
            ca: None,
            contact: vec!["mailto:ops@cdn.test".into()],
            names: names.iter().map(|n| n.to_string()).collect(),
            renew_before: default_renew_before(),
            check: default_check(),
            dns_wait: default_dns_wait(),
        }
    }

    #[test]
    fn problems_name_their_keys() {
        assert!(config(&["www.cdn.test", "*.cdn.test"]).problems(true).is_empty());
        let mut bad = config(&["WWW.cdn.test", "a..b", "*."]);
        bad.directory = "http://x/dir".into();
        bad.contact = vec!["ops@cdn.test".into()];
        let problems = bad.problems(false);
        for key in ["acme.directory", "acme.names[0]", "acme.names[1]", "acme.names[2]", "acme.contact[0]", "acme:"] {
            assert!(problems.iter().any(|p| p.starts_with(key)), "{key} in {problems:?}");
        }
        assert!(config(&[]).problems(true).iter().any(|p| p.starts_with("acme.names")));
    }

    #[test]
    fn reads_the_end_of_validity() {
        let generated = rcgen::generate_simple_self_signed(vec!["www.cdn.test".to_string()]).unwrap();
        let end = not_after(&generated.cert.pem()).unwrap();
        let now = cdn_cluster::now_ms() as i64 / 1000;
        assert!(end > now + 86_400, "{end} vs {now}");
        assert!(not_after("no pem here").is_none());
    }
}
