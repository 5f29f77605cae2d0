//! The load generator. Closed loop: `--concurrency` connections, each sending its next request
//! when the previous answer is read. Open loop: requests are *scheduled* at `--rate` per second
//! and each latency is measured from its scheduled start, so a stalled proxy is charged for the
//! requests it kept waiting (coordinated-omission correction). Both stop at `--requests` or
//! `--duration`, whichever comes first, and print one JSON line.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// `http://host:port/path`.
    #[arg(long)]
    url: Uri,
    /// Request body (POST); none: GET.
    #[arg(long)]
    body: Option<PathBuf>,
    /// Extra header, `name: value`; repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Closed loop with this many connections.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Open loop at this many requests per second (overrides --concurrency).
    #[arg(long)]
    rate: Option<u64>,
    /// Open loop: at most this many connections.
    #[arg(long, default_value_t = 512)]
    connections: usize,
    /// Stop after this many measured requests.
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Requests sent and not measured first (closed loop, one connection each).
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// A response must contain this to count as a success.
    #[arg(long)]
    expect: Option<String>,
    /// Join one run: send back, on every request, the `ringfence-context` header the first
    /// response carried (as an agent does), instead of starting a run per request.
    #[arg(long)]
    join_run: bool,
}

struct Target {
    authority: String,
    method: Method,
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    expect: Option<String>,
    join_run: bool,
    run: Mutex<Option<HeaderValue>>,
}

const CONTEXT_HEADER: &str = "ringfence-context";

type Conn = SendRequest<Full<Bytes>>;

impl Target {
    async fn connect(&self) -> anyhow::Result<Conn> {
        let tcp = TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("connecting to {}", self.authority))?;
        tcp.set_nodelay(true)?;
        let (send, conn) = http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    /// One request on `conn`; `Ok(false)` when the answer is not a success.
    async fn send(&self, conn: &mut Conn) -> anyhow::Result<bool> {
        conn.ready().await?;
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(self.uri.clone())
            .header(http::header::HOST, &self.authority);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let run = self.run.lock().ok().and_then(|r| r.clone());
        if let Some(run) = &run {
            req = req.header(CONTEXT_HEADER, run);
        }
        let req = req.body(Full::new(self.body.clone()))?;
        let resp = conn.send_request(req).await?;
        if self.join_run
            && run.is_none()
            && let Some(v) = resp.headers().get(CONTEXT_HEADER)
            && let Ok(mut slot) = self.run.lock()
        {
            *slot = Some(v.clone());
        }
        let ok = resp.status().is_success();
        let body = resp.into_body().collect().await?.to_bytes();
        let found = match &self.expect {
            None => true,
            Some(needle) => body.windows(needle.len()).any(|w| w == needle.as_bytes()),
        };
        Ok(ok && found)
    }
}

#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn record(&mut self, started: Instant, outcome: anyhow::Result<bool>) {
        self.latencies_ns
            .push(u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                self.errors += 1;
                self.first_error
                    .get_or_insert_with(|| "unexpected status or body".into());
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(main(args))
}

