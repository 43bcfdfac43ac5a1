//! Operators' commands: `cdn purge`, `cdn nodes`, `cdn drain`, `cdn undrain`,
//! `cdn routing apply|show` — clients of a control node's API
//! (`--control`/`CDN_CONTROL`, `--token`/`CDN_TOKEN`; for an `https://` control node
//! `--ca`/`CDN_CA` or `--insecure`).
//! `cdn sign` works alone: it signs a URL with a key's secret (RFC 9246).

/// Prints a line to stdout. A reader that went away (`cdn nodes --json | head`)
/// ends the command quietly, rather than with a panic on the broken pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout(), $($arg)*)
            && error.kind() == std::io::ErrorKind::BrokenPipe
        {
            std::process::exit(0);
        }
    }};
}

use std::{
    collections::BTreeSet,
    io::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use cdn_control::{
    api::{EdgeProgress, NodeView, PurgeState, RoutingAck, RoutingView},
    client::{ClientError, ControlClient, ServerTrust},
    purge::PurgeRequest,
    routing::Format,
};

/// Where the control API is and how to authenticate.
#[derive(Debug, Args)]
pub(crate) struct ApiArgs {
    /// Control API base URL.
    #[arg(long, env = "CDN_CONTROL", default_value = "http://127.0.0.1:9000")]
    control: String,
    /// API token.
    #[arg(long, env = "CDN_TOKEN", hide_env_values = true)]
    token: String,
    /// PEM file of the CA (or the self-signed certificate) to trust for an https
    /// control URL, instead of the public CAs.
    #[arg(long, env = "CDN_CA", conflicts_with = "insecure")]
    ca: Option<PathBuf>,
    /// Accept any certificate from an https control URL (development only: the
    /// token is then sent to whoever answers).
    #[arg(long)]
    insecure: bool,
}

impl ApiArgs {
    fn client(&self) -> anyhow::Result<ControlClient> {
        let trust = match (&self.ca, self.insecure) {
            (Some(ca), _) => ServerTrust::CaFile(ca.clone()),
            (None, true) => ServerTrust::Insecure,
            (None, false) => ServerTrust::PublicRoots,
        };
        Ok(ControlClient::with_trust(&self.control, &self.token, &trust)?)
    }
}

/// `cdn purge`.
#[derive(Debug, Args)]
pub(crate) struct PurgeArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Absolute URL to purge (repeatable).
    #[arg(long = "url")]
    urls: Vec<String>,
    /// URL prefix, `host/path` or `https://host/path` (repeatable).
    #[arg(long = "prefix")]
    prefixes: Vec<String>,
    /// Surrogate key / cache tag (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Everything.
    #[arg(long)]
    all: bool,
    /// Mark stale (revalidate) instead of deleting.
    #[arg(long)]
    soft: bool,
    /// Wait until every edge applied it, showing progress.
    #[arg(long)]
    wait: bool,
}

/// `cdn nodes`.
#[derive(Debug, Args)]
pub(crate) struct NodesArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

/// `cdn routing ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum RoutingCommand {
    /// Send a routing document to the control node, which versions it and
    /// publishes it to every edge (FILE ending in `.toml`: TOML, else JSON).
    Apply(RoutingApplyArgs),
    /// Print the routing document as JSON, with its version and each edge's.
    Show(RoutingShowArgs),
}

/// `cdn routing apply FILE`.
#[derive(Debug, Args)]
pub(crate) struct RoutingApplyArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The document: TOML when the name ends in `.toml`, else JSON.
    file: PathBuf,
    /// Wait until every edge that is alive serves by the new version.
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits (`30s`, `500ms`, `2m`; a bare number is seconds).
    #[arg(long, default_value = "30s", value_parser = parse_duration, requires = "wait")]
    timeout: Duration,
}

/// `cdn routing show`.
#[derive(Debug, Args)]
pub(crate) struct RoutingShowArgs {
    #[command(flatten)]
    api: ApiArgs,
}

/// `cdn drain NODE` / `cdn undrain NODE`.
#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The edge's node id.
    node: String,
}

