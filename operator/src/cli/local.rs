//! `ringfence local DIR`: the whole control plane on one machine, from a folder of the same
//! manifests Kubernetes takes. State (CA, bootstrap tokens, bundle versions) lives in
//! `DIR/.ringfence/` unless `--state` says otherwise; the budget service's store is
//! `<state>/budget.db` unless `--database` names another file or a PostgreSQL URL.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ringfence_crds::{AgentKey, TrustDomain};
use tokio::net::TcpListener;

use super::spawn::{self, SidecarLaunch, Sidecars};
use crate::budget::service::BudgetService;
use crate::budget::store::Store;
use crate::compile::{Placement, Settings};
use crate::distribute::{self, Acks, ControlPlane, Projection, Publisher};
use crate::identity::Identity;
use crate::source::folder::Folder;
use crate::source::watch::FolderWatch;

/// Options of `ringfence local`.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub dir: PathBuf,
    pub state: Option<PathBuf>,
    pub listen: SocketAddr,
    pub trust_domain: TrustDomain,
    pub svid_ttl: Duration,
    pub spawn_sidecars: bool,
    pub sidecar_bin: Option<PathBuf>,
    /// The budget store: a SQLite file path or a `postgres://` URL [default: `<state>/budget.db`].
    pub database: Option<String>,
    /// Where spawned sidecars write their logs (`<dir>/<agent>.log`) [default: this process's
    /// output].
    pub sidecar_logs: Option<PathBuf>,
}

/// A running local control plane.
pub struct Local {
    opts: LocalOptions,
    state: PathBuf,
    identity: Arc<Identity>,
    folder: Folder,
    projection: Projection,
    acks: Arc<Acks>,
    /// Opened when serving starts (opening the store is async).
    budget: Option<Arc<BudgetService>>,
}

impl Local {
    /// Loads state and manifests and publishes the first bundles.
    pub fn new(opts: LocalOptions) -> anyhow::Result<Self> {
        anyhow::ensure!(
            opts.dir.is_dir(),
            "{} is not a folder of manifests",
            opts.dir.display()
        );
        let state = opts
            .state
            .clone()
            .unwrap_or_else(|| opts.dir.join(".ringfence"));
        std::fs::create_dir_all(&state)
            .with_context(|| format!("cannot create the state folder {}", state.display()))?;
        let identity = Identity::load_or_create(&state, opts.trust_domain.clone(), opts.svid_ttl)
            .with_context(|| {
            format!(
                "cannot set up the certificate authority in {}",
                state.display()
            )
        })?;
        let settings = Settings {
            trust_domain: opts.trust_domain.clone(),
            placement: Placement::Local,
        };
        let mut local = Self {
            folder: Folder::new(&opts.dir),
            projection: Projection::new(
                settings,
                Publisher::new(Some(state.join("bundle-versions.json"))),
            ),
            identity: Arc::new(identity),
            acks: Arc::new(Acks::default()),
            budget: None,
            state,
            opts,
        };
        local.reload()?;
        Ok(local)
    }

    pub fn state_dir(&self) -> &std::path::Path {
        &self.state
    }

    pub fn trust_bundle_file(&self) -> PathBuf {
        self.identity.trust_bundle_path().to_owned()
    }

    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    pub fn control_plane(&self) -> Arc<ControlPlane> {
        Arc::new(ControlPlane {
            identity: self.identity.clone(),
            snapshots: self.projection.subscribe(),
            attestor: None,
            acks: self.acks.clone(),
            budget: self.budget.clone(),
        })
    }

    /// Reads the folder again, compiles and publishes. Problems are logged; what was in force
    /// stays in force for whatever they touch.
    pub fn reload(&mut self) -> anyhow::Result<()> {
        let loaded = self.folder.load();
        for p in &loaded.problems {
            tracing::error!("{p}");
        }
        for f in &loaded.stale {
            tracing::warn!(file = %f.display(), "keeping the last good content of this file until it loads again");
        }
        let projected = self.projection.project(&loaded.manifests)?;
        let agents: Vec<AgentKey> = projected.snapshot.bundles.keys().cloned().collect();
        self.identity
            .ensure_tokens(&agents)
            .context("cannot write bootstrap tokens")?;
        let changed = projected.changed;
        tracing::info!(
            agents = agents.len(),
            changed = changed.len(),
            "manifests loaded from {}",
            self.opts.dir.display()
        );
        Ok(())
    }

