//! `--format json`: the run, its agents, its edges and its call tree. The shape is stable: keys
//! are only ever added (a test pins them).

use serde::Serialize;

use super::{Node, tree};
use crate::budget::{AgentSpend, EdgeAggregate, EdgeEvent, RunDetail, RunSummary};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RunJson<'a> {
    #[serde(flatten)]
    summary: &'a RunSummary,
    agents: &'a [AgentSpend],
    edges: &'a [EdgeAggregate],
    tree: Vec<NodeJson<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeJson<'a> {
    #[serde(flatten)]
    call: &'a EdgeEvent,
    children: Vec<NodeJson<'a>>,
}

fn node<'a>(n: &Node<'a>) -> NodeJson<'a> {
    NodeJson {
        call: n.call,
        children: n.children.iter().map(node).collect(),
    }
}

/// The run as pretty-printed JSON.
pub fn show(detail: &RunDetail) -> String {
    let doc = RunJson {
        summary: &detail.summary,
        agents: &detail.agents,
        edges: &detail.edges,
        tree: tree(detail).iter().map(node).collect(),
    };
    // Serializing plain data to a String cannot fail.
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}
