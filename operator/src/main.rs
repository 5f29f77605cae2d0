//! `ringfence`: the Ringfence control plane and its tools.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ringfence::cli::{check, demo, local, runs};
use ringfence_crds::TrustDomain;

#[derive(Parser)]
#[command(
    name = "ringfence",
    version,
    about = "Identity, policy, limits and traces for multi-agent systems"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay the overnight-loop incident on this machine: the loop halted by its run budget,
    /// cut at its first hop by policy, then each control (depth, cycles, rate, stall, taint)
    /// in isolation. Needs ringfence-sidecar beside this binary.
    Demo {
        /// Leave everything running afterwards, with instructions to explore it (Ctrl-C stops).
        #[arg(long)]
        keep_running: bool,
        /// Where the runs' Jaeger trace files go when OTEL_EXPORTER_OTLP_ENDPOINT is not set.
        #[arg(long, value_name = "DIR", default_value = "ringfence-demo")]
        out: PathBuf,
    },
    /// Run the whole control plane on this machine from a folder of manifests.
    Local {
        /// The folder of Agent, AgentPolicy and RunBudget manifests (watched for changes).
        dir: PathBuf,
        /// Where to keep the CA, bootstrap tokens and bundle versions [default: DIR/.ringfence].
        #[arg(long)]
        state: Option<PathBuf>,
        /// Where the control plane listens for sidecars.
        #[arg(long, default_value = "127.0.0.1:15010", env = "RINGFENCE_LISTEN")]
        listen: SocketAddr,
        #[arg(long, default_value = "cluster.local", env = "RINGFENCE_TRUST_DOMAIN")]
        trust_domain: TrustDomain,
        /// Lifetime of issued SVIDs, in seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        svid_ttl_seconds: u64,
        /// Start a ringfence-sidecar for every agent whose manifest says where it listens.
        #[arg(long)]
        spawn_sidecars: bool,
        /// The ringfence-sidecar binary [default: beside this binary, else on PATH].
        #[arg(long)]
        sidecar_bin: Option<PathBuf>,
        /// The budget store: a SQLite file or a postgres:// URL [default: STATE/budget.db].
        #[arg(long, env = "RINGFENCE_DATABASE")]
        database: Option<String>,
    },
    /// Run the budget service alone (Kubernetes; several replicas share one PostgreSQL).
    ///
    /// Leases, spend reports and the halt stream need the sidecar's SVID as client
    /// certificate; `GET /v1/runs` needs only a client that trusts the CA.
    Budget {
        /// The state folder holding the trust domain's CA (`ca/`), which signs this service's
        /// serving certificate.
        #[arg(long)]
        state: PathBuf,
        /// Where the budget service listens for sidecars.
        #[arg(
            long,
            default_value = "127.0.0.1:15011",
            env = "RINGFENCE_BUDGET_LISTEN"
        )]
        listen: SocketAddr,
        /// The budget store: a SQLite file path or a postgres:// URL.
        #[arg(long, env = "RINGFENCE_DATABASE")]
        database: String,
        /// DNS names and IPs for the serving certificate (repeat the flag for several).
        #[arg(long = "name", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned()])]
        names: Vec<String>,
        #[arg(long, default_value = "cluster.local", env = "RINGFENCE_TRUST_DOMAIN")]
        trust_domain: TrustDomain,
    },
    /// Run the control plane in Kubernetes: controllers, CA, bundle and CSR server.
    Operator(Box<ringfence::cluster::OperatorOptions>),
    /// Run the admission webhooks alone: sidecar injection and AgentPolicy validation
    /// (`ringfence operator` runs them too).
    Webhook {
        /// The state folder holding the trust domain's CA (`ca/cert.pem`, `ca/key.pem`; in the
        /// cluster, the CA Secret mounted there), which signs the webhook's serving certificate.
        #[arg(long)]
        state: PathBuf,
        /// The namespace the webhook runs in: its Service's DNS names, and never injected.
        #[arg(long, env = "POD_NAMESPACE", default_value = "ringfence-system")]
        namespace: String,
        #[arg(long, default_value = "cluster.local", env = "RINGFENCE_TRUST_DOMAIN")]
        trust_domain: TrustDomain,
        #[command(flatten)]
        webhook: Box<ringfence::webhook::WebhookOptions>,
    },
    /// Validate a folder of manifests offline; exits 1 when anything would be refused.
    Check {
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: TrustDomain,
    },
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// Inspect runs in the run ledger: `list`, or `show RUN` as a tree, JSON, Graphviz or a
    /// Jaeger trace file.
    Runs {
        #[command(flatten)]
        ledger: runs::LedgerArgs,
        #[command(subcommand)]
        command: runs::RunsCommand,
    },
}

