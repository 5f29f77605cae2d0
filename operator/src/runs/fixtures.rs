//! The overnight-loop run as the ledger holds it: orchestrator delegates to research and
//! writer; research searches the web, then "retries" by invoking orchestrator, which policy
//! refuses (a cycle: orchestrator is already on the path); writer asks the model.

use std::collections::BTreeMap;

use ringfence_crds::budget::OnBreach;

use crate::budget::{
    AgentSpend, Amount, Decision, DenialKey, EdgeAggregate, EdgeEvent, EdgeKind, RunDetail,
    RunLimits, RunRecord, RunStatus, RunSummary, Spend,
};

pub const RUN: &str = "01JD8X3Y4Z5A6B7C8D9E0F1G2H";
pub const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[allow(clippy::too_many_arguments)]
fn call(
    span: &str,
    parent: Option<&str>,
    caller: &str,
    callee: &str,
    kind: EdgeKind,
    operation: &str,
    depth: u32,
    at_ms: u64,
) -> EdgeEvent {
    EdgeEvent {
        event_id: format!("{TRACE}-{span}"),
        run_id: RUN.to_owned(),
        trace_id: TRACE.to_owned(),
        span_id: span.to_owned(),
        parent_call: parent.map(str::to_owned),
        root: "orchestrator".to_owned(),
        user: "user:ada".to_owned(),
        caller: caller.to_owned(),
        callee: callee.to_owned(),
        kind,
        operation: Some(operation.to_owned()),
        decision: Decision::Allowed,
        rule: None,
        depth,
        cycle: false,
        tainted: false,
        latency_us: 12_000,
        tokens_in: 0,
        tokens_out: 0,
        micros: 0,
        at_ms,
        status: Some(200),
    }
}

pub fn overnight_loop() -> RunDetail {
    let to_research = call(
        "00000000000000a1",
        None,
        "orchestrator",
        "research",
        EdgeKind::Agent,
        "SendMessage",
        1,
        1_000,
    );
    let search = call(
        "00000000000000b1",
        Some("00000000000000a1"),
        "research",
        "tool:web-search",
        EdgeKind::Tool,
        "web_search",
        2,
        1_010,
    );
    let mut back = call(
        "00000000000000b2",
        Some("00000000000000a1"),
        "research",
        "orchestrator",
        EdgeKind::Agent,
        "SendMessage",
        2,
        1_020,
    );
    back.decision = Decision::Denied("policy".to_owned());
    back.rule = Some("default/no-loops/deny[0]".to_owned());
    back.cycle = true;
    back.status = Some(403);
    back.latency_us = 150;
    let to_writer = call(
        "00000000000000a2",
        None,
        "orchestrator",
        "writer",
        EdgeKind::Agent,
        "SendMessage",
        1,
        1_030,
    );
    let mut chat = call(
        "00000000000000c1",
        Some("00000000000000a2"),
        "writer",
        "model:openai",
        EdgeKind::Model,
        "gpt-4o",
        2,
        1_040,
    );
    chat.tokens_in = 1_000;
    chat.tokens_out = 200;
    chat.micros = 4_500;
    let calls = vec![to_research, search, back, to_writer, chat];
    let agents = vec![AgentSpend {
        agent: "writer".to_owned(),
        spent: Spend {
            tokens_in: 1_000,
            tokens_out: 200,
            micros: 4_500,
            calls: 1,
        },
        first_at_ms: 1_040,
        last_at_ms: 1_040,
    }];
    let edge = |caller: &str, callee: &str, kind, calls, tokens, micros, depth, at| EdgeAggregate {
        caller: String::from(caller),
        callee: String::from(callee),
        kind,
        calls,
        denials: BTreeMap::new(),
        tokens,
        micros,
        max_depth: depth,
        cycles: 0,
        total_latency_us: 12_000,
        first_seen_ms: at,
        last_seen_ms: at,
    };
    let mut loop_back = edge(
        "research",
        "orchestrator",
        EdgeKind::Agent,
        1,
        0,
        0,
        2,
        1_020,
    );
    loop_back.denials.insert(
        DenialKey {
            reason: "policy".to_owned(),
            rule: Some("default/no-loops/deny[0]".to_owned()),
        },
        1,
    );
    loop_back.cycles = 1;
    RunDetail {
        summary: RunSummary {
            run: RunRecord {
                run_id: RUN.to_owned(),
                root_agent: "orchestrator".to_owned(),
                user: "user:ada".to_owned(),
                limits: RunLimits {
                    max_tokens: Some(100_000),
                    max_cost_micros: Some(5_000_000),
                    deadline_ms: None,
                    on_breach: OnBreach::HaltAndAlert,
                    budgets: vec!["incident-budget".to_owned()],
                },
                status: RunStatus::Completed,
                opened_at_ms: 990,
                halted_at_ms: None,
                halt_reason: None,
                completed_at_ms: Some(1_100),
            },
            spent: Spend {
                tokens_in: 1_000,
                tokens_out: 200,
                micros: 4_500,
                calls: 1,
            },
            outstanding: Amount::default(),
        },
        agents,
        edges: vec![
            edge(
                "orchestrator",
                "research",
                EdgeKind::Agent,
                1,
                0,
                0,
                1,
                1_000,
            ),
            edge(
                "research",
                "tool:web-search",
                EdgeKind::Tool,
                1,
                0,
                0,
                2,
                1_010,
            ),
            loop_back,
            edge("orchestrator", "writer", EdgeKind::Agent, 1, 0, 0, 1, 1_030),
            edge(
                "writer",
                "model:openai",
                EdgeKind::Model,
                1,
                1_200,
                4_500,
                2,
                1_040,
            ),
        ],
        calls,
    }
}
