//! Windowed quotas: where a quota's window stands at a given time, and what a lease may take
//! from it. Pure arithmetic over times passed in; the store keeps the counters
//! (`store/quota.rs`) and the service halts and alerts.
//!
//! A quota counter is named by its RunBudget quota id, its key (`team:search`) and its window
//! label (`day`, `sliding day`). Spend lands in time buckets:
//!
//! - **calendar** windows (UTC): one bucket per window, starting at the top of the hour, at
//!   midnight, or on the 1st of the month; the window's spend is that bucket.
//! - **sliding** windows (the last hour, day or 30 days): buckets of 1/60 of the window (1
//!   minute, 24 minutes, 12 hours); the window's spend is the sum of the current bucket and the
//!   60 before it. So spend counts for at least a full window and at most 1/60 of a window
//!   longer: never released early, and at most 61 rows per counter.
//!
//! Spend is placed by the time the budget service receives it, not the sidecar's clock, so a
//! re-sent or late batch cannot land in a window that is already over.

use ringfence_crds::budget::OnBreach;
use ringfence_crds::budget::Usd;
use ringfence_crds::quota::QuotaUsage;
use ringfence_crds::quota::{QuotaTerm, QuotaWindow};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{Date, Month, OffsetDateTime};

use super::{Amount, BudgetLimit};

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;
/// A sliding month.
const THIRTY_DAYS_MS: u64 = 30 * DAY_MS;
/// Buckets per sliding window.
pub const SLIDING_BUCKETS: u64 = 60;

/// Names one counter: a quota's id and key, and its window label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CounterId {
    pub id: String,
    pub key: String,
    /// `hour`, `day`, `month`, or `sliding hour` (etc.).
    pub window: String,
}

impl CounterId {
    pub fn of(term: &QuotaTerm) -> CounterId {
        CounterId {
            id: term.id.clone(),
            key: term.key.clone(),
            window: label(term.window, term.sliding),
        }
    }
}

impl std::fmt::Display for CounterId {
    /// How a refusal names the quota: `quota <id> <key> <window>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "quota {} {} {}", self.id, self.key, self.window)
    }
}

/// The window label of a counter.
pub fn label(window: QuotaWindow, sliding: bool) -> String {
    if sliding {
        format!("sliding {}", window.as_str())
    } else {
        window.as_str().to_owned()
    }
}

/// The window and sliding flag a label names.
pub fn parse_label(label: &str) -> Option<(QuotaWindow, bool)> {
    let (sliding, name) = match label.strip_prefix("sliding ") {
        Some(name) => (true, name),
        None => (false, label),
    };
    let window = match name {
        "hour" => QuotaWindow::Hour,
        "day" => QuotaWindow::Day,
        "month" => QuotaWindow::Month,
        _ => return None,
    };
    Some((window, sliding))
}

/// Where a counter's window stands at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The first bucket that counts: the window's start (calendar) or the oldest bucket summed.
    pub from_ms: u64,
    /// The bucket spend made now goes to.
    pub bucket_ms: u64,
    /// When the current calendar window ends; for sliding windows, when the current bucket
    /// does (the earliest time anything may expire).
    pub until_ms: u64,
    /// The mark that tells whether this window's breach was handled ([`Span::tripped`]).
    pub trip_mark_ms: u64,
    sliding_len_ms: Option<u64>,
}

impl Span {
    /// Whether the breach recorded at `mark` was in this window: calendar windows alert once
    /// per window; a sliding window again once a whole window has passed since the last alert.
    pub fn tripped(&self, mark: Option<u64>) -> bool {
        let Some(mark) = mark else { return false };
        match self.sliding_len_ms {
            None => mark == self.trip_mark_ms,
            Some(len) => mark.saturating_add(len) > self.trip_mark_ms,
        }
    }

    /// Buckets older than this are never summed again and may be deleted. A calendar counter
    /// keeps its previous window too, so the last day (or month) can still be read.
    pub fn keep_from_ms(&self) -> u64 {
        match self.sliding_len_ms {
            Some(_) => self.from_ms,
            None => self.from_ms.saturating_sub(31 * DAY_MS),
        }
    }
}

