//! Model fallback: the ordered routes one model call may take, and when it moves on.
//!
//! A provider's `fallbacks` name other providers of the same agent (the compiler checks that
//! they exist and speak the same API), each optionally with another model. The call goes to the
//! primary first; an answer of 5xx or 429, a provider that cannot be reached, or one that
//! outlives its `timeoutSeconds` (waiting for the answer's head) moves it to the next route at
//! once — no backoff: the next route is another provider. The decision is made on the answer's
//! head, so a streamed answer falls back only before any byte of it reached the app. A route is
//! tried only when policy permits its model; one that is denied is skipped and recorded.
//!
//! Nothing here allocates unless a call actually falls back.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use ringfence_crds::agent::{ModelProvider, ModelRoute};

/// The header on an answer that took a fallback: the routes tried, in order, the last one being
/// the route that answered (or failed last).
pub const ROUTES_HEADER: &str = "ringfence-model-routes";

/// One place a model call can go: a provider and the model asked of it.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    pub provider: &'a ModelProvider,
    pub model: &'a str,
}

impl<'a> Route<'a> {
    /// The route a fallback entry names, with the request's `model` when the entry names none;
    /// `None` when its provider is not in the bundle (the compiler refuses such an Agent, so
    /// only a hand-made bundle gets here, and the route is then skipped).
    pub fn resolve(
        entry: &'a ModelRoute,
        providers: &'a [ModelProvider],
        requested: &'a str,
    ) -> Option<Self> {
        let provider = providers.iter().find(|p| p.name == entry.provider)?;
        Some(Route {
            provider,
            model: entry.model.as_deref().unwrap_or(requested),
        })
    }

    /// `provider/model`, as policies and the pricing-free logs name it.
    pub fn name(&self) -> String {
        format!("{}/{}", self.provider.name, self.model)
    }

    /// How long to wait for this route's answer head, given what is left of the call's own
    /// time; and whether the provider's `timeoutSeconds` is what binds (only then does running
    /// out of time fall back: a run past its deadline has no time for another route either).
    pub fn timeout(&self, left: Duration) -> (Duration, bool) {
        match self.provider.timeout_seconds.map(Duration::from_secs) {
            Some(own) if own < left => (own, true),
            _ => (left, false),
        }
    }
}

/// Why a call moved on from a route: the `reason` label of `ringfence_model_fallbacks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The provider answered 5xx.
    ServerError,
    /// The provider answered 429.
    RateLimited,
    /// No answer head within the provider's `timeoutSeconds`.
    Timeout,
    /// The provider could not be reached, or the connection broke before an answer.
    Unreachable,
    /// Policy does not permit the route's model: the route was skipped.
    Policy,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::ServerError => "server_error",
            Reason::RateLimited => "rate_limited",
            Reason::Timeout => "timeout",
            Reason::Unreachable => "unreachable",
            Reason::Policy => "policy",
        }
    }

    /// The reason an answer with `status` falls back, if it does: 5xx and 429 only. Other 4xx
    /// are the request's fault and would fail the same way on every route.
    pub fn of_status(status: StatusCode) -> Option<Self> {
        if status.is_server_error() {
            Some(Reason::ServerError)
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            Some(Reason::RateLimited)
        } else {
            None
        }
    }
}

/// What happened to each route of a call before the one that answered. Empty, and never
/// allocated, for a call its first route answers.
#[derive(Debug, Default)]
pub struct Trail {
    /// Routes a request was sent to and that failed, in order.
    failed: Vec<String>,
    /// `route: what happened`, for the span.
    events: String,
}

impl Trail {
    /// Whether the call left its first route.
    pub fn fell_back(&self) -> bool {
        !self.events.is_empty()
    }

    /// `route` was asked and failed with `what` (a status, or why it could not answer).
    pub fn failed(&mut self, route: &Route<'_>, what: &str) {
        self.failed.push(route.name());
        self.event(route, what);
    }

    /// `route` was skipped: policy does not permit its model.
    pub fn skipped(&mut self, route: &Route<'_>) {
        self.event(route, "denied by policy");
    }

    fn event(&mut self, route: &Route<'_>, what: &str) {
        if !self.events.is_empty() {
            self.events.push_str("; ");
        }
        // Writing to a String cannot fail.
        let _ = write!(
            self.events,
            "{}/{}: {what}",
            route.provider.name, route.model
        );
    }

    /// The routes tried, for [`ROUTES_HEADER`]: those that failed, then `answered` when a route
    /// answered.
    pub fn tried_header(&self, answered: Option<&Route<'_>>) -> String {
        let mut out = self.failed.join(", ");
        if let Some(route) = answered {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(&route.name());
        }
        out
    }

    /// Every route left behind and why, for the span and error messages.
    pub fn summary(&self) -> &str {
        &self.events
    }
}

