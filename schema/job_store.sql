-- gpuq job store, format version 2 (see schema/PROTOCOL.md). One SQLite file
-- in WAL mode, written by the broker only. A job is acknowledged to its client
-- only after its row is committed.

CREATE TABLE IF NOT EXISTS meta (
  name  TEXT PRIMARY KEY,
  value TEXT NOT NULL
) STRICT;

CREATE TABLE IF NOT EXISTS jobs (
  id           INTEGER PRIMARY KEY,      -- job id, never reused
  tenant       TEXT NOT NULL,
  client_key   TEXT,                     -- idempotency key; NULL when none
  priority     INTEGER NOT NULL,
  state        TEXT NOT NULL,            -- queued | done | failed | canceled | expired
  attempts     INTEGER NOT NULL DEFAULT 0,
  suspect      INTEGER NOT NULL DEFAULT 0,  -- was in flight on a worker that faulted
  accepted_ms  INTEGER NOT NULL,         -- Unix time, milliseconds
  deadline_ms  INTEGER NOT NULL,         -- absolute; 0 = none
  spec         BLOB NOT NULL,            -- the submit header's job map (msgpack)
  client       BLOB NOT NULL,            -- ZeroMQ routing id of the submitter, for the push
  finished_ms  INTEGER                   -- set with a terminal state
) STRICT;

CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs(tenant, client_key)
  WHERE client_key IS NOT NULL;
-- No index of unfinished jobs: they are read once, at start, by a scan;
-- an index would cost two B-tree writes per job.
DROP INDEX IF EXISTS jobs_unfinished;
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs(finished_ms) WHERE finished_ms IS NOT NULL;

-- Input buffers (payload frames), removed when the job ends. Where a
-- buffer's bytes are (in_file):
--   0: in `data` (under 1 KiB);
--   2: in a log segment of the blob directory (the store's path + ".blobs/",
--      file log-<seg>), `len` bytes at `off` (1 KiB up to 64 KiB);
--   1: a file of its own there, j<job_id>.i<idx> (64 KiB or more).
-- Bytes are written before the row that names them commits, and files are
-- unlinked after the row's deletion commits; files and segments that no row
-- names are removed at start.
CREATE TABLE IF NOT EXISTS job_inputs (
  job_id  INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
  idx     INTEGER NOT NULL,
  data    BLOB NOT NULL,
  in_file INTEGER NOT NULL DEFAULT 0,
  seg     INTEGER,
  off     INTEGER,
  len     INTEGER,
  PRIMARY KEY (job_id, idx)
) STRICT, WITHOUT ROWID;

-- The result of an ended job, kept for the retention period.
CREATE TABLE IF NOT EXISTS results (
  job_id    INTEGER PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
  code      TEXT NOT NULL,               -- ok, or the failure code
  error     TEXT NOT NULL,
  device    TEXT NOT NULL,
  timing    BLOB NOT NULL,               -- msgpack [queue, compile, load, h2d, kernel, d2h, total, cache_hit]
  outputs   BLOB NOT NULL                -- msgpack [arg index...]
) STRICT;

-- Output buffers, kept as inputs are; a file of its own is j<job_id>.o<idx>.
CREATE TABLE IF NOT EXISTS result_outputs (
  job_id  INTEGER NOT NULL REFERENCES results(job_id) ON DELETE CASCADE,
  idx     INTEGER NOT NULL,
  data    BLOB NOT NULL,
  in_file INTEGER NOT NULL DEFAULT 0,
  seg     INTEGER,
  off     INTEGER,
  len     INTEGER,
  PRIMARY KEY (job_id, idx)
) STRICT, WITHOUT ROWID;

INSERT OR IGNORE INTO meta(name, value) VALUES ('format', '2');
