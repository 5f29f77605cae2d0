//! SPIFFE identities of agents.
//!
//! An agent's identity is `spiffe://<trust-domain>/ns/<namespace>/agent/<name>`. Parsing is
//! strict: one canonical spelling per identity, so two strings name the same agent exactly when
//! they are equal, and `parse(display(id)) == id` always holds.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid identity, with what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("{0:?} is not a SPIFFE ID: it must start with \"spiffe://\"")]
    Scheme(String),
    #[error("trust domain {0:?} is invalid: use 1-255 lowercase letters, digits, '.', '-' or '_'")]
    TrustDomain(String),
    #[error(
        "{0:?} is not an agent identity: the path must be /ns/<namespace>/agent/<name> with nothing after it"
    )]
    Path(String),
    #[error(
        "{what} {value:?} is invalid: use 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit (a Kubernetes DNS label)"
    )]
    Name { what: &'static str, value: String },
    #[error("{0:?} is not an agent reference: write <name> or <namespace>/<name>")]
    AgentRef(String),
}

/// A SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(s: &str) -> Result<Self, SpiffeError> {
        let ok = !s.is_empty()
            && s.len() <= 255
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(SpiffeError::TrustDomain(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        Self("cluster.local".to_owned())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Checks a Kubernetes DNS-1123 label (namespaces and agent names).
pub fn validate_dns_label(what: &'static str, value: &str) -> Result<(), SpiffeError> {
    let b = value.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::Name {
            what,
            value: value.to_owned(),
        })
    }
}

/// An agent, named by namespace and name: the key everything in the control plane is indexed by.
/// Written `<namespace>/<name>`; [`AgentKey::parse_in`] also takes a bare `<name>` relative to a
/// namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct AgentKey {
    pub namespace: String,
    pub name: String,
}

impl AgentKey {
    pub fn new(namespace: &str, name: &str) -> Result<Self, SpiffeError> {
        validate_dns_label("namespace", namespace)?;
        validate_dns_label("agent name", name)?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Parses `<name>` (in `namespace`) or `<namespace>/<name>`.
    pub fn parse_in(namespace: &str, s: &str) -> Result<Self, SpiffeError> {
        match s.split_once('/') {
            None => Self::new(namespace, s),
            Some((ns, name)) if !name.contains('/') => Self::new(ns, name),
            Some(_) => Err(SpiffeError::AgentRef(s.to_owned())),
        }
    }
}

impl<'de> Deserialize<'de> for AgentKey {
    /// Validates like [`AgentKey::new`]: a key from the network never names a path.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            namespace: String,
            name: String,
        }
        let raw = Raw::deserialize(d)?;
        Self::new(&raw.namespace, &raw.name).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for AgentKey {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !name.contains('/') => Self::new(ns, name),
            _ => Err(SpiffeError::AgentRef(s.to_owned())),
        }
    }
}

/// The SPIFFE ID of an agent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    agent: AgentKey,
}

impl SpiffeId {
    pub fn new(trust_domain: TrustDomain, agent: AgentKey) -> Self {
        Self {
            trust_domain,
            agent,
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn agent(&self) -> &AgentKey {
        &self.agent
    }

    pub fn namespace(&self) -> &str {
        &self.agent.namespace
    }

    pub fn name(&self) -> &str {
        &self.agent.name
    }

    pub fn parse(s: &str) -> Result<Self, SpiffeError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::Scheme(s.to_owned()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeError::Path(s.to_owned()))?;
        let trust_domain = TrustDomain::new(td)?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("agent"), Some(name), None) => Ok(Self {
                trust_domain,
                agent: AgentKey::new(ns, name)?,
            }),
            _ => Err(SpiffeError::Path(s.to_owned())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/agent/{}",
            self.trust_domain, self.agent.namespace, self.agent.name
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for SpiffeId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SpiffeId".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "string", "pattern": "^spiffe://" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_canonical_form() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/agent/research").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.name(), "research");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/agent/research"
        );
    }

    #[test]
    fn refuses_every_other_spelling() {
        for bad in [
            "",
            "http://cluster.local/ns/default/agent/a",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://Cluster.local/ns/default/agent/a",
            "spiffe://cluster.local/ns/default/agent/a/",
            "spiffe://cluster.local/ns/default/agent/a/b",
            "spiffe://cluster.local/ns/default/sa/a",
            "spiffe://cluster.local/ns//agent/a",
            "spiffe://cluster.local/ns/default/agent/A",
            "spiffe://cluster.local/ns/default/agent/-a",
            "spiffe://cluster.local/ns/default/agent/a?x=1",
            "spiffe://cluster.local:8080/ns/default/agent/a",
            "spiffe://user@cluster.local/ns/default/agent/a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn an_agent_key_from_json_is_validated() {
        let ok: AgentKey =
            serde_json::from_str(r#"{"namespace":"default","name":"research"}"#).unwrap();
        assert_eq!(ok.to_string(), "default/research");
        assert!(
            serde_json::from_str::<AgentKey>(r#"{"namespace":"..","name":"research"}"#).is_err()
        );
        assert!(
            serde_json::from_str::<AgentKey>(r#"{"namespace":"default","name":"a/../../b"}"#)
                .is_err()
        );
    }

    #[test]
    fn agent_refs_resolve_relative_to_a_namespace() {
        let k = AgentKey::parse_in("team-a", "writer").unwrap();
        assert_eq!(k.to_string(), "team-a/writer");
        let k = AgentKey::parse_in("team-a", "team-b/writer").unwrap();
        assert_eq!(k.namespace, "team-b");
        assert!(AgentKey::parse_in("team-a", "a/b/c").is_err());
        assert!("writer".parse::<AgentKey>().is_err());
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(
            td in "[a-z0-9][a-z0-9._-]{0,30}",
            ns in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
            name in "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
        ) {
            let id = SpiffeId::new(TrustDomain::new(&td).unwrap(), AgentKey::new(&ns, &name).unwrap());
            let back = SpiffeId::parse(&id.to_string()).unwrap();
            prop_assert_eq!(back, id);
        }

        #[test]
        fn parse_never_panics_and_accepts_only_canonical_text(s in "\\PC{0,80}") {
            if let Ok(id) = SpiffeId::parse(&s) {
                prop_assert_eq!(id.to_string(), s);
            }
        }
    }
}
