//! What the demo prints: a line per step while it runs, then for each act what happened in
//! plain words. The wording is pure functions over plain data, tested here.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::agents::Refusal;
use super::scenario::{Act, Expect};

/// Where progress lines go: standard output as they happen (or a buffer, in tests).
#[derive(Clone, Default)]
pub struct Progress {
    captured: Option<Arc<Mutex<String>>>,
}

impl Progress {
    pub fn stdout() -> Self {
        Self { captured: None }
    }

    /// Progress kept in memory, for tests.
    pub fn captured() -> (Self, Arc<Mutex<String>>) {
        let buf = Arc::new(Mutex::new(String::new()));
        (
            Self {
                captured: Some(buf.clone()),
            },
            buf,
        )
    }

    /// A line as it is.
    pub fn line(&self, text: &str) {
        match &self.captured {
            Some(buf) => {
                let mut b = buf
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                b.push_str(text);
                b.push('\n');
            }
            // A closed pipe (`ringfence demo | head`) must not stop the demo half-way.
            None => {
                use std::io::Write as _;
                let _ = writeln!(std::io::stdout().lock(), "{text}");
            }
        }
    }

    /// One step of an act, indented under it.
    pub fn step(&self, text: &str) {
        self.line(&format!("  · {text}"));
    }
}

/// An act's title line.
pub fn act_header(n: usize, total: usize, act: &Act) -> String {
    format!(
        "\n━━ [{n}/{total}] {} ━━\n   {}\n   Tomás asks the orchestrator: \"{}\"",
        act.title, act.story, act.task
    )
}

/// Whether an act ended the way it should, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub text: String,
}

/// Judges an act by how the run ended (the answer Tomás got) and whether the alert came.
pub fn verdict(
    expect: &Expect,
    outcome: &Result<String, Refusal>,
    alert: Option<&Value>,
) -> Verdict {
    let r = match outcome {
        Ok(_) => {
            return Verdict {
                ok: false,
                text: format!(
                    "✗ the run completed, but {} should have stopped it",
                    expected(expect)
                ),
            };
        }
        Err(r) => r,
    };
    let rule = r.rule().unwrap_or("-");
    let stopped_right = r.status == expect.status && expect.rules.contains(&rule);
    let mut text = if stopped_right {
        format!(
            "✓ stopped: {} {} by {rule}{}: {}",
            r.status,
            r.reason(),
            r.edge().map(|e| format!(" on {e}")).unwrap_or_default(),
            r.message()
        )
    } else {
        format!(
            "✗ expected {}, got {} {} by {rule}: {}",
            expected(expect),
            r.status,
            r.reason(),
            r.message()
        )
    };
    let mut ok = stopped_right;
    if expect.alert {
        match alert {
            Some(a) => {
                let _ = write!(text, "\n  ✓ {}", alert_line(a));
            }
            None => {
                ok = false;
                text.push_str("\n  ✗ no alert reached the webhook");
            }
        }
    }
    Verdict { ok, text }
}

fn expected(e: &Expect) -> String {
    format!("{} by {}", e.status, e.rules.join(" or "))
}

/// The alert the budget service sent, in a sentence.
pub fn alert_line(a: &Value) -> String {
    let s = |k: &str| a[k].as_str().unwrap_or("?").to_owned();
    let value = match &a["limitValue"] {
        Value::Null => "?".to_owned(),
        v => v.to_string(),
    };
    format!(
        "alert received at the webhook: run {} {} at its {} of {value} (spent {}); started by {} for {}",
        s("run"),
        s("status"),
        s("limit"),
        a["spent"],
        s("root"),
        s("user")
    )
}

/// The closing table: one line per act.
pub fn summary(rows: &[(&Act, &Verdict)]) -> String {
    let mut out = String::from("\n━━ Summary ━━\n");
    let width = rows.iter().map(|(a, _)| a.title.len()).max().unwrap_or(0);
    for (act, v) in rows {
        let first = v.text.lines().next().unwrap_or_default();
        let mark = if v.ok { "✓" } else { "✗" };
        let rule = act.expect.rules[0];
        let _ = writeln!(
            out,
            "{mark} {:<width$}  {} {rule}",
            act.title,
            act.expect.status,
            width = width
        );
        if !v.ok {
            let _ = writeln!(out, "    {first}");
        }
    }
    out
}

/// Where the traces went when an OTLP endpoint is set.
pub fn traces_otlp(endpoint: &str) -> String {
    format!(
        "\nTraces: OTEL_EXPORTER_OTLP_ENDPOINT is {endpoint}; the sidecars, which inherit it, export their spans there: one trace per run (service name = agent name, attribute ringfence.run.id)."
    )
}

/// Where the traces went when written to files.
pub fn traces_files(files: &[PathBuf]) -> String {
    let mut out = String::from("\nTraces: one Jaeger JSON file per run:\n");
    for f in files {
        let _ = writeln!(out, "  {}", f.display());
    }
    out.push_str(
        "To see them: run Jaeger (docker run --rm -p 16686:16686 jaegertracing/all-in-one), open \
         http://localhost:16686, choose Search → JSON File and drop the files in.\n\
         (Set OTEL_EXPORTER_OTLP_ENDPOINT to have the sidecars export live instead.)",
    );
    out
}

