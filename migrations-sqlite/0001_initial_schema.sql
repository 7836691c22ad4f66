-- The SQLite schema of the embedded store: the same tables and invariants as the Postgres
-- migrations, including 0002's token accuracy columns. Timestamps are INTEGER microseconds since
-- the Unix epoch, written from the service's clock, so they compare exactly and never depend on
-- SQLite's own clock. JSON values are TEXT and booleans are 0 or 1. `seq` is the rowid;
-- AUTOINCREMENT keeps it increasing and never reused, which `after` paging relies on.

CREATE TABLE files (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,
    filename    TEXT NOT NULL,
    purpose     TEXT NOT NULL CHECK (purpose IN ('fine-tune')),
    bytes       INTEGER NOT NULL CHECK (bytes >= 0),
    sha256      TEXT NOT NULL CHECK (length(sha256) = 64 AND sha256 NOT GLOB '*[^0-9a-f]*'),
    format      TEXT NOT NULL,
    line_count  INTEGER NOT NULL CHECK (line_count >= 0),
    status      TEXT NOT NULL DEFAULT 'processed' CHECK (status IN ('uploaded', 'processed', 'error'))
);

CREATE TABLE jobs (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT NOT NULL UNIQUE,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    started_at        INTEGER,
    finished_at       INTEGER,
    status            TEXT NOT NULL CHECK (status IN
                        ('validating_files', 'queued', 'running', 'paused', 'succeeded', 'failed', 'cancelled')),
    model             TEXT NOT NULL,
    training_file     TEXT NOT NULL REFERENCES files (id),
    validation_file   TEXT REFERENCES files (id),
    suffix            TEXT,
    seed              INTEGER NOT NULL,
    metadata          TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
    -- The validated JobSpec, every "auto" resolved.
    spec              TEXT NOT NULL CHECK (json_valid(spec)),
    hyperparameters   TEXT NOT NULL CHECK (json_valid(hyperparameters)),
    error             TEXT CHECK (error IS NULL OR json_valid(error)),
    fine_tuned_model  TEXT,
    trained_tokens    INTEGER,
    locked_by         TEXT,
    lease_expires_at  INTEGER,
    attempt           INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts      INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts > 0),
    cancel_requested  INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),

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
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    level       TEXT NOT NULL CHECK (level IN ('info', 'warn', 'error')),
    type        TEXT NOT NULL CHECK (type IN ('message', 'metrics')),
    message     TEXT NOT NULL,
    data        TEXT CHECK (data IS NULL OR json_valid(data))
);

CREATE INDEX job_events_by_job ON job_events (job_id, seq);

CREATE TABLE job_metrics (
    job_id                     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step                       INTEGER NOT NULL CHECK (step >= 1),
    created_at                 INTEGER NOT NULL,
    epoch                      REAL NOT NULL,
    train_loss                 REAL NOT NULL,
    valid_loss                 REAL,
    learning_rate              REAL NOT NULL,
    grad_norm                  REAL NOT NULL,
    tokens_per_second          REAL NOT NULL,
    trained_tokens             INTEGER NOT NULL,
    train_mean_token_accuracy  REAL,
    valid_mean_token_accuracy  REAL,
    PRIMARY KEY (job_id, step)
);

CREATE TABLE checkpoints (
    id            TEXT PRIMARY KEY,
    job_id        TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step          INTEGER NOT NULL CHECK (step >= 1),
    created_at    INTEGER NOT NULL,
    metrics       TEXT NOT NULL CHECK (json_valid(metrics)),
    artifact_key  TEXT NOT NULL,
    UNIQUE (job_id, step)
);
