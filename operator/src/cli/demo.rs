//! `ringfence demo`: the overnight-loop incident replayed on loopback — the loop halted by
//! the run budget, then cut at its first hop by policy, then each control in isolation — with
//! the run trees and where the traces went. See docs/demo.md.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use crate::demo::agents::{self, Refusal};
use crate::demo::output::{self, Progress, Verdict};
use crate::demo::scenario::{self, Act};
use crate::demo::system::System;
use crate::runs;

/// How long the demo waits for the budget's alert after the halt.
const ALERT_WITHIN: Duration = Duration::from_secs(15);
/// How long the demo waits for one act's run to end (the agents' own calls time out sooner).
const ACT_WITHIN: Duration = Duration::from_secs(90);

/// Options of `ringfence demo`.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Leave everything running after the acts, until Ctrl-C.
    pub keep_running: bool,
    /// Where the Jaeger trace files go [default: `./ringfence-demo`].
    pub out: Option<PathBuf>,
}

/// Runs the demo; `Ok(true)` when every act ended the way it should.
pub async fn run(opts: DemoOptions, shutdown: impl Future<Output = ()>) -> anyhow::Result<bool> {
    let progress = Progress::stdout();
    progress.line(
        "Ringfence demo: the overnight-loop incident, replayed on this machine.\n\
         An orchestrator delegates to research; research \"retries\" by re-invoking the orchestrator.\n\
         Starting the control plane, the budget service and a sidecar per agent on 127.0.0.1 …",
    );
    let acts = scenario::acts();
    let first = acts[0];
    let system = System::start(|e| first.manifests(e), &progress).await?;
    tokio::pin!(shutdown);

    let outcome = tokio::select! {
        r = play(&system, &acts, &opts, &progress) => Some(r),
        _ = &mut shutdown => None,
    };
    let ok = match outcome {
        None => {
            progress.line("\nInterrupted; stopping everything.");
            system.shutdown().await?;
            anyhow::bail!("interrupted before the last act; everything was stopped");
        }
        Some(Err(e)) => {
            let _ = system.shutdown().await;
            return Err(e);
        }
        Some(Ok(ok)) => ok,
    };

    if opts.keep_running {
        system
            .apply(&scenario::explore_manifests(&system.endpoints))
            .await?;
        let agent = |n: &str| system.endpoints.agents.get(n).copied();
        let orchestrator = agent("orchestrator").context("the demo has no orchestrator")?;
        let database = system.database();
        let manifests = system.manifests_dir();
        let logs = system.logs_dir();
        progress.line(&output::keep_running(&output::Explore {
            plane: system.plane,
            database: &database,
            orchestrator_outbound: orchestrator.outbound,
            orchestrator_app: orchestrator.app,
            manifests: &manifests,
            logs: &logs,
            agents: scenario::AGENTS
                .iter()
                .filter_map(|n| agent(n).map(|a| (n.to_string(), a.outbound, a.admin)))
                .collect(),
        }));
        system.stage.begin(scenario::Behaviour::Loop);
        shutdown.await;
        progress.line("\nStopping everything.");
    }
    system.shutdown().await?;
    Ok(ok)
}

/// Plays every act; returns whether all ended as they should.
async fn play(
    system: &System,
    acts: &[Act],
    opts: &DemoOptions,
    progress: &Progress,
) -> anyhow::Result<bool> {
    let otlp = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let out_dir = match &opts.out {
        Some(d) => d.clone(),
        None => std::env::current_dir()
            .context("cannot read the current folder")?
            .join("ringfence-demo"),
    };
    let mut verdicts: Vec<Verdict> = Vec::new();
    let mut files = Vec::new();
    for (i, act) in acts.iter().enumerate() {
        progress.line(&output::act_header(i + 1, acts.len(), act));
        if i == 0 {
            progress.step("its manifests are in force at every sidecar");
        } else {
            let took = system.apply(&act.manifests(&system.endpoints)).await?;
            progress.step(&format!(
                "new manifests written; every sidecar enforces them after {} ms",
                took.as_millis()
            ));
        }
        let alerts_before = system.alerts.count();
        system.stage.begin(act.behaviour);
        let outcome = ask_orchestrator(system, act.task).await;
        let alert = if act.expect.alert {
            tokio::time::timeout(ALERT_WITHIN, system.alerts.nth(alerts_before))
                .await
                .ok()
        } else {
            None
        };
        let verdict = output::verdict(&act.expect, &outcome, alert.as_ref());
        for line in verdict.text.lines() {
            progress.line(&format!("  {line}"));
        }

        let run = match outcome.as_ref().err().and_then(Refusal::run) {
            Some(run) => Some(run.to_owned()),
            None => system.newest_run().await?,
        };
        match run {
            Some(run) => {
                let want = system.stage.calls();
                match system.ledger(&run, want).await? {
                    Some(detail) => {
                        progress.line(&format!(
                            "\n  The run as `ringfence runs show {run}` draws it:\n"
                        ));
                        progress.line(&runs::text::show(&detail));
                        if detail.calls.len() < want {
                            progress.step(&format!(
                                "the ledger holds {} of the {want} calls so far; the rest are still on their way",
                                detail.calls.len()
                            ));
                        }
                        if otlp.is_none() {
                            files.push(write_trace(&out_dir, i + 1, act, &detail)?);
                        }
                    }
                    None => progress.step(&format!("run {run} is not in the ledger")),
                }
            }
            None => progress.step("no run was recorded"),
        }
        verdicts.push(verdict);
    }

    let rows: Vec<(&Act, &Verdict)> = acts.iter().zip(verdicts.iter()).collect();
    progress.line(&output::summary(&rows));
    match &otlp {
        Some(endpoint) => progress.line(&output::traces_otlp(endpoint)),
        None => progress.line(&output::traces_files(&files)),
    }
    Ok(verdicts.iter().all(|v| v.ok))
}

/// Tomás's request to the orchestrator (from outside the mesh, straight to the agent): the
/// run starts at the orchestrator's first outbound call. Returns its answer or the refusal that
/// stopped the run.
async fn ask_orchestrator(system: &System, task: &str) -> Result<String, Refusal> {
    let Some(orchestrator) = system.endpoints.agents.get("orchestrator") else {
        return Err(Refusal::demo(
            500,
            "demo",
            "the demo has no orchestrator".into(),
        ));
    };
    let answer = tokio::time::timeout(
        ACT_WITHIN,
        agents::post(
            orchestrator.app,
            "/",
            &[("content-type", "application/json".to_owned())],
            agents::send_message(task).to_string(),
        ),
    )
    .await;
    match answer {
        Ok(Ok((status, _, body))) if status.is_success() => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            Ok(v["result"]["message"]["parts"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned())
        }
        Ok(Ok((status, _, body))) => Err(Refusal::from_answer(status.as_u16(), &body)),
        Ok(Err(e)) => Err(Refusal::demo(
            502,
            "unreachable",
            format!("the orchestrator could not be reached: {e}"),
        )),
        Err(_) => Err(Refusal::demo(
            504,
            "demo-timeout",
            format!("the run did not end within {}s", ACT_WITHIN.as_secs()),
        )),
    }
}

/// Writes the run as a Jaeger JSON file: `<dir>/<n>-<act>.json`.
fn write_trace(
    dir: &std::path::Path,
    n: usize,
    act: &Act,
    detail: &crate::budget::RunDetail,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create {} (--out picks another folder)",
            dir.display()
        )
    })?;
    let path = dir.join(format!("{n}-{}.json", act.id));
    std::fs::write(&path, runs::jaeger::export(detail))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}