/// Where `window` stands at `now_ms`.
pub fn span(window: QuotaWindow, sliding: bool, now_ms: u64) -> Span {
    if sliding {
        let len = match window {
            QuotaWindow::Hour => HOUR_MS,
            QuotaWindow::Day => DAY_MS,
            QuotaWindow::Month => THIRTY_DAYS_MS,
        };
        let size = len / SLIDING_BUCKETS;
        let bucket = now_ms - now_ms % size;
        return Span {
            from_ms: bucket.saturating_sub(len),
            bucket_ms: bucket,
            until_ms: bucket + size,
            trip_mark_ms: now_ms,
            sliding_len_ms: Some(len),
        };
    }
    let (start, end) = match window {
        QuotaWindow::Hour => {
            let start = now_ms - now_ms % HOUR_MS;
            (start, start + HOUR_MS)
        }
        QuotaWindow::Day => {
            let start = now_ms - now_ms % DAY_MS;
            (start, start + DAY_MS)
        }
        QuotaWindow::Month => month_of(now_ms),
    };
    Span {
        from_ms: start,
        bucket_ms: start,
        until_ms: end,
        trip_mark_ms: start,
        sliding_len_ms: None,
    }
}

/// The UTC calendar month around `now_ms`: its first and the next month's first millisecond.
fn month_of(now_ms: u64) -> (u64, u64) {
    let secs = i64::try_from(now_ms / 1_000).unwrap_or(i64::MAX);
    let date = OffsetDateTime::from_unix_timestamp(secs)
        .map(|t| t.date())
        .unwrap_or(Date::MIN);
    let first = |year: i32, month: Month| {
        Date::from_calendar_date(year, month, 1)
            .map(|d| u64::try_from(d.midnight().assume_utc().unix_timestamp()).unwrap_or(0) * 1_000)
            .unwrap_or(u64::MAX)
    };
    let start = first(date.year(), date.month());
    let (year, month) = match date.month() {
        Month::December => (date.year() + 1, Month::January),
        m => (date.year(), m.next()),
    };
    (start, first(year, month))
}

/// A counter's state, read under its lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaState {
    pub max_tokens: Option<u64>,
    pub max_micros: Option<u64>,
    /// Spent in the window.
    pub spent: Amount,
    /// Leased and neither reported nor given back, by leases of this counter.
    pub outstanding: Amount,
}

impl QuotaState {
    /// The first limit the window's spend has reached: the quota is spent.
    pub fn spent_limit(&self) -> Option<(BudgetLimit, u64, u64)> {
        if let Some(max) = self.max_tokens
            && self.spent.tokens >= max
        {
            return Some((BudgetLimit::MaxTotalTokens, self.spent.tokens, max));
        }
        if let Some(max) = self.max_micros
            && self.spent.micros >= max
        {
            return Some((BudgetLimit::MaxCostUsd, self.spent.micros, max));
        }
        None
    }
}

impl QuotaState {
    /// Nothing is left for a lease in some limited dimension: spent, or promised to leases.
    pub fn no_room(&self) -> bool {
        let full = |max: Option<u64>, used: u64, held: u64| {
            max.is_some_and(|m| used.saturating_add(held) >= m)
        };
        full(self.max_tokens, self.spent.tokens, self.outstanding.tokens)
            || full(self.max_micros, self.spent.micros, self.outstanding.micros)
    }
}

/// What a lease may take from one quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaDecision {
    /// At most this much, per dimension.
    Room(Amount),
    /// Nothing: `limit` is spent, or promised to outstanding leases (`spent` false).
    Exhausted {
        limit: BudgetLimit,
        used: u64,
        outstanding: u64,
        limit_value: u64,
        spent: bool,
    },
}

