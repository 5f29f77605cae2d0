//! What a call costs: a per-token price table, and exact integer money.
//!
//! The table is in LiteLLM's de-facto format (`model_prices_and_context_window.json`): an object
//! of model name → `input_cost_per_token`, `output_cost_per_token`,
//! `cache_read_input_token_cost`, `cache_creation_input_token_cost` (US dollars per token) and
//! `litellm_provider`; every other member is ignored, and entries with neither token price
//! (image, audio, rerank models) are skipped, so LiteLLM's own file loads as it is.
//!
//! Prices become integer **pico-dollars per token** at load time, read from the decimal text of
//! the JSON number (`1.5e-07` and `0.00000015` are both 150 000 pico-dollars) — never through a
//! float. A cost is then `ceil(Σ tokens × pico / 10⁶)` micro-dollars in `u128`: exact, and
//! rounded up, so a run is never charged less than it spent. A price finer than a pico-dollar is
//! rounded up too.
//!
//! The shipped table (`sidecar/pricing/default.json`) takes its prices from LiteLLM's
//! `model_prices_and_context_window.json` (BerriAI/litellm); where that file no longer lists a
//! model directly (claude-3-5-sonnet, claude-3-5-haiku, o3-mini's cached input), the provider's
//! list price, which matches LiteLLM's entries for the same model on other routes. An override
//! file replaces entries by name ([`Pricing::merge_override`]).
//!
//! Not modelled: tiered prices (Anthropic's above-200k-token rates), 1-hour cache writes,
//! batch and priority tiers. They price at the base rate.

use std::collections::HashMap;

use ringfence_crds::budget::Usd;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::jsonrpc::{self, LenientStr};
use crate::protocol::llm::Usage;

/// The shipped table.
const DEFAULT_TABLE: &str = include_str!("../pricing/default.json");

/// Pico-dollars in a micro-dollar.
const PICO_PER_MICRO: u128 = 1_000_000;

/// Why a pricing table was refused, phrased for whoever maintains it.
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error(
        "the pricing table is not valid JSON ({0}); it must be one object of model name → \
         prices, as in LiteLLM's model_prices_and_context_window.json"
    )]
    Json(serde_json::Error),
    #[error("the pricing entry for {model:?} could not be read ({source}); check its members")]
    Entry {
        model: String,
        source: serde_json::Error,
    },
    #[error(
        "the pricing entry for {model:?} has {field} = {text}, which {problem}; write US \
         dollars per token as a JSON number, e.g. 1.5e-07"
    )]
    Price {
        model: String,
        field: &'static str,
        text: String,
        problem: &'static str,
    },
}

/// One model's prices, in pico-dollars (10⁻¹² USD) per token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPrice {
    pub input_pico: u64,
    pub output_pico: u64,
    /// Cached input read; the input price when the table has none.
    pub cache_read_pico: Option<u64>,
    /// Cached input written (Anthropic); the input price when the table has none.
    pub cache_creation_pico: Option<u64>,
    /// `litellm_provider`, as the table says.
    pub provider: Option<String>,
    /// `max_output_tokens`, a reservation's size when the request sets no cap.
    pub max_output_tokens: Option<u64>,
}

impl ModelPrice {
    /// What `usage` costs at these prices, in micro-dollars, rounded up.
    pub fn cost_micros(&self, usage: &Usage) -> u64 {
        let cache_read = usage.cache_read_tokens.min(usage.input_tokens);
        let cache_creation = usage
            .cache_creation_tokens
            .min(usage.input_tokens - cache_read);
        let uncached = usage.input_tokens - cache_read - cache_creation;
        let terms = [
            (uncached, self.input_pico),
            (cache_read, self.cache_read_pico.unwrap_or(self.input_pico)),
            (
                cache_creation,
                self.cache_creation_pico.unwrap_or(self.input_pico),
            ),
            (usage.output_tokens, self.output_pico),
        ];
        // Each product fits u128 (u64 × u64); only an absurd sum could overflow, and then the
        // cost saturates rather than wraps.
        let pico = terms.iter().fold(0u128, |sum, &(tokens, price)| {
            sum.saturating_add(u128::from(tokens) * u128::from(price))
        });
        u64::try_from(pico.div_ceil(PICO_PER_MICRO)).unwrap_or(u64::MAX)
    }