async fn main(args: Args) -> anyhow::Result<()> {
    let authority = match args.url.authority() {
        Some(a) if args.url.scheme_str() == Some("http") => a.to_string(),
        _ => bail!("--url must be http://host:port/path, got {}", args.url),
    };
    let body = match &args.body {
        Some(p) => {
            Bytes::from(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => Bytes::new(),
    };
    let mut headers = Vec::new();
    for h in &args.headers {
        let Some((k, v)) = h.split_once(':') else {
            bail!("--header {h:?} must be `name: value`");
        };
        headers.push((
            HeaderName::try_from(k.trim())?,
            HeaderValue::try_from(v.trim())?,
        ));
    }
    if args.body.is_some() {
        headers.push((
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ));
    }
    let target = Arc::new(Target {
        authority,
        method: if args.body.is_some() {
            Method::POST
        } else {
            Method::GET
        },
        uri: Uri::try_from(args.url.path_and_query().map_or("/", |p| p.as_str()))?,
        headers,
        body,
        expect: args.expect.clone(),
        join_run: args.join_run,
        run: Mutex::new(None),
    });

    // Warm-up: connections, caches and (on these VMs) sleeping cores.
    let mut conn = target.connect().await?;
    for _ in 0..args.warmup {
        if !target.send(&mut conn).await? {
            bail!("warm-up request failed: check the target ({})", args.url);
        }
    }
    drop(conn);
    if args.join_run && target.run.lock().map(|r| r.is_none()).unwrap_or(true) {
        bail!("--join-run: the target sent no {CONTEXT_HEADER} header to join");
    }

    let deadline = Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let tally = match args.rate {
        None => closed(&target, &args, deadline).await?,
        Some(rate) => open(&target, &args, rate, deadline).await,
    };
    let elapsed = started.elapsed().as_secs_f64();
    let mut l = tally.latencies_ns;
    l.sort_unstable();
    let q = |p: f64| {
        if l.is_empty() {
            return 0.0;
        }
        let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
        l[i] as f64 / 1000.0
    };
    let mean = if l.is_empty() {
        0.0
    } else {
        l.iter().map(|&n| n as f64).sum::<f64>() / l.len() as f64 / 1000.0
    };
    println!(
        "{}",
        json!({
            "requests": l.len(),
            "errors": tally.errors,
            "first_error": tally.first_error,
            "duration_s": elapsed,
            "rps": l.len() as f64 / elapsed,
            "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99), "p999_us": q(0.999),
            "max_us": q(1.0), "mean_us": mean,
        })
    );
    Ok(())
}

async fn closed(target: &Arc<Target>, args: &Args, deadline: Duration) -> anyhow::Result<Tally> {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let per_conn = args.requests.div_ceil(args.concurrency.max(1) as u64);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let target = target.clone();
        let tally = tally.clone();
        let mut conn = target.connect().await?;
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_conn {
                if start.elapsed() > deadline {
                    break;
                }
                let t = Instant::now();
                let outcome = target.send(&mut conn).await;
                let broken = outcome.is_err();
                if let Ok(mut tally) = tally.lock() {
                    tally.record(t, outcome);
                }
                if broken {
                    match target.connect().await {
                        Ok(c) => conn = c,
                        Err(_) => break,
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let mut tally = tally
        .lock()
        .map_err(|_| anyhow::anyhow!("a load task panicked"))?;
    Ok(std::mem::take(&mut *tally))
}

async fn open(target: &Arc<Target>, args: &Args, rate: u64, deadline: Duration) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let pool: Arc<Mutex<Vec<Conn>>> = Arc::new(Mutex::new(Vec::new()));
    let limit = Arc::new(tokio::sync::Semaphore::new(args.connections.max(1)));
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let total = args
        .requests
        .min((rate as f64 * deadline.as_secs_f64()).ceil() as u64);
    let start = Instant::now();
    // The schedule is kept by a thread of its own: tokio's timer ticks in whole milliseconds,
    // which would start a request at 1k RPS up to ~1 ms late and charge that to the target.
    // `thread::sleep` wakes within tens of microseconds.
    let (tx, mut due) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for i in 0..total {
            let scheduled = start + interval.mul_f64(i as f64);
            if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if tx.send(scheduled).is_err() {
                return;
            }
        }
    });
    let mut tasks = Vec::with_capacity(total as usize);
    while let Some(scheduled) = due.recv().await {
        let (target, tally, pool, limit) =
            (target.clone(), tally.clone(), pool.clone(), limit.clone());
        tasks.push(tokio::spawn(async move {
            // Waiting for a connection is part of the latency: it is measured from `scheduled`.
            let Ok(_permit) = limit.acquire().await else {
                return;
            };
            let pooled = pool.lock().ok().and_then(|mut p| p.pop());
            let conn = match pooled {
                Some(c) => Ok(c),
                None => target.connect().await,
            };
            let outcome = match conn {
                Ok(mut c) => {
                    let outcome = target.send(&mut c).await;
                    if outcome.is_ok()
                        && let Ok(mut p) = pool.lock()
                    {
                        p.push(c);
                    }
                    outcome
                }
                Err(e) => Err(e),
            };
            if let Ok(mut tally) = tally.lock() {
                tally.record(scheduled, outcome);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut guard = match tally.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    std::mem::take(&mut *guard)
}