/// Caps `want` by what the quota has left. A spent quota refuses every lease, whatever it asks
/// for (a call spends tokens and money together); one whose rest is promised to other leases
/// refuses a lease that asks for that dimension.
pub fn decide(state: &QuotaState, want: Amount) -> QuotaDecision {
    if let Some((limit, used, limit_value)) = state.spent_limit() {
        let outstanding = match limit {
            BudgetLimit::MaxTotalTokens => state.outstanding.tokens,
            BudgetLimit::MaxCostUsd => state.outstanding.micros,
        };
        return QuotaDecision::Exhausted {
            limit,
            used,
            outstanding,
            limit_value,
            spent: true,
        };
    }
    let dims = [
        (
            BudgetLimit::MaxTotalTokens,
            state.max_tokens,
            state.spent.tokens,
            state.outstanding.tokens,
            want.tokens,
        ),
        (
            BudgetLimit::MaxCostUsd,
            state.max_micros,
            state.spent.micros,
            state.outstanding.micros,
            want.micros,
        ),
    ];
    let mut room = [0u64; 2];
    for (slot, (limit, max, used, outstanding, want)) in room.iter_mut().zip(dims) {
        let Some(max) = max else {
            *slot = want;
            continue;
        };
        let left = max.saturating_sub(used.saturating_add(outstanding));
        if want > 0 && left == 0 {
            return QuotaDecision::Exhausted {
                limit,
                used,
                outstanding,
                limit_value: max,
                spent: false,
            };
        }
        *slot = want.min(left);
    }
    QuotaDecision::Room(Amount {
        tokens: room[0],
        micros: room[1],
    })
}

/// A quota whose window's spend reached its limit, for the first time in this window: the
/// service halts the open runs that spend under it (per `on_breach`) and alerts its webhook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaTrip {
    pub counter: CounterId,
    pub limit: BudgetLimit,
    pub spent: u64,
    pub limit_value: u64,
    pub on_breach: OnBreach,
    pub alert_webhook: Option<String>,
    pub window_start_ms: u64,
}

impl QuotaTrip {
    /// The halt reason of the runs it stops.
    pub fn reason(&self) -> String {
        format!(
            "{} is exhausted: {} {} spent of {} this window",
            self.counter,
            self.spent,
            match self.limit {
                BudgetLimit::MaxTotalTokens => "tokens",
                BudgetLimit::MaxCostUsd => "micro-USD",
            },
            self.limit_value
        )
    }
}

/// One counter as `GET /v1/quotas` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaStatus {
    #[serde(flatten)]
    pub counter: CounterId,
    pub window_start_ms: u64,
    /// When the calendar window ends (sliding: when the current bucket does).
    pub window_end_ms: u64,
    pub tokens: u64,
    pub micros: u64,
    pub max_tokens: Option<u64>,
    pub max_micros: Option<u64>,
    /// Leased by leases of this quota and not yet reported or given back.
    pub outstanding: Amount,
    pub on_breach: OnBreach,
    /// Nothing is left: the window's spend (with what outstanding leases hold) reached a limit,
    /// so leases are refused until the window moves (or those leases are reported or lapse).
    pub exhausted: bool,
}

impl QuotaStatus {
    /// The counter as a RunBudget's `status.quotas` shows it.
    pub fn usage(&self) -> QuotaUsage {
        QuotaUsage {
            id: self.counter.id.clone(),
            key: self.counter.key.clone(),
            window: self.counter.window.clone(),
            window_start: rfc3339(self.window_start_ms),
            tokens: self.tokens,
            cost_usd: Usd::from_micros(self.micros).to_string(),
            exhausted: self.exhausted,
        }
    }
}

