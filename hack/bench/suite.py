#!/usr/bin/env python3
"""Runs the benchmark suite side by side and writes a markdown report.

Targets are started once, all at the same time (distinct ports), then measured in interleaved
rounds: every (workload, load shape) visits every target in a rotated order per round. Added
latency is taken against `direct` *within the same round*; reported are medians over rounds with
min..max. CPU per request comes from /proc/<pid>/stat (utime+stime) of each proxy process over
the measured interval; RSS idle is VmRSS before any load, peak is VmHWM at the end.

Proxies (nginx, sidecars, LiteLLM, the Ringfence control plane) are pinned to CPU 0; the mock
upstream and the load generator to CPU 1. Driven by hack/bench/run.sh.
"""
import argparse, json, os, random, shutil, signal, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "hack/bench/baselines"
TICK = os.sysconf("SC_CLK_TCK")
PROCS = []
SINK_PORT = 18318
ALWAYS = ("direct", "nginx 2 hops mTLS")
wanted = lambda name: True


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def spawn(args, cpu, env=None, log=None):
    f = open(log, "wb") if log else subprocess.DEVNULL
    p = subprocess.Popen(["taskset", "-c", str(cpu), *args], stdout=f, stderr=subprocess.STDOUT,
                         env={**os.environ, **(env or {})}, start_new_session=True)
    PROCS.append(p)
    return p


