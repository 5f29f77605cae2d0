//! `--format dot`: the run's edges as a Graphviz graph (`| dot -Tsvg > run.svg`). Refused calls
//! are red and name their rule; an edge where a cycle formed is bold.

use std::fmt::Write;

use super::usd;
use crate::budget::RunDetail;

pub fn show(detail: &RunDetail) -> String {
    let r = &detail.summary.run;
    let mut out = String::new();
    let _ = writeln!(out, "digraph run {{");
    let _ = writeln!(
        out,
        "  label={};",
        quote(&format!("run {} ({})", r.run_id, r.status.as_str()))
    );
    let _ = writeln!(
        out,
        "  rankdir=LR;\n  node [shape=box, fontname=\"Helvetica\"];"
    );
    let _ = writeln!(out, "  {} [style=bold];", quote(&r.root_agent));
    for e in &detail.edges {
        let denied: u64 = e.denials.values().sum();
        let mut label = vec![format!("{} calls", e.calls)];
        if e.micros > 0 || e.tokens > 0 {
            label.push(format!("{} tokens {}", e.tokens, usd(e.micros)));
        }
        for (k, n) in &e.denials {
            label.push(match &k.rule {
                Some(rule) => format!("✗ {n} {} ({rule})", k.reason),
                None => format!("✗ {n} {}", k.reason),
            });
        }
        if e.cycles > 0 {
            label.push(format!("↺ cycle ×{}", e.cycles));
        }
        let mut attrs = vec![format!("label={}", quote(&label.join("\n")))];
        if denied > 0 {
            attrs.push("color=red".to_owned());
            attrs.push("fontcolor=red".to_owned());
        }
        if denied == e.calls && e.calls > 0 {
            attrs.push("style=dashed".to_owned());
        }
        if e.cycles > 0 {
            attrs.push("penwidth=2.5".to_owned());
        }
        let _ = writeln!(
            out,
            "  {} -> {} [{}];",
            quote(&e.caller),
            quote(&e.callee),
            attrs.join(", ")
        );
    }
    out.push_str("}\n");
    out
}

/// A DOT string literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