    /// Which sidecars should run: one per agent whose manifest says where it listens.
    fn wanted_sidecars(&self, launch: &SidecarLaunch) -> BTreeMap<AgentKey, Vec<String>> {
        let loaded = Folder::new(&self.opts.dir).load();
        let snap = self.projection.current();
        loaded
            .manifests
            .agents
            .iter()
            .filter_map(|a| {
                let key = AgentKey::new(
                    a.metadata.namespace.as_deref()?,
                    a.metadata.name.as_deref()?,
                )
                .ok()?;
                snap.bundles.contains_key(&key).then_some(())?;
                let args = spawn::sidecar_args(a, &key, launch, &self.identity.token_path(&key)?)?;
                Some((key, args))
            })
            .collect()
    }

    /// Serves until `shutdown` completes: the control-plane endpoint, the folder watch, and
    /// the sidecars when asked to spawn them.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let listener = TcpListener::bind(self.opts.listen)
            .await
            .with_context(|| format!("cannot listen on {}: is another control plane running? (--listen picks another address)", self.opts.listen))?;
        self.serve(listener, shutdown).await
    }

    /// Like [`Local::run`], on a listener the caller bound.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        let store = match &self.opts.database {
            Some(target) => Store::open(target).await,
            None => Store::open_sqlite(&self.state.join("budget.db")).await,
        }
        .context("cannot open the budget store (--database picks another)")?;
        self.budget = Some(BudgetService::new(store));
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        if !addr.ip().is_unspecified() {
            names.push(addr.ip().to_string());
        }
        let tls = self
            .identity
            .server_tls_config(&names)
            .context("cannot build the control plane's TLS configuration")?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(distribute::serve(
            listener,
            Arc::new(tls),
            self.control_plane(),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let url = format!("https://{addr}");
        tracing::info!(
            "control plane serving on {url} (trust domain {}); trust bundle {}; bootstrap tokens under {}",
            self.opts.trust_domain,
            self.trust_bundle_file().display(),
            self.state.join("tokens").display()
        );

        // A database URL may hold a password: name it, do not print it.
        let ledger = match &self.opts.database {
            Some(_) => "<the --database value>".to_owned(),
            None => self.state.join("budget.db").display().to_string(),
        };
        tracing::info!("run ledger: ringfence runs --database {ledger} list");
        let mut watch = FolderWatch::new(&self.opts.dir)?;
        tracing::info!("watching {} for changes", self.opts.dir.display());
        let launch = SidecarLaunch {
            binary: self
                .opts
                .sidecar_bin
                .clone()
                .unwrap_or_else(spawn::default_sidecar_binary),
            control_plane: url,
            ca_file: self.trust_bundle_file(),
            log_dir: self.opts.sidecar_logs.clone(),
        };
        let mut sidecars = Sidecars::new(launch.clone());
        if self.opts.spawn_sidecars {
            sidecars.reconcile(self.wanted_sidecars(&launch));
        }

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                changed = watch.changed() => {
                    if changed.is_none() {
                        anyhow::bail!("the folder watch stopped");
                    }
                    if let Err(e) = self.reload() {
                        tracing::error!("reload failed, the previous bundles stay in force: {e:#}");
                    }
                    if self.opts.spawn_sidecars {
                        sidecars.reconcile(self.wanted_sidecars(&launch));
                    }
                }
                _ = sidecars.supervise_tick(), if self.opts.spawn_sidecars => {}
            }
        }
        tracing::info!("shutting down");
        sidecars.stop_all().await;
        let _ = stop_tx.send(());
        let _ = server.await;
        Ok(())
    }
}
