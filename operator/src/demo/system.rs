//! The whole system on loopback, in a temporary folder: the local control plane with its budget
//! service (`ringfence local`, in this process), a real `ringfence-sidecar` process per agent
//! (started by the same code as `ringfence local --spawn-sidecars`), the demo agents and their
//! upstreams. Manifests change by rewriting one file, and [`System::apply`] returns once every
//! sidecar enforces what was written.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ringfence_crds::{AgentKey, TrustDomain};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::agents::{self, Stage};
use super::output::Progress;
use super::scenario::{AGENTS, AgentAddrs, Endpoints};
use super::upstream::{self, Alerts};
use crate::budget::RunDetail;
use crate::budget::store::Store;
use crate::cli::local::{Local, LocalOptions};
use crate::cli::spawn;
use crate::compile::{self, LastGood, Placement, Settings};
use crate::distribute::ControlPlane;
use crate::source::folder::Folder;

/// The manifests file the demo rewrites for each act.
const MANIFESTS: &str = "demo.yaml";
/// How long sidecars get to start, or to take up new manifests: generous, for a loaded machine.
const READY_WITHIN: Duration = Duration::from_secs(45);
/// How long the run ledger gets to receive a run's calls (sidecars report every 200 ms).
const LEDGER_WITHIN: Duration = Duration::from_secs(15);
/// How often the demo looks again at what it awaits.
const POLL: Duration = Duration::from_millis(25);

