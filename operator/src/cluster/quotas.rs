//! RunBudget `status.quotas`: the leader reads the budget service's windowed quota counters
//! (`GET /v1/quotas`) every [`PERIOD`] and hands them, grouped by RunBudget, to the RunBudget
//! reconciler, which writes them with the rest of the status (and only when they changed).
//!
//! The operator is the CA, so it mints its own client SVID (`ringfence-operator` in its
//! namespace) and renews it at half its lifetime. A failed read keeps the last counters known
//! (statuses stay as they are) and is logged once until a read succeeds again; it never holds
//! up a reconcile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ringfence_crds::quota::QuotaUsage;
use ringfence_crds::{AgentKey, svid};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::budget::quota::QuotaStatus;
use crate::cli::runs::Ledger;
use crate::compile::ResourceRef;
use crate::identity::{Identity, IdentityError};

/// How often the leader reads the counters.
pub const PERIOD: Duration = Duration::from_secs(30);
/// Longest one read may take; a slow service counts as a failed read.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent name of the operator's client SVID.
pub const CLIENT_NAME: &str = "ringfence-operator";

/// Each RunBudget's counters (`(namespace, name)`), sorted by id, key and window.
pub type Usages = BTreeMap<(String, String), Vec<QuotaUsage>>;

/// What the leader knows of the counters: `None` until a read succeeded (or without
/// `--budget-url`), in which case RunBudget statuses keep the `quotas` they have.
pub type Known = Option<Arc<Usages>>;

/// Why the counters could not be read.
#[derive(Debug, thiserror::Error)]
pub enum QuotaReadError {
    #[error(
        "cannot mint the operator's client certificate for the budget service: {0} (check the CA Secret)"
    )]
    Identity(#[from] IdentityError),
    #[error("--budget-url {0}: the budget service speaks HTTPS only; give https://host:port")]
    Url(String),
    #[error(
        "cannot read the quota counters from the budget service at {url}: {reason} (check --budget-url and that the budget service runs)"
    )]
    Read { url: String, reason: String },
}

/// Groups counters by the RunBudget their id names (`<ns>/<budget>#<i>`); ids of another shape
/// are skipped (no RunBudget can show them).
pub fn group(counters: &[QuotaStatus]) -> Usages {
    let mut usages = Usages::new();
    for c in counters {
        let Some((budget, _index)) = c.counter.id.rsplit_once('#') else {
            continue;
        };
        let Some((namespace, name)) = budget.split_once('/') else {
            continue;
        };
        usages
            .entry((namespace.to_owned(), name.to_owned()))
            .or_default()
            .push(c.usage());
    }
    for list in usages.values_mut() {
        list.sort_by(|a, b| (&a.id, &a.key, &a.window).cmp(&(&b.id, &b.key, &b.window)));
    }
    usages
}

/// The `quotas` field a RunBudget's status should carry: its counters when they are known
/// (absent when it has none), else whatever `current` (its status) already says.
pub fn field(known: &Known, r: &ResourceRef, current: &Value) -> Option<Value> {
    let Some(usages) = known else {
        return current.get("quotas").cloned();
    };
    usages
        .get(&(r.namespace.clone(), r.name.clone()))
        .filter(|list| !list.is_empty())
        .and_then(|list| serde_json::to_value(list).ok())
}

/// Reads the counters from one budget service under the operator's own SVID.
pub struct BudgetQuotas {
    url: String,
    identity: Arc<Identity>,
    client: AgentKey,
    /// The client, and when its SVID is due for renewal.
    ledger: Option<(Ledger, OffsetDateTime)>,
}

impl BudgetQuotas {
    /// A reader of the budget service at `url` (https://host:port), presenting an SVID for
    /// `ringfence-operator` in `namespace`.
    pub fn new(
        url: &str,
        identity: Arc<Identity>,
        namespace: &str,
    ) -> Result<Self, QuotaReadError> {
        if !url.starts_with("https://") {
            return Err(QuotaReadError::Url(url.to_owned()));
        }
        let client = AgentKey::new(namespace, CLIENT_NAME).map_err(IdentityError::from)?;
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            identity,
            client,
            ledger: None,
        })
    }

    /// The same reader with no client yet, for a new leadership term.
    pub fn fresh(&self) -> BudgetQuotas {
        BudgetQuotas {
            url: self.url.clone(),
            identity: self.identity.clone(),
            client: self.client.clone(),
            ledger: None,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every counter with its current window's spend.
    pub async fn read(&mut self) -> Result<Vec<QuotaStatus>, QuotaReadError> {
        let now = OffsetDateTime::now_utc();
        if self.ledger.as_ref().is_none_or(|(_, renew)| now >= *renew) {
            self.ledger = Some(self.connect()?);
        }
        let Some((ledger, _)) = &self.ledger else {
            return Err(self.failed("no client"));
        };
        match tokio::time::timeout(READ_TIMEOUT, ledger.quotas()).await {
            Ok(Ok(counters)) => Ok(counters),
            Ok(Err(e)) => Err(self.failed(&format!("{e:#}"))),
            Err(_) => Err(self.failed(&format!("no answer within {}s", READ_TIMEOUT.as_secs()))),
        }
    }

    fn connect(&self) -> Result<(Ledger, OffsetDateTime), QuotaReadError> {
        let svid = self.identity.mint_svid(&self.client)?;
        let roots = svid::trust_bundle_roots(self.identity.trust_bundle_pem())
            .map_err(|e| self.failed(&format!("the trust bundle is unusable: {e}")))?;
        let renew = svid.not_before + (svid.not_after - svid.not_before) / 2;
        let ledger = Ledger::service(&self.url, roots, Some((svid.chain, svid.key)))
            .map_err(|e| self.failed(&format!("{e:#}")))?;
        Ok((ledger, renew))
    }

    fn failed(&self, reason: &str) -> QuotaReadError {
        QuotaReadError::Read {
            url: self.url.clone(),
            reason: reason.to_owned(),
        }
    }
}

/// The leader's reader: every [`PERIOD`], reads the counters and publishes them on `known` when
/// they differ from what it holds. Runs until aborted (leadership lost).
pub async fn poll(mut source: BudgetQuotas, known: Arc<watch::Sender<Known>>) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match source.read().await {
            Ok(counters) => {
                if failing {
                    tracing::info!(url = %source.url(), "reading the quota counters again");
                    failing = false;
                }
                publish(&known, group(&counters));
            }
            Err(e) => {
                // Once per outage: the statuses keep the last counters known meanwhile.
                if !failing {
                    tracing::warn!(error = %e, "RunBudget quota statuses keep their last counters until the budget service answers");
                    failing = true;
                }
            }
        }
    }
}

/// Publishes `usages` unless they are what `known` already holds (no reconcile for nothing).
pub fn publish(known: &watch::Sender<Known>, usages: Usages) {
    known.send_if_modified(|held| {
        if held.as_deref() == Some(&usages) {
            return false;
        }
        *held = Some(Arc::new(usages));
        true
    });
}
