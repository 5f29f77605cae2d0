//! `ringfence check DIR`: validate a folder of manifests offline, the way the control plane
//! would, and exit non-zero when anything would be refused.

use std::path::Path;

use ringfence_crds::TrustDomain;

use crate::compile::{self, LastGood, Placement, Settings};
use crate::source::folder::Folder;

/// The outcome, printable and testable.
#[derive(Debug)]
pub struct Report {
    pub lines: Vec<String>,
    pub ok: bool,
}

pub fn check(dir: &Path, trust_domain: &TrustDomain) -> Report {
    let loaded = Folder::new(dir).load();
    let settings = Settings {
        trust_domain: trust_domain.clone(),
        placement: Placement::Local,
    };
    let compiled = compile::compile(&loaded.manifests, &settings, &LastGood::default());
    let mut lines: Vec<String> = loaded
        .problems
        .iter()
        .map(|p| format!("error: {p}"))
        .collect();
    lines.extend(compiled.diagnostics.iter().map(ToString::to_string));
    let ok = loaded.problems.is_empty() && compiled.errors().next().is_none();
    let m = &loaded.manifests;
    let policies: usize = compiled.accepted.values().sum();
    lines.push(format!(
        "{}: {} agents, {} agent policies ({} Cedar policies accepted), {} run budgets: {}",
        dir.display(),
        m.agents.len(),
        m.policies.len(),
        policies,
        m.budgets.len(),
        if ok { "OK" } else { "errors found" }
    ));
    Report { lines, ok }
}
