-- Queue controls: retry backoff, the last transient error, pause requests and idempotent creates.

ALTER TABLE jobs
    -- A queued job is claimable only from this time on; NULL means at once. The store sets it
    -- from its own clock when it requeues a failed attempt.
    ADD COLUMN run_after        TIMESTAMPTZ,
    -- The error of the latest attempt that ended without finishing the job, as {code, message, param}.
    ADD COLUMN last_error       JSONB,
    -- Set on a running job whose pause was requested; its worker checkpoints and pauses it.
    ADD COLUMN pause_requested  BOOLEAN NOT NULL DEFAULT FALSE,
    -- The client's Idempotency-Key and the SHA-256 of its canonical request body.
    ADD COLUMN idempotency_key  TEXT,
    ADD COLUMN request_hash     TEXT,
    ADD CONSTRAINT jobs_run_after_only_queued CHECK (run_after IS NULL OR status = 'queued'),
    ADD CONSTRAINT jobs_idempotency_key_has_hash CHECK (
        (idempotency_key IS NULL) = (request_hash IS NULL));

-- One job per key: two concurrent creates with one key insert one row.
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (idempotency_key);
