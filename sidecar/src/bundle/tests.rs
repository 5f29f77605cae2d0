//! Admission of stream lines, and line splitting with a size cap.

use ringfence_crds::bundle::Bundle;

use super::*;
use crate::testing::bundle_content;

const ORCHESTRATOR_DELEGATES: (&str, &str) = (
    "default/article/orchestrator-delegates",
    r#"permit (principal == Agent::"orchestrator", action == Action::"invoke", resource)
       when { [Agent::"research", Agent::"writer", Agent::"critic"].contains(resource) };"#,
);

fn agent() -> AgentKey {
    AgentKey::new("default", "orchestrator").unwrap()
}

fn line(b: &Bundle) -> Vec<u8> {
    serde_json::to_vec(b).unwrap()
}

fn enforce(line: &[u8], current: Option<&Snapshot>) -> Snapshot {
    match admit(line, &agent(), current) {
        Admission::Enforce(s) => *s,
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

fn rejection(line: &[u8], current: Option<&Snapshot>) -> (u64, BundleError) {
    match admit(line, &agent(), current) {
        Admission::Reject { version, error, .. } => (version, error),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn a_valid_bundle_is_compiled_into_a_snapshot() {
    let b = Bundle::new(1, bundle_content(&agent(), &[ORCHESTRATOR_DELEGATES]));
    let s = enforce(&line(&b), None);
    assert_eq!(s.bundle, b);
    assert_eq!(s.authorizer.policy_count(), 1);
}

#[test]
fn a_bundle_whose_hash_does_not_match_is_rejected() {
    let mut b = Bundle::new(2, bundle_content(&agent(), &[ORCHESTRATOR_DELEGATES]));
    b.content.limits.max_delegation_depth = 99;
    let (version, error) = rejection(&line(&b), None);
    assert_eq!(version, 2);
    assert!(matches!(error, BundleError::Hash(_)), "{error}");
    assert!(error.to_string().contains("hashes to"), "{error}");
}

#[test]
fn a_bundle_with_an_invalid_policy_is_rejected_naming_the_rule() {
    let broken = (
        "default/broken/typo",
        r#"permit (principal, action == Action::"invok", resource);"#,
    );
    let b = Bundle::new(3, bundle_content(&agent(), &[broken]));
    let (version, error) = rejection(&line(&b), None);
    assert_eq!(version, 3);
    assert!(error.to_string().contains("default/broken/typo"), "{error}");
}

#[test]
fn a_bundle_for_another_agent_is_rejected() {
    let other = AgentKey::new("default", "research").unwrap();
    let b = Bundle::new(1, bundle_content(&other, &[]));
    let (_, error) = rejection(&line(&b), None);
    assert!(matches!(error, BundleError::WrongAgent { .. }), "{error}");
}

#[test]
fn a_malformed_line_is_rejected_with_what_it_claimed() {
    let (version, error) = rejection(
        br#"{"version": 7, "hash": "sha256:00", "content": 5}"#,
        None,
    );
    assert_eq!(version, 7);
    assert!(matches!(error, BundleError::Malformed(_)));
    let (version, _) = rejection(b"\x00\xffnot json", None);
    assert_eq!(version, 0);
}

#[test]
fn blank_lines_are_keep_alives() {
    assert!(matches!(admit(b"", &agent(), None), Admission::KeepAlive));
    assert!(matches!(
        admit(b"  \t", &agent(), None),
        Admission::KeepAlive
    ));
}

#[test]
fn the_same_version_again_is_not_rebuilt() {
    let b = Bundle::new(1, bundle_content(&agent(), &[ORCHESTRATOR_DELEGATES]));
    let current = enforce(&line(&b), None);
    assert!(matches!(
        admit(&line(&b), &agent(), Some(&current)),
        Admission::Unchanged { version: 1, .. }
    ));
}

fn texts(lines: Vec<Line>) -> Vec<String> {
    lines
        .into_iter()
        .map(|l| match l {
            Line::Complete(b) => String::from_utf8(b.to_vec()).unwrap(),
            Line::TooLong => "<too long>".to_owned(),
        })
        .collect()
}

#[test]
fn lines_are_reassembled_across_chunks() {
    let mut r = LineReader::new(100);
    assert!(r.push(b"{\"a\":").is_empty());
    assert_eq!(texts(r.push(b"1}\r\n\n{\"b\"")), vec!["{\"a\":1}", ""]);
    assert_eq!(texts(r.push(b":2}\n")), vec!["{\"b\":2}"]);
}

#[test]
fn an_oversized_line_is_dropped_and_the_stream_goes_on() {
    let mut r = LineReader::new(8);
    assert_eq!(texts(r.push(b"0123456789")), vec!["<too long>"]);
    assert!(r.push(b"more of the same").is_empty(), "still discarding");
    assert_eq!(texts(r.push(b"tail\nok\n")), vec!["ok"]);
    assert_eq!(
        texts(r.push(b"123456789\nfine\n")),
        vec!["<too long>", "fine"]
    );
}

#[test]
fn a_snapshot_finds_this_agent_and_its_peers_by_name() {
    let b = Bundle::new(1, bundle_content(&agent(), &[ORCHESTRATOR_DELEGATES]));
    let s = enforce(&line(&b), None);
    assert_eq!(
        s.agent_named("orchestrator").map(|a| a.name.as_str()),
        Some("orchestrator")
    );
    for peer in &b.content.peers {
        assert_eq!(s.agent_named(&peer.name), Some(peer));
    }
    assert!(!b.content.peers.is_empty());
    assert!(s.agent_named("nobody").is_none());
}