fn init_tracing() {
    init_tracing_at("info");
}

/// Logs to standard error at `default` unless RUST_LOG says otherwise.
fn init_tracing_at(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => match ringfence_crds::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot render the CRDs: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check { dir, trust_domain } => {
            let report = check::check(&dir, &trust_domain);
            for line in &report.lines {
                println!("{line}");
            }
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Local {
            dir,
            state,
            listen,
            trust_domain,
            svid_ttl_seconds,
            spawn_sidecars,
            sidecar_bin,
            database,
        } => {
            init_tracing();
            let opts = local::LocalOptions {
                dir,
                state,
                listen,
                trust_domain,
                svid_ttl: Duration::from_secs(svid_ttl_seconds),
                spawn_sidecars,
                sidecar_bin,
                database,
                sidecar_logs: None,
            };
            let result = tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async { local::Local::new(opts)?.run(shutdown_signal()).await })
                });
            exit(result)
        }
        Command::Demo { keep_running, out } => {
            // The story goes to standard output; only errors are logged.
            init_tracing_at("error");
            let opts = demo::DemoOptions {
                keep_running,
                out: Some(out),
            };
            let result = tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(demo::run(opts, shutdown_signal())));
            match result {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => {
                    eprintln!("error: not every act of the demo ended as it should (see above)");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Runs { ledger, command } => {
            let result = tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async {
                        let ledger = runs::Ledger::open(&ledger).await?;
                        runs::run(&ledger, command).await
                    })
                });
            exit(result)
        }
        Command::Operator(opts) => {
            init_tracing();
            let result = tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(ringfence::cluster::run(*opts, shutdown_signal())));
            exit(result)
        }
        Command::Webhook {
            state,
            namespace,
            trust_domain,
            webhook,
        } => {
            init_tracing();
            let result = tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(serve_webhook(state, namespace, trust_domain, *webhook))
                });
            exit(result)
        }
        Command::Budget {
            state,
            listen,
            database,
            names,
            trust_domain,
        } => {
            init_tracing();
            let result = tokio::runtime::Runtime::new()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(serve_budget(state, listen, database, names, trust_domain))
                });
            exit(result)
        }
    }
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `ringfence webhook`: the admission webhooks alone, with a serving certificate from the CA in
/// `state`.
async fn serve_webhook(
    state: PathBuf,
    namespace: String,
    trust_domain: TrustDomain,
    options: ringfence::webhook::WebhookOptions,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use ringfence::identity::Identity;

    // A CA made here would be one the sidecars and the API server never hear of.
    let ca = state.join("ca").join("cert.pem");
    anyhow::ensure!(
        ca.is_file(),
        "no CA at {}: point --state at a folder whose ca/ holds the CA Secret's cert.pem and key.pem",
        ca.display()
    );
    let identity = Identity::load_or_create(&state, trust_domain, Duration::from_secs(24 * 3600))
        .with_context(|| format!("cannot load the CA in {}", state.display()))?;
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    ringfence::webhook::run(
        options,
        namespace,
        client,
        std::sync::Arc::new(identity),
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// `ringfence budget`: the budget service alone, with a serving certificate from the CA in
/// `state`.
async fn serve_budget(
    state: PathBuf,
    listen: SocketAddr,
    database: String,
    names: Vec<String>,
    trust_domain: TrustDomain,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use ringfence::budget::service::{self, BudgetService};
    use ringfence::budget::store::Store;
    use ringfence::identity::Identity;

    // A CA made here would be one no sidecar trusts: insist on the existing one.
    let ca = state.join("ca").join("cert.pem");
    anyhow::ensure!(
        ca.is_file(),
        "no CA at {}: point --state at the control plane's state folder",
        ca.display()
    );
    let identity = Identity::load_or_create(&state, trust_domain, Duration::from_secs(24 * 3600))
        .with_context(|| format!("cannot load the CA in {}", state.display()))?;
    let tls = identity
        .server_tls_config(&names)
        .context("cannot build the budget service's TLS configuration (--name)")?;
    let store = Store::open(&database)
        .await
        .context("cannot open the budget store (--database)")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (--listen picks another address)"))?;
    tracing::info!(
        "budget service serving on https://{listen} ({:?} store); names {}",
        store.backend(),
        names.join(", ")
    );
    service::serve(
        listener,
        std::sync::Arc::new(tls),
        BudgetService::new(store),
        shutdown_signal(),
    )
    .await;
    Ok(())
}