pub(crate) async fn purge(args: PurgeArgs) -> anyhow::Result<()> {
    let client = args.api.client()?;
    let body =
        PurgeRequest { urls: args.urls, prefixes: args.prefixes, tags: args.tags, all: args.all, soft: args.soft };
    let ack = client.purge(&body).await?;
    out!("purge {} accepted (seq {})", ack.id, ack.seq);
    if !args.wait {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut shown: std::collections::BTreeSet<String> = Default::default();
    loop {
        let status = client.status(&ack.id).await?;
        for (edge, state) in &status.edges {
            if *state == EdgeProgress::Applied && shown.insert(edge.clone()) {
                out!("  {edge:<20} applied   (+{} ms)", started.elapsed().as_millis());
            }
        }
        if status.status == PurgeState::Complete {
            match status.completed_ms {
                Some(ms) => out!("complete on {} edges in {ms} ms", status.edges.len()),
                None => out!("complete on {} edges", status.edges.len()),
            }
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "not complete after 60 s; pending: {}",
            status
                .edges
                .iter()
                .filter(|(_, s)| **s != EdgeProgress::Applied)
                .map(|(e, _)| e.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn nodes(args: NodesArgs) -> anyhow::Result<()> {
    let nodes = args.api.client()?.nodes().await?;
    if args.json {
        out!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    out!("{}", table(&nodes).trim_end_matches('\n'));
    Ok(())
}

/// The `cdn nodes` table.
fn table(nodes: &[NodeView]) -> String {
    let mut rows = vec![
        ["NODE", "ROLE", "REGION", "ADDR", "STATE", "READY", "LOAD", "APPLIED", "ROUTING"].map(String::from).to_vec(),
    ];
    for node in nodes {
        let state = serde_json::to_value(node.state).ok().and_then(|v| v.as_str().map(str::to_owned));
        rows.push(vec![
            node.node_id.clone(),
            node.role.as_str().to_string(),
            if node.region.is_empty() { "-".into() } else { node.region.clone() },
            node.addr.clone(),
            state.unwrap_or_else(|| "-".into()),
            if node.ready { "yes".into() } else { "no".into() },
            format!("{:.0}%", node.load * 100.0),
            node.applied_seq.to_string(),
            node.routing_version.map_or_else(|| "-".into(), |version| version.to_string()),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

pub(crate) async fn drain(args: DrainArgs, on: bool) -> anyhow::Result<()> {
    args.api.client()?.drain(&args.node, on).await?;
    out!("{} {}", args.node, if on { "drained: out of DNS answers" } else { "undrained: back in DNS answers" });
    let _ = std::io::stdout().flush();
    Ok(())
}

pub(crate) async fn routing(command: RoutingCommand) -> anyhow::Result<()> {
    match command {
        RoutingCommand::Apply(args) => routing_apply(args).await,
        RoutingCommand::Show(args) => {
            let view = args.api.client()?.routing_get().await?;
            out!("{}", serde_json::to_string_pretty(&view)?);
            Ok(())
        }
    }
}

async fn routing_apply(args: RoutingApplyArgs) -> anyhow::Result<()> {
    let document = std::fs::read(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let client = args.api.client()?;
    let ack = match client.routing_put(document, Format::from_path(&args.file)).await {
        Ok(ack) => ack,
        Err(ClientError::InvalidRouting { problems, .. }) => {
            anyhow::bail!("{} refused (nothing changed):\n  {}", args.file.display(), problems.join("\n  "))
        }
        Err(error) => return Err(error.into()),
    };
    out!("routing version {} accepted (by {})", ack.version, ack.by);
    let _ = std::io::stdout().flush();
    if !args.wait {
        return Ok(());
    }
    let started = Instant::now();
    let mut shown = BTreeSet::new();
    loop {
        let view = client.routing_get().await?;
        let progress = wait_progress(&ack, &view)?;
        for edge in progress.applied {
            if shown.insert(edge.to_string()) {
                out!("  {edge:<20} version {}   (+{} ms)", ack.version, started.elapsed().as_millis());
            }
        }
        if progress.pending.is_empty() {
            let edges = view.edges.len();
            let ms = started.elapsed().as_millis();
            if edges == 0 {
                out!("no edge is alive: nothing to wait for");
            } else {
                out!("version {} applied on {edges} edges in {ms} ms", ack.version);
            }
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < args.timeout,
            "version {} not applied everywhere after {:?}; pending: {}",
            ack.version,
            args.timeout,
            progress.pending.join(", ")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where `cdn routing apply --wait` stands.
#[derive(Debug, PartialEq)]
struct Progress<'a> {
    /// Edges that serve by the version applied (or a later one).
    applied: Vec<&'a str>,
    /// The others, as `edge (version v)`.
    pending: Vec<String>,
}

/// The edges of `view` that serve by `ack`'s version and the others; an error when
/// the control node holds another document than the one applied (a newer one
/// superseded it).
fn wait_progress<'a>(ack: &RoutingAck, view: &'a RoutingView) -> anyhow::Result<Progress<'a>> {
    anyhow::ensure!(
        (view.version, view.by.as_str()) == (ack.version, ack.by.as_str()),
        "version {} (by {}) was superseded by version {} (by {}) before every edge applied it",
        ack.version,
        ack.by,
        view.version,
        view.by
    );
    let (mut applied, mut pending) = (Vec::new(), Vec::new());
    for (edge, version) in &view.edges {
        if *version >= ack.version {
            applied.push(edge.as_str());
        } else {
            pending.push(format!("{edge} (version {version})"));
        }
    }
    Ok(Progress { applied, pending })
}

/// `30s`, `500ms`, `2m`, `1h`, or a bare number of seconds (`1.5`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration (30s, 500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("unknown unit {other:?} in {text:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|error| format!("{text:?}: {error}"))
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn nodes_table_aligns_columns() {
        let node = |value: Value| -> NodeView { serde_json::from_value(value).unwrap() };
        let nodes = vec![
            node(json!({"node_id": "us-east", "role": "edge", "region": "us-east", "addr": "127.0.0.11",
                   "gossip_addr": "127.0.0.11:7946", "admin_addr": null, "location": null,
                   "state": "alive", "ready": true, "load": 0.25, "applied_seq": 7, "applied": {},
                   "routing_version": 4})),
            node(json!({"node_id": "control", "role": "control", "region": "", "addr": "127.0.0.1",
                   "gossip_addr": "127.0.0.1:7946", "admin_addr": null, "location": null,
                   "state": "alive", "ready": true, "load": 0.0, "applied_seq": 0, "applied": {}})),
        ];
        let out = table(&nodes);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NODE     ROLE"), "{out}");
        assert!(lines[1].contains("25%") && lines[1].ends_with(" 7        4"), "{out}");
        assert!(lines[2].ends_with(" 0        -"), "no routing version reported:\n{out}");
        assert_eq!(lines[1].find("alive"), lines[2].find("alive"), "columns align:\n{out}");
        assert_eq!(lines[0].find("STATE"), lines[1].find("alive"), "columns align:\n{out}");
    }

    #[test]
    fn durations_for_the_wait_timeout() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err() && parse_duration("3 days").is_err() && parse_duration("").is_err());
    }

    #[test]
    fn wait_progress_follows_the_edges_and_notices_a_newer_document() {
        let ack = RoutingAck { version: 3, by: "c1".into() };
        let view = |version: u64, by: &str, edges: Value| -> RoutingView {
            serde_json::from_value(json!({"version": version, "by": by, "routing": {"sites": []}, "edges": edges}))
                .unwrap()
        };
        let seen = view(3, "c1", json!({"e1": 3, "e2": 2, "e3": 0}));
        let progress = wait_progress(&ack, &seen).unwrap();
        assert_eq!(progress.applied, ["e1"]);
        assert_eq!(progress.pending, ["e2 (version 2)", "e3 (version 0)"]);
        assert!(wait_progress(&ack, &view(3, "c1", json!({"e1": 3}))).unwrap().pending.is_empty());
        let error = wait_progress(&ack, &view(3, "c2", json!({}))).unwrap_err().to_string();
        assert!(error.contains("superseded by version 3 (by c2)"), "{error}");
    }
}

/// `cdn sign`.
#[derive(Debug, Args)]
pub(crate) struct SignArgs {
    /// The absolute URL to sign (`https://cdn.example/paid/a.mp4`).
    url: String,
    /// The key's id (`kid`), as in `[[signing.keys]]`.
    #[arg(long)]
    key_id: String,
    /// File holding the key's HS256 secret, written as in `[[signing.keys]]`
    /// (`base64:…`, `hex:…`, or the text itself).
    #[arg(long)]
    secret_file: PathBuf,
    /// How long the URL stays valid (`exp`).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    expires: Duration,
    /// Cover every URI this expression matches whole (`cdniuc` `regex:`), e.g. all
    /// segments of a stream, instead of this URL alone (`hash:`).
    #[arg(long, conflicts_with = "any_path")]
    regex: Option<String>,
    /// Cover every path the site signs (no `cdniuc`), instead of this URL alone.
    #[arg(long)]
    any_path: bool,
}

/// `cdn sign`: prints the signed URL.
pub(crate) fn sign(args: &SignArgs) -> anyhow::Result<()> {
    use cdn_edge::signing::{Cover, SigningKey, sign_url};
    let text = std::fs::read_to_string(&args.secret_file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.secret_file.display()))?;
    let key = SigningKey::hs256_from_text(args.key_id.clone(), &text).map_err(anyhow::Error::msg)?;
    let cover = match (&args.regex, args.any_path) {
        (Some(regex), _) => Cover::Regex(regex),
        (None, true) => Cover::Prefix,
        (None, false) => Cover::Uri,
    };
    let expires = std::time::SystemTime::now() + args.expires;
    let signed = sign_url(&args.url, &key, expires, cover).map_err(anyhow::Error::msg)?;
    out!("{signed}");
    Ok(())
}
