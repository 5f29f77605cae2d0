-- The run ledger keeps every call, not only per-edge totals: `ringfence runs show` draws the
-- run's tree from them, and exports them as a trace. A call's event id is its idempotency key,
-- so this table replaces edge_events, which held the keys alone. Its keys move here as rows
-- with no caller (a re-sent old batch is still not counted twice); readers skip those rows.
CREATE TABLE calls (
    event_id    TEXT PRIMARY KEY NOT NULL,
    run_id      TEXT NOT NULL,
    trace_id    TEXT NOT NULL,
    span_id     TEXT NOT NULL,
    parent_call TEXT,
    caller      TEXT NOT NULL,
    callee      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    operation   TEXT,
    decision    TEXT NOT NULL,            -- 'allowed', or the reason of the refusal
    rule        TEXT,
    depth       BIGINT NOT NULL,
    cycle       BIGINT NOT NULL,         -- 0 or 1
    tainted     BIGINT NOT NULL,         -- 0 or 1
    latency_us  BIGINT NOT NULL,
    tokens_in   BIGINT NOT NULL,
    tokens_out  BIGINT NOT NULL,
    micros      BIGINT NOT NULL,
    at_ms       BIGINT NOT NULL,
    status      BIGINT
);
CREATE INDEX calls_by_run ON calls (run_id, at_ms);

INSERT INTO calls (event_id, run_id, trace_id, span_id, caller, callee, kind, decision, depth,
                   cycle, tainted, latency_us, tokens_in, tokens_out, micros, at_ms)
SELECT event_id, run_id, '', '', '', '', 'agent', 'allowed', 0, 0, 0, 0, 0, 0, 0, at_ms
FROM edge_events;
DROP TABLE edge_events;

ALTER TABLE edges ADD COLUMN cycles BIGINT NOT NULL DEFAULT 0;
