-- Idempotent uploads: the client's Idempotency-Key of the upload that created a file. A repeat
-- with the key gets the file back when its content, filename and purpose match.
ALTER TABLE files ADD COLUMN idempotency_key TEXT;

-- One file per key: two concurrent uploads with one key insert one row.
CREATE UNIQUE INDEX files_idempotency_key ON files (idempotency_key);