    /// [`cost_micros`](Self::cost_micros) as money.
    pub fn cost(&self, usage: &Usage) -> Usd {
        Usd::from_micros(self.cost_micros(usage))
    }
}

/// A model name → price table. Build it once, publish it, read it on the hot path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pricing {
    models: HashMap<String, ModelPrice>,
}

#[derive(Deserialize)]
struct WireEntry<'a> {
    #[serde(default, borrow)]
    input_cost_per_token: Option<&'a RawValue>,
    #[serde(default, borrow)]
    output_cost_per_token: Option<&'a RawValue>,
    #[serde(default, borrow)]
    cache_read_input_token_cost: Option<&'a RawValue>,
    #[serde(default, borrow)]
    cache_creation_input_token_cost: Option<&'a RawValue>,
    #[serde(default, borrow)]
    litellm_provider: LenientStr<'a>,
    #[serde(default, borrow)]
    max_output_tokens: Option<&'a RawValue>,
}

impl Pricing {
    /// The table shipped with the sidecar.
    pub fn default_table() -> Self {
        // The shipped file is part of the source and a test reads it; an empty table (every
        // cost an estimate, each counted) is the fallback, never a panic.
        Self::from_json(DEFAULT_TABLE).unwrap_or_default()
    }

    /// Reads a table in LiteLLM's format.
    pub fn from_json(text: &str) -> Result<Self, PricingError> {
        let entries: HashMap<String, &RawValue> =
            serde_json::from_str(text).map_err(PricingError::Json)?;
        let mut models = HashMap::with_capacity(entries.len());
        for (model, raw) in entries {
            // LiteLLM's file opens with a `sample_spec` that documents the format.
            if model == "sample_spec" || jsonrpc::json_kind(raw.get()) != "an object" {
                continue;
            }
            let wire: WireEntry<'_> = match serde_json::from_str(raw.get()) {
                Ok(wire) => wire,
                Err(source) => return Err(PricingError::Entry { model, source }),
            };
            if wire.input_cost_per_token.is_none() && wire.output_cost_per_token.is_none() {
                continue; // not priced per token
            }
            let price = |raw: Option<&RawValue>, field: &'static str| {
                raw.filter(|raw| raw.get() != "null")
                    .map(|raw| {
                        pico_per_token(raw.get()).map_err(|problem| PricingError::Price {
                            model: model.clone(),
                            field,
                            text: raw.get().to_owned(),
                            problem,
                        })
                    })
                    .transpose()
            };
            let entry = ModelPrice {
                input_pico: price(wire.input_cost_per_token, "input_cost_per_token")?.unwrap_or(0),
                output_pico: price(wire.output_cost_per_token, "output_cost_per_token")?
                    .unwrap_or(0),
                cache_read_pico: price(
                    wire.cache_read_input_token_cost,
                    "cache_read_input_token_cost",
                )?,
                cache_creation_pico: price(
                    wire.cache_creation_input_token_cost,
                    "cache_creation_input_token_cost",
                )?,
                provider: wire.litellm_provider.into_string(),
                max_output_tokens: wire
                    .max_output_tokens
                    .and_then(|raw| raw.get().parse::<u64>().ok()),
            };
            models.insert(model, entry);
        }
        Ok(Self { models })
    }

    /// Adds `other`'s entries, replacing this table's entries of the same name.
    pub fn merge_override(&mut self, other: Pricing) {
        self.models.extend(other.models);
    }

    /// How many models the table prices.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The price of `model`: the exact name first; then without a provider prefix
    /// (`openai/gpt-4o-mini` → `gpt-4o-mini`); each also without a date or `-latest` suffix
    /// (`gpt-4o-mini-2024-07-18` → `gpt-4o-mini`, `claude-sonnet-4-20250514` →
    /// `claude-sonnet-4`) when the dated name is not listed. `None` for an unknown model.
    pub fn get(&self, model: &str) -> Option<&ModelPrice> {
        let mut name = Some(model);
        while let Some(candidate) = name {
            if let Some(price) = self.models.get(candidate) {
                return Some(price);
            }
            if let Some(price) = undated(candidate).and_then(|base| self.models.get(base)) {
                return Some(price);
            }
            name = candidate.split_once('/').map(|(_, rest)| rest);
        }
        None
    }

    /// What `usage` cost on `model`; `None` when the model is not priced.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<Usd> {
        self.get(model).map(|price| price.cost(usage))
    }
}

