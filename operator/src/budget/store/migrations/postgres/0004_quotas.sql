-- Windowed quotas (version 4, PostgreSQL). Keep in step with ../sqlite/0004_quotas.sql.
-- A quota counter is named by (quota_id, quota_key, win): the RunBudget quota, what it counts
-- together (`team:search`), and its window (`day`, or `sliding day`).

-- Each counter's terms as the last lease brought them, and when its breach was last handled
-- (halt and alert once per window).
CREATE TABLE quotas (
    quota_id        TEXT NOT NULL,
    quota_key       TEXT NOT NULL,
    win             TEXT NOT NULL,
    max_tokens      BIGINT,
    max_micros      BIGINT,
    on_breach       TEXT NOT NULL,
    alert_webhook   TEXT,
    tripped_ms      BIGINT,                  -- the window (start) whose breach was handled
    seen_at_ms      BIGINT NOT NULL,
    PRIMARY KEY (quota_id, quota_key, win)
);

-- Spend per counter and time bucket: a calendar window has one row per window start; a sliding
-- window one row per 1/60 of the window, summed over the last 60 (plus the current one).
CREATE TABLE quota_buckets (
    quota_id  TEXT NOT NULL,
    quota_key TEXT NOT NULL,
    win       TEXT NOT NULL,
    start_ms  BIGINT NOT NULL,
    tokens    BIGINT NOT NULL,
    micros    BIGINT NOT NULL,
    PRIMARY KEY (quota_id, quota_key, win, start_ms)
);

-- Which counters a lease reserves against and its spend counts toward.
CREATE TABLE lease_quotas (
    lease_id  TEXT NOT NULL,
    quota_id  TEXT NOT NULL,
    quota_key TEXT NOT NULL,
    win       TEXT NOT NULL,
    PRIMARY KEY (lease_id, quota_id, quota_key, win)
);
CREATE INDEX lease_quotas_by_quota ON lease_quotas (quota_id, quota_key, win);
