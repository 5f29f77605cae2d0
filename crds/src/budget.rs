//! `RunBudget`: a run is a bounded transaction — depth, cycles, rate, time, tokens and money.
// kube's `printcolumn(...)` repeats `type_ = "string"`, which this lint takes for a duplicate.
#![allow(clippy::duplicated_attributes)]

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Limits for runs that pass through the selected agents.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ringfence.dev",
    version = "v1alpha1",
    kind = "RunBudget",
    namespaced,
    status = "RunBudgetStatus",
    shortname = "rb",
    category = "ringfence",
    doc = "Limits for runs through the selected agents: depth, cycles, rate, time, tokens, cost.",
    printcolumn(
        name = "Depth",
        type_ = "integer",
        json_path = ".spec.maxDelegationDepth"
    ),
    printcolumn(name = "Tokens", type_ = "integer", json_path = ".spec.maxTotalTokens"),
    printcolumn(name = "Cost", type_ = "string", json_path = ".spec.maxCostUsd"),
    printcolumn(name = "On Breach", type_ = "string", json_path = ".spec.onBreach"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RunBudgetSpec {
    /// Agents these limits apply to, by name. With neither `agents` nor `selector`, the budget
    /// applies to every agent in the namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// Agents these limits apply to, by the Agent resources' labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// How deep a chain of delegations may go: the root agent is depth 0, each hop adds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delegation_depth: Option<u32>,
    /// What happens when a run re-enters an agent already on its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycles: Option<CyclePolicy>,
    /// Tokens (input + output, all models) one run may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_tokens: Option<u64>,
    /// Money one run may spend, in US dollars as a decimal string, e.g. `"25.00"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<Usd>,
    /// How long one run may last from its first call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wall_clock_seconds: Option<u64>,
    /// Limits on each selected agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_agent: Option<PerAgentLimits>,
    /// What a breach does. Default `HaltAndAlert`.
    #[serde(default)]
    pub on_breach: OnBreach,
    /// Where breach alerts go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertTarget>,
    /// What sidecars do when the budget service cannot be reached and their lease is spent.
    /// Default `FailClosed`: refuse the run's metered calls until it is back.
    #[serde(default)]
    pub on_budget_service_unavailable: Unavailable,
    /// How the selected agents' sidecars retry failed calls, within a retry budget. Absent: no
    /// retries. Where several RunBudgets select an agent, the one with the fewest
    /// `maxAttempts` is in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<crate::retry::RetryPolicy>,
    /// Token and cost quotas over hours, days or months, counted across runs per agent, team,
    /// environment or this workflow. Every quota of every RunBudget selecting an agent applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<crate::quota::Quota>,
}

/// What happens to metered calls when the budget service cannot be reached.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Unavailable {
    /// Refuse them (402) once the lease in hand is spent.
    #[default]
    FailClosed,
    /// Let them through unmetered by a lease; their spend is still reported when the service
    /// returns.
    FailOpen,
}

/// Re-entry into an agent already on the run's path.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CyclePolicy {
    /// How many times a run may re-enter an agent already on its path. 0 (the default) refuses
    /// every re-entry.
    #[serde(default)]
    pub max_revisits: u32,
}

/// Limits on each selected agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PerAgentLimits {
    /// How often one agent may invoke other agents, e.g. `60/min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoke_rate_limit: Option<InvokeRate>,
    /// How long a call to a child may take before it counts as stalled (504).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// What a breach of the run's limits does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum OnBreach {
    /// Stop the run everywhere and send an alert.
    #[default]
    HaltAndAlert,
    /// Stop the run everywhere.
    Halt,
    /// Let the run go on, but send an alert.
    AlertOnly,
}

impl OnBreach {
    pub fn halts(self) -> bool {
        matches!(self, OnBreach::HaltAndAlert | OnBreach::Halt)
    }
    pub fn alerts(self) -> bool {
        matches!(self, OnBreach::HaltAndAlert | OnBreach::AlertOnly)
    }
}

/// Where alerts go.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlertTarget {
    /// A URL that receives a JSON summary of the run when a limit trips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
}

/// Observed state of a RunBudget.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunBudgetStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The agents the budget currently selects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selected_agents: Vec<String>,
    /// What each quota's current window has spent, as the budget service counts it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<crate::quota::QuotaUsage>,
}

/// Why a limit value is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "rate {0:?} is invalid: write <count>/<unit>, e.g. 60/min, with unit s, sec, second, min, minute, h or hour and a count of at least 1"
    )]
    Rate(String),
    #[error(
        "amount {0:?} is invalid: write US dollars as a decimal with at most 6 places, e.g. \"25.00\""
    )]
    Usd(String),
}

/// A rate: `count` events per `per`, written `60/min`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvokeRate {
    pub count: u32,
    pub per: Duration,
}