def stop_all():
    for p in PROCS:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in PROCS:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def cpu_ticks(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (FileNotFoundError, ProcessLookupError):
        return 0


def mem_kb(pid, key):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def children(pid):
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            pass
    return out


def tree(pid):
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children(p)
    return seen


def wait_port(port, timeout=60):
    import socket
    end = time.time() + timeout
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# ---------------------------------------------------------------------------------------------
# Ringfence configurations: a control plane with a caller and a callee sidecar each.

def agent_yaml(name, ports, labels, models):
    ann = "\n".join(f"    ringfence.dev/local-{k}: 127.0.0.1:{v}" for k, v in ports.items())
    m = ""
    if models:
        m = "\n  models:\n    - name: openai\n      url: http://127.0.0.1:18000"
    return f"""apiVersion: ringfence.dev/v1alpha1
kind: Agent
metadata:
  name: {name}
  labels: {{{labels}}}
  annotations:
{ann}
spec:
  team: bench
  environment: prod
  mayStartRuns: {"true" if name == "caller" else "false"}{m}
---
"""


GUARDS = """  cedar: |
    @id("no-deep-delegation")
    forbid (principal, action == Action::"invoke", resource) when { context.depth > 8 };
    @id("tainted-branches-keep-off-sensitive-tools")
    forbid (principal, action == Action::"call_tool", resource)
    when { context.tainted && resource.sensitivity == "high" };
"""


def ringfence_folder(folder, base, thousand, limits):
    folder.mkdir(parents=True, exist_ok=True)
    docs = [agent_yaml("caller", {"app": base + 51, "outbound": base + 21, "inbound": base + 31,
                                  "admin": base + 41}, "bench: pair", True),
            agent_yaml("callee", {"app": 18000, "outbound": base + 22, "inbound": base + 32,
                                  "admin": base + 42}, "bench: pair", False)]
    docs.append("""apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: pair}
spec:
  allow:
    - from: [caller]
      agents: [callee]
    - from: [caller]
      models: [openai/*]
""" + (GUARDS if thousand else "") + "---\n")
    if thousand:
        rng = random.Random(7)
        names = [f"agent-{i:04d}" for i in range(998)] + ["caller", "callee"]
        for n in names[:998]:
            docs.append(f"apiVersion: ringfence.dev/v1alpha1\nkind: Agent\nmetadata: {{name: {n}}}\n"
                        f"spec: {{team: team-{rng.randrange(25)}, environment: prod}}\n---\n")
        # 10,000 edges in 100 AgentPolicies of 100 rules, each rule one (caller, callee) edge.
        for p in range(100):
            rules = []
            for r in range(100):
                a, b = rng.choice(names), rng.choice(names)
                rules.append(f"    - from: [{a}]\n      agents: [{b}]")
            docs.append(f"apiVersion: ringfence.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {{name: edges-{p:03d}}}\n"
                        "spec:\n  allow:\n" + "\n".join(rules) + "\n---\n")
    if limits:
        docs.append("""apiVersion: ringfence.dev/v1alpha1
kind: RunBudget
metadata: {name: pair}
spec:
  selector:
    matchLabels: {bench: pair}
  maxDelegationDepth: 5
  cycles: {maxRevisits: 0}
  maxTotalTokens: 1000000000000
  maxWallClockSeconds: 600
  perAgent:
    invokeRateLimit: 1000000/s
    timeoutSeconds: 45
""")
    (folder / "manifests.yaml").write_text("".join(docs))


# ---------------------------------------------------------------------------------------------

def load(bench, url, body, extra, expect, headers=()):
    args = ["taskset", "-c", "1", str(bench), "load", "--url", url, "--body", str(body),
            *extra]
    for h in headers:
        args += ["--header", h]
    if expect:
        args += ["--expect", expect]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        return {"errors": 1, "requests": 0, "first_error": out.stderr.strip()[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_range(xs, digits=0):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = statistics.median(xs)
    f = f"{{:.{digits}f}}"
    if len(xs) == 1:
        return f.format(m)
    return f"{f.format(m)} ({f.format(min(xs))}..{f.format(max(xs))})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target/dist"))
    ap.add_argument("--dir", default="/tmp/rfbench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--c1-requests", type=int, default=3000)
    ap.add_argument("--rates", default="1000,3000")
    ap.add_argument("--litellm", default="")
    ap.add_argument("--out", default="-")
    ap.add_argument("--targets", default="",
                    help="comma-separated substrings: measure only the targets whose name holds "
                         "one (direct and the nginx pair always run: the ratios need them)")
    ap.add_argument("--workloads", default="",
                    help="comma-separated substrings of workload names (W1, W2, W2s)")
    a = ap.parse_args()
    global wanted
    picks = [t.strip() for t in a.targets.split(",") if t.strip()]
    wanted = lambda name: (not picks or name in ALWAYS
                           or any(p.lower() in name.lower() for p in picks))
    wl_picks = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bin_ = Path(a.bin)
    bench = bin_ / "ringfence-bench"
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    rates = [int(r) for r in a.rates.split(",") if r]

    # Bodies.
    a2a = BASE / "a2a.json"
    chat = BASE / "chat.json"
    chat_s = d / "chat-stream.json"
    body = json.loads(chat.read_text())
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    chat_s.write_text(json.dumps(body, separators=(",", ":")))

    # Mock upstream on CPU 1.
    spawn([str(bench), "mock", "--listen", "127.0.0.1:18000"], 1, log=d / "mock.log")
    wait_port(18000)

    # nginx baselines on CPU 0.
    pki = d / "pki"
    sh(str(bench), "certs", str(pki))
    nginx_pids = {}
    for name in ["proxy", "mtls"]:
        conf = d / f"{name}-nginx.conf"
        conf.write_text((BASE / f"{name}-nginx.conf").read_text().replace("BENCH_DIR", str(d)))
        pidf = d / f"{name}.pid"
        if pidf.exists():
            try:
                os.kill(int(pidf.read_text()), signal.SIGQUIT)
                time.sleep(0.5)
            except (ProcessLookupError, ValueError):
                pass
        sh("taskset", "-c", "0", "nginx", "-c", str(conf), "-p", str(d))
        for _ in range(50):
            if pidf.exists() and pidf.read_text().strip():
                break
            time.sleep(0.1)
        nginx_pids[name] = int(pidf.read_text())
    wait_port(18080)
    wait_port(18081)

    # Ringfence ladder.
    # label, 1k agents, limits+budget, spans to the OTLP sink. Every rung reports its calls
    # to the run ledger (the budget service), as a sidecar always does.
    ladder = [
        ("rf mTLS+Cedar (2 agents)", False, False, False),
        ("rf +1k agents/10k edges", True, False, False),
        ("rf +limits+budget", True, True, False),
        ("rf +tracing (everything on)", True, True, True),
    ]
    ladder = [r for r in ladder if wanted(r[0])]
    rf = {}
    otel_off = {"OTEL_EXPORTER_OTLP_ENDPOINT": "", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ""}
    otel_on = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{SINK_PORT}",
               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "",
               "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    if any(r[3] for r in ladder):
        spawn([str(bench), "sink", "--listen", f"127.0.0.1:{SINK_PORT}"], 1, log=d / "sink.log")
        wait_port(SINK_PORT)
    for i, (label, thousand, limits, tracing) in enumerate(ladder):
        base = 21000 + i * 100
        folder = d / f"rf{i}"
        shutil.rmtree(folder, ignore_errors=True)
        ringfence_folder(folder, base, thousand, limits)
        p = spawn([str(bin_ / "ringfence"), "local", str(folder), "--spawn-sidecars",
                   "--listen", f"127.0.0.1:{base + 10}"], 0, log=d / f"rf{i}.log",
                  env={"RUST_LOG": "warn", **(otel_on if tracing else otel_off)})
        rf[label] = (p, base)
    for label, (p, base) in rf.items():
        for port in (base + 21, base + 32):
            wait_port(port, 120)
        # Ready means the bundle arrived: /readyz on both admins.
        for port in (base + 41, base + 42):
            end = time.time() + 60
            while time.time() < end:
                r = subprocess.run(["curl", "-fsS", f"http://127.0.0.1:{port}/readyz"],
                                   capture_output=True)
                if r.returncode == 0:
                    break
                time.sleep(0.3)

    # LiteLLM, one worker, on CPU 0.
    litellm = None
    if a.litellm and wanted("LiteLLM 1 worker"):
        cfg = d / "litellm.yaml"
        shutil.copy(BASE / "litellm.yaml", cfg)
        litellm = spawn([a.litellm, "--config", str(cfg), "--port", "18400", "--num_workers", "1"],
                        0, env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"}, log=d / "litellm.log")
        wait_port(18400, 180)

    time.sleep(2)

    def rf_procs(label):
        p, base = rf[label]
        kids = children(p.pid)  # taskset exec'd into ringfence local
        side = {}
        for k in kids:
            try:
                cmd = Path(f"/proc/{k}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            text = b" ".join(cmd).decode(errors="replace")
            if "ringfence-sidecar" in text:
                side["callee" if "callee" in text else "caller"] = k
        return {"caller sidecar": side.get("caller"), "callee sidecar": side.get("callee"),
                "control plane": p.pid}

    nginx_workers = {n: children(pid) for n, pid in nginx_pids.items()}
    # Process groups measured per target: name -> pids whose CPU counts.
    procs = {
        "direct": {},
        "nginx 1 hop": {"nginx": nginx_workers["proxy"]},
        "nginx 2 hops mTLS": {"nginx pair": nginx_workers["mtls"]},
    }
    for label in rf:
        procs[label] = {k: [v] for k, v in rf_procs(label).items() if v}
    if litellm:
        procs["LiteLLM 1 worker"] = {"litellm": tree(litellm.pid)}

    idle = {t: {k: sum(mem_kb(p, "VmRSS") for p in ps) for k, ps in g.items()}
            for t, g in procs.items()}

    auth = ["Authorization: Bearer sk-bench-1234"]
    workloads = {
        "W1 A2A SendMessage (2 KB)": (a2a, '"completed"', {
            "direct": "http://127.0.0.1:18000/a2a",
            "nginx 1 hop": "http://127.0.0.1:18080/a2a",
            "nginx 2 hops mTLS": "http://127.0.0.1:18081/a2a",
            **{l: f"http://127.0.0.1:{b + 21}/agents/callee/a2a" for l, (_, b) in rf.items()},
        }),
        "W2 chat completion": (chat, '"usage"', {
            "direct": "http://127.0.0.1:18000/v1/chat/completions",
            "nginx 1 hop": "http://127.0.0.1:18080/v1/chat/completions",
            **{l: f"http://127.0.0.1:{b + 21}/models/openai/v1/chat/completions"
               for l, (_, b) in rf.items()},
            **({"LiteLLM 1 worker": "http://127.0.0.1:18400/v1/chat/completions"} if litellm else {}),
        }),
        "W2s chat completion, streamed": (chat_s, "[DONE]", {
            "direct": "http://127.0.0.1:18000/v1/chat/completions",
            "nginx 1 hop": "http://127.0.0.1:18080/v1/chat/completions",
            **{l: f"http://127.0.0.1:{b + 21}/models/openai/v1/chat/completions"
               for l, (_, b) in rf.items()},
            **({"LiteLLM 1 worker": "http://127.0.0.1:18400/v1/chat/completions"} if litellm else {}),
        }),
    }
    for wl in list(workloads):
        if wl_picks and not any(wl.split()[0] == w for w in wl_picks):
            del workloads[wl]
            continue
        for t in list(workloads[wl][2]):
            if not wanted(t):
                del workloads[wl][2][t]
    shapes = [("c=1", ["--concurrency", "1", "--requests", str(a.c1_requests),
                       "--duration", str(a.seconds)])]
    shapes += [(f"{r} RPS open loop", ["--rate", str(r), "--duration", str(a.seconds),
                                        "--requests", str(int(r * a.seconds))]) for r in rates]

    # results[(workload, shape, target)] = list of per-round dicts
    results = {}
    for rnd in range(a.rounds):
        for wl, (body_file, expect, targets) in workloads.items():
            for shape, extra in shapes:
                names = list(targets)
                rot = rnd % len(names)
                names = names[rot:] + names[:rot]
                for t in names:
                    if t.startswith("LiteLLM") and shape != "c=1":
                        continue  # ~160 requests/s per core: an open loop at 1k RPS only queues.
                    ex = list(extra)
                    if t.startswith("LiteLLM"):
                        ex = ["--concurrency", "1", "--requests", "300", "--duration",
                              str(a.seconds), "--warmup", "20"]
                    group = procs.get(t, {})
                    before = {k: sum(cpu_ticks(p) for p in ps) for k, ps in group.items()}
                    if t.startswith("rf "):
                        ex.append("--join-run")
                    r = load(bench, targets[t], body_file, ex, expect,
                             auth if t.startswith("LiteLLM") else ())
                    after = {k: sum(cpu_ticks(p) for p in ps) for k, ps in group.items()}
                    n = max(r.get("requests", 0), 1)
                    r["cpu_us"] = {k: (after[k] - before[k]) * 1e6 / TICK / n for k in group}
                    results.setdefault((wl, shape, t), []).append(r)
                    print(f"round {rnd + 1} | {wl} | {shape} | {t}: p50 {r.get('p50_us', 0):.0f} µs"
                          f" p99 {r.get('p99_us', 0):.0f} µs errors {r.get('errors')}"
                          f" cpu {json.dumps({k: round(v, 1) for k, v in r['cpu_us'].items()})}",
                          file=sys.stderr, flush=True)

    peak = {t: {k: sum(mem_kb(p, "VmHWM") for p in ps) for k, ps in g.items()}
            for t, g in procs.items()}
    sink_stats = None
    if any(r[3] for r in ladder):
        time.sleep(1)  # the exporter flushes every 500 ms
        r = subprocess.run(["curl", "-fsS", f"http://127.0.0.1:{SINK_PORT}/stats"],
                           capture_output=True, text=True)
        sink_stats = r.stdout.strip() or r.stderr.strip()
    stop_all()
    for name in nginx_pids:
        try:
            os.kill(nginx_pids[name], signal.SIGQUIT)
        except ProcessLookupError:
            pass

    # Report.
    out = []
    w = out.append
    w(f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
      f"{os.cpu_count()} CPUs ({cpu_model()}), {a.rounds} interleaved rounds, "
      f"{a.seconds:g} s per measurement. Latency columns: added over `direct` in the same round, "
      "µs, median (min..max) over rounds. CPU: µs of CPU per request of each proxy process "
      "(/proc/<pid>/stat). Proxies on CPU 0, mock and load generator on CPU 1.\n")
    for wl, (_, _, targets) in workloads.items():
        for shape, _ in shapes:
            w(f"\n### {wl}, {shape}\n")
            w("| target | p50 | p90 | p99 | p99.9 | CPU µs/request | errors | vs nginx 2-hop p50 |")
            w("|---|---|---|---|---|---|---|---|")
            direct = results.get((wl, shape, "direct"), [])
            for t in targets:
                rs = results.get((wl, shape, t))
                if not rs:
                    continue
                cols = []
                for q in ["p50_us", "p90_us", "p99_us", "p999_us"]:
                    if t == "direct":
                        cols.append(fmt_range([r.get(q) for r in rs]) + " (absolute)")
                    else:
                        cols.append(fmt_range([r.get(q, 0) - d_.get(q, 0)
                                               for r, d_ in zip(rs, direct)]))
                cpu = "; ".join(f"{k} {fmt_range([r['cpu_us'].get(k) for r in rs], 1)}"
                                for k in rs[0]["cpu_us"]) or "–"
                errs = sum(r.get("errors", 0) for r in rs)
                first = next((r.get("first_error") for r in rs if r.get("first_error")), None)
                errs_s = f"{errs}" + (f" ({first[:80]})" if first else "")
                ref = results.get((wl, shape, "nginx 2 hops mTLS"))
                ratio = "–"
                if ref and t not in ("direct",):
                    ratios = [(r.get("p50_us", 0) - d_.get("p50_us", 0)) /
                              max(n_.get("p50_us", 0) - d_.get("p50_us", 0), 1e-9)
                              for r, d_, n_ in zip(rs, direct, ref)]
                    ratio = fmt_range(ratios, 2) + "×"
                w(f"| {t} | " + " | ".join(cols) + f" | {cpu} | {errs_s} | {ratio} |")
    w("\n### Memory (RSS, MB)\n")
    w("| target | process | idle | peak |")
    w("|---|---|---|---|")
    for t, g in procs.items():
        for k in g:
            w(f"| {t} | {k} | {idle[t][k] / 1024:.1f} | {peak[t][k] / 1024:.1f} |")
    if sink_stats is not None:
        w(f"\nOTLP sink (spans of the +tracing rung): {sink_stats}\n")
    text = "\n".join(out) + "\n"
    (d / "results.json").write_text(json.dumps(
        {"|".join(k): v for k, v in results.items()}, indent=1))
    if a.out == "-":
        print(text)
    else:
        Path(a.out).write_text(text)
        print(text)


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
