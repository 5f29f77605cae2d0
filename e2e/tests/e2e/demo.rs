//! `ringfence demo`, the README's main command, run as a user runs it: the real binary, which
//! starts the control plane, the budget service and real sidecar processes on loopback.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringfence_e2e::binary;

/// The demo, with its temporary folder under `tmp` (so the test can tell its processes and
/// files apart from everyone else's) and its traces written to files.
fn demo(tmp: &Path) -> Command {
    let mut cmd = Command::new(binary("ringfence"));
    cmd.arg("demo")
        .current_dir(tmp)
        .env("TMPDIR", tmp)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// Processes whose command line mentions `path`: the demo's sidecars name their CA file under
/// the demo's temporary folder.
fn processes_under(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle) && c.contains("ringfence-sidecar"))
        .collect()
}

/// The part of the output from `start` up to the next act (or the summary).
fn section<'a>(out: &'a str, start: &str) -> &'a str {
    let from = out
        .find(start)
        .unwrap_or_else(|| panic!("no {start:?} in:\n{out}"));
    let rest = &out[from..];
    let end = rest[start.len()..]
        .find("━━ [")
        .or_else(|| rest[start.len()..].find("━━ Summary"))
        .map_or(rest.len(), |e| e + start.len());
    &rest[..end]
}

#[test]
fn the_demo_replays_the_incident_and_every_control_trips_with_its_rule_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = demo(tmp.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );

    // Act 1: only the budget stops the loop, after several rounds; the alert arrives.
    let act1 = section(&stdout, "[1/7]");
    assert!(act1.contains("round 3: orchestrator planned"), "{act1}");
    assert!(
        act1.contains("✓ stopped: 402 budget by maxTotalTokens")
            || act1.contains("✓ stopped: 402 budget by maxCostUsd"),
        "{act1}"
    );
    assert!(
        act1.contains("✓ alert received at the webhook: run "),
        "{act1}"
    );
    assert!(act1.contains(" halted at its max"), "{act1}");
    assert!(
        act1.contains("⛔ halted: its budget is exhausted"),
        "{act1}"
    );

    // Act 2: the incident policies cut the loop at its first hop, naming the rule.
    let act2 = section(&stdout, "[2/7]");
    assert!(
        act2.contains(
            "✓ stopped: 403 policy by default/no-loops/deny[0] on research → orchestrator"
        ),
        "{act2}"
    );
    assert!(
        !act2.contains("round 2"),
        "the loop went round again: {act2}"
    );
    assert!(
        act2.contains("✗ orchestrator  SendMessage  denied (policy) by default/no-loops/deny[0]"),
        "the run tree shows the refused hop: {act2}"
    );

    // Each control in isolation trips with its rule named.
    for (act, want) in [
        ("[3/7]", "✓ stopped: 508 depth by maxDelegationDepth"),
        ("[4/7]", "✓ stopped: 508 cycle by cycles"),
        ("[5/7]", "✓ stopped: 429 rate_limit by invokeRateLimit"),
        ("[6/7]", "✓ stopped: 504 timeout by perAgent.timeoutSeconds"),
        (
            "[7/7]",
            "✓ stopped: 403 policy by default/tools/tainted-branches-keep-off-sensitive-tools",
        ),
    ] {
        let s = section(&stdout, act);
        assert!(s.contains(want), "{act} should say {want:?}:\n{s}");
        assert!(s.contains("draws it:"), "{act} shows its run tree:\n{s}");
    }
    let taint = section(&stdout, "[7/7]");
    assert!(
        taint.contains("writer read vault/read_secret"),
        "the clean branch keeps the tool: {taint}"
    );

    // The traces: one Jaeger file per act, each a JSON trace of its run.
    for name in [
        "1-budget", "2-policy", "3-depth", "4-cycle", "5-rate", "6-stall", "7-taint",
    ] {
        let file = tmp
            .path()
            .join("ringfence-demo")
            .join(format!("{name}.json"));
        assert!(
            stdout.contains(&format!("ringfence-demo/{name}.json")),
            "{stdout}"
        );
        let text =
            std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let spans = v["data"][0]["spans"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(!spans.is_empty(), "{name}: {v}");
    }
    assert!(stdout.contains("JSON File"), "{stdout}");

    // Everything stopped, and the temporary folder is gone.
    assert_eq!(processes_under(tmp.path()), Vec::<String>::new());
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ringfence-demo-"))
        .collect();
    assert!(left.is_empty(), "temporary folders left: {left:?}");
}

#[test]
fn keep_running_leaves_the_system_up_with_instructions_and_stops_it_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = demo(tmp.path())
        .arg("--keep-running")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("Press Ctrl-C") {
            break;
        }
    }
    assert!(seen.contains("Press Ctrl-C to stop everything."), "{seen}");
    assert!(seen.contains("ringfence runs --database "), "{seen}");
    assert!(seen.contains("curl -s http://127.0.0.1:"), "{seen}");
    assert_eq!(
        processes_under(tmp.path()).len(),
        4,
        "a sidecar per agent is still up"
    );

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(status.success(), "{status:?}: {rest:?}");
    assert_eq!(
        rest.last().map(String::as_str),
        Some("Stopping everything.")
    );
    assert_eq!(processes_under(tmp.path()), Vec::<String>::new());
}

#[test]
fn ctrl_c_in_the_middle_stops_everything_and_says_it_was_interrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = demo(tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("round 1: orchestrator planned") {
            break;
        }
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        rest.iter()
            .any(|l| l.contains("Interrupted; stopping everything.")),
        "{rest:?}"
    );
    assert!(
        stderr.contains("interrupted before the last act"),
        "{stderr}"
    );
    assert_eq!(processes_under(tmp.path()), Vec::<String>::new());
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ringfence-demo-"))
        .collect();
    assert!(left.is_empty(), "temporary folders left: {left:?}");
}