impl FromStr for InvokeRate {
    type Err = LimitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LimitError::Rate(s.to_owned());
        let (count, unit) = s.split_once('/').ok_or_else(err)?;
        let count: u32 = count.trim().parse().map_err(|_| err())?;
        let secs = match unit.trim() {
            "s" | "sec" | "second" => 1,
            "min" | "minute" => 60,
            "h" | "hour" => 3600,
            _ => return Err(err()),
        };
        if count == 0 {
            return Err(err());
        }
        Ok(Self {
            count,
            per: Duration::from_secs(secs),
        })
    }
}

impl fmt::Display for InvokeRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            3600 => "h",
            other => return write!(f, "{}/{}s", self.count, other),
        };
        write!(f, "{}/{}", self.count, unit)
    }
}

impl Serialize for InvokeRate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InvokeRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for InvokeRate {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "InvokeRate".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9]+/(s|sec|second|min|minute|h|hour)$",
            "description": "A rate such as 60/min."
        })
    }
}

/// Money in integer micro-dollars (1 USD = 1,000,000). Never a float: written as a decimal
/// string in manifests and parsed exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd {
    pub micros: u64,
}

impl Usd {
    pub const fn from_micros(micros: u64) -> Self {
        Self { micros }
    }
}

impl FromStr for Usd {
    type Err = LimitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LimitError::Usd(s.to_owned());
        let t = s.trim().trim_start_matches('$');
        let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
        if whole.is_empty()
            || frac.len() > 6
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(err());
        }
        let whole: u64 = whole.parse().map_err(|_| err())?;
        let mut frac_micros: u64 = 0;
        for (i, b) in frac.bytes().enumerate() {
            frac_micros += u64::from(b - b'0') * 10u64.pow(5 - i as u32);
        }
        whole
            .checked_mul(1_000_000)
            .and_then(|w| w.checked_add(frac_micros))
            .map(Usd::from_micros)
            .ok_or_else(err)
    }
}

impl fmt::Display for Usd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.micros / 1_000_000;
        let frac = self.micros % 1_000_000;
        if frac == 0 {
            write!(f, "{whole}.00")
        } else {
            let s = format!("{frac:06}");
            let s = s.trim_end_matches('0');
            if s.len() < 2 {
                write!(f, "{whole}.{s:0<2}")
            } else {
                write!(f, "{whole}.{s}")
            }
        }
    }
}

impl Serialize for Usd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Manifests written by hand often say `maxCostUsd: 25`; YAML makes that a number. Take
        // its decimal text (Rust prints the shortest text that reads back as the same float).
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            S(String),
            U(u64),
            F(f64),
        }
        let text = match Text::deserialize(d)? {
            Text::S(s) => s,
            Text::U(u) => u.to_string(),
            Text::F(f) => f.to_string(),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Usd {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Usd".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[0-9]+(\\.[0-9]{1,6})?$",
            "description": "US dollars as a decimal string, e.g. \"25.00\"."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rates_parse_in_every_unit() {
        let r: InvokeRate = "60/min".parse().unwrap();
        assert_eq!((r.count, r.per), (60, Duration::from_secs(60)));
        assert_eq!("5/s".parse::<InvokeRate>().unwrap().to_string(), "5/s");
        assert_eq!(
            "100/hour".parse::<InvokeRate>().unwrap().to_string(),
            "100/h"
        );
        for bad in ["", "60", "60/day", "0/min", "-1/min", "x/min", "60/"] {
            assert!(bad.parse::<InvokeRate>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn money_is_exact_micro_dollars() {
        assert_eq!("25.00".parse::<Usd>().unwrap().micros, 25_000_000);
        assert_eq!("0.000001".parse::<Usd>().unwrap().micros, 1);
        assert_eq!("$1.5".parse::<Usd>().unwrap().micros, 1_500_000);
        assert_eq!(Usd::from_micros(1_500_000).to_string(), "1.50");
        assert_eq!(Usd::from_micros(1_234_567).to_string(), "1.234567");
        for bad in [
            "",
            ".5",
            "1.0000001",
            "-1",
            "1e3",
            "abc",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<Usd>().is_err(), "accepted {bad:?}");
        }
        let from_yaml: Usd = serde_yaml::from_str("0.1").unwrap();
        assert_eq!(from_yaml.micros, 100_000);
        let from_yaml: Usd = serde_yaml::from_str("25").unwrap();
        assert_eq!(from_yaml.micros, 25_000_000);
    }

    proptest! {
        #[test]
        fn money_round_trips(m in 0u64..1_000_000_000_000) {
            let u = Usd::from_micros(m);
            prop_assert_eq!(u.to_string().parse::<Usd>().unwrap(), u);
        }
    }
}
