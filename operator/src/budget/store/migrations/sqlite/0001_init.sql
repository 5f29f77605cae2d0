-- Budget store schema, version 1 (SQLite). Keep in step with ../postgres/0001_init.sql.
-- Counters are INTEGER (64-bit); money is micro-dollars; times are Unix milliseconds.

CREATE TABLE runs (
    run_id          TEXT PRIMARY KEY NOT NULL,
    root_agent      TEXT NOT NULL,
    user_name       TEXT NOT NULL,
    max_tokens      INTEGER,
    max_micros      INTEGER,
    deadline_ms     INTEGER,
    on_breach       TEXT NOT NULL,
    budgets         TEXT NOT NULL,            -- JSON array of RunBudget names
    status          TEXT NOT NULL CHECK (status IN ('running', 'halted', 'completed')),
    opened_at_ms    INTEGER NOT NULL,
    halted_at_ms    INTEGER,
    halt_reason     TEXT,
    completed_at_ms INTEGER,
    tokens_in       INTEGER NOT NULL DEFAULT 0,
    tokens_out      INTEGER NOT NULL DEFAULT 0,
    micros          INTEGER NOT NULL DEFAULT 0,
    calls           INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX runs_by_opened ON runs (opened_at_ms);
CREATE INDEX runs_by_user ON runs (user_name);
CREATE INDEX runs_by_root ON runs (root_agent);

-- A lease keeps what it still holds: granted, less covering reports, less what was given back.
CREATE TABLE leases (
    lease_id         TEXT PRIMARY KEY NOT NULL,
    run_id           TEXT NOT NULL REFERENCES runs (run_id),
    agent            TEXT NOT NULL,
    granted_tokens   INTEGER NOT NULL,
    granted_micros   INTEGER NOT NULL,
    remaining_tokens INTEGER NOT NULL,
    remaining_micros INTEGER NOT NULL,
    granted_at_ms    INTEGER NOT NULL,
    released_at_ms   INTEGER
);
-- Only leases that still hold something count as outstanding.
CREATE INDEX leases_outstanding ON leases (run_id)
    WHERE remaining_tokens > 0 OR remaining_micros > 0;

-- Every accepted spend event, keyed by its idempotency key.
CREATE TABLE spend_events (
    event_id       TEXT PRIMARY KEY NOT NULL,
    run_id         TEXT NOT NULL REFERENCES runs (run_id),
    agent          TEXT NOT NULL,
    lease_id       TEXT,
    tokens_in      INTEGER NOT NULL,
    tokens_out     INTEGER NOT NULL,
    micros         INTEGER NOT NULL,
    calls          INTEGER NOT NULL,
    model          TEXT,
    estimated      INTEGER NOT NULL,
    at_ms          INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL
);
CREATE INDEX spend_events_by_run ON spend_events (run_id);

CREATE TABLE agent_spend (
    run_id      TEXT NOT NULL REFERENCES runs (run_id),
    agent       TEXT NOT NULL,
    tokens_in   INTEGER NOT NULL,
    tokens_out  INTEGER NOT NULL,
    micros      INTEGER NOT NULL,
    calls       INTEGER NOT NULL,
    first_at_ms INTEGER NOT NULL,
    last_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (run_id, agent)
);
CREATE INDEX agent_spend_by_agent ON agent_spend (agent);

-- The halt stream. AUTOINCREMENT: a sequence number is never reused, even after a delete.
CREATE TABLE halts (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    reason TEXT NOT NULL,
    at_ms  INTEGER NOT NULL
);

-- Ledger: event ids seen (idempotency), and one aggregate per edge of a run.
CREATE TABLE edge_events (
    event_id TEXT PRIMARY KEY NOT NULL,
    run_id   TEXT NOT NULL,
    at_ms    INTEGER NOT NULL
);

CREATE TABLE edges (
    run_id           TEXT NOT NULL,
    caller           TEXT NOT NULL,
    callee           TEXT NOT NULL,
    kind             TEXT NOT NULL,
    calls            INTEGER NOT NULL,
    denials          INTEGER NOT NULL,
    tokens           INTEGER NOT NULL,
    micros           INTEGER NOT NULL,
    max_depth        INTEGER NOT NULL,
    total_latency_us INTEGER NOT NULL,
    first_seen_ms    INTEGER NOT NULL,
    last_seen_ms     INTEGER NOT NULL,
    PRIMARY KEY (run_id, caller, callee)
);
CREATE INDEX edges_by_caller ON edges (caller);
CREATE INDEX edges_by_callee ON edges (callee);

-- rule is '' when no rule decided (a key column cannot be NULL).
CREATE TABLE edge_denials (
    run_id TEXT NOT NULL,
    caller TEXT NOT NULL,
    callee TEXT NOT NULL,
    reason TEXT NOT NULL,
    rule   TEXT NOT NULL,
    count  INTEGER NOT NULL,
    PRIMARY KEY (run_id, caller, callee, reason, rule)
);
