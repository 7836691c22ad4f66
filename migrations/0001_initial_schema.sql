-- Files, fine-tuning jobs and the queue, job events, per-step metrics and checkpoints.
-- Ids are text with OpenAI's prefixes; `seq` gives a stable order for `after` paging.

CREATE TABLE files (
    id          TEXT PRIMARY KEY,
    seq         BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL,
    filename    TEXT NOT NULL,
    purpose     TEXT NOT NULL CHECK (purpose IN ('fine-tune')),
    bytes       BIGINT NOT NULL CHECK (bytes >= 0),
    sha256      TEXT NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    format      TEXT NOT NULL,
    line_count  BIGINT NOT NULL CHECK (line_count >= 0),
    status      TEXT NOT NULL DEFAULT 'processed' CHECK (status IN ('uploaded', 'processed', 'error'))
);

CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    seq               BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL,
    started_at        TIMESTAMPTZ,
    finished_at       TIMESTAMPTZ,
    status            TEXT NOT NULL CHECK (status IN
                        ('validating_files', 'queued', 'running', 'paused', 'succeeded', 'failed', 'cancelled')),
    model             TEXT NOT NULL,
    training_file     TEXT NOT NULL REFERENCES files (id),
    validation_file   TEXT REFERENCES files (id),
    suffix            TEXT,
    seed              BIGINT NOT NULL,
    metadata          JSONB,
    -- The validated JobSpec, every "auto" resolved.
    spec              JSONB NOT NULL,
    hyperparameters   JSONB NOT NULL,
    error             JSONB,
    fine_tuned_model  TEXT,
    trained_tokens    BIGINT,
    locked_by         TEXT,
    lease_expires_at  TIMESTAMPTZ,
    attempt           INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts      INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts > 0),
    cancel_requested  BOOLEAN NOT NULL DEFAULT FALSE,

    -- Terminal states are exactly the ones with a finish time.
    CONSTRAINT jobs_finished_at_iff_terminal CHECK (
        (status IN ('succeeded', 'failed', 'cancelled')) = (finished_at IS NOT NULL)),
    -- A running job always has an owner and a lease; no other state has an owner.
    CONSTRAINT jobs_running_iff_locked CHECK (
        (status = 'running') = (locked_by IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT jobs_succeeded_has_model CHECK (
        status <> 'succeeded' OR fine_tuned_model IS NOT NULL),
    CONSTRAINT jobs_failed_has_error CHECK (
        status <> 'failed' OR error IS NOT NULL),
    CONSTRAINT jobs_attempt_within_max CHECK (attempt <= max_attempts)
);

-- The claim picks the oldest queued job; the rescue scans running jobs by lease.
CREATE INDEX jobs_queued_by_age ON jobs (seq) WHERE status = 'queued';
CREATE INDEX jobs_running_by_lease ON jobs (lease_expires_at) WHERE status = 'running';
CREATE INDEX jobs_fine_tuned_models ON jobs (seq) WHERE status = 'succeeded';

CREATE TABLE job_events (
    id          TEXT PRIMARY KEY,
    seq         BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    created_at  TIMESTAMPTZ NOT NULL,
    level       TEXT NOT NULL CHECK (level IN ('info', 'warn', 'error')),
    type        TEXT NOT NULL CHECK (type IN ('message', 'metrics')),
    message     TEXT NOT NULL,
    data        JSONB
);

CREATE INDEX job_events_by_job ON job_events (job_id, seq);

CREATE TABLE job_metrics (
    job_id             TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step               BIGINT NOT NULL CHECK (step >= 1),
    created_at         TIMESTAMPTZ NOT NULL,
    epoch              DOUBLE PRECISION NOT NULL,
    train_loss         DOUBLE PRECISION NOT NULL,
    valid_loss         DOUBLE PRECISION,
    learning_rate      DOUBLE PRECISION NOT NULL,
    grad_norm          DOUBLE PRECISION NOT NULL,
    tokens_per_second  DOUBLE PRECISION NOT NULL,
    trained_tokens     BIGINT NOT NULL,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE checkpoints (
    id            TEXT PRIMARY KEY,
    job_id        TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step          BIGINT NOT NULL CHECK (step >= 1),
    created_at    TIMESTAMPTZ NOT NULL,
    metrics       JSONB NOT NULL,
    artifact_key  TEXT NOT NULL,
    UNIQUE (job_id, step)
);
