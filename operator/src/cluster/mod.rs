//! `ringfence operator`: the control plane inside Kubernetes.
//!
//! Every replica watches Agents, AgentPolicies and RunBudgets, projects them through the same
//! compiler and publisher as `ringfence local` ([`index`]), and serves bundles and CSRs — CSRs
//! proven with the pod's ServiceAccount token ([`crate::identity::tokenreview`]) and signed by
//! the CA kept in a Secret ([`ca_secret`]). The replica holding the leader Lease ([`lease`])
//! also writes: each Agent's Service, the namespaces' trust bundles and every object's status
//! ([`reconcile`], [`status`]), with each RunBudget's quota counters read from the budget
//! service ([`quotas`]).

pub mod ca_secret;
pub mod health;
pub mod index;
pub mod lease;
pub mod quotas;
pub mod reconcile;
pub mod status;

#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod quota_tests;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{Stream, StreamExt, stream};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DynamicObject};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use ringfence_crds::TrustDomain;
use tokio::sync::watch;

use crate::compile::{Placement, Settings};
use crate::distribute::{self, Acks, ControlPlane, Projection, Publisher};
use crate::identity::PodAttestor;
use index::{Index, Kind, Outcome};
use reconcile::Ctx;

/// Options of `ringfence operator`.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorOptions {
    /// The operator's own namespace (its CA Secret and leader Lease live there).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    #[arg(long, default_value = "cluster.local", env = "RINGFENCE_TRUST_DOMAIN")]
    pub trust_domain: TrustDomain,
    /// The Secret holding the CA (`tls.crt`, `tls.key`); generated when absent.
    #[arg(long, default_value = "ringfence-ca")]
    pub ca_secret: String,
    /// Where bundles and CSRs are served to sidecars.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// DNS names of the bundle and CSR server's certificate, comma-separated
    /// [default: ringfence.<ns>.svc,ringfence.<ns>.svc.cluster.local].
    #[arg(long, value_delimiter = ',')]
    pub serving_names: Vec<String>,
    /// Where /metrics, /healthz and /readyz are served (plain HTTP).
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub metrics: SocketAddr,
    /// The Lease that elects the replica which writes status, Services and trust bundles.
    #[arg(long, default_value = "ringfence-operator")]
    pub lease_name: String,
    /// The cluster's DNS domain, for the Service addresses written into bundles.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Lifetime of issued SVIDs, in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    pub svid_ttl_seconds: u64,
    /// This replica's name in the Lease and in Events [default: the host name].
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// The admission webhooks (sidecar injection, AgentPolicy validation), served by every
    /// replica with a certificate from the trust domain's CA.
    #[command(flatten)]
    pub webhook: crate::webhook::WebhookOptions,
    /// The budget service (https://ringfence-budget.<ns>.svc:15013), read every 30 s for each
    /// RunBudget's `status.quotas`; without it, no quota status is written.
    #[arg(long, env = "RINGFENCE_BUDGET_URL")]
    pub budget_url: Option<String>,
}

impl OperatorOptions {
    fn serving_names(&self) -> Vec<String> {
        if self.serving_names.is_empty() {
            vec![
                format!("ringfence.{}.svc", self.namespace),
                format!("ringfence.{}.svc.cluster.local", self.namespace),
            ]
        } else {
            self.serving_names.clone()
        }
    }

    fn replica(&self) -> String {
        self.pod_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("ringfence-{}", std::process::id()))
    }
}

