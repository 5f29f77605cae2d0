//! `ringfence local --spawn-sidecars`: one `ringfence-sidecar` process per agent whose manifest
//! says where it listens, started with the agent and stopped with it (or on exit).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ringfence_crds::agent::local;
use ringfence_crds::{Agent, AgentKey};
use tokio::process::{Child, Command};

/// How to start a sidecar.
#[derive(Debug, Clone)]
pub struct SidecarLaunch {
    pub binary: PathBuf,
    pub control_plane: String,
    pub ca_file: PathBuf,
    /// Where each sidecar's output goes, as `<dir>/<agent name>.log`; `None` keeps it on this
    /// process's own output. (`ringfence demo` keeps its terminal for the story.)
    pub log_dir: Option<PathBuf>,
}

/// The arguments of one agent's sidecar, or `None` when its manifest does not say where it
/// listens (all four `ringfence.dev/local-*` annotations are needed).
pub fn sidecar_args(
    agent: &Agent,
    key: &AgentKey,
    launch: &SidecarLaunch,
    token_file: &Path,
) -> Option<Vec<String>> {
    let a = agent.metadata.annotations.as_ref()?;
    Some(vec![
        "--agent".into(),
        key.to_string(),
        "--control-plane".into(),
        launch.control_plane.clone(),
        "--ca-file".into(),
        launch.ca_file.display().to_string(),
        "--token-file".into(),
        token_file.display().to_string(),
        "--app".into(),
        a.get(local::APP)?.clone(),
        "--outbound".into(),
        a.get(local::OUTBOUND)?.clone(),
        "--inbound".into(),
        a.get(local::INBOUND)?.clone(),
        "--admin".into(),
        a.get(local::ADMIN)?.clone(),
        // Should `ringfence local` be killed with -9, its sidecars stop too.
        "--exit-with-parent".into(),
    ])
}

struct Running {
    args: Vec<String>,
    child: Child,
    restarts: u32,
}

/// The sidecars of local mode, kept in line with the agents.
pub struct Sidecars {
    launch: SidecarLaunch,
    running: BTreeMap<AgentKey, Running>,
}

impl Sidecars {
    pub fn new(launch: SidecarLaunch) -> Self {
        Self {
            launch,
            running: BTreeMap::new(),
        }
    }

    /// Starts sidecars for new agents, restarts those whose arguments changed or that exited,
    /// stops those whose agent is gone.
    pub fn reconcile(&mut self, wanted: BTreeMap<AgentKey, Vec<String>>) {
        self.running.retain(|key, r| {
            let keep = wanted.get(key) == Some(&r.args);
            if !keep {
                tracing::info!(agent = %key, "stopping sidecar");
                let _ = r.child.start_kill();
            }
            keep
        });
        for (key, args) in wanted {
            if let Some(r) = self.running.get_mut(&key) {
                match r.child.try_wait() {
                    Ok(None) => continue,
                    Ok(Some(status)) => {
                        r.restarts += 1;
                        tracing::warn!(agent = %key, %status, restarts = r.restarts, "sidecar exited; restarting it");
                    }
                    Err(e) => tracing::warn!(agent = %key, error = %e, "cannot check the sidecar"),
                }
            }
            let restarts = self.running.get(&key).map_or(0, |r| r.restarts);
            let mut cmd = Command::new(&self.launch.binary);
            cmd.args(&args).stdin(Stdio::null()).kill_on_drop(true);
            if let Some(dir) = &self.launch.log_dir {
                match log_file(dir, &key) {
                    Ok((out, err)) => {
                        cmd.stdout(out).stderr(err);
                    }
                    Err(e) => {
                        tracing::warn!(agent = %key, dir = %dir.display(), error = %e, "cannot open the sidecar's log file; its output stays on this terminal")
                    }
                }
            }
            match cmd.spawn() {
                Ok(child) => {
                    tracing::info!(agent = %key, pid = child.id(), "started sidecar");
                    self.running.insert(
                        key,
                        Running {
                            args,
                            child,
                            restarts,
                        },
                    );
                }
                Err(e) => tracing::error!(
                    agent = %key,
                    binary = %self.launch.binary.display(),
                    error = %e,
                    "cannot start the sidecar; build it with `cargo build --release` or pass --sidecar-bin"
                ),
            }
        }
    }

    /// Restarts sidecars that exited, at most once a second each.
    pub async fn supervise_tick(&mut self) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let wanted = self
            .running
            .iter()
            .map(|(k, r)| (k.clone(), r.args.clone()))
            .collect();
        self.reconcile(wanted);
    }

    pub async fn stop_all(&mut self) {
        for (key, r) in &mut self.running {
            let _ = r.child.start_kill();
            let _ = r.child.wait().await;
            tracing::info!(agent = %key, "sidecar stopped");
        }
        self.running.clear();
    }
}

/// The sidecar's log file in `dir`, opened for appending (a restarted sidecar adds to it), once
/// for standard output and once for standard error.
fn log_file(dir: &Path, key: &AgentKey) -> std::io::Result<(std::fs::File, std::fs::File)> {
    std::fs::create_dir_all(dir)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{}.log", key.name)))?;
    let copy = file.try_clone()?;
    Ok((file, copy))
}

/// `ringfence-sidecar` beside the running binary, else the one on PATH.
pub fn default_sidecar_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("ringfence-sidecar")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("ringfence-sidecar"))
}
