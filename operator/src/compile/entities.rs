//! Cedar entities: agents of a namespace and the tools policies describe.

use ringfence_crds::Agent;
use ringfence_crds::bundle::ToolAttrs;
use serde_json::{Value, json};

/// Cedar's JSON entity format for `agents` and the tool-level `tools`.
pub fn to_json(namespace: &str, agents: &[&Agent], tools: &[ToolAttrs]) -> Value {
    let mut out = Vec::with_capacity(agents.len() + tools.len());
    for a in agents {
        out.push(json!({
            "uid": { "type": "Agent", "id": a.metadata.name.as_deref().unwrap_or_default() },
            "attrs": {
                "namespace": namespace,
                "team": a.spec.team.as_deref().unwrap_or_default(),
                "environment": a.spec.environment.as_deref().unwrap_or_default(),
                "trust": a.spec.trust.as_str(),
            },
            "parents": [],
        }));
    }
    for t in tools {
        let Some(tool) = &t.tool else { continue };
        out.push(json!({
            "uid": { "type": "Tool", "id": format!("{}/{}", t.server, tool) },
            "attrs": {
                "server": t.server,
                "name": tool,
                "untrusted": t.untrusted,
                "sensitivity": t.sensitivity.as_str(),
            },
            "parents": [],
        }));
    }
    Value::Array(out)
}