/// Runs the operator until `shutdown` completes.
pub async fn run(opts: OperatorOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let identity = ca_secret::load_or_create(
        client.clone(),
        &opts.namespace,
        &opts.ca_secret,
        opts.trust_domain.clone(),
        Duration::from_secs(opts.svid_ttl_seconds),
    )
    .await
    .context("cannot set up the certificate authority")?;
    let identity = Arc::new(identity);
    let (quotas_tx, quotas_rx) = watch::channel::<quotas::Known>(None);
    let quotas_tx = Arc::new(quotas_tx);
    let quota_source = match &opts.budget_url {
        Some(url) => {
            tracing::info!(%url, "reading quota counters for RunBudget statuses");
            Some(
                quotas::BudgetQuotas::new(url, identity.clone(), &opts.namespace)
                    .context("cannot set up the budget service reader")?,
            )
        }
        None => None,
    };

    let settings = Settings {
        trust_domain: opts.trust_domain.clone(),
        placement: Placement::Cluster {
            inbound_port: reconcile::INBOUND_PORT,
            cluster_domain: opts.cluster_domain.clone(),
        },
    };
    // Versions are per replica; sidecars compare version and hash, so a restart or a switch to
    // another replica is recognised by the hash.
    let projection = Projection::new(settings, Publisher::new(None));
    let index = Index::default();
    let attestor = PodAttestor::new(client.clone(), Box::new(index.directory()));
    let cp = Arc::new(ControlPlane {
        identity: identity.clone(),
        snapshots: projection.subscribe(),
        acks: Arc::new(Acks::default()),
        budget: None,
        attestor: Some(Arc::new(attestor)),
    });
    let names = opts.serving_names();
    let tls = identity
        .server_tls_config(&names)
        .context("cannot build the serving certificate (--serving-names)")?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {} (--listen)", opts.listen))?;
    let metrics = tokio::net::TcpListener::bind(opts.metrics)
        .await
        .with_context(|| format!("cannot listen on {} (--metrics)", opts.metrics))?;
    tracing::info!(
        "serving bundles and CSRs on https://{} as {}; trust domain {}",
        opts.listen,
        names.join(", "),
        opts.trust_domain
    );

    let (outcome_tx, outcome_rx) = watch::channel::<Option<Arc<Outcome>>>(None);
    let (leading_tx, leading_rx) = watch::channel(false);
    let health = Arc::new(health::Health::new(outcome_rx.clone(), leading_rx.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(distribute::serve(
        listener,
        Arc::new(tls),
        cp,
        std::future::pending(),
    ));
    tasks.spawn(health::serve(metrics, health.clone()));
    {
        let (opts, namespace) = (opts.webhook.clone(), opts.namespace.clone());
        let (client, identity) = (client.clone(), identity.clone());
        tasks.spawn(async move {
            if let Err(e) =
                crate::webhook::run(opts, namespace, client, identity, std::future::pending()).await
            {
                tracing::error!(error = %e, "the admission webhook stopped");
            }
        });
    }
    tasks.spawn(project_loop(
        client.clone(),
        index,
        projection,
        outcome_tx,
        health,
    ));
    let replica = opts.replica();
    tasks.spawn(lease::run(
        Api::<Lease>::namespaced(client.clone(), &opts.namespace),
        opts.lease_name.clone(),
        replica.clone(),
        leading_tx,
    ));
    let ctx = Arc::new(Ctx {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: reconcile::MANAGER.to_owned(),
                instance: Some(replica),
            },
        ),
        client,
        outcome: outcome_rx,
        trust_domain: opts.trust_domain.clone(),
        trust_bundle_pem: identity.trust_bundle_pem().to_owned(),
        quotas: quotas_rx,
    });
    let feed = quota_source.map(|source| QuotaFeed {
        source,
        known: quotas_tx.clone(),
    });
    tasks.spawn(lead(ctx, leading_rx, feed));

    tokio::pin!(shutdown);
    tokio::select! {
        _ = &mut shutdown => tracing::info!("shutting down"),
        Some(ended) = tasks.join_next() => {
            anyhow::bail!("an operator task stopped unexpectedly: {ended:?}");
        }
    }
    tasks.shutdown().await;
    Ok(())
}

/// A stream that yields whenever `rx` changes.
fn changes<T: Send + Sync + 'static>(rx: watch::Receiver<T>) -> impl Stream<Item = ()> + Send {
    stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

/// How long the watches must be quiet before a projection: one projection per burst.
const QUIET: Duration = Duration::from_millis(100);

