//! The Ringfence call context: who started a run, how deep it is, which agents it went through,
//! what untrusted content reached it, when it must end, and its trace.
//!
//! It travels in the `ringfence-context` header ([`HEADER`]) in two forms:
//!
//! - **hop form**, `v1.<base64url(payload)>`, from the caller's sidecar to the callee's sidecar
//!   inside mTLS. Its `path` ends with the **caller** and its `depth` is `path.len()`, the
//!   callee's depth. The callee's sidecar trusts the header only as far as mTLS lets it: it
//!   checks that the last path element is the authenticated caller and that the depth equals the
//!   path length ([`RunContext::check_hop`]), then appends its own agent ([`RunContext::enter`]).
//!   [`accept_hop`] does all three.
//! - **sealed form**, `v1.<base64url(payload)>.<base64url(mac)>`, handed by a sidecar to its own
//!   app, which forwards it unchanged on its outbound calls. Its `path` ends with **that app's
//!   agent** and its `depth` is `path.len() - 1`. The MAC is HMAC-SHA256 under a key that never
//!   leaves the sidecar, derived for one agent ([`Sealer`]), so an app cannot forge or reset its
//!   context, and a context issued to another agent or by another sidecar is refused.
//!
//! On an outbound call the caller's sidecar [`Sealer::open`]s the app's header, checks limits
//! with its path, and sends [`RunContext::hop`]`.encode()` to the callee.
//!
//! The payload is compact JSON, decoded strictly: unknown or duplicate fields are refused and
//! every field is validated ([`RunContext::validate`]). A header over [`MAX_HEADER_LEN`] bytes is
//! refused before anything is decoded, and the seal is verified (in constant time) before the
//! payload is.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::{Deserialize, Serialize};
use ulid::Ulid;

use crate::tracecontext::TraceParent;

/// The header that carries the context.
pub const HEADER: &str = "ringfence-context";
/// The largest header value accepted or produced, in bytes.
pub const MAX_HEADER_LEN: usize = 8 * 1024;
/// The most agents a path may hold.
pub const MAX_PATH: usize = 64;
/// The most taint sources a context may carry.
pub const MAX_TAINT: usize = 32;
/// The longest `user` or taint source, in bytes.
pub const MAX_TEXT_LEN: usize = 256;
/// The longest agent name (a DNS label).
pub const MAX_AGENT_LEN: usize = 63;

const PREFIX: &str = "v1.";
const MAC_LEN: usize = 32;
/// Base64url without padding of 32 bytes.
const MAC_B64_LEN: usize = 43;
/// Separates the derived key of one agent from any other use of the sidecar's key.
const KEY_LABEL: &[u8] = b"ringfence-context/v1 agent=";