/// Why a request body could not be sent to a fallback's model.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    #[error(
        "the request could not be re-read to ask the fallback model {model:?} ({source}); send \
         the model request as one JSON object"
    )]
    Body {
        model: String,
        source: serde_json::Error,
    },
}

/// `body` (a JSON object) asking for `model` instead. Re-serialised: only a fallback to another
/// model pays for it. `stream_options` survives as it is in `body`.
pub fn with_model(body: &[u8], model: &str) -> Result<Bytes, FallbackError> {
    let failed = |source| FallbackError::Body {
        model: model.to_owned(),
        source,
    };
    let mut request: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(failed)?;
    request.insert("model".to_owned(), serde_json::Value::from(model));
    serde_json::to_vec(&request)
        .map(Bytes::from)
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use ringfence_crds::agent::ModelApi;

    use super::*;

    fn provider(name: &str, timeout_seconds: Option<u64>) -> ModelProvider {
        ModelProvider {
            name: name.into(),
            url: format!("http://{name}.invalid"),
            api: ModelApi::OpenAI,
            api_key_env: None,
            timeout_seconds,
            fallbacks: vec![],
        }
    }

    #[test]
    fn only_5xx_and_429_fall_back() {
        assert_eq!(
            Reason::of_status(StatusCode::SERVICE_UNAVAILABLE),
            Some(Reason::ServerError)
        );
        assert_eq!(
            Reason::of_status(StatusCode::INTERNAL_SERVER_ERROR),
            Some(Reason::ServerError)
        );
        assert_eq!(
            Reason::of_status(StatusCode::TOO_MANY_REQUESTS),
            Some(Reason::RateLimited)
        );
        for status in [
            StatusCode::OK,
            StatusCode::BAD_REQUEST,
            StatusCode::UNAUTHORIZED,
            StatusCode::NOT_FOUND,
            StatusCode::PAYMENT_REQUIRED,
        ] {
            assert_eq!(Reason::of_status(status), None, "{status}");
        }
    }

    #[test]
    fn a_route_keeps_the_requested_model_unless_it_names_one() {
        let providers = [provider("openai", None), provider("backup", None)];
        let same = ModelRoute {
            provider: "backup".into(),
            model: None,
        };
        let other = ModelRoute {
            provider: "backup".into(),
            model: Some("gpt-4o-mini".into()),
        };
        let missing = ModelRoute {
            provider: "nowhere".into(),
            model: None,
        };
        let r = Route::resolve(&same, &providers, "gpt-4o").unwrap();
        assert_eq!(r.name(), "backup/gpt-4o");
        let r = Route::resolve(&other, &providers, "gpt-4o").unwrap();
        assert_eq!(r.name(), "backup/gpt-4o-mini");
        assert!(Route::resolve(&missing, &providers, "gpt-4o").is_none());
    }

    #[test]
    fn the_providers_timeout_binds_only_when_shorter_than_the_time_left() {
        let slow = provider("slow", Some(1));
        let r = Route {
            provider: &slow,
            model: "m",
        };
        assert_eq!(
            r.timeout(Duration::from_secs(30)),
            (Duration::from_secs(1), true)
        );
        assert_eq!(
            r.timeout(Duration::from_millis(500)),
            (Duration::from_millis(500), false)
        );
        let plain = provider("plain", None);
        let r = Route {
            provider: &plain,
            model: "m",
        };
        assert_eq!(
            r.timeout(Duration::from_secs(30)),
            (Duration::from_secs(30), false)
        );
    }

    #[test]
    fn the_fallback_model_replaces_the_requests_and_stream_options_survive() {
        let body = br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#;
        let out = with_model(body, "gpt-4o-mini").unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "gpt-4o-mini");
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["messages"][0]["content"], "hi");
        assert!(with_model(b"[1]", "m").is_err());
    }

    #[test]
    fn the_trail_names_the_routes_tried_and_why_each_was_left() {
        let (a, b, c) = (
            provider("openai", None),
            provider("cheap", None),
            provider("backup", None),
        );
        let (a, b, c) = (
            Route {
                provider: &a,
                model: "gpt-4o",
            },
            Route {
                provider: &b,
                model: "gpt-4o-mini",
            },
            Route {
                provider: &c,
                model: "gpt-4o",
            },
        );
        let mut trail = Trail::default();
        assert!(!trail.fell_back());
        trail.failed(&a, "503 Service Unavailable");
        trail.skipped(&b);
        assert!(trail.fell_back());
        assert_eq!(trail.tried_header(Some(&c)), "openai/gpt-4o, backup/gpt-4o");
        assert_eq!(trail.tried_header(None), "openai/gpt-4o");
        assert_eq!(
            trail.summary(),
            "openai/gpt-4o: 503 Service Unavailable; cheap/gpt-4o-mini: denied by policy"
        );
    }
}
