//! `cdn dev`: the whole CDN on loopback in one process.

use std::path::PathBuf;

use clap::Args;
use tokio_util::sync::CancellationToken;

/// Options of `cdn dev`.
#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Content directory the origin serves.
    #[arg(long, default_value = "examples/content")]
    pub(crate) content: PathBuf,
}

pub(crate) async fn run(_args: DevArgs, _shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::bail!("cdn dev is not assembled yet")
}