/// Why a context header is refused. Messages are for the developer of the app that sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error(
        "the ringfence-context header is {len} bytes, over the {max}-byte limit: the run's path or taint list has grown too long; check for a delegation loop"
    )]
    TooLarge { len: usize, max: usize },
    #[error(
        "the ringfence-context header is malformed ({0}): forward the header exactly as your agent received it, without building or editing one"
    )]
    Malformed(String),
    #[error(
        "the ringfence-context header has version {found:?} but this sidecar reads v1: make sure every sidecar in the mesh runs a compatible version"
    )]
    Version { found: String },
    #[error(
        "the ringfence-context header was modified or was not issued by this agent's sidecar: forward the header exactly as your agent received it"
    )]
    BadSeal,
    #[error(
        "the ringfence-context field {field} is invalid: {reason}; forward the header exactly as your agent received it"
    )]
    Invalid { field: &'static str, reason: String },
    #[error(
        "the ringfence-context path ends with {last_in_path:?} but the call came from {expected_caller:?}: a context may only be forwarded by the agent it was issued to, so this one was copied from another agent or run"
    )]
    HopMismatch {
        expected_caller: String,
        last_in_path: String,
    },
    #[error(
        "the ringfence-context depth is {depth} but its path holds {path_len} agents, which does not match: forward the header exactly as your agent received it"
    )]
    DepthMismatch { depth: u32, path_len: usize },
    #[error(
        "the system's random source failed while creating the context key; check the host's entropy source"
    )]
    Random,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ContextError {
    ContextError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The context of one run as one agent sees it. See the module doc for what `depth` means in
/// each form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunContext {
    /// The run's ULID, 26 characters of uppercase Crockford base32.
    pub run: String,
    /// The human principal, e.g. `user:tomas`; may be empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// The delegation depth (root 0).
    pub depth: u32,
    /// Agent names, root first.
    pub path: Vec<String>,
    /// Sources of untrusted content that reached this branch, sorted and without duplicates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taint: Vec<String>,
    /// The run's wall-clock deadline, unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// The trace id and the span id of the hop that carried this context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceParent>,
    /// Sealed form only: the span id (16 hex digits) of the call that brought the run to this
    /// agent, which the run ledger links this agent's calls to. `None` at the root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

impl RunContext {
    /// A new run rooted at `root_agent`: a fresh ULID, path `[root_agent]`, depth 0. This is the
    /// context the root's app holds.
    pub fn start(
        root_agent: &str,
        user: &str,
        deadline_ms: Option<u64>,
        trace: Option<TraceParent>,
    ) -> Result<Self, ContextError> {
        check_agent(root_agent)?;
        check_text("user", user, true)?;
        Ok(Self {
            run: Ulid::new().to_string(),
            user: user.to_owned(),
            depth: 0,
            path: vec![root_agent.to_owned()],
            taint: Vec::new(),
            deadline_ms,
            trace,
            via: None,
        })
    }

    /// The last agent on the path: the app's own agent in a sealed context, the caller in a hop
    /// context.
    pub fn last_agent(&self) -> Option<&str> {
        self.path.last().map(String::as_str)
    }

    /// Whether untrusted content has reached this branch of the run.
    pub fn tainted(&self) -> bool {
        !self.taint.is_empty()
    }

    /// Marks the branch as having read untrusted content from `source` (e.g.
    /// `tool:search/web_search`). Adding a source already present changes nothing.
    pub fn add_taint(&mut self, source: &str) -> Result<(), ContextError> {
        check_text("taint", source, false)?;
        if let Err(at) = self.taint.binary_search_by(|t| t.as_str().cmp(source)) {
            if self.taint.len() >= MAX_TAINT {
                return Err(invalid(
                    "taint",
                    format!("a context carries at most {MAX_TAINT} taint sources"),
                ));
            }
            self.taint.insert(at, source.to_owned());
        }
        Ok(())
    }

    /// How many times `agent` is already on the path.
    pub fn revisits_of(&self, agent: &str) -> u32 {
        let n = self.path.iter().filter(|a| *a == agent).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// The callee sidecar's check of a hop context: the path must end with the authenticated
    /// `caller`, and the depth must be the path's length (the callee's depth).
    pub fn check_hop(&self, caller: &str) -> Result<(), ContextError> {
        let last = self.last_agent().unwrap_or_default();
        if last != caller {
            return Err(ContextError::HopMismatch {
                expected_caller: caller.to_owned(),
                last_in_path: last.to_owned(),
            });
        }
        if usize::try_from(self.depth).ok() != Some(self.path.len()) {
            return Err(ContextError::DepthMismatch {
                depth: self.depth,
                path_len: self.path.len(),
            });
        }
        Ok(())
    }

    /// From a checked hop context to the context the callee's app holds: `callee` is appended
    /// and the depth becomes `path.len() - 1`, unchanged from the hop's.
    pub fn enter(mut self, callee: &str) -> Result<Self, ContextError> {
        check_agent(callee)?;
        if self.path.len() >= MAX_PATH {
            return Err(invalid(
                "path",
                format!("a run may pass through at most {MAX_PATH} agents"),
            ));
        }
        self.path.push(callee.to_owned());
        self.depth = depth_of(self.path.len().saturating_sub(1));
        Ok(self)
    }

    /// From the context an app holds to the hop context its sidecar sends to a callee: the same
    /// path, depth `path.len()`. Set `trace` to the hop's span before encoding.
    pub fn hop(mut self) -> Self {
        self.depth = depth_of(self.path.len());
        self.via = None;
        self
    }

    /// Checks every field except `depth`, whose meaning depends on the form (see
    /// [`check_hop`](Self::check_hop)).
    pub fn validate(&self) -> Result<(), ContextError> {
        check_run(&self.run)?;
        check_text("user", &self.user, true)?;
        if self.path.is_empty() {
            return Err(invalid(
                "path",
                "it is empty; a run has at least its root agent",
            ));
        }
        if self.path.len() > MAX_PATH {
            return Err(invalid(
                "path",
                format!("a run may pass through at most {MAX_PATH} agents"),
            ));
        }
        for agent in &self.path {
            check_agent(agent)?;
        }
        if self.taint.len() > MAX_TAINT {
            return Err(invalid(
                "taint",
                format!("a context carries at most {MAX_TAINT} taint sources"),
            ));
        }
        for source in &self.taint {
            check_text("taint", source, false)?;
        }
        if self.taint.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid("taint", "the sources are not sorted and unique"));
        }
        if let Some(via) = &self.via
            && (via.len() != 16 || !via.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        {
            return Err(invalid(
                "via",
                "expected a span id, 16 lowercase hex digits",
            ));
        }
        Ok(())
    }

    /// The hop form, `v1.<base64url(payload)>`. Fails when the context is invalid or would be
    /// over [`MAX_HEADER_LEN`], so a sidecar never sends what its peer would refuse.
    pub fn encode(&self) -> Result<String, ContextError> {
        self.validate()?;
        let payload = self.payload()?;
        let len = PREFIX.len() + base64::encoded_len(payload.len(), false).unwrap_or(usize::MAX);
        if len > MAX_HEADER_LEN {
            return Err(ContextError::TooLarge {
                len,
                max: MAX_HEADER_LEN,
            });
        }
        let mut out = String::with_capacity(len);
        out.push_str(PREFIX);
        URL_SAFE_NO_PAD.encode_string(&payload, &mut out);
        Ok(out)
    }

    fn payload(&self) -> Result<Vec<u8>, ContextError> {
        let mut payload = Vec::with_capacity(256);
        serde_json::to_writer(&mut payload, self)
            .map_err(|e| ContextError::Malformed(format!("it cannot be written: {e}")))?;
        Ok(payload)
    }
}

/// Reads a hop-form header. The result is validated but not yet checked against the caller: use
/// [`RunContext::check_hop`], or [`accept_hop`].
pub fn decode(value: &str) -> Result<RunContext, ContextError> {
    let body = strip_version(value)?;
    decode_payload(body)
}

/// The callee sidecar's whole inbound step: read the hop header sent by the authenticated
/// `caller`, check it, and append `callee`, giving the context to seal for the callee's app.
pub fn accept_hop(value: &str, caller: &str, callee: &str) -> Result<RunContext, ContextError> {
    let ctx = decode(value)?;
    ctx.check_hop(caller)?;
    ctx.enter(callee)
}

/// Seals contexts for one agent's app and opens them when the app sends them back.
///
/// The MAC is HMAC-SHA256 over `v1.<base64url(payload)>` under a key derived for the agent from
/// the sidecar's own random key: `HMAC-SHA256(key, "ringfence-context/v1 agent=" + agent)`. A
/// context sealed by another sidecar (another key) or for another agent therefore fails, and the
/// MAC is verified over the header's bytes as they arrived, without copying them.
pub struct Sealer {
    agent: String,
    key: hmac::Key,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for `agent` (its SPIFFE ID or name) with a fresh random key that lives only in
    /// this process.
    pub fn new(agent: &str) -> Result<Self, ContextError> {
        use ring::rand::{SecureRandom, SystemRandom};
        let mut key = [0u8; 32];
        SystemRandom::new()
            .fill(&mut key)
            .map_err(|_| ContextError::Random)?;
        Ok(Self::with_key(agent, key))
    }

    /// A sealer with a given key, for tests.
    pub fn with_key(agent: &str, key: [u8; 32]) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, &key);
        let mut derive = hmac::Context::with_key(&root);
        derive.update(KEY_LABEL);
        derive.update(agent.as_bytes());
        let derived = derive.sign();
        Self {
            agent: agent.to_owned(),
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    /// The agent this sealer serves.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// The sealed form of a context an app holds (depth `path.len() - 1`).
    pub fn seal(&self, ctx: &RunContext) -> Result<String, ContextError> {
        check_held_depth(ctx)?;
        let mut out = ctx.encode()?;
        let len = out.len() + 1 + MAC_B64_LEN;
        if len > MAX_HEADER_LEN {
            return Err(ContextError::TooLarge {
                len,
                max: MAX_HEADER_LEN,
            });
        }
        let tag = hmac::sign(&self.key, out.as_bytes());
        out.reserve_exact(1 + MAC_B64_LEN);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(tag.as_ref(), &mut out);
        Ok(out)
    }

    /// Opens a sealed header from this sidecar's app: the seal is verified before the payload
    /// is read.
    pub fn open(&self, value: &str) -> Result<RunContext, ContextError> {
        // Checks the size and the version; the seal covers the version too.
        strip_version(value)?;
        let Some((signed, mac)) = value.rsplit_once('.') else {
            return Err(ContextError::BadSeal);
        };
        let Some(body) = signed.strip_prefix(PREFIX) else {
            // Only one '.': a hop-form context, which an app never receives.
            return Err(ContextError::Malformed(
                "it carries no seal, so it was not handed over by this agent's sidecar".into(),
            ));
        };
        if mac.len() != MAC_B64_LEN {
            return Err(ContextError::BadSeal);
        }
        let mut tag = [0u8; MAC_LEN + 3];
        match URL_SAFE_NO_PAD.decode_slice(mac, &mut tag) {
            Ok(MAC_LEN) => {}
            _ => return Err(ContextError::BadSeal),
        }
        hmac::verify(&self.key, signed.as_bytes(), &tag[..MAC_LEN])
            .map_err(|_| ContextError::BadSeal)?;
        let ctx = decode_payload(body)?;
        check_held_depth(&ctx)?;
        Ok(ctx)
    }
}

/// Checks the size, then strips `v1.`, telling an unknown version from garbage.
fn strip_version(value: &str) -> Result<&str, ContextError> {
    if value.len() > MAX_HEADER_LEN {
        return Err(ContextError::TooLarge {
            len: value.len(),
            max: MAX_HEADER_LEN,
        });
    }
    if let Some(body) = value.strip_prefix(PREFIX) {
        return Ok(body);
    }
    let version = value.split('.').next().unwrap_or_default();
    let looks_versioned = version.len() <= 6
        && version.len() >= 2
        && version.starts_with('v')
        && version.bytes().skip(1).all(|b| b.is_ascii_digit())
        && value.len() > version.len();
    if looks_versioned {
        Err(ContextError::Version {
            found: version.to_owned(),
        })
    } else {
        Err(ContextError::Malformed("it does not start with v1.".into()))
    }
}

fn decode_payload(body: &str) -> Result<RunContext, ContextError> {
    let json = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| ContextError::Malformed("its payload is not unpadded base64url".into()))?;
    let ctx: RunContext = serde_json::from_slice(&json)
        .map_err(|e| ContextError::Malformed(format!("its payload is not a context: {e}")))?;
    ctx.validate()?;
    Ok(ctx)
}

