//! The `ringfence` binary as a user runs it: `check` and `crds`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ringfence() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringfence"))
}

fn incident() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/incident")
}

/// A copy of the incident example to break.
fn copy_of_incident() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(incident()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            std::fs::copy(&p, d.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    d
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn replace_in(dir: &Path, file: &str, from: &str, to: &str) {
    let p = dir.join(file);
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains(from), "{from:?} not in {file}");
    std::fs::write(p, text.replace(from, to)).unwrap();
}

#[test]
fn check_accepts_the_incident_example() {
    let (ok, out) = run(ringfence().arg("check").arg(incident()));
    assert!(ok, "{out}");
    assert!(out.contains("4 agents, 3 agent policies"), "{out}");
    assert!(out.contains(": OK"), "{out}");
}

#[test]
fn check_exits_non_zero_on_an_invalid_cedar_policy_and_says_where() {
    let d = copy_of_incident();
    replace_in(
        d.path(),
        "policies.yaml",
        "resource.sensitivity == \"high\"",
        "resource.sensitivty == \"high\"",
    );
    let (ok, out) = run(ringfence().arg("check").arg(d.path()));
    assert!(!ok, "{out}");
    assert!(
        out.contains("error: AgentPolicy default/web-search"),
        "{out}"
    );
    assert!(out.contains("policies.yaml"), "{out}");
    assert!(out.contains("spec.cedar line 9, column"), "{out}");
    assert!(out.contains("sensitivty"), "{out}");
}

#[test]
fn check_names_the_file_of_malformed_yaml() {
    let d = copy_of_incident();
    replace_in(
        d.path(),
        "budget.yaml",
        "maxDelegationDepth: 5",
        "maxDelegationDepth: [5",
    );
    let (ok, out) = run(ringfence().arg("check").arg(d.path()));
    assert!(!ok, "{out}");
    assert!(
        out.contains("budget.yaml, document 1: not valid YAML"),
        "{out}"
    );
}

#[test]
fn crds_prints_the_checked_in_yaml() {
    let (ok, out) = run(ringfence().arg("crds"));
    assert!(ok);
    let on_disk = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds/yaml/ringfence.dev.yaml"),
    )
    .unwrap();
    assert_eq!(out, on_disk);
}
