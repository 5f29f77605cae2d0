//! The renewal schedule on tokio's paused clock, against an in-process CA.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use crate::testing::TestCa;

const HOUR: Duration = Duration::from_secs(3600);

/// Wall time that moves with tokio's (paused) clock.
#[derive(Clone)]
struct PausedClock {
    base: SystemTime,
    start: tokio::time::Instant,
}

impl PausedClock {
    fn new() -> Self {
        Self {
            base: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for PausedClock {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}

/// Signs with a test CA; fails while `down` is set; records what it was sent.
struct FakeCa {
    ca: TestCa,
    clock: PausedClock,
    ttl: Duration,
    down: std::sync::atomic::AtomicBool,
    calls: AtomicU32,
    tokens: Mutex<Vec<Option<String>>>,
    spiffe_override: Mutex<Option<String>>,
}

impl FakeCa {
    fn new(clock: PausedClock, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            ca: TestCa::new("cluster.local"),
            clock,
            ttl,
            down: Default::default(),
            calls: AtomicU32::new(0),
            tokens: Mutex::new(Vec::new()),
            spiffe_override: Mutex::new(None),
        })
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

impl CertificateAuthority for Arc<FakeCa> {
    async fn sign(
        &self,
        request: &CsrRequest,
        token: Option<&str>,
    ) -> Result<CsrResponse, IdentityError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.tokens.lock().unwrap().push(token.map(str::to_owned));
        if self.down.load(Ordering::SeqCst) {
            return Err(IdentityError::ControlPlane("connection refused".to_owned()));
        }
        let mut response = self
            .ca
            .sign(request, self.clock.now(), self.ttl)
            .map_err(|e| IdentityError::ControlPlane(e.to_string()))?;
        if let Some(id) = self.spiffe_override.lock().unwrap().clone() {
            response.spiffe_id = id;
        }
        Ok(response)
    }
}

struct Harness {
    ca: Arc<FakeCa>,
    store: CredentialStore,
    problems: watch::Receiver<Option<String>>,
    task: tokio::task::JoinHandle<()>,
    _token: tempfile::NamedTempFile,
}

fn agent() -> AgentKey {
    AgentKey::new("default", "research").unwrap()
}

fn start(ttl: Duration, configure: impl FnOnce(&FakeCa)) -> Harness {
    let clock = PausedClock::new();
    let ca = FakeCa::new(clock.clone(), ttl);
    configure(&ca);
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "bootstrap-secret\n").unwrap();
    let store = CredentialStore::new();
    let identity = Identity::new(
        agent(),
        ca.clone(),
        clock,
        Some(token.path().to_owned()),
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(8),
        },
        store.clone(),
        Metrics::new().unwrap(),
    );
    let problems = identity.problems();
    let task = tokio::spawn(identity.run());
    Harness {
        ca,
        store,
        problems,
        task,
        _token: token,
    }
}

/// Lets spawned tasks run (the CA answers at once; key generation is real work).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

async fn advance(d: Duration) {
    tokio::time::advance(d).await;
    settle().await;
}

async fn first_svid(h: &Harness) -> Arc<Credentials> {
    let mut rx = h.store.subscribe();
    rx.wait_for(Option::is_some).await.unwrap().clone().unwrap()
}

fn leaf(c: &Credentials) -> Vec<u8> {
    c.certified_key.cert[0].to_vec()
}

#[tokio::test(start_paused = true)]
async fn the_first_svid_is_requested_at_once_with_the_bootstrap_token() {
    let mut h = start(HOUR, |_| {});
    let creds = first_svid(&h).await;
    assert_eq!(
        creds.spiffe_id.to_string(),
        "spiffe://cluster.local/ns/default/agent/research"
    );
    assert_eq!(creds.trust_bundle.len(), 1);
    assert_eq!(
        h.ca.tokens.lock().unwrap().as_slice(),
        &[Some("bootstrap-secret".to_owned())]
    );
    settle().await;
    assert_eq!(*h.problems.borrow_and_update(), None);
    h.task.abort();
}