/// A context held by an app has its own agent last, at depth `path.len() - 1`.
fn check_held_depth(ctx: &RunContext) -> Result<(), ContextError> {
    if usize::try_from(ctx.depth).ok().map(|d| d + 1) != Some(ctx.path.len()) {
        return Err(ContextError::DepthMismatch {
            depth: ctx.depth,
            path_len: ctx.path.len(),
        });
    }
    Ok(())
}

fn depth_of(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// A run id is a ULID in its canonical form (uppercase Crockford base32, 26 characters).
fn check_run(run: &str) -> Result<(), ContextError> {
    let bad = || {
        invalid(
            "run",
            "it is not a ULID (26 characters of uppercase Crockford base32)",
        )
    };
    if run.len() != ulid::ULID_LEN {
        return Err(bad());
    }
    let parsed = Ulid::from_string(run).map_err(|_| bad())?;
    let mut canonical = [0u8; ulid::ULID_LEN];
    if parsed.array_to_str(&mut canonical) != run {
        return Err(bad());
    }
    Ok(())
}

/// An agent name is a DNS label: 1 to 63 of `a-z`, `0-9` and `-`, not starting or ending with
/// `-`.
fn check_agent(name: &str) -> Result<(), ContextError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_AGENT_LEN
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first() != Some(&b'-')
        && b.last() != Some(&b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "path",
            format!(
                "agent name {:?} is not a DNS label (1-63 of a-z, 0-9 and '-', not starting or ending with '-')",
                truncated(name)
            ),
        ))
    }
}

