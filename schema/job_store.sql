-- gpuq job store, format 4 (schema/STORE.md describes it in full). One
-- SQLite file (the broker's --store PATH) in WAL mode, written by one broker
-- process, and the blob directory PATH.blobs/ beside it. Compiled into the
-- programs and run at every open, in the transaction that migrates older
-- formats. A
-- job is acknowledged to its client, and a result pushed, only after the
-- transaction that holds it commits.
--
-- Numbers in `meta` are decimal text. The integers packed in results.timing
-- and results.outputs are raw little-endian, without any header, count or
-- framing (not msgpack).

CREATE TABLE IF NOT EXISTS meta (
  name  TEXT PRIMARY KEY,
  value TEXT NOT NULL
) STRICT;
-- Rows of meta:
--   'format'   '4' (PRAGMA user_version is not used). Migrated at open,
--              with no row rewritten: format 1 (inline buffers only) gets
--              the columns in_file, seg, off and len in job_inputs and
--              result_outputs, then is format 2; format 2 (which has those
--              columns, but no 'next_id' or 'epoch' and no len in inline and
--              file rows) gets 'format' set to '3'; format 3 gets the usage
--              table (empty: usage before it is not counted) and '4'. Any
--              other value fails the open and leaves the file as it was.
--   'next_id'  with MAX(jobs.id) + 1, a bound on every job id a committed
--              transaction inserted: ids are issued from max(next_id,
--              MAX(jobs.id) + 1, 1) up, so none is issued twice (a job's id
--              outlives its purge). Written at each open, and by a commit
--              that deleted jobs rows (a purge: the only deletion, and so
--              the only way MAX(jobs.id) can fall) when it has changed.
--   'epoch'    how many times the store has been opened: each open adds one
--              and commits it before the broker serves (1 for a new store).

CREATE TABLE IF NOT EXISTS jobs (
  id           INTEGER PRIMARY KEY,      -- job id, never reused (meta 'next_id';
                                         -- not AUTOINCREMENT: the broker assigns it)
  tenant       TEXT NOT NULL,
  client_key   TEXT,                     -- idempotency key; NULL when none
  priority     INTEGER NOT NULL,
  state        TEXT NOT NULL,            -- queued | done | failed | canceled | expired
                                         -- (a job on a worker stays queued here)
  attempts     INTEGER NOT NULL DEFAULT 0,  -- dispatches, written when the job is
                                         -- requeued after its worker was lost and
                                         -- when it ends
  suspect      INTEGER NOT NULL DEFAULT 0,  -- 1: requeued after the worker it was on
                                         -- was lost (it runs alone next time)
  accepted_ms  INTEGER NOT NULL,         -- Unix time, milliseconds
  deadline_ms  INTEGER NOT NULL,         -- absolute, Unix ms; 0 = none
  spec         BLOB NOT NULL,            -- the job map (msgpack, PROTOCOL.md "submit")
                                         -- as the broker re-encodes it: limit_ms set
                                         -- to the default when absent, and without
                                         -- `files` (those inputs are job_inputs rows
                                         -- after the frames' rows)
  client       BLOB NOT NULL,            -- unused: empty in rows written by format 3
                                         -- (formats 1-2 kept a ZeroMQ routing id here)
  finished_ms  INTEGER                   -- Unix ms; set with a terminal state
) STRICT;

CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs(tenant, client_key)
  WHERE client_key IS NOT NULL;
-- No index of unfinished jobs: they are read once, at start, by a scan;
-- an index would cost two B-tree writes per job.
DROP INDEX IF EXISTS jobs_unfinished;
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs(finished_ms) WHERE finished_ms IS NOT NULL;

-- Input buffers, one row per payload index: the submit's frames (0 up), then
-- its local `files`. Removed when the job ends. Where a buffer's bytes are
-- (in_file), for a buffer of N bytes (kBlobLogMinBytes and kBlobFileMinBytes
-- in broker/job_store.h):
--   0: in `data` (N < 1 KiB); len = N.
--   2: in the input log: segment file PATH.blobs/log-i-<seg>, the N = len
--      bytes at byte `off` (1 KiB <= N < 64 KiB); `data` empty.
--   1: a file of its own, PATH.blobs/j<job_id>.i<idx> (N >= 64 KiB, or any
--      size for a local file the client handed over); `data` empty; len = N.
-- seg and off are NULL but for in_file 2. len is NULL in rows written by
-- formats 1 and 2 for in_file 0 and 1 (the length of `data`, the size of the
-- file then count). Format 1 rows are all in_file 0, of any size.
--
-- Bytes are written (and with power durability synced) before the row that
-- names them commits; files are unlinked after the row's deletion commits.
-- Appends go to one segment until a commit leaves it holding the segment
-- size (64 MiB in gpuqd) or more, then to the next (<seg> + 1); after a
-- start, to one past the largest <seg> among the segment files present and
-- the rows. A segment is the buffers' bytes end to end, with no header,
-- length or checksum: rows alone say where each buffer is. A segment that no
-- row names any more is removed, but the one appended to. At start, files
-- j*.i* and j*.o* and log segments that no row names are removed, as are
-- local files handed over by clients (c-*) and workers (w-*) last modified
-- over an hour before. A log segment may end with bytes no row names
-- (written before a crash, or by a failed transaction whose bytes could not
-- be cut off).
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
  code      TEXT NOT NULL,               -- ok (done, canceled), expired, or the
                                         -- failure's code (PROTOCOL.md "Error codes")
  error     TEXT NOT NULL,               -- empty for ok
  device    TEXT NOT NULL,               -- uuid of the GPU whose worker returned the
                                         -- result; empty when no worker did
  timing    BLOB NOT NULL,               -- 64+ bytes, 8 little-endian u64 at bytes 0, 8,
                                         -- ..., 56: queue, compile, load, h2d, kernel,
                                         -- d2h, total (microseconds), cache_hit (0/1);
                                         -- then one u64 per launch of a job of several
                                         -- launches (its time on the GPU, µs)
  outputs   BLOB NOT NULL                -- 4 bytes per output, in output (idx) order:
                                         -- its argument index, a little-endian u32
) STRICT;

-- Output buffers, one row per output: the row of idx i holds the bytes of
-- the argument named by the i-th u32 of results.outputs (the worker's
-- frames first, then its files). Their bytes are placed as inputs' are
-- (in_file, data, seg, off, len), in the output log (log-o-<seg>) or a file
-- of their own (j<job_id>.o<idx>; any size for a local worker's file).
-- Removed with their result, when it is purged.
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

-- What each tenant used, by hour: one row per tenant and hour in which its
-- jobs ended, added to in the transaction that writes each result (so the
-- totals are exactly the results written, across restarts). Never purged
-- with the jobs: kept for accounting.
CREATE TABLE IF NOT EXISTS usage (
  tenant     TEXT NOT NULL,
  hour       INTEGER NOT NULL,             -- Unix time of the jobs' ends / 3600
  done       INTEGER NOT NULL DEFAULT 0,   -- jobs that ended done
  failed     INTEGER NOT NULL DEFAULT 0,   -- ... failed (any code)
  canceled   INTEGER NOT NULL DEFAULT 0,
  expired    INTEGER NOT NULL DEFAULT 0,
  gpu_us     INTEGER NOT NULL DEFAULT 0,   -- time its jobs held a GPU (dispatch to
                                           -- result: timing total - queue)
  kernel_us  INTEGER NOT NULL DEFAULT 0,   -- their kernels' time (CUDA events)
  bytes_in   INTEGER NOT NULL DEFAULT 0,   -- input bytes of the jobs
  bytes_out  INTEGER NOT NULL DEFAULT 0,   -- output bytes of their results
  PRIMARY KEY (tenant, hour)
) STRICT, WITHOUT ROWID;

INSERT OR IGNORE INTO meta(name, value) VALUES ('format', '4');
