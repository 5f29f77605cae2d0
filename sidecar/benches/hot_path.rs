//! Micro-benchmarks of the sidecar's per-request work: one policy decision on a realistic
//! slice (1,000 agents, 10,000 edges), the run-context header (seal/open for the app, encode
//! and accept for the hop), and LLM usage parsing (JSON body and SSE stream).
//!
//! `cargo bench -p ringfence-sidecar --bench hot_path`. Before criterion's estimates, the
//! decision's latency distribution (p50/p99/p99.9 over single calls) is printed, since the
//! target is a p99.

use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion};
use ringfence_sidecar::authz::fixtures::{Mesh, agent_name, mesh_slice};
use ringfence_sidecar::authz::{Action, Authorizer, CallContext, CallRequest, Resource};
use ringfence_sidecar::context::{RunContext, Sealer, accept_hop};
use ringfence_sidecar::protocol::llm::{Api, UsageStream, inspect_request, response_usage};

/// The agent whose slice is benchmarked: the one with the most policies among the first 200,
/// the worst case a sidecar of this mesh carries.
fn busiest(mesh: &Mesh) -> usize {
    (0..200)
        .max_by_key(|&i| mesh_slice(mesh, i).0.policies.len())
        .unwrap_or(0)
}

struct Case {
    name: &'static str,
    principal: String,
    action: Action,
    resource: (u8, String, String),
}

impl Case {
    fn request<'a>(&'a self, context: &'a CallContext) -> CallRequest<'a> {
        let resource = match self.resource.0 {
            0 => Resource::Agent(&self.resource.1),
            1 => Resource::Tool {
                server: &self.resource.1,
                tool: &self.resource.2,
            },
            _ => Resource::Model {
                provider: &self.resource.1,
                model: &self.resource.2,
            },
        };
        CallRequest {
            principal: &self.principal,
            action: self.action,
            resource,
            context,
        }
    }
}

/// Requests a sidecar of `me` decides: an allowed outbound edge, an inbound one, an edge
/// nobody allowed, a listed tool, a tool the bundle does not list, a model.
fn cases(mesh: &Mesh, me: usize) -> Vec<Case> {
    let (slice, _) = mesh_slice(mesh, me);
    let me_name = agent_name(me);
    // An allowed callee and caller, read off the slice's edge ids (`…:<caller>-><callee>`).
    let edge = |outbound: bool| {
        slice.policies.iter().find_map(|p| {
            let (_, pair) = p.id.rsplit_once(':')?;
            let (from, to) = pair.split_once("->")?;
            (p.text.contains("permit") && to.starts_with("agent-"))
                .then_some((from.to_owned(), to.to_owned()))
                .filter(|(f, t)| {
                    if outbound {
                        *f == me_name
                    } else {
                        *t == me_name
                    }
                })
        })
    };
    let out = edge(true).map_or_else(|| agent_name(1), |e| e.1);
    let inbound = edge(false).map_or_else(|| agent_name(1), |e| e.0);
    let agent = |n: &str| (0, n.to_owned(), String::new());
    vec![
        Case {
            name: "invoke allowed (outbound)",
            principal: me_name.clone(),
            action: Action::Invoke,
            resource: agent(&out),
        },
        Case {
            name: "invoke allowed (inbound)",
            principal: inbound,
            action: Action::Invoke,
            resource: agent(&me_name),
        },
        Case {
            name: "invoke default deny",
            principal: me_name.clone(),
            action: Action::Invoke,
            resource: agent("agent-9999"),
        },
        Case {
            name: "call_tool listed",
            principal: me_name.clone(),
            action: Action::CallTool,
            resource: (1, "srv-03".into(), "tool-04".into()),
        },
        Case {
            name: "call_tool unlisted",
            principal: me_name.clone(),
            action: Action::CallTool,
            resource: (1, "srv-99".into(), "unknown".into()),
        },
        Case {
            name: "call_model",
            principal: me_name,
            action: Action::CallModel,
            resource: (2, "openai".into(), "gpt-4o-mini".into()),
        },
    ]
}

fn context(me: usize) -> CallContext {
    CallContext {
        run: "01JBENCHRUN0000000000000000".into(),
        user: "user:tomas".into(),
        depth: 2,
        path: vec![agent_name(0), agent_name(me)],
        revisits: 0,
        taint: Vec::new(),
    }
}

/// p50/p99/p99.9 of `n` single decisions, each timed on its own.
fn percentiles(label: &str, n: usize, mut f: impl FnMut()) {
    let n = n.max(1);
    for _ in 0..n / 20 {
        f();
    }
    let mut ns = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        ns.push(t.elapsed().as_nanos() as u64);
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((n as f64 * q) as usize).min(n - 1)] as f64 / 1000.0;
    println!(
        "{label:<48} p50 {:>8.2} µs  p99 {:>8.2} µs  p99.9 {:>8.2} µs",
        at(0.5),
        at(0.99),
        at(0.999)
    );
}