/// `user` and taint sources: printable text of at most 256 bytes.
fn check_text(field: &'static str, text: &str, may_be_empty: bool) -> Result<(), ContextError> {
    if text.is_empty() && !may_be_empty {
        return Err(invalid(field, "it is empty"));
    }
    if text.len() > MAX_TEXT_LEN {
        return Err(invalid(
            field,
            format!(
                "it is {} bytes, over the limit of {MAX_TEXT_LEN}",
                text.len()
            ),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid(field, "it contains control characters"));
    }
    Ok(())
}

/// At most 64 characters of untrusted text, for an error message.
fn truncated(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [7; 32];

    fn held(path: &[&str]) -> RunContext {
        let mut ctx =
            RunContext::start(path[0], "user:tomas", Some(1_700_000_000_000), None).unwrap();
        for agent in &path[1..] {
            ctx = ctx.hop().enter(agent).unwrap();
        }
        ctx
    }

    fn flip(token: &str, at: usize, to: u8) -> Vec<u8> {
        let mut bytes = token.as_bytes().to_vec();
        bytes[at] = to;
        bytes
    }

    #[test]
    fn a_run_starts_at_its_root_with_depth_0() {
        let trace = TraceParent::new_root();
        let ctx = RunContext::start("orchestrator", "user:tomas", None, Some(trace)).unwrap();
        assert_eq!(ctx.run.len(), 26);
        assert_eq!(ctx.path, ["orchestrator"]);
        assert_eq!(ctx.depth, 0);
        assert_eq!(ctx.trace, Some(trace));
        assert!(!ctx.tainted());
        assert!(RunContext::start("Orchestrator", "", None, None).is_err());
        assert!(RunContext::start("orchestrator", "user:\n", None, None).is_err());
    }

    #[test]
    fn the_hop_form_round_trips() {
        let mut ctx = held(&["orchestrator", "research"]).hop();
        ctx.add_taint("tool:search/web_search").unwrap();
        ctx.trace = Some(TraceParent::new_root());
        let header = ctx.encode().unwrap();
        assert!(header.starts_with("v1.") && !header[3..].contains('.'));
        assert_eq!(decode(&header).unwrap(), ctx);
    }

    #[test]
    fn the_sealed_form_round_trips() {
        let sealer = Sealer::with_key("research", KEY);
        let ctx = held(&["orchestrator", "research"]);
        let token = sealer.seal(&ctx).unwrap();
        assert_eq!(token.split('.').count(), 3);
        assert_eq!(sealer.open(&token).unwrap(), ctx);
    }

    #[test]
    fn a_hop_is_checked_then_entered() {
        // orchestrator's sidecar sends the hop; research's sidecar accepts it from orchestrator.
        let app = held(&["orchestrator"]);
        let header = app.clone().hop().encode().unwrap();
        let research = accept_hop(&header, "orchestrator", "research").unwrap();
        assert_eq!(research.path, ["orchestrator", "research"]);
        assert_eq!(research.depth, 1);
        assert_eq!(research.run, app.run);
        assert_eq!(research.revisits_of("orchestrator"), 1);
        assert_eq!(research.revisits_of("billing"), 0);
    }

    #[test]
    fn a_hop_from_someone_other_than_the_last_agent_is_refused() {
        let header = held(&["orchestrator", "research"]).hop().encode().unwrap();
        assert_eq!(
            accept_hop(&header, "billing", "writer"),
            Err(ContextError::HopMismatch {
                expected_caller: "billing".into(),
                last_in_path: "research".into(),
            })
        );
    }

    #[test]
    fn a_hop_whose_depth_is_not_its_path_length_is_refused() {
        // An app-held context sent as if it were a hop: depth 1 with two agents on the path.
        let ctx = held(&["orchestrator", "research"]);
        let header = ctx.encode().unwrap();
        assert_eq!(
            accept_hop(&header, "research", "writer"),
            Err(ContextError::DepthMismatch {
                depth: 1,
                path_len: 2
            })
        );
        let mut reset = ctx.hop();
        reset.depth = 0;
        assert!(matches!(
            reset.check_hop("research"),
            Err(ContextError::DepthMismatch { .. })
        ));
    }

    #[test]
    fn a_context_replayed_from_elsewhere_is_refused() {
        // A sealed context from another sidecar (another key) for the same agent name.
        let ctx = held(&["orchestrator", "research"]);
        let elsewhere = Sealer::with_key("research", [9; 32]).seal(&ctx).unwrap();
        let here = Sealer::with_key("research", KEY);
        assert_eq!(here.open(&elsewhere), Err(ContextError::BadSeal));
        // A context sealed for another agent by a sidecar with the same key.
        let for_writer = Sealer::with_key("writer", KEY).seal(&ctx).unwrap();
        assert_eq!(here.open(&for_writer), Err(ContextError::BadSeal));
        // A hop captured between orchestrator and research, replayed by billing.
        let captured = held(&["orchestrator"]).hop().encode().unwrap();
        assert!(matches!(
            accept_hop(&captured, "billing", "research"),
            Err(ContextError::HopMismatch { .. })
        ));
        // A hop-form context handed to an app's sidecar as if sealed.
        assert!(matches!(
            here.open(&ctx.encode().unwrap()),
            Err(ContextError::Malformed(_))
        ));
    }

    #[test]
    fn an_app_cannot_reset_its_depth() {
        let sealer = Sealer::with_key("research", KEY);
        let token = sealer.seal(&held(&["orchestrator", "research"])).unwrap();
        let (signed, mac) = token.rsplit_once('.').unwrap();
        let mut forged = held(&["research"]);
        forged.run = decode(signed).unwrap().run;
        let forged = format!("{}.{mac}", forged.encode().unwrap());
        assert_eq!(sealer.open(&forged), Err(ContextError::BadSeal));
    }

    #[test]
    fn every_single_byte_change_of_a_sealed_token_is_refused() {
        let sealer = Sealer::with_key("research", KEY);
        let mut ctx = held(&["orchestrator", "research"]);
        ctx.add_taint("agent:external").unwrap();
        let token = sealer.seal(&ctx).unwrap();
        for at in 0..token.len() {
            for to in [b'A', b'a', b'0', b'-', b'_', b'.', b'z', 0x80] {
                if token.as_bytes()[at] == to {
                    continue;
                }
                let changed = flip(&token, at, to);
                if let Ok(s) = std::str::from_utf8(&changed) {
                    assert!(sealer.open(s).is_err(), "accepted a change at {at} to {to}");
                }
            }
        }
        assert!(sealer.open(&token[..token.len() - 1]).is_err());
        assert!(sealer.open(&format!("{token}A")).is_err());
    }

    #[test]
    fn oversized_headers_are_refused_before_decoding() {
        let big = format!("v1.{}", "A".repeat(MAX_HEADER_LEN));
        assert!(matches!(decode(&big), Err(ContextError::TooLarge { .. })));
        let sealer = Sealer::with_key("research", KEY);
        assert!(matches!(
            sealer.open(&big),
            Err(ContextError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_context_too_large_to_send_is_refused_when_encoding() {
        let mut ctx = held(&["orchestrator"]);
        for i in 0..MAX_TAINT {
            ctx.add_taint(&format!("tool:{i:03}/{}", "x".repeat(240)))
                .unwrap();
        }
        assert!(matches!(ctx.encode(), Err(ContextError::TooLarge { .. })));
        let sealer = Sealer::with_key("orchestrator", KEY);
        assert!(matches!(
            sealer.seal(&ctx),
            Err(ContextError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_fields_and_unsorted_taint_are_refused() {
        let ctx = held(&["orchestrator"]).hop();
        let mut json = serde_json::to_value(&ctx).unwrap();
        json["admin"] = true.into();
        let header = format!("v1.{}", URL_SAFE_NO_PAD.encode(json.to_string()));
        let err = decode(&header).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");

        let mut json = serde_json::to_value(&ctx).unwrap();
        json["taint"] = serde_json::json!(["tool:b", "tool:a"]);
        let header = format!("v1.{}", URL_SAFE_NO_PAD.encode(json.to_string()));
        assert!(matches!(
            decode(&header),
            Err(ContextError::Invalid { field: "taint", .. })
        ));
    }

    #[test]
    fn invalid_fields_are_named() {
        let base = held(&["orchestrator"]).hop();
        type Mutation = fn(&mut RunContext);
        let cases: [(&str, Mutation); 6] = [
            ("run", |c| c.run = "01arz3ndektsv4rrffq69g5fav".into()),
            ("run", |c| c.run = "not-a-ulid".into()),
            ("path", |c| c.path.clear()),
            ("path", |c| c.path.push("Research".into())),
            ("path", |c| c.path = vec!["a".into(); MAX_PATH + 1]),
            ("user", |c| c.user = "u".repeat(MAX_TEXT_LEN + 1)),
        ];
        for (field, mutate) in cases {
            let mut ctx = base.clone();
            mutate(&mut ctx);
            let json = serde_json::to_vec(&ctx).unwrap();
            let header = format!("v1.{}", URL_SAFE_NO_PAD.encode(json));
            match decode(&header) {
                Err(ContextError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected {field} to be invalid, got {other:?}"),
            }
            assert!(ctx.encode().is_err());
        }
    }

    #[test]
    fn an_unknown_version_is_named() {
        assert_eq!(
            decode("v2.eyJ9"),
            Err(ContextError::Version { found: "v2".into() })
        );
        assert!(matches!(decode("garbage"), Err(ContextError::Malformed(_))));
        assert!(matches!(decode(""), Err(ContextError::Malformed(_))));
        assert!(matches!(decode("v1."), Err(ContextError::Malformed(_))));
    }

    #[test]
    fn taint_is_kept_sorted_and_unique() {
        let mut ctx = held(&["orchestrator"]);
        ctx.add_taint("tool:search/web_search").unwrap();
        ctx.add_taint("agent:external").unwrap();
        ctx.add_taint("tool:search/web_search").unwrap();
        assert_eq!(ctx.taint, ["agent:external", "tool:search/web_search"]);
        assert!(ctx.tainted());
        assert!(ctx.add_taint("").is_err());
        for i in 2..MAX_TAINT {
            ctx.add_taint(&format!("tool:t{i:02}")).unwrap();
        }
        assert!(ctx.add_taint("tool:one-too-many").is_err());
        assert!(ctx.validate().is_ok());
    }

    #[test]
    fn a_path_cannot_grow_past_its_limit() {
        let mut ctx = held(&["a0"]);
        for i in 1..MAX_PATH {
            ctx = ctx.hop().enter(&format!("a{i}")).unwrap();
        }
        assert_eq!(ctx.depth as usize, MAX_PATH - 1);
        assert!(ctx.hop().enter("one-more").is_err());
    }

    #[test]
    fn the_key_does_not_show_in_debug_output() {
        let sealer = Sealer::new("research").unwrap();
        assert_eq!(sealer.agent(), "research");
        assert!(!format!("{sealer:?}").contains("key"));
    }

    fn arb_context() -> impl Strategy<Value = RunContext> {
        (
            any::<u128>(),
            "[ -~]{0,40}",
            prop::collection::vec("[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", 1..8),
            prop::collection::btree_set("[a-z]{1,8}:[ -~]{1,30}", 0..5),
            any::<Option<u64>>(),
            any::<bool>(),
        )
            .prop_map(|(id, user, path, taint, deadline_ms, traced)| RunContext {
                run: Ulid(id).to_string(),
                user,
                depth: (path.len() - 1) as u32,
                path,
                taint: taint.into_iter().collect(),
                deadline_ms,
                via: traced.then(|| TraceParent::new_root().parent_id_hex()),
                trace: traced.then(TraceParent::new_root),
            })
    }

    proptest! {
        #[test]
        fn any_context_round_trips_in_both_forms(ctx in arb_context()) {
            let sealer = Sealer::with_key("me", KEY);
            prop_assert_eq!(sealer.open(&sealer.seal(&ctx).unwrap()).unwrap(), ctx.clone());
            let hop = ctx.hop();
            prop_assert_eq!(decode(&hop.encode().unwrap()).unwrap(), hop);
        }

        #[test]
        fn any_single_byte_change_of_a_sealed_token_is_refused(
            ctx in arb_context(),
            at in any::<prop::sample::Index>(),
            to in any::<u8>(),
        ) {
            let sealer = Sealer::with_key("me", KEY);
            let token = sealer.seal(&ctx).unwrap();
            let at = at.index(token.len());
            prop_assume!(token.as_bytes()[at] != to);
            if let Ok(s) = std::str::from_utf8(&flip(&token, at, to)) {
                prop_assert!(sealer.open(s).is_err());
            }
        }

        #[test]
        fn garbage_never_panics(s in "\\PC{0,200}", tail in "[A-Za-z0-9_.-]{0,300}") {
            let sealer = Sealer::with_key("me", KEY);
            let _ = decode(&s);
            let _ = sealer.open(&s);
            let v1 = format!("v1.{tail}");
            let _ = decode(&v1);
            let _ = sealer.open(&v1);
        }
    }
}