/// What is running, when `--keep-running` leaves it up.
pub struct Explore<'a> {
    pub plane: SocketAddr,
    pub database: &'a Path,
    pub orchestrator_outbound: SocketAddr,
    pub orchestrator_app: SocketAddr,
    pub manifests: &'a Path,
    pub logs: &'a Path,
    pub agents: Vec<(String, SocketAddr, SocketAddr)>,
}

/// How to explore the running system.
pub fn keep_running(e: &Explore<'_>) -> String {
    let mut out = String::from("\n━━ Still running (the incident policies are in force) ━━\n");
    let _ = writeln!(out, "control plane and budget service: https://{}", e.plane);
    for (name, outbound, admin) in &e.agents {
        let _ = writeln!(
            out,
            "  {name:<13} outbound http://{outbound}   admin http://{admin}/metrics"
        );
    }
    let _ = writeln!(
        out,
        "manifests (edit them; sidecars follow): {}",
        e.manifests.display()
    );
    let _ = writeln!(out, "sidecar logs: {}", e.logs.display());
    let _ = writeln!(
        out,
        "\nList the runs:\n  ringfence runs --database {} list",
        e.database.display()
    );
    let _ = writeln!(
        out,
        "Start a run as the orchestrator would (a model call through its sidecar):\n  curl -s http://{}/models/openai/v1/chat/completions -H 'ringfence-user: user:you' -d '{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'",
        e.orchestrator_outbound
    );
    let _ = writeln!(
        out,
        "Ask the orchestrator itself (it runs the incident's loop, cut by no-loops):\n  curl -s http://{}/ -d '{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"SendMessage\",\"params\":{{\"message\":{{\"role\":\"ROLE_USER\",\"messageId\":\"m1\",\"parts\":[{{\"text\":\"go\"}}]}}}}}}'",
        e.orchestrator_app
    );
    out.push_str("\nPress Ctrl-C to stop everything.");
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::demo::scenario::acts;

    fn refusal(status: u16, rule: &str) -> Refusal {
        Refusal {
            status,
            detail: json!({"status": status, "reason": "policy", "rule": rule, "edge": "research → orchestrator", "message": "research may not invoke orchestrator"}),
        }
    }

    #[test]
    fn a_loop_cut_by_the_named_rule_passes_and_says_where() {
        let act = &acts()[1];
        let v = verdict(
            &act.expect,
            &Err(refusal(403, "default/no-loops/deny[0]")),
            None,
        );
        assert!(v.ok);
        assert_eq!(
            v.text,
            "✓ stopped: 403 policy by default/no-loops/deny[0] on research → orchestrator: research may not invoke orchestrator"
        );
    }

    #[test]
    fn the_wrong_rule_or_a_completed_run_fails_the_act() {
        let act = &acts()[1];
        let v = verdict(&act.expect, &Err(refusal(508, "cycles")), None);
        assert!(!v.ok);
        assert!(
            v.text
                .starts_with("✗ expected 403 by default/no-loops/deny[0], got 508"),
            "{}",
            v.text
        );
        let v = verdict(&act.expect, &Ok("done".into()), None);
        assert!(!v.ok);
        assert!(v.text.contains("the run completed"), "{}", v.text);
    }

    #[test]
    fn the_budget_act_needs_the_alert_too() {
        let act = &acts()[0];
        let halted = Err(refusal(402, "maxTotalTokens"));
        assert!(!verdict(&act.expect, &halted, None).ok);
        let alert = json!({"run": "01J", "status": "halted", "limit": "maxTotalTokens", "limitValue": 16000, "spent": 16000, "root": "orchestrator", "user": "user:tomas"});
        let v = verdict(&act.expect, &halted, Some(&alert));
        assert!(v.ok, "{}", v.text);
        assert!(
            v.text.ends_with("✓ alert received at the webhook: run 01J halted at its maxTotalTokens of 16000 (spent 16000); started by orchestrator for user:tomas"),
            "{}",
            v.text
        );
    }

    #[test]
    fn the_summary_has_a_line_per_act_and_explains_failures() {
        let all = acts();
        let good = Verdict {
            ok: true,
            text: "✓ stopped".into(),
        };
        let bad = Verdict {
            ok: false,
            text: "✗ expected 429 by invokeRateLimit, got nothing".into(),
        };
        let rows: Vec<(&Act, &Verdict)> = all
            .iter()
            .map(|a| (a, if a.id == "rate" { &bad } else { &good }))
            .collect();
        let s = summary(&rows);
        assert_eq!(s.matches('✓').count(), 6, "{s}");
        assert!(s.contains("✗ Control · invoke rate limit"), "{s}");
        assert!(
            s.contains("    ✗ expected 429 by invokeRateLimit, got nothing"),
            "{s}"
        );
    }

    #[test]
    fn trace_files_come_with_how_to_load_them() {
        let s = traces_files(&[PathBuf::from("ringfence-demo/1-budget.json")]);
        assert!(s.contains("  ringfence-demo/1-budget.json\n"), "{s}");
        assert!(s.contains("JSON File"), "{s}");
        assert!(traces_otlp("http://localhost:4318").contains("http://localhost:4318"));
    }

    #[test]
    fn progress_can_be_captured() {
        let (p, buf) = Progress::captured();
        p.step("orchestrator delegates");
        assert_eq!(*buf.lock().unwrap(), "  · orchestrator delegates\n");
    }
}