/// Every replica: watch the three kinds, project on every change.
async fn project_loop(
    client: kube::Client,
    mut index: Index,
    mut projection: Projection,
    outcome: watch::Sender<Option<Arc<Outcome>>>,
    health: Arc<health::Health>,
) {
    let mut stores: Vec<(Kind, Store<DynamicObject>)> = Vec::new();
    let mut events = Vec::new();
    for kind in Kind::ALL {
        let ar = kind.api_resource();
        let writer = reflector::store::Writer::new(ar.clone());
        let reader = writer.as_reader();
        let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .map(move |ev| {
                if let Err(e) = &ev {
                    tracing::warn!(kind = kind.name(), error = %e, "watch failed; retrying");
                }
            });
        events.push(stream.boxed());
        stores.push((kind, reader));
    }
    let mut events = stream::select_all(events);
    // Nothing is published before every kind is listed: a bundle built from Agents alone would
    // deny every call until the policies arrive.
    let ready = async {
        for (_, s) in &stores {
            let _ = s.wait_until_ready().await;
        }
    };
    tokio::pin!(ready);
    loop {
        tokio::select! {
            _ = &mut ready => break,
            Some(()) = events.next() => {}
        }
    }
    loop {
        for (kind, store) in &stores {
            index.sync(*kind, &store.state());
        }
        match index.project(&mut projection) {
            Ok(o) => {
                health.projected();
                outcome.send_replace(Some(Arc::new(o)));
            }
            Err(e) => tracing::error!("cannot publish bundles; the previous ones stay served: {e}"),
        }
        if events.next().await.is_none() {
            return;
        }
        while let Ok(Some(())) = tokio::time::timeout(QUIET, events.next()).await {}
    }
}

/// The budget service's reader and where it publishes, for the leader.
struct QuotaFeed {
    source: quotas::BudgetQuotas,
    known: Arc<watch::Sender<quotas::Known>>,
}

/// The leader's controllers: started when this replica takes the Lease, stopped when it loses
/// it.
async fn lead(ctx: Arc<Ctx>, mut leading: watch::Receiver<bool>, feed: Option<QuotaFeed>) {
    loop {
        while !*leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                return;
            }
        }
        tracing::info!("leading: writing status, Services and trust bundles");
        let controllers = tokio::spawn(controllers(ctx.clone()));
        // Each term starts knowing nothing (counters from an earlier term may be older than what
        // another leader wrote since) and reads with a fresh client.
        let reader = feed.as_ref().map(|f| {
            f.known.send_replace(None);
            tokio::spawn(quotas::poll(f.source.fresh(), f.known.clone()))
        });
        while *leading.borrow_and_update() {
            if leading.changed().await.is_err() {
                break;
            }
        }
        controllers.abort();
        if let Some(reader) = reader {
            reader.abort();
        }
        tracing::info!("no longer leading");
    }
}

async fn controllers(ctx: Arc<Ctx>) {
    let mut running = Vec::new();
    for kind in Kind::ALL {
        let ar = kind.api_resource();
        let api = Api::<DynamicObject>::all_with(ctx.client.clone(), &ar);
        // RunBudgets also follow the quota counters (their `status.quotas`).
        let trigger = if kind == Kind::RunBudget {
            stream::select(changes(ctx.outcome.clone()), changes(ctx.quotas.clone())).boxed()
        } else {
            changes(ctx.outcome.clone()).boxed()
        };
        let mut controller =
            Controller::new_with(api, watcher::Config::default(), ar).reconcile_all_on(trigger);
        if kind == Kind::Agent {
            controller = controller.owns(
                Api::<Service>::all(ctx.client.clone()),
                watcher::Config::default().labels("app.kubernetes.io/managed-by=ringfence"),
            );
        }
        let run = controller
            .run(
                move |obj, ctx| reconcile::reconcile(kind, obj, ctx),
                move |obj, err, _| reconcile::error_policy(kind, &obj, err),
                ctx.clone(),
            )
            .for_each(|_| async {});
        running.push(tokio::spawn(run));
    }
    // Aborting this task (leadership lost) must stop the controllers too.
    struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            for t in &self.0 {
                t.abort();
            }
        }
    }
    let _running = AbortOnDrop(running);
    std::future::pending::<()>().await;
}
