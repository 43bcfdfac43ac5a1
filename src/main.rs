//! `cdn`: one binary, four roles (and `dev`, all of them at once).
//!
//! The binary is thin: it parses arguments, loads and validates the role's config
//! (before any port is bound), sets up tracing and signals, and calls the role's
//! `run`. Everything else lives in the role crates.
//!
//! Exit codes: 0 after a graceful shutdown (SIGINT/SIGTERM); 1 when a role fails —
//! it cannot bind, or one of its tasks failed while serving (its supervisor first
//! stops the other tasks gracefully; in `cdn dev` every role stops); 2 for a bad
//! config or flag, before any port is bound; 130 on a second signal.

#![forbid(unsafe_code)]

mod config;
mod dev;
mod ops;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Overrides;

/// A geo-distributed content delivery network: edge, origin, control and geo roles.
#[derive(Debug, Parser)]
#[command(name = "cdn", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log format on stderr (`RUST_LOG` sets the filter).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CDN_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a content directory to the edges (files, video, validators, ranges).
    Origin(OriginArgs),
    /// Run a caching reverse proxy in front of an origin (HTTP/1.1, HTTP/2, HTTP/3).
    Edge(EdgeArgs),
    /// Run a control node: cluster membership, the purge API and routing.
    Control(ControlArgs),
    /// Run the geo-DNS: answer with the nearest healthy edges.
    Geo(GeoArgs),
    /// Start a whole local CDN on loopback: origin, control, three edges, geo-DNS.
    Dev(dev::DevArgs),
    /// Purge cached objects on every edge (through a control node).
    Purge(ops::PurgeArgs),
    /// Show the cluster: every node, its state, load and applied purges.
    Nodes(ops::NodesArgs),
    /// Take an edge out of DNS answers (it keeps serving its connections).
    Drain(ops::DrainArgs),
    /// Put a drained edge back into DNS answers.
    Undrain(ops::DrainArgs),
    /// Apply or show the routing document: sites, origin pools, cache rules.
    #[command(subcommand)]
    Routing(ops::RoutingCommand),
    /// Sign a URL for paths that need one (RFC 9246): prints it with its URISigningPackage.
    Sign(ops::SignArgs),
}

#[derive(Debug, Args)]
struct GeoArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The zone served (`zone`), e.g. `cdn.test.`.
    #[arg(long)]
    zone: Option<String>,
    /// DNS listen address, UDP and TCP (`listen.dns`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// MaxMind-format database (`geoip_db`).
    #[arg(long)]
    geoip_db: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ControlArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// This node's id (`node_id`).
    #[arg(long)]
    node_id: Option<String>,
    /// API listen address (`listen.api`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where the purge log lives (`data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// File holding the API token (`token_file`); prefer it to putting the token in the config.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct OriginArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Content directory to serve (`root`).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Plain HTTP listen address (`listen.http`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Admin listen address (`listen.admin`).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Enable generated test content under `/_gen/<size>` (`generate`).
    #[arg(long)]
    generate: bool,
}

#[derive(Debug, Args)]
struct EdgeArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// This node's id (`node_id`).
    #[arg(long)]
    node_id: Option<String>,
    /// Origin base URL (`origin.url`).
    #[arg(long)]
    origin: Option<String>,
    /// Plain HTTP listen address (`listen.http`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTPS listen address (`listen.https`).
    #[arg(long)]
    https: Option<SocketAddr>,
    /// Admin listen address (`listen.admin`).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Cache memory bound, e.g. `512MiB` (`cache.memory`).
    #[arg(long)]
    cache_memory: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let open_files = cdn_node::listener::raise_open_files_limit();
    tracing::debug!(?open_files, "open-files limit");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async_main(cli.command))
}

async fn async_main(command: Command) -> ExitCode {
    let registry = prometheus::Registry::new();
    let shutdown = CancellationToken::new();
    match command {
        Command::Origin(args) => {
            let overrides = Overrides::new()
                .path("root", args.root)
                .string("listen.http", args.listen)
                .string("listen.admin", args.admin)
                .flag("generate", args.generate);
            let config: cdn_origin::Config =
                match config::load(args.config.as_deref(), overrides, |c: &cdn_origin::Config| c.validate()) {
                    Ok(config) => config,
                    Err(code) => return code,
                };
            spawn_signal_handler(shutdown.clone());
            finish("origin", cdn_origin::run(config, shutdown, registry).await)
        }
        Command::Edge(args) => {
            let overrides = Overrides::new()
                .string("node_id", args.node_id)
                .string("origin.url", args.origin)
                .string("listen.http", args.listen)
                .string("listen.https", args.https)
                .string("listen.admin", args.admin)
                .string("cache.memory", args.cache_memory);
            let config: cdn_edge::Config =
                match config::load(args.config.as_deref(), overrides, |c: &cdn_edge::Config| c.validate()) {
                    Ok(config) => config,
                    Err(code) => return code,
                };
            spawn_signal_handler(shutdown.clone());
            finish("edge", cdn_edge::run(config, shutdown, registry).await)
        }
        Command::Control(args) => {
            let overrides = Overrides::new()
                .string("node_id", args.node_id)
                .string("listen.api", args.listen)
                .path("data_dir", args.data_dir)
                .path("token_file", args.token_file);
            let config: cdn_control::server::Config =
                match config::load(args.config.as_deref(), overrides, |c: &cdn_control::server::Config| c.validate()) {
                    Ok(config) => config,
                    Err(code) => return code,
                };
            spawn_signal_handler(shutdown.clone());
            finish("control", cdn_control::server::run(config, shutdown, registry).await)
        }
        Command::Geo(args) => {
            let overrides = Overrides::new()
                .string("zone", args.zone)
                .string("listen.dns", args.listen)
                .path("geoip_db", args.geoip_db);
            let config: cdn_geo::Config =
                match config::load(args.config.as_deref(), overrides, |c: &cdn_geo::Config| c.validate()) {
                    Ok(config) => config,
                    Err(code) => return code,
                };
            spawn_signal_handler(shutdown.clone());
            finish("geo", cdn_geo::run(config, shutdown, registry).await)
        }
        Command::Purge(args) => client_result(ops::purge(args).await),
        Command::Nodes(args) => client_result(ops::nodes(args).await),
        Command::Drain(args) => client_result(ops::drain(args, true).await),
        Command::Undrain(args) => client_result(ops::drain(args, false).await),
        Command::Routing(command) => client_result(ops::routing(command).await),
        Command::Sign(args) => client_result(ops::sign(&args)),
        Command::Dev(args) => {
            spawn_signal_handler(shutdown.clone());
            match dev::run(args, shutdown).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    error!("{error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn client_result(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn finish<E: std::fmt::Display>(role: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => {
            info!(role, "stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            error!(role, %error, "failed");
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,hickory_server=warn,quinn=warn,chitchat=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// SIGINT or SIGTERM cancels `shutdown` (graceful); a second one exits at once.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut first = true;
        loop {
            wait_for_signal().await;
            if first {
                info!("shutting down (send the signal again to exit at once)");
                shutdown.cancel();
                first = false;
            } else {
                warn!("second signal, exiting now");
                std::process::exit(130);
            }
        }
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