fn bench_authz(c: &mut Criterion) {
    // `cargo bench … -- context` and the like skip the decision's distribution too.
    if std::env::args().any(|a| a.starts_with("context") || a.starts_with("llm")) {
        return;
    }
    let mut group = c.benchmark_group("authz");
    for (label, mesh) in [
        ("1k agents 10k edges + free-form", Mesh::THOUSAND),
        (
            "1k agents 10k edges, edges only",
            Mesh {
                free_form: false,
                ..Mesh::THOUSAND
            },
        ),
    ] {
        let me = busiest(&mesh);
        let (slice, tools) = mesh_slice(&mesh, me);
        let authz = match Authorizer::build(&slice, &tools) {
            Ok(a) => a,
            Err(e) => panic!("the benchmark slice does not build: {e}"),
        };
        let ctx = context(me);
        println!(
            "# {label}: slice of {} has {} policies",
            agent_name(me),
            slice.policies.len()
        );
        for case in cases(&mesh, me) {
            let req = case.request(&ctx);
            let d = authz.decide(&req);
            assert_eq!(d, authz.decide_with_cedar_only(&req), "{}", case.name);
            percentiles(&format!("{label} | {} | index", case.name), 100_000, || {
                black_box(authz.decide(black_box(&req)));
            });
            // Residual outcomes are kept by the context attributes the policies read: above, the
            // same request hits. Here every decision has a depth not seen before (more than the
            // kept outcomes' bound), so a guard that reads the depth goes to Cedar each time (a
            // guard that reads only `tainted`, as call_tool's does, still hits).
            let mut cold = ctx.clone();
            let mut depth = 0u32;
            percentiles(
                &format!("{label} | {} | index, new depth", case.name),
                20_000,
                || {
                    depth = depth.wrapping_add(1);
                    cold.depth = depth;
                    black_box(authz.decide(black_box(&case.request(&cold))));
                },
            );
            // The reference is slow on unlisted resources: fewer samples keep the run short.
            percentiles(
                &format!("{label} | {} | cedar only", case.name),
                5_000,
                || {
                    black_box(authz.decide_with_cedar_only(black_box(&req)));
                },
            );
            group.bench_with_input(
                BenchmarkId::new(format!("{label} | index"), case.name),
                &req,
                |b, req| b.iter(|| authz.decide(black_box(req))),
            );
            group.bench_with_input(
                BenchmarkId::new(format!("{label} | cedar only"), case.name),
                &req,
                |b, req| b.iter(|| authz.decide_with_cedar_only(black_box(req))),
            );
        }
    }
    group.finish();
}

fn bench_context(c: &mut Criterion) {
    let mut group = c.benchmark_group("context");
    let root = match RunContext::start("orchestrator", "user:tomas", Some(1_900_000_000_000), None)
    {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    let Ok(held) = root
        .clone()
        .enter("research")
        .and_then(|c| c.enter("writer"))
    else {
        panic!("a three-agent path is valid");
    };
    let sealer = Sealer::with_key("writer", [7; 32]);
    let Ok(sealed) = sealer.seal(&held) else {
        panic!("sealing a valid context works");
    };
    let Ok(hop) = held.clone().hop().encode() else {
        panic!("encoding a valid context works");
    };
    group.bench_function("seal (sidecar → app)", |b| {
        b.iter(|| sealer.seal(black_box(&held)))
    });
    group.bench_function("open (app → sidecar, verify)", |b| {
        b.iter(|| sealer.open(black_box(&sealed)))
    });
    group.bench_function("encode hop header", |b| {
        b.iter(|| black_box(&held).encode())
    });
    group.bench_function("accept hop (decode, check, enter)", |b| {
        b.iter(|| accept_hop(black_box(&hop), "writer", "critic"))
    });
    group.finish();
}

const CHAT_REQUEST: &[u8] = br#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Summarise the incident report in two sentences."}],"max_tokens":64}"#;
const CHAT_RESPONSE: &[u8] = br#"{"id":"chatcmpl-mock","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","system_fingerprint":"fp_mock","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the mock upstream. This is a short canned completion."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":14,"total_tokens":264}}"#;

fn sse_response() -> Vec<u8> {
    let mut out = Vec::new();
    for word in ["Hello", " from", " the", " mock", " upstream", "."] {
        out.extend_from_slice(format!("data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}},\"finish_reason\":null}}]}}\n\n").as_bytes());
    }
    out.extend_from_slice(b"data: {\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":250,\"completion_tokens\":6,\"total_tokens\":256}}\n\ndata: [DONE]\n\n");
    out
}

fn bench_usage(c: &mut Criterion) {
    let mut group = c.benchmark_group("llm usage");
    let estimate = match inspect_request(Api::ChatCompletions, CHAT_REQUEST) {
        Ok(r) => r.estimate(),
        Err(e) => panic!("{e}"),
    };
    group.bench_function("inspect chat request", |b| {
        b.iter(|| {
            inspect_request(Api::ChatCompletions, black_box(CHAT_REQUEST)).map(|r| r.estimate())
        })
    });
    group.bench_function("usage of a chat response", |b| {
        b.iter(|| response_usage(Api::ChatCompletions, black_box(CHAT_RESPONSE)))
    });
    let sse = sse_response();
    group.bench_function("usage of a 7-event chat stream", |b| {
        b.iter(|| {
            let mut stream = UsageStream::new(Api::ChatCompletions, estimate);
            for chunk in black_box(&sse).chunks(64) {
                stream.feed(chunk);
            }
            stream.finish()
        })
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_authz(&mut c);
    bench_context(&mut c);
    bench_usage(&mut c);
    c.final_summary();
}
