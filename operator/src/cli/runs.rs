//! `ringfence runs`: recent runs, one run as a tree, JSON, Graphviz or a Jaeger trace file, and
//! the windowed quotas' counters.
//!
//! It reads the run ledger either straight from the budget store (`--database`: the SQLite file
//! `ringfence local` keeps in `DIR/.ringfence/budget.db`, or a `postgres://` URL) or from a
//! running budget service (`--budget https://…` with `--ca-file`, the trust domain's CA).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::budget::quota::QuotaStatus;
use crate::budget::store::Store;
use crate::budget::{RunDetail, RunFilter, RunStatus, RunSummary};
use crate::runs;

/// Largest answer read from the budget service.
const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Where the run ledger is read from.
#[derive(clap::Args, Debug, Clone)]
pub struct LedgerArgs {
    /// Read the budget store directly: a SQLite file (`ringfence local` keeps it at
    /// DIR/.ringfence/budget.db) or a postgres:// URL.
    #[arg(long, env = "RINGFENCE_DATABASE", conflicts_with = "budget")]
    pub database: Option<String>,
    /// Ask a running budget service instead, https://host:port.
    #[arg(long, env = "RINGFENCE_BUDGET", requires = "ca_file")]
    pub budget: Option<String>,
    /// The trust domain's CA certificate (PEM), to verify the budget service.
    #[arg(long, env = "RINGFENCE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum RunsCommand {
    /// Recent runs, newest first.
    List {
        /// running, halted or completed.
        #[arg(long)]
        status: Option<String>,
        /// Runs this agent started, spent in, called or was called in.
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long, value_enum, default_value_t = ListFormat::Table)]
        format: ListFormat,
    },
    /// One run: its call tree with refusals, cycles and cost per agent.
    Show {
        run: String,
        #[arg(long, value_enum, default_value_t = ShowFormat::Tree)]
        format: ShowFormat,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Windowed quotas: each counter's spend in its current window, and whether it is spent.
    Quotas {
        #[arg(long, value_enum, default_value_t = ListFormat::Table)]
        format: ListFormat,
    },
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFormat {
    Table,
    Json,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShowFormat {
    /// The call tree, cost per agent and edges, for a terminal.
    Tree,
    Json,
    /// Graphviz: `| dot -Tsvg > run.svg`.
    Dot,
    /// Jaeger's JSON trace format, for its UI's "JSON File" upload.
    Jaeger,
}

/// The run ledger, wherever it is.
pub enum Ledger {
    Store(Store),
    Service {
        base: String,
        client: Box<HttpsClient>,
    },
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

impl Ledger {
    pub async fn open(args: &LedgerArgs) -> anyhow::Result<Ledger> {
        if let Some(db) = &args.database {
            let store = Store::open(db)
                .await
                .with_context(|| format!("opening the budget store {db}"))?;
            return Ok(Ledger::Store(store));
        }
        let (Some(base), Some(ca)) = (&args.budget, &args.ca_file) else {
            bail!(
                "say where the run ledger is: --database DIR/.ringfence/budget.db (what `ringfence local DIR` keeps), \
                 or --budget https://host:port --ca-file CA.pem for a running budget service"
            );
        };
        if !base.starts_with("https://") {
            bail!("--budget {base}: the budget service speaks HTTPS only; give https://host:port");
        }
        let pem =
            std::fs::read(ca).with_context(|| format!("reading --ca-file {}", ca.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            let cert = cert.with_context(|| format!("--ca-file {} is not PEM", ca.display()))?;
            roots.add(cert).with_context(|| {
                format!("--ca-file {} holds an unusable certificate", ca.display())
            })?;
        }
        if roots.is_empty() {
            bail!("--ca-file {} holds no certificate", ca.display());
        }
        Ledger::service(base, Arc::new(roots), None)
    }

    /// A running budget service at `base` (https://host:port), its certificate verified with
    /// `roots`; `client` is the certificate chain and key to present, when the caller has one
    /// (the operator presents an SVID it minted).
    pub fn service(
        base: &str,
        roots: Arc<rustls::RootCertStore>,
        client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> anyhow::Result<Ledger> {
        if !base.starts_with("https://") {
            bail!("{base}: the budget service speaks HTTPS only; give https://host:port");
        }
        let builder =
            rustls::ClientConfig::builder_with_provider(ringfence_crds::svid::crypto_provider())
                .with_safe_default_protocol_versions()
                .context("setting up TLS")?
                .with_root_certificates(roots);
        let config = match client {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .context("the client certificate does not fit its key")?,
            None => builder.with_no_client_auth(),
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        Ok(Ledger::Service {
            base: base.trim_end_matches('/').to_owned(),
            client: Box::new(Client::builder(TokioExecutor::new()).build(connector)),
        })
    }

    pub async fn list(&self, filter: &RunFilter, limit: usize) -> anyhow::Result<Vec<RunSummary>> {
        match self {
            Ledger::Store(store) => Ok(store.list_runs(filter, limit).await?),
            Ledger::Service { .. } => {
                let mut query = vec![format!("limit={limit}")];
                for (k, v) in [
                    ("status", filter.status.map(|s| s.as_str().to_owned())),
                    ("agent", filter.agent.clone()),
                    ("user", filter.user.clone()),
                ] {
                    if let Some(v) = v {
                        query.push(format!("{k}={}", encode(&v)));
                    }
                }
                let body = self.get(&format!("/v1/runs?{}", query.join("&"))).await?;
                serde_json::from_slice(&body).context("the budget service's run list is not valid")
            }
        }
    }

    pub async fn get_run(&self, run: &str) -> anyhow::Result<Option<RunDetail>> {
        match self {
            Ledger::Store(store) => Ok(store.get_run(run).await?),
            Ledger::Service { .. } => match self.get(&format!("/v1/runs/{}", encode(run))).await {
                Ok(body) => Ok(Some(
                    serde_json::from_slice(&body)
                        .context("the budget service's run is not valid")?,
                )),
                Err(e) if e.downcast_ref::<NotFound>().is_some() => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// Every windowed quota counter with its current window's spend.
    pub async fn quotas(&self) -> anyhow::Result<Vec<QuotaStatus>> {
        match self {
            Ledger::Store(store) => Ok(store.quota_usage(now_ms()).await?),
            Ledger::Service { .. } => {
                let body = self.get(ringfence_crds::api::QUOTAS_PATH).await?;
                serde_json::from_slice(&body)
                    .context("the budget service's quota list is not valid")
            }
        }
    }

    async fn get(&self, path: &str) -> anyhow::Result<Bytes> {
        let Ledger::Service { base, client } = self else {
            bail!("not a budget service");
        };
        let url = format!("{base}{path}");
        let uri: http::Uri = url.parse().with_context(|| format!("{url} is not a URL"))?;
        let resp = client
            .get(uri)
            .await
            .with_context(|| format!("cannot reach the budget service at {base}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the budget service's answer: {e}"))?
            .to_bytes();
        if status == http::StatusCode::NOT_FOUND {
            return Err(NotFound.into());
        }
        if !status.is_success() {
            bail!(
                "the budget service answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(body)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Debug, thiserror::Error)]
#[error("not found")]
struct NotFound;

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs `ringfence runs …`, printing to standard output (or `--output`).
pub async fn run(ledger: &Ledger, command: RunsCommand) -> anyhow::Result<()> {
    match command {
        RunsCommand::List {
            status,
            agent,
            user,
            limit,
            format,
        } => {
            let status = status
                .map(|s| {
                    RunStatus::parse(&s)
                        .with_context(|| format!("--status {s}: give running, halted or completed"))
                })
                .transpose()?;
            let runs = ledger
                .list(
                    &RunFilter {
                        status,
                        agent,
                        user,
                    },
                    limit,
                )
                .await?;
            match format {
                ListFormat::Table => print!("{}", runs::text::list(&runs)),
                ListFormat::Json => println!("{}", serde_json::to_string_pretty(&runs)?),
            }
        }
        RunsCommand::Quotas { format } => {
            let quotas = ledger.quotas().await?;
            match format {
                ListFormat::Table => print!("{}", runs::text::quotas(&quotas)),
                ListFormat::Json => println!("{}", serde_json::to_string_pretty(&quotas)?),
            }
        }
        RunsCommand::Show {
            run,
            format,
            output,
        } => {
            let detail = ledger.get_run(&run).await?.with_context(|| {
                format!("no run {run} in the ledger; `ringfence runs list` shows recent runs")
            })?;
            let text = render(&detail, format);
            match output {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
        }
    }
    Ok(())
}

/// A run in one of the `show` formats.
pub fn render(detail: &RunDetail, format: ShowFormat) -> String {
    match format {
        ShowFormat::Tree => runs::text::show(detail),
        ShowFormat::Json => runs::json::show(detail) + "\n",
        ShowFormat::Dot => runs::dot::show(detail),
        ShowFormat::Jaeger => runs::jaeger::export(detail) + "\n",
    }
}
