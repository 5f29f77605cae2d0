//! `ringfence runs show RUN`: the run's header, its call tree, cost per agent and its edges, as
//! text for a terminal.

use std::fmt::Write;

use super::{Node, tree, usd};
use crate::budget::quota::QuotaStatus;
use crate::budget::{Decision, EdgeEvent, RunDetail, RunStatus, RunSummary};

/// Most lines of the tree drawn; the rest is counted (the JSON form has every call).
pub const MAX_TREE_LINES: usize = 200;

/// The whole report.
pub fn show(detail: &RunDetail) -> String {
    let mut out = String::new();
    header(&mut out, &detail.summary);
    out.push('\n');
    let roots = tree(detail);
    let _ = writeln!(out, "{}", detail.summary.run.root_agent);
    let mut lines = 0usize;
    let mut hidden = 0usize;
    draw(&mut out, &roots, "", &mut lines, &mut hidden);
    if hidden > 0 {
        let _ = writeln!(
            out,
            "… {hidden} more calls not drawn (ringfence runs show {} --format json has them all)",
            detail.summary.run.run_id
        );
    }
    if let Some(reason) = &detail.summary.run.halt_reason {
        let _ = writeln!(out, "⛔ halted: {reason}");
    }

    out.push_str("\nCost per agent\n");
    let mut rows = vec![[
        "agent".to_owned(),
        "tokens".to_owned(),
        "cost".to_owned(),
        "model calls".to_owned(),
    ]];
    for a in &detail.agents {
        rows.push([
            a.agent.clone(),
            a.spent.tokens().to_string(),
            usd(a.spent.micros),
            a.spent.calls.to_string(),
        ]);
    }
    table(&mut out, &rows);

    out.push_str("\nEdges\n");
    let mut rows = vec![[
        "edge".to_owned(),
        "calls".to_owned(),
        "denied".to_owned(),
        "notes".to_owned(),
    ]];
    for e in &detail.edges {
        let denied: u64 = e.denials.values().sum();
        let mut notes: Vec<String> = e
            .denials
            .iter()
            .map(|(k, n)| match &k.rule {
                Some(rule) => format!("{n}× {} by {rule}", k.reason),
                None => format!("{n}× {}", k.reason),
            })
            .collect();
        if e.cycles > 0 {
            notes.push(format!("↺ cycle ×{}", e.cycles));
        }
        if e.micros > 0 || e.tokens > 0 {
            notes.push(format!("{} tokens {}", e.tokens, usd(e.micros)));
        }
        rows.push([
            format!("{} → {}", e.caller, e.callee),
            e.calls.to_string(),
            denied.to_string(),
            notes.join("; "),
        ]);
    }
    table(&mut out, &rows);
    out
}

fn header(out: &mut String, s: &RunSummary) {
    let r = &s.run;
    let status = match r.status {
        RunStatus::Running => "running".to_owned(),
        RunStatus::Completed => "completed".to_owned(),
        RunStatus::Halted => match &r.halt_reason {
            Some(reason) => format!("halted ({reason})"),
            None => "halted".to_owned(),
        },
    };
    let user = if r.user.is_empty() { "-" } else { &r.user };
    let _ = writeln!(
        out,
        "run {} · {status} · started by {} for {user}",
        r.run_id, r.root_agent
    );
    let mut limits = Vec::new();
    if let Some(t) = r.limits.max_tokens {
        limits.push(format!("maxTotalTokens {t}"));
    }
    if let Some(m) = r.limits.max_cost_micros {
        limits.push(format!("maxCostUsd {}", usd(m)));
    }
    let _ = writeln!(
        out,
        "spent {} tokens, {} over {} model calls{}",
        s.spent.tokens(),
        usd(s.spent.micros),
        s.spent.calls,
        if limits.is_empty() {
            String::new()
        } else {
            format!(" (limits: {})", limits.join(", "))
        }
    );
}

