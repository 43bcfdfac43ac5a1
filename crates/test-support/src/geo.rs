//! A geo-DNS (`cdn_geo::Geo`) in-process on loopback, over a member list the test
//! owns and changes (no cluster needed), and `dig` as an independent DNS client.
//!
//! Moved from tests/geo.rs (`Running`, now [`TestGeo`]; `Dig`); tests/control/main.rs
//! asks through [`dig`] too.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use cdn_cluster::Member;
use cdn_geo::{Config, Geo, MemberSource};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

/// How long a DNS exchange, or a stop, may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A running geo-DNS; stopped (token cancelled) when dropped.
pub struct TestGeo {
    pub dns: SocketAddr,
    pub admin: SocketAddr,
    /// What the server sees as the cluster: change it and the next answer follows.
    pub members: Arc<Mutex<Vec<Member>>>,
    pub registry: Registry,
    pub shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), cdn_geo::Error>>>,
}

impl Drop for TestGeo {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestGeo {
    /// Binds `config` (which must have an admin listener) and serves it with
    /// `members` as the cluster.
    pub async fn start(config: Config, members: Vec<Member>) -> Self {
        let members = Arc::new(Mutex::new(members));
        let source: MemberSource = {
            let members = members.clone();
            Arc::new(move || Arc::new(members.lock().expect("the members' lock").clone()))
        };
        let registry = Registry::new();
        let geo = Geo::bind(config, &registry, source).await.expect("geo binds");
        let dns = geo.dns_addr();
        let admin = geo.admin_addr().expect("admin listener");
        let shutdown = CancellationToken::new();
        let task = Some(tokio::spawn(geo.serve(shutdown.clone())));
        Self { dns, admin, members, registry, shutdown, task }
    }

    /// The DNS port, as text (for `dig -p`).
    pub fn port(&self) -> String {
        self.dns.port().to_string()
    }

    /// The sum of the samples of metric `name` whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        crate::metrics::sum_in(&self.registry, name, labels)
    }

    /// Cancels the server and waits for `serve` to return cleanly.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("stops in time")
            .expect("serve did not panic")
            .expect("serve ends cleanly");
    }
}

/// What dig printed, and whether it got an answer.
#[derive(Debug, Clone)]
pub struct Dig {
    pub out: String,
    pub stderr: String,
    /// dig's exit status was 0 (an answer came, whatever its rcode).
    pub success: bool,
}

impl Dig {
    /// The rcode (`NOERROR`, `NXDOMAIN`, ...), or `""`.
    pub fn status(&self) -> &str {
        self.out.split("status: ").nth(1).and_then(|rest| rest.split(',').next()).unwrap_or("")
    }

    /// The header flags (`qr`, `aa`, `tc`, ...).
    pub fn flags(&self) -> Vec<&str> {
        let flags = self.out.split(";; flags: ").nth(1).and_then(|rest| rest.split(';').next()).unwrap_or("");
        flags.split_whitespace().collect()
    }

    /// The records of the ANSWER section, each as whitespace-separated fields.
    pub fn answers(&self) -> Vec<Vec<&str>> {
        let Some(section) = self.out.split(";; ANSWER SECTION:\n").nth(1) else { return Vec::new() };
        section.lines().take_while(|line| !line.trim().is_empty()).map(|l| l.split_whitespace().collect()).collect()
    }

    /// The addresses of the A records in the ANSWER section.
    pub fn a_records(&self) -> Vec<&str> {
        self.answers()
            .into_iter()
            .filter(|fields| fields.get(3) == Some(&"A"))
            .filter_map(|f| f.get(4).copied())
            .collect()
    }

    /// The lines of `+short` output (comments left out).
    pub fn short(&self) -> Vec<String> {
        self.out.lines().map(str::to_string).filter(|l| !l.starts_with(';')).collect()
    }
}

/// Runs `dig @<server ip> -p <port> +time=3 +tries=1 +norecurse <args>` (later
/// options win: `+time=1` in `args` shortens the wait).
pub async fn dig(server: SocketAddr, args: &[&str]) -> Dig {
    let output = tokio::time::timeout(
        TIMEOUT,
        tokio::process::Command::new("dig")
            .arg(format!("@{}", server.ip()))
            .args(["-p", &server.port().to_string(), "+time=3", "+tries=1", "+norecurse"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("dig timed out")
    .expect("dig runs (scripts/test-deps.sh installs dnsutils)");
    Dig {
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        success: output.status.success(),
    }
}
