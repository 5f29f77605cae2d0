//! The sidecar's tokio runtime, sized to the CPUs it may use.
//!
//! A sidecar shares its pod with the agent and usually gets a fraction of one CPU. With one
//! CPU, a multi-thread runtime only adds hand-offs between its worker and the I/O driver and
//! wake-ups of idle threads: the single-threaded runtime serves the same load with fewer
//! context switches. With more CPUs it runs one worker per CPU it may use — the count
//! `std::thread::available_parallelism` reads from the CPU affinity mask and the cgroup's CPU
//! quota — unless `RINGFENCE_WORKERS` says otherwise.

use std::num::NonZeroUsize;

/// The variable that overrides the number of worker threads.
pub const WORKERS_VAR: &str = "RINGFENCE_WORKERS";

/// Why the runtime cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "{WORKERS_VAR}={value:?} is not a number of worker threads; set a whole number ≥ 1, or unset it to use one per CPU the sidecar may run on"
    )]
    Workers { value: String },
    #[error("cannot start the async runtime: {0}")]
    Build(#[from] std::io::Error),
}

/// How many worker threads to run: `RINGFENCE_WORKERS` when set (and not blank), else the CPUs
/// available to the process.
pub fn workers(
    overridden: Option<&str>,
    available: NonZeroUsize,
) -> Result<NonZeroUsize, RuntimeError> {
    match overridden.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(available),
        Some(v) => v.parse().map_err(|_| RuntimeError::Workers {
            value: v.to_owned(),
        }),
    }
}

/// The CPUs this process may use (affinity mask and cgroup quota); one when unknown.
pub fn available() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

/// A runtime of `workers` threads: the single-threaded runtime for one.
pub fn build(workers: NonZeroUsize) -> Result<tokio::runtime::Runtime, RuntimeError> {
    let mut builder = if workers.get() == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers.get());
        b
    };
    Ok(builder.enable_all().build()?)
}

/// The runtime the environment asks for.
pub fn from_env() -> Result<(tokio::runtime::Runtime, NonZeroUsize), RuntimeError> {
    let n = workers(std::env::var(WORKERS_VAR).ok().as_deref(), available())?;
    Ok((build(n)?, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: usize) -> NonZeroUsize {
        NonZeroUsize::new(v).unwrap()
    }

    #[test]
    fn without_an_override_the_sidecar_runs_one_worker_per_available_cpu() {
        assert_eq!(workers(None, n(3)).unwrap(), n(3));
        assert_eq!(workers(Some("  "), n(2)).unwrap(), n(2));
    }

    #[test]
    fn ringfence_workers_overrides_the_cpu_count() {
        assert_eq!(workers(Some("4"), n(1)).unwrap(), n(4));
        assert_eq!(workers(Some(" 1 "), n(8)).unwrap(), n(1));
    }

    #[test]
    fn zero_or_a_word_for_ringfence_workers_is_refused_with_what_to_set() {
        for bad in ["0", "two", "-1", "1.5"] {
            let err = workers(Some(bad), n(2)).unwrap_err().to_string();
            assert!(err.contains("RINGFENCE_WORKERS"), "{err}");
            assert!(err.contains("whole number"), "{err}");
        }
    }

    #[test]
    fn one_worker_is_the_single_threaded_runtime_and_more_are_a_thread_pool() {
        use tokio::runtime::RuntimeFlavor;
        let one = build(n(1)).unwrap();
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        let two = build(n(2)).unwrap();
        assert_eq!(two.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(two.metrics().num_workers(), 2);
        // Both serve the sidecar's tasks, timers and sockets.
        for rt in [one, two] {
            let got = rt.block_on(async {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = l.local_addr().unwrap();
                let task = tokio::spawn(async move { l.accept().await.is_ok() });
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
                task.await.unwrap()
            });
            assert!(got);
        }
    }
}