fn draw(out: &mut String, nodes: &[Node<'_>], prefix: &str, lines: &mut usize, hidden: &mut usize) {
    for (i, node) in nodes.iter().enumerate() {
        if *lines >= MAX_TREE_LINES {
            *hidden += count(node);
            continue;
        }
        let last = i + 1 == nodes.len();
        let _ = writeln!(
            out,
            "{prefix}{}{}",
            if last { "└─ " } else { "├─ " },
            line(node.call)
        );
        *lines += 1;
        let deeper = format!("{prefix}{}", if last { "   " } else { "│  " });
        draw(out, &node.children, &deeper, lines, hidden);
    }
}

fn count(node: &Node<'_>) -> usize {
    1 + node.children.iter().map(count).sum::<usize>()
}

/// One call: `✗ orchestrator  SendMessage  denied (policy) by default/no-loops/deny[0]  ↺ cycle`.
pub fn line(c: &EdgeEvent) -> String {
    let mut parts = Vec::new();
    let denied = match &c.decision {
        Decision::Allowed => None,
        Decision::Denied(reason) => Some(reason),
    };
    parts.push(format!(
        "{}{}",
        if denied.is_some() { "✗ " } else { "" },
        c.callee
    ));
    if let Some(op) = &c.operation {
        parts.push(op.clone());
    }
    match denied {
        Some(reason) => parts.push(match &c.rule {
            Some(rule) => format!("denied ({reason}) by {rule}"),
            None => format!("denied ({reason})"),
        }),
        None => parts.push(format!("{:.1} ms", c.latency_us as f64 / 1000.0)),
    }
    if c.tokens() > 0 || c.micros > 0 {
        parts.push(format!("{} tokens {}", c.tokens(), usd(c.micros)));
    }
    if c.cycle {
        parts.push("↺ cycle".to_owned());
    }
    if c.tainted {
        parts.push("⚠ tainted".to_owned());
    }
    parts.join("  ")
}

/// Runs as a table: `ringfence runs list`.
pub fn list(runs: &[RunSummary]) -> String {
    let mut rows = vec![[
        "run".to_owned(),
        "status".to_owned(),
        "root".to_owned(),
        "user".to_owned(),
        "tokens".to_owned(),
        "cost".to_owned(),
    ]];
    for s in runs {
        rows.push([
            s.run.run_id.clone(),
            s.run.status.as_str().to_owned(),
            s.run.root_agent.clone(),
            s.run.user.clone(),
            s.spent.tokens().to_string(),
            usd(s.spent.micros),
        ]);
    }
    let mut out = String::new();
    table(&mut out, &rows);
    out
}

/// `ringfence runs quotas`: each windowed quota counter, its window's spend against its limits.
pub fn quotas(quotas: &[QuotaStatus]) -> String {
    let mut rows = vec![[
        "quota".to_owned(),
        "key".to_owned(),
        "window".to_owned(),
        "since".to_owned(),
        "tokens".to_owned(),
        "cost".to_owned(),
        "state".to_owned(),
    ]];
    let of = |spent: String, max: Option<String>| match max {
        Some(max) => format!("{spent} / {max}"),
        None => spent,
    };
    for q in quotas {
        rows.push([
            q.counter.id.clone(),
            q.counter.key.clone(),
            q.counter.window.clone(),
            crate::budget::quota::rfc3339(q.window_start_ms),
            of(q.tokens.to_string(), q.max_tokens.map(|m| m.to_string())),
            of(usd(q.micros), q.max_micros.map(usd)),
            if q.exhausted { "spent" } else { "ok" }.to_owned(),
        ]);
    }
    let mut out = String::new();
    if quotas.is_empty() {
        out.push_str("  no quota has been leased under yet\n");
        return out;
    }
    table(&mut out, &rows);
    out
}

fn table<const N: usize>(out: &mut String, rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::from("  ");
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            line.push_str(cell);
            if i + 1 < N {
                line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}