/// A time as RFC 3339 in UTC, to the second.
pub fn rfc3339(ms: u64) -> String {
    i64::try_from(ms / 1_000)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-24T13:45:10.500Z.
    const NOW: u64 = 1_795_527_910_500;

    fn rfc(ms: u64) -> String {
        rfc3339(ms)
    }

    #[test]
    fn calendar_windows_start_at_the_top_of_the_hour_midnight_and_the_first_in_utc() {
        let hour = span(QuotaWindow::Hour, false, NOW);
        assert_eq!(rfc(hour.from_ms), "2026-11-24T13:00:00Z");
        assert_eq!(rfc(hour.until_ms), "2026-11-24T14:00:00Z");
        let day = span(QuotaWindow::Day, false, NOW);
        assert_eq!(rfc(day.from_ms), "2026-11-24T00:00:00Z");
        assert_eq!(rfc(day.until_ms), "2026-11-25T00:00:00Z");
        let month = span(QuotaWindow::Month, false, NOW);
        assert_eq!(rfc(month.from_ms), "2026-11-01T00:00:00Z");
        assert_eq!(rfc(month.until_ms), "2026-12-01T00:00:00Z");
        let december = span(QuotaWindow::Month, false, month.until_ms + 5);
        assert_eq!(rfc(december.until_ms), "2027-01-01T00:00:00Z");
        // The last millisecond of a day is still that day; the next is a new window.
        assert_eq!(span(QuotaWindow::Day, false, day.until_ms - 1), day);
        assert_eq!(
            span(QuotaWindow::Day, false, day.until_ms).from_ms,
            day.until_ms
        );
    }

    #[test]
    fn a_sliding_window_sums_sixty_buckets_before_the_current_one() {
        let s = span(QuotaWindow::Hour, true, NOW);
        assert_eq!(s.bucket_ms % 60_000, 0, "minute buckets");
        assert_eq!(s.bucket_ms - s.from_ms, HOUR_MS);
        assert!(NOW - s.from_ms >= HOUR_MS, "nothing expires early");
        assert!(NOW - s.from_ms < HOUR_MS + 60_000, "at most a bucket late");
        let month = span(QuotaWindow::Month, true, NOW);
        assert_eq!(month.bucket_ms - month.from_ms, THIRTY_DAYS_MS);
    }

    #[test]
    fn a_breach_is_handled_once_per_calendar_window_and_once_per_sliding_length() {
        let day = span(QuotaWindow::Day, false, NOW);
        assert!(!day.tripped(None));
        assert!(day.tripped(Some(day.trip_mark_ms)));
        let tomorrow = span(QuotaWindow::Day, false, day.until_ms);
        assert!(!tomorrow.tripped(Some(day.trip_mark_ms)));

        let sliding = span(QuotaWindow::Hour, true, NOW);
        assert!(sliding.tripped(Some(NOW - 10)));
        assert!(!span(QuotaWindow::Hour, true, NOW + HOUR_MS).tripped(Some(NOW)));
    }

    #[test]
    fn labels_round_trip() {
        for w in [QuotaWindow::Hour, QuotaWindow::Day, QuotaWindow::Month] {
            for s in [false, true] {
                assert_eq!(parse_label(&label(w, s)), Some((w, s)));
            }
        }
        assert_eq!(parse_label("week"), None);
    }

    fn state(max_tokens: Option<u64>, spent: u64, outstanding: u64) -> QuotaState {
        QuotaState {
            max_tokens,
            max_micros: None,
            spent: Amount {
                tokens: spent,
                micros: 0,
            },
            outstanding: Amount {
                tokens: outstanding,
                micros: 0,
            },
        }
    }

    #[test]
    fn a_lease_takes_at_most_what_is_neither_spent_nor_promised() {
        let want = Amount {
            tokens: 500,
            micros: 9,
        };
        assert_eq!(
            decide(&state(Some(1_000), 600, 100), want),
            QuotaDecision::Room(Amount {
                tokens: 300,
                micros: 9
            })
        );
        assert_eq!(
            decide(&state(Some(1_000), 600, 400), want),
            QuotaDecision::Exhausted {
                limit: BudgetLimit::MaxTotalTokens,
                used: 600,
                outstanding: 400,
                limit_value: 1_000,
                spent: false,
            }
        );
    }

    #[test]
    fn a_spent_quota_refuses_even_a_lease_for_the_other_dimension() {
        let want = Amount {
            tokens: 0,
            micros: 10,
        };
        assert!(matches!(
            decide(&state(Some(1_000), 1_000, 0), want),
            QuotaDecision::Exhausted { spent: true, .. }
        ));
        assert_eq!(
            decide(&state(None, 5_000, 0), want),
            QuotaDecision::Room(want)
        );
    }
}