/// A model name without its snapshot suffix: `-YYYY-MM-DD` (OpenAI), `-YYYYMMDD` (Anthropic) or
/// `-latest`.
fn undated(model: &str) -> Option<&str> {
    fn digits(s: &str, len: usize) -> bool {
        s.len() == len && s.bytes().all(|b| b.is_ascii_digit())
    }
    if let Some(base) = model.strip_suffix("-latest") {
        return Some(base);
    }
    let (base, last) = model.rsplit_once('-')?;
    if digits(last, 8) {
        return Some(base); // claude-sonnet-4-20250514
    }
    let (rest, month) = base.rsplit_once('-')?;
    let (base, year) = rest.rsplit_once('-')?;
    // gpt-4o-mini-2024-07-18
    (digits(year, 4) && digits(month, 2) && digits(last, 2)).then_some(base)
}

/// Pico-dollars per token from the text of a JSON number in dollars (`1.5e-07`, `0.00000015`,
/// `3`). Exact for any price with at most 12 decimal places; finer ones round up.
fn pico_per_token(text: &str) -> Result<u64, &'static str> {
    const NOT_A_NUMBER: &str = "is not a non-negative decimal number";
    const TOO_LARGE: &str = "is too large to be a price per token";
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, Some(exponent)),
        None => (text, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((int, frac)) if !frac.is_empty() => (int, frac),
        Some(_) => return Err(NOT_A_NUMBER),
        None => (mantissa, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !all_digits(int) || !all_digits(frac) {
        return Err(NOT_A_NUMBER);
    }
    let exponent: i64 = match exponent {
        None => 0,
        Some(e) => {
            let (negative, digits) = match e.as_bytes().first() {
                Some(b'-') => (true, e.get(1..).unwrap_or_default()),
                Some(b'+') => (false, e.get(1..).unwrap_or_default()),
                _ => (false, e),
            };
            if digits.is_empty() || !all_digits(digits) {
                return Err(NOT_A_NUMBER);
            }
            // Past ±10⁶ the answer no longer depends on the exact exponent.
            let magnitude = digits
                .bytes()
                .fold(0i64, |n, b| (n * 10 + i64::from(b - b'0')).min(1_000_000));
            if negative { -magnitude } else { magnitude }
        }
    };
    // Trailing zeros after the point change nothing; dropping them keeps the mantissa small.
    let frac = frac.trim_end_matches('0');
    let mut significant: u128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        significant = significant
            .checked_mul(10)
            .and_then(|n| n.checked_add(u128::from(b - b'0')))
            .ok_or(TOO_LARGE)?;
    }
    if significant == 0 {
        return Ok(0);
    }
    // value = significant × 10^(exponent − frac digits); pico = value × 10¹².
    let frac_len = i64::try_from(frac.len()).map_err(|_| TOO_LARGE)?;
    let scale = exponent - frac_len + 12;
    let pico = if scale >= 0 {
        let factor = u32::try_from(scale)
            .ok()
            .and_then(|s| 10u128.checked_pow(s))
            .ok_or(TOO_LARGE)?;
        significant.checked_mul(factor).ok_or(TOO_LARGE)?
    } else {
        match u32::try_from(-scale)
            .ok()
            .and_then(|s| 10u128.checked_pow(s))
        {
            Some(divisor) => significant.div_ceil(divisor),
            // Smaller than any u128 power of ten: a positive sliver, rounded up.
            None => 1,
        }
    };
    u64::try_from(pico).map_err(|_| TOO_LARGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, output: u64, cache_read: u64, cache_creation: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cache_read_tokens: cache_read,
            cache_creation_tokens: cache_creation,
            ..Usage::default()
        }
    }

    #[test]
    fn the_shipped_table_reads_and_prices_every_model_it_lists() {
        let table = Pricing::from_json(DEFAULT_TABLE).expect("shipped table reads");
        assert_eq!(table, Pricing::default_table());
        for model in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "o3-mini",
            "claude-3-5-sonnet-20241022",
            "claude-3-5-haiku-20241022",
            "claude-sonnet-4-20250514",
            "claude-opus-4-20250514",
        ] {
            let price = table.get(model).expect(model);
            assert!(price.input_pico > 0 && price.output_pico > 0, "{model}");
            assert!(price.cache_read_pico.is_some(), "{model}");
        }
    }

    #[test]
    fn a_price_reads_the_same_in_any_decimal_spelling() {
        for text in [
            "1.5e-07",
            "0.00000015",
            "1.5E-7",
            "15e-8",
            "0.15e-6",
            "1.50000e-07",
            "0.000000150",
        ] {
            assert_eq!(pico_per_token(text), Ok(150_000), "{text}");
        }
        assert_eq!(pico_per_token("1.875e-05"), Ok(18_750_000));
        assert_eq!(pico_per_token("5.46875e-07"), Ok(546_875));
        assert_eq!(pico_per_token("3"), Ok(3_000_000_000_000));
        assert_eq!(pico_per_token("0.0"), Ok(0));
        assert_eq!(pico_per_token("0"), Ok(0));
    }

    #[test]
    fn a_price_finer_than_a_pico_dollar_rounds_up() {
        assert_eq!(pico_per_token("1.0000000000001e-06"), Ok(1_000_001));
        assert_eq!(pico_per_token("1e-20"), Ok(1));
        assert_eq!(pico_per_token("1e-999999999"), Ok(1));
    }

    #[test]
    fn a_price_that_is_not_a_plain_number_is_refused_with_the_model_named() {
        for bad in [
            "-1e-06",
            "\"1.5e-07\"",
            "1.",
            ".5",
            "1e",
            "1e+",
            "abc",
            "true",
        ] {
            assert!(pico_per_token(bad).is_err(), "accepted {bad:?}");
        }
        assert!(pico_per_token("1e30").is_err());
        let err = Pricing::from_json(r#"{"my-model": {"input_cost_per_token": "0.1"}}"#)
            .expect_err("a string price");
        let message = err.to_string();
        assert!(message.contains("my-model") && message.contains("input_cost_per_token"));
        assert!(message.contains("e.g. 1.5e-07"), "{message}");
    }

    #[test]
    fn gpt_4o_mini_with_cached_input_costs_exact_micro_dollars() {
        let table = Pricing::default_table();
        // 800 uncached × 0.15 µ$ + 200 cached × 0.075 µ$ + 500 out × 0.6 µ$ = 435 µ$.
        let cost = table
            .cost("gpt-4o-mini", &usage(1_000, 500, 200, 0))
            .expect("priced");
        assert_eq!(cost.micros, 435);
        // A million output tokens of gpt-4.1 is $8.
        let cost = table
            .cost("gpt-4.1", &usage(0, 1_000_000, 0, 0))
            .expect("priced");
        assert_eq!(cost.micros, 8_000_000);
    }

    #[test]
    fn anthropic_cache_writes_and_reads_are_priced_apart_from_plain_input() {
        let table = Pricing::default_table();
        // input 12 100 = 100 plain + 2 000 written + 10 000 read; 300 out.
        // 100×3 + 2 000×3.75 + 10 000×0.3 + 300×15 µ$ = 300 + 7 500 + 3 000 + 4 500 = 15 300 µ$.
        let spent = usage(12_100, 300, 10_000, 2_000);
        let cost = table
            .cost("claude-sonnet-4-20250514", &spent)
            .expect("priced");
        assert_eq!(cost.micros, 15_300);
        let opus = table
            .cost("claude-opus-4-20250514", &spent)
            .expect("priced");
        assert_eq!(opus.micros, 76_500);
    }

    #[test]
    fn a_fraction_of_a_micro_dollar_is_charged_as_a_whole_one() {
        let table = Pricing::default_table();
        let cost = table
            .cost("gpt-4o-mini", &usage(1, 0, 0, 0))
            .expect("priced");
        assert_eq!(cost.micros, 1);
        let nothing = table
            .cost("gpt-4o-mini", &usage(0, 0, 0, 0))
            .expect("priced");
        assert_eq!(nothing.micros, 0);
    }

    #[test]
    fn a_cache_count_larger_than_the_input_never_prices_more_than_the_input() {
        let table = Pricing::default_table();
        let cost = table
            .cost("claude-sonnet-4", &usage(10, 0, 1_000, 1_000))
            .expect("priced");
        // All 10 input tokens at the cache-read price: 10 × 0.3 µ$ = 3 µ$.
        assert_eq!(cost.micros, 3);
    }

    #[test]
    fn provider_prefixes_and_dated_snapshots_find_the_base_model() {
        let table = Pricing::default_table();
        let base = table.get("gpt-4o-mini").expect("listed");
        assert_eq!(table.get("openai/gpt-4o-mini"), Some(base));
        assert_eq!(table.get("gpt-4o-mini-2024-07-18"), Some(base));
        assert_eq!(table.get("openai/gpt-4o-mini-2024-07-18"), Some(base));
        let sonnet = table.get("claude-sonnet-4").expect("listed");
        assert_eq!(table.get("claude-sonnet-4-20990101"), Some(sonnet));
        assert_eq!(
            table.get("anthropic/claude-sonnet-4-20250514"),
            Some(sonnet)
        );
        assert!(table.get("claude-3-5-haiku-latest").is_some());
        assert!(table.get("o3-mini-2025-01-31").is_some());
    }

    #[test]
    fn a_listed_snapshot_keeps_its_own_price() {
        let table = Pricing::default_table();
        let may = table.get("gpt-4o-2024-05-13").expect("listed");
        assert_eq!(may.input_pico, 5_000_000);
        assert_eq!(
            table.get("gpt-4o-2024-08-06").map(|p| p.input_pico),
            Some(2_500_000)
        );
    }

    #[test]
    fn an_unknown_model_has_no_price() {
        let table = Pricing::default_table();
        assert_eq!(table.get("llama-3-70b"), None);
        assert_eq!(table.get("gpt-4o-mini-0613"), None);
        assert_eq!(table.get(""), None);
        assert_eq!(table.get("/"), None);
        assert!(table.cost("mystery", &usage(1, 1, 0, 0)).is_none());
    }

    #[test]
    fn an_override_file_wins_over_the_shipped_table() {
        let mut table = Pricing::default_table();
        let shipped = table.len();
        let negotiated = Pricing::from_json(
            r#"{
                "gpt-4o-mini": {"input_cost_per_token": 1e-07, "output_cost_per_token": 4e-07,
                                "litellm_provider": "openai"},
                "acme-large": {"input_cost_per_token": 0.000001, "output_cost_per_token": 0.000002}
            }"#,
        )
        .expect("override reads");
        table.merge_override(negotiated);
        assert_eq!(table.len(), shipped + 1);
        let mini = table.get("gpt-4o-mini").expect("listed");
        assert_eq!((mini.input_pico, mini.output_pico), (100_000, 400_000));
        assert_eq!(
            mini.cache_read_pico, None,
            "the override replaces the whole entry"
        );
        assert_eq!(
            table
                .cost("acme-large", &usage(1_000, 1_000, 0, 0))
                .map(|c| c.micros),
            Some(3_000)
        );
    }

    #[test]
    fn litellms_own_file_shape_loads_skipping_what_is_not_priced_per_token() {
        let table = Pricing::from_json(
            r#"{
                "sample_spec": {"input_cost_per_token": 0.0, "litellm_provider": "one of …",
                                "max_output_tokens": "max output tokens, if the provider says"},
                "dall-e-3": {"input_cost_per_image": 0.04, "litellm_provider": "openai",
                             "mode": "image_generation"},
                "gpt-4o-mini": {"cache_read_input_token_cost": 7.5e-08,
                                "input_cost_per_token": 1.5e-07,
                                "input_cost_per_token_batches": 7.5e-08,
                                "litellm_provider": "openai", "max_output_tokens": 16384,
                                "mode": "chat", "output_cost_per_token": 6e-07,
                                "search_context_cost_per_query": {"search_context_size_high": 0.03},
                                "supports_vision": true}
            }"#,
        )
        .expect("LiteLLM shape reads");
        assert_eq!(table.len(), 1);
        let mini = table.get("gpt-4o-mini").expect("listed");
        assert_eq!(mini.provider.as_deref(), Some("openai"));
        assert_eq!(mini.max_output_tokens, Some(16_384));
        assert_eq!(mini.cache_read_pico, Some(75_000));
    }

    #[test]
    fn a_table_that_is_not_an_object_of_entries_is_refused() {
        assert!(matches!(
            Pricing::from_json("[1, 2]"),
            Err(PricingError::Json(_))
        ));
        assert!(matches!(
            Pricing::from_json(
                r#"{"m": {"input_cost_per_token": 1e-06, "input_cost_per_token": 2e-06}}"#
            ),
            Err(PricingError::Entry { .. })
        ));
    }
}