#[tokio::test(start_paused = true)]
async fn renewal_happens_at_half_life_and_replaces_the_certificate() {
    let h = start(HOUR, |_| {});
    let first = first_svid(&h).await;
    settle().await;

    advance(Duration::from_secs(1790)).await;
    assert_eq!(
        h.ca.calls.load(Ordering::SeqCst),
        1,
        "renewed before half-life"
    );

    advance(Duration::from_secs(20)).await;
    assert_eq!(
        h.ca.calls.load(Ordering::SeqCst),
        2,
        "not renewed at half-life"
    );
    let second = h.store.current().unwrap();
    assert_ne!(leaf(&first), leaf(&second));
    assert!(second.not_after > first.not_after);

    // And again half-way through the new one's life.
    advance(Duration::from_secs(1810)).await;
    assert_eq!(h.ca.calls.load(Ordering::SeqCst), 3);
    h.task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_failed_renewal_keeps_the_valid_certificate_and_backs_off() {
    let h = start(HOUR, |_| {});
    let first = first_svid(&h).await;
    settle().await;
    h.ca.set_down(true);

    advance(Duration::from_secs(1801)).await;
    assert!(
        h.ca.calls.load(Ordering::SeqCst) >= 2,
        "no renewal attempt at half-life"
    );
    assert_eq!(
        leaf(&h.store.current().unwrap()),
        leaf(&first),
        "kept the current SVID"
    );

    // Backoff: 1 s, 2 s, 4 s, 8 s, 8 s ... (each at least half of that): 30 s brings several
    // retries, far fewer than one per second.
    for _ in 0..30 {
        advance(Duration::from_secs(1)).await;
    }
    let calls = h.ca.calls.load(Ordering::SeqCst);
    assert!((4..=12).contains(&calls), "{calls} attempts in 30 s");
    assert_eq!(leaf(&h.store.current().unwrap()), leaf(&first));

    h.ca.set_down(false);
    for _ in 0..9 {
        advance(Duration::from_secs(1)).await;
    }
    assert_ne!(leaf(&h.store.current().unwrap()), leaf(&first), "recovered");
    h.task.abort();
}

#[tokio::test(start_paused = true)]
async fn an_expired_svid_is_withdrawn_and_readiness_says_why() {
    let mut h = start(Duration::from_secs(60), |_| {});
    first_svid(&h).await;
    settle().await;
    h.ca.set_down(true);

    advance(Duration::from_secs(31)).await;
    assert!(h.store.current().is_some(), "still valid at 31 s");
    for _ in 0..40 {
        advance(Duration::from_secs(1)).await;
    }
    assert!(h.store.current().is_none(), "expired SVID still published");
    let problem = h.problems.borrow_and_update().clone().unwrap();
    assert!(problem.contains("expired"), "{problem}");
    h.task.abort();
}

#[tokio::test(start_paused = true)]
async fn an_svid_for_another_agent_is_refused() {
    let mut h = start(HOUR, |ca| {
        *ca.spiffe_override.lock().unwrap() =
            Some("spiffe://cluster.local/ns/default/agent/orchestrator".to_owned());
    });
    let problem = h
        .problems
        .wait_for(|p| p.as_deref().is_some_and(|p| p.contains("orchestrator")))
        .await
        .unwrap()
        .clone()
        .unwrap();
    assert!(h.store.current().is_none());
    assert!(
        problem.contains("orchestrator") && problem.contains("--agent"),
        "{problem}"
    );
    h.task.abort();
}

#[test]
fn half_life_counts_from_receipt() {
    let ca = TestCa::new("cluster.local");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let request = CsrRequest {
        agent: agent(),
        csr,
    };
    let response = ca
        .sign(&request, now, Duration::from_secs(24 * 3600))
        .unwrap();
    let creds = Credentials::from_response(&agent(), &key, &response, now).unwrap();
    assert_eq!(creds.renew_at(), now + Duration::from_secs(12 * 3600));

    // A chain signed for another key is refused.
    let other = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let err = Credentials::from_response(&agent(), &other, &response, now).unwrap_err();
    assert!(matches!(err, IdentityError::KeyMismatch(_)), "{err}");
}
