//! Taint of run branches (prompt-injection containment).
//!
//! A branch is one agent's part of a run: the run id and the path that reached the agent. When
//! untrusted content reaches a branch — the answer of a tool marked untrusted, of an untrusted
//! agent, or of a callee whose own branch was tainted — the branch is marked with the source.
//! The app keeps forwarding the context it was handed, which cannot know this, so the sidecar
//! remembers: every later call of that branch carries the taint to its callee, where Cedar sees
//! `context.tainted`, and the answer carries it back to the caller's sidecar.
//!
//! Memory is bounded: the oldest branches are forgotten first (their runs are long over).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

/// Header on a response between sidecars: the callee branch's taint, comma-separated.
pub const TAINT_HEADER: &str = "ringfence-taint";

/// How many branches are remembered.
pub const DEFAULT_CAPACITY: usize = 16_384;

type Branch = (String, Vec<String>);

/// Branch → taint sources.
pub struct TaintTable {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Branch, BTreeSet<String>>,
    order: VecDeque<Branch>,
}

impl Default for TaintTable {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl TaintTable {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Marks the branch `(run, path)` with `sources`.
    pub fn add<'a>(&self, run: &str, path: &[String], sources: impl IntoIterator<Item = &'a str>) {
        let mut sources = sources.into_iter().filter(|s| !s.is_empty()).peekable();
        if sources.peek().is_none() {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (run.to_owned(), path.to_vec());
        if !inner.map.contains_key(&key) {
            if inner.order.len() >= self.capacity
                && let Some(old) = inner.order.pop_front()
            {
                inner.map.remove(&old);
            }
            inner.order.push_back(key.clone());
        }
        let set = inner.map.entry(key).or_default();
        for s in sources {
            if set.len() < 32 {
                set.insert(s.to_owned());
            }
        }
    }

    /// The branch's taint merged into `taint` (kept sorted and without duplicates).
    pub fn merge_into(&self, run: &str, path: &[String], taint: &mut Vec<String>) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        // Borrowed lookup would need a custom key type; branches are short.
        if let Some(set) = inner.map.get(&(run.to_owned(), path.to_vec())) {
            for s in set {
                if !taint.contains(s) {
                    taint.push(s.clone());
                }
            }
            taint.sort();
        }
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Parses a [`TAINT_HEADER`] value.
pub fn parse_header(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 256)
        .take(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_branch_keeps_its_taint_and_other_branches_stay_clean() {
        let t = TaintTable::default();
        t.add(
            "run1",
            &path(&["orchestrator", "research"]),
            ["tool:search/web_search"],
        );
        let mut taint = vec![];
        t.merge_into("run1", &path(&["orchestrator", "research"]), &mut taint);
        assert_eq!(taint, vec!["tool:search/web_search".to_owned()]);
        let mut other = vec![];
        t.merge_into("run1", &path(&["orchestrator", "writer"]), &mut other);
        assert!(other.is_empty());
        t.merge_into("run2", &path(&["orchestrator", "research"]), &mut other);
        assert!(other.is_empty());
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_branch_goes_first() {
        let t = TaintTable::with_capacity(2);
        for run in ["a", "b", "c"] {
            t.add(run, &path(&["x"]), ["s"]);
        }
        assert_eq!(t.len(), 2);
        let mut taint = vec![];
        t.merge_into("a", &path(&["x"]), &mut taint);
        assert!(taint.is_empty());
    }

    #[test]
    fn the_header_is_read_defensively() {
        let v: Vec<&str> = parse_header(" tool:a , ,agent:b,").collect();
        assert_eq!(v, vec!["tool:a", "agent:b"]);
        let long = "x".repeat(300);
        assert_eq!(parse_header(&long).count(), 0);
    }
}
