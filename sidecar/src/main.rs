//! `ringfence-sidecar`: parse flags, start, wait for SIGTERM or Ctrl-C, stop.
#![forbid(unsafe_code)]

use anyhow::Context as _;
use clap::Parser;
use ringfence_sidecar::config::Config;
use ringfence_sidecar::runtime;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    // Logs go to stderr: stdout carries the decision log's JSON lines, one per call.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let config = Config::parse();
    let (runtime, workers) = runtime::from_env()?;
    tracing::debug!(workers = workers.get(), "async runtime");
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let running = ringfence_sidecar::run::start(&config)
        .await
        .context("cannot start the sidecar")?;
    let signal = tokio::select! {
        s = shutdown_signal() => s,
        s = parent_gone(), if config.exit_with_parent => s,
    };
    tracing::info!(signal, "shutting down");
    running.shutdown().await;
    Ok(())
}

/// Waits until the process that started this one is gone: the sidecar is then re-parented, and
/// its parent id changes.
async fn parent_gone() -> &'static str {
    #[cfg(unix)]
    {
        let parent = std::os::unix::process::parent_id();
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            if std::os::unix::process::parent_id() != parent {
                return "the parent process exited";
            }
        }
    }
    #[cfg(not(unix))]
    {
        std::future::pending::<()>().await;
        "never"
    }
}

/// Waits for SIGTERM (what Kubernetes sends) or Ctrl-C.
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the sidecar");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}