/// The running demo system.
pub struct System {
    /// Removed when the system is dropped.
    dir: tempfile::TempDir,
    pub endpoints: Endpoints,
    pub plane: SocketAddr,
    pub stage: Arc<Stage>,
    pub alerts: Arc<Alerts>,
    control_plane: Arc<ControlPlane>,
    /// The run ledger, opened once the control plane has created it.
    store: Option<Store>,
    stop: watch::Sender<bool>,
    local_stop: Option<tokio::sync::oneshot::Sender<()>>,
    local: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl System {
    /// Starts everything with `first` (manifests built from the endpoints) in force, and waits
    /// until every sidecar is ready and enforces them.
    pub async fn start(
        first: impl Fn(&Endpoints) -> String,
        progress: &Progress,
    ) -> anyhow::Result<Self> {
        let sidecar_bin = spawn::default_sidecar_binary();
        if !sidecar_bin.is_file() {
            bail!(
                "ringfence-sidecar was not found beside this binary ({}): build both with `cargo build --release`",
                sidecar_bin.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("ringfence-demo-")
            .tempdir()
            .context("cannot create a temporary folder")?;
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests)
            .with_context(|| format!("cannot create {}", manifests.display()))?;

        let bind = || async {
            TcpListener::bind("127.0.0.1:0")
                .await
                .context("cannot listen on 127.0.0.1")
        };
        let (llm, mcp, alerts_l, plane_l) =
            (bind().await?, bind().await?, bind().await?, bind().await?);
        let mut apps = BTreeMap::new();
        let mut addrs = BTreeMap::new();
        for name in AGENTS {
            let app = bind().await?;
            let a = AgentAddrs {
                app: app.local_addr()?,
                outbound: free_addr()?,
                inbound: free_addr()?,
                admin: free_addr()?,
            };
            apps.insert(name, (app, a.outbound));
            addrs.insert(name.to_owned(), a);
        }
        let endpoints = Endpoints {
            agents: addrs,
            llm: llm.local_addr()?,
            mcp: mcp.local_addr()?,
            alerts: alerts_l.local_addr()?,
        };
        let plane = plane_l.local_addr()?;

        let (stop, stop_rx) = watch::channel(false);
        let alerts = Alerts::new();
        tokio::spawn(upstream::serve(llm, stop_rx.clone(), upstream::llm));
        tokio::spawn(upstream::serve(mcp, stop_rx.clone(), upstream::mcp));
        let a = alerts.clone();
        tokio::spawn(upstream::serve(alerts_l, stop_rx.clone(), move |r| {
            let reply = a.receive(&r);
            async move { reply }
        }));
        let stage = Stage::new(stop_rx.clone(), progress.clone());
        agents::serve_all(apps, &stage, &stop_rx);

        write_manifests(&manifests, &first(&endpoints))?;
        let state = dir.path().join("state");
        let local = Local::new(LocalOptions {
            dir: manifests.clone(),
            state: Some(state.clone()),
            listen: plane,
            trust_domain: TrustDomain::default(),
            svid_ttl: Duration::from_secs(3600),
            spawn_sidecars: true,
            sidecar_bin: Some(sidecar_bin),
            database: None,
            sidecar_logs: Some(dir.path().join("logs")),
        })
        .context("cannot start the local control plane")?;
        let control_plane = local.control_plane();
        let (local_stop, local_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let local = tokio::spawn(local.serve(plane_l, async move {
            let _ = local_stop_rx.await;
        }));

        let mut system = Self {
            dir,
            endpoints,
            plane,
            stage,
            alerts,
            control_plane,
            store: None,
            stop,
            local_stop: Some(local_stop),
            local: Some(local),
        };
        let started = Instant::now();
        system.await_enforced().await?;
        system.await_ready().await?;
        // The sidecars got their bundles from the control plane, which had opened (and
        // migrated) the store before serving: reading it now cannot race its creation.
        system.store = Some(
            Store::open_sqlite(&state.join("budget.db"))
                .await
                .context("cannot open the run ledger")?,
        );
        progress.step(&format!(
            "control plane on https://{plane}, {} sidecars ready in {:.1}s",
            AGENTS.len(),
            started.elapsed().as_secs_f64()
        ));
        Ok(system)
    }

    /// The temporary folder everything lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    pub fn database(&self) -> PathBuf {
        self.dir.path().join("state").join("budget.db")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// Puts `manifests` in force and waits until every sidecar enforces them.
    pub async fn apply(&self, manifests: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        write_manifests(&self.manifests_dir(), manifests)?;
        self.await_enforced().await?;
        Ok(started.elapsed())
    }

    /// Waits until every agent's sidecar enforces the bundle compiled from the manifests on
    /// disk: the control plane published it and each connected sidecar acknowledged its hash.
    async fn await_enforced(&self) -> anyhow::Result<()> {
        let want = expected_hashes(&self.manifests_dir())?;
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let report = self.control_plane.acks.report();
            let pending: Vec<&AgentKey> = want
                .iter()
                .filter(|(key, hash)| {
                    let sidecars: Vec<_> = report
                        .get(*key)
                        .map(|s| s.iter().filter(|s| s.connected).collect())
                        .unwrap_or_default();
                    sidecars.is_empty()
                        || sidecars
                            .iter()
                            .any(|s| s.enforced_hash.as_deref() != Some(hash.as_str()))
                })
                .map(|(k, _)| k)
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            self.check_local()?;
            if Instant::now() > deadline {
                bail!(
                    "after {}s these sidecars still do not enforce the new manifests: {}; their logs are in {}",
                    READY_WITHIN.as_secs(),
                    pending
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                    self.logs_dir().display()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until every sidecar's admin listener says it is ready.
    async fn await_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        for (name, a) in &self.endpoints.agents {
            while !ready(a.admin).await {
                self.check_local()?;
                if Instant::now() > deadline {
                    bail!(
                        "{name}'s sidecar is not ready after {}s; its log is {}",
                        READY_WITHIN.as_secs(),
                        self.logs_dir().join(format!("{name}.log")).display()
                    );
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }

    /// Fails when the control plane stopped by itself.
    fn check_local(&self) -> anyhow::Result<()> {
        if self.local.as_ref().is_some_and(|l| l.is_finished()) {
            bail!("the local control plane stopped; run with RUST_LOG=info to see why");
        }
        Ok(())
    }

    /// The run as the ledger holds it, once it holds at least `calls` calls (or what it holds
    /// when they do not all arrive in time).
    pub async fn ledger(&self, run: &str, calls: usize) -> anyhow::Result<Option<RunDetail>> {
        let store = self.store()?;
        let deadline = Instant::now() + LEDGER_WITHIN;
        loop {
            let detail = store
                .get_run(run)
                .await
                .with_context(|| format!("cannot read run {run} from the ledger"))?;
            if detail.as_ref().is_some_and(|d| d.calls.len() >= calls) || Instant::now() > deadline
            {
                return Ok(detail);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The newest run in the ledger.
    pub async fn newest_run(&self) -> anyhow::Result<Option<String>> {
        let runs = self
            .store()?
            .list_runs(&crate::budget::RunFilter::default(), 1)
            .await
            .context("cannot list the runs")?;
        Ok(runs.first().map(|r| r.run.run_id.clone()))
    }

    /// Stops everything: the sidecars (the control plane stops them and waits for them), the
    /// control plane, the agents and upstreams; then the temporary folder goes.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        if let Some(tx) = self.local_stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.local.take() {
            match tokio::time::timeout(Duration::from_secs(20), task).await {
                Ok(Ok(r)) => r.context("the control plane stopped with an error")?,
                Ok(Err(e)) => bail!("the control plane task failed: {e}"),
                Err(_) => bail!("the control plane did not stop within 20 s"),
            }
        }
        if let Some(store) = &self.store {
            store.close().await;
        }
        Ok(())
    }

    fn store(&self) -> anyhow::Result<&Store> {
        self.store
            .as_ref()
            .context("the run ledger is not open yet")
    }
}

/// The bundle hash each agent should get from the manifests in `dir`, compiled as the control
/// plane compiles them.
fn expected_hashes(dir: &Path) -> anyhow::Result<BTreeMap<AgentKey, String>> {
    let loaded = Folder::new(dir).load();
    if let Some(p) = loaded.problems.first() {
        bail!("the demo's own manifests do not load: {p}");
    }
    let settings = Settings {
        trust_domain: TrustDomain::default(),
        placement: Placement::Local,
    };
    let compiled = compile::compile(&loaded.manifests, &settings, &LastGood::default());
    if let Some(d) = compiled.errors().next() {
        bail!("the demo's own manifests do not compile: {d}");
    }
    Ok(compiled
        .bundles
        .into_iter()
        .map(|(k, c)| (k, c.digest()))
        .collect())
}

/// Writes the manifests file in one step (write beside it, then rename), so the folder watch
/// never reads half of it.
fn write_manifests(dir: &Path, yaml: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{MANIFESTS}.partial"));
    std::fs::write(&tmp, yaml).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(MANIFESTS))
        .with_context(|| format!("cannot write {}", dir.join(MANIFESTS).display()))?;
    Ok(())
}

/// `GET /readyz` on a sidecar's admin listener answers 200.
async fn ready(admin: SocketAddr) -> bool {
    let Ok(tcp) = tokio::net::TcpStream::connect(admin).await else {
        return false;
    };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let Ok(req) = http::Request::get("/readyz")
        .header("host", admin.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
    else {
        return false;
    };
    sender
        .send_request(req)
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// A free port on 127.0.0.1 for a sidecar to bind. Picked below Linux's ephemeral range (from
/// 32768), where the kernel hands out ports to outgoing connections: a port chosen there could
/// be taken by any client socket before the sidecar binds it.
fn free_addr() -> anyhow::Result<SocketAddr> {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut x = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
        | 1;
    for _ in 0..10_000 {
        // xorshift: cheap, and different per process and call.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20_000 + (x % 12_000) as u16;
        if given.contains(&port) {
            continue;
        }
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    bail!("no free port found on 127.0.0.1 between 20000 and 32000")
}
