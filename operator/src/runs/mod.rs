//! What `ringfence runs show` draws from the run ledger: the run's calls as a tree (each call
//! under the call that brought the run to its caller), with the cost per agent, refusals with
//! their rule, and marks where a cycle formed or a limit tripped. Pure functions over a
//! [`RunDetail`]; [`text`], [`json`], [`dot`] and [`jaeger`] are its four forms.

use std::collections::HashMap;

use crate::budget::{EdgeEvent, RunDetail};

pub mod dot;
pub mod jaeger;
pub mod json;
pub mod text;

/// One call and the calls made below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node<'a> {
    pub call: &'a EdgeEvent,
    pub children: Vec<Node<'a>>,
}

/// The run's calls as a forest under its root agent: each call hangs under the call whose
/// span brought the run to its caller; calls of the root agent, and calls whose parent the
/// ledger does not hold, are at the top. Siblings keep the order they started in.
pub fn tree(detail: &RunDetail) -> Vec<Node<'_>> {
    let by_span: HashMap<&str, usize> = detail
        .calls
        .iter()
        .enumerate()
        .map(|(i, c)| (c.span_id.as_str(), i))
        .collect();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); detail.calls.len()];
    let mut roots = Vec::new();
    for (i, call) in detail.calls.iter().enumerate() {
        match call
            .parent_call
            .as_deref()
            .and_then(|p| by_span.get(p))
            .filter(|&&p| p != i)
        {
            Some(&p) => children[p].push(i),
            None => roots.push(i),
        }
    }
    fn build<'a>(
        i: usize,
        calls: &'a [EdgeEvent],
        children: &[Vec<usize>],
        depth: usize,
    ) -> Node<'a> {
        // A malformed ledger cannot make the walk loop: a run is at most 64 agents deep.
        let kids = if depth > 128 {
            Vec::new()
        } else {
            children[i]
                .iter()
                .map(|&c| build(c, calls, children, depth + 1))
                .collect()
        };
        Node {
            call: &calls[i],
            children: kids,
        }
    }
    roots
        .into_iter()
        .map(|i| build(i, &detail.calls, &children, 0))
        .collect()
}

/// Dollars from micro-dollars, for people: `$0.0123`.
pub fn usd(micros: u64) -> String {
    let dollars = micros / 1_000_000;
    let rest = micros % 1_000_000;
    if rest == 0 {
        format!("${dollars}.00")
    } else {
        let frac = format!("{rest:06}");
        format!("${dollars}.{}", frac.trim_end_matches('0'))
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
