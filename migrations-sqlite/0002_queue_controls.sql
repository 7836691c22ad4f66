-- Queue controls, as the Postgres migration 0003: retry backoff, the last transient error,
-- pause requests and idempotent creates.

-- A queued job is claimable only from this time on (microseconds since the Unix epoch); NULL
-- means at once.
ALTER TABLE jobs ADD COLUMN run_after INTEGER
    CONSTRAINT jobs_run_after_only_queued CHECK (run_after IS NULL OR status = 'queued');
-- The error of the latest attempt that ended without finishing the job, as {code, message, param}.
ALTER TABLE jobs ADD COLUMN last_error TEXT CHECK (last_error IS NULL OR json_valid(last_error));
-- Set on a running job whose pause was requested; its worker checkpoints and pauses it.
ALTER TABLE jobs ADD COLUMN pause_requested INTEGER NOT NULL DEFAULT 0
    CHECK (pause_requested IN (0, 1));
-- The client's Idempotency-Key and the SHA-256 of its canonical request body.
ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
ALTER TABLE jobs ADD COLUMN request_hash TEXT
    CONSTRAINT jobs_idempotency_key_has_hash CHECK ((idempotency_key IS NULL) = (request_hash IS NULL));

-- One job per key: two concurrent creates with one key insert one row.
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key);
