//! Operators' commands: `cdn purge`, `cdn nodes`, `cdn drain`, `cdn undrain` —
//! clients of a control node's API (`--control`/`CDN_CONTROL`, `--token`/`CDN_TOKEN`;
//! for an `https://` control node `--ca`/`CDN_CA` or `--insecure`).

use std::{io::Write as _, path::PathBuf, time::Duration};

use clap::Args;

use cdn_control::{
    api::{EdgeProgress, NodeView, PurgeState},
    client::{ControlClient, ServerTrust},
    purge::PurgeRequest,
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
    println!("purge {} accepted (seq {})", ack.id, ack.seq);
    if !args.wait {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut shown: std::collections::BTreeSet<String> = Default::default();
    loop {
        let status = client.status(&ack.id).await?;
        for (edge, state) in &status.edges {
            if *state == EdgeProgress::Applied && shown.insert(edge.clone()) {
                println!("  {edge:<20} applied   (+{} ms)", started.elapsed().as_millis());
            }
        }
        if status.status == PurgeState::Complete {
            match status.completed_ms {
                Some(ms) => println!("complete on {} edges in {ms} ms", status.edges.len()),
                None => println!("complete on {} edges", status.edges.len()),
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
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(());
    }
    print!("{}", table(&nodes));
    Ok(())
}

/// The `cdn nodes` table.
fn table(nodes: &[NodeView]) -> String {
    let mut rows =
        vec![["NODE", "ROLE", "REGION", "ADDR", "STATE", "READY", "LOAD", "APPLIED"].map(String::from).to_vec()];
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
    println!("{} {}", args.node, if on { "drained: out of DNS answers" } else { "undrained: back in DNS answers" });
    let _ = std::io::stdout().flush();
    Ok(())
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
                   "state": "alive", "ready": true, "load": 0.25, "applied_seq": 7, "applied": {}})),
            node(json!({"node_id": "control", "role": "control", "region": "", "addr": "127.0.0.1",
                   "gossip_addr": "127.0.0.1:7946", "admin_addr": null, "location": null,
                   "state": "alive", "ready": true, "load": 0.0, "applied_seq": 0, "applied": {}})),
        ];
        let out = table(&nodes);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NODE     ROLE"), "{out}");
        assert!(lines[1].contains("25%") && lines[1].ends_with('7'), "{out}");
        assert_eq!(lines[1].find("alive"), lines[2].find("alive"), "columns align:\n{out}");
        assert_eq!(lines[0].find("STATE"), lines[1].find("alive"), "columns align:\n{out}");
    }
}
