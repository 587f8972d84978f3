-- gpuq kernel cache, format 1 (schema/STORE.md, "The kernel cache", describes
-- it in full). One SQLite file in WAL mode, shared by any number of
-- processes. Compiled into the programs and run, in one transaction, at every
-- open; it is idempotent, so several processes may create a new file at
-- once. A file whose meta 'format' is then not '1' is refused. A file that is not a sound cache
-- is moved aside to PATH.damaged-<Unix seconds> and a fresh one started.

CREATE TABLE IF NOT EXISTS meta (
  name  TEXT PRIMARY KEY,
  value TEXT NOT NULL
) STRICT;

-- One row per cache key. key = SHA-256 over these fields, each preceded by
-- its length as a little-endian u64: "gpuq-kernel-cache/2", NVRTC's version,
-- the target architecture, the source's file name, the source, the number of
-- named headers (decimal text) then each name and content, the number of
-- options then each option, the number of name expressions then each
-- expression (schema/PROTOCOL.md, "Kernel cache"). A source NVRTC rejects is
-- stored (ok = 0); a compile stopped by its time or memory bound is not.
-- Inserting an entry evicts the least recently used others while SUM(bytes)
-- exceeds the cap (CacheOptions::max_bytes, 1 GiB by default).
CREATE TABLE IF NOT EXISTS kernels (
  key           BLOB PRIMARY KEY,     -- 32 bytes
  arch          TEXT NOT NULL,        -- sm_90, compute_90
  nvrtc_version TEXT NOT NULL,        -- "13.0"
  ok            INTEGER NOT NULL,     -- 1 compiled; 0 rejected (log says why)
  code          TEXT NOT NULL,        -- ok | compile_error | sandbox_violation
  ptx           BLOB NOT NULL,        -- PTX text, no trailing NUL; empty when not ok
  cubin         BLOB NOT NULL,        -- empty for compute_XX or when not ok
  lowered       TEXT NOT NULL,        -- "expression\tlowered\n" per name expression
  log           TEXT NOT NULL,        -- NVRTC's log (the full log on failure)
  compile_us    INTEGER NOT NULL,     -- wall time of the compile as the service saw it
                                      -- (helper taken, sandboxed compile, output read)
  created_ms    INTEGER NOT NULL,     -- Unix time in milliseconds
  last_used_ms  INTEGER NOT NULL,     -- Unix ms: the insert, then hits; a hit writes
                                      -- it only when it is 30 s old or more
  hits          INTEGER NOT NULL DEFAULT 0,  -- hits since the entry was stored
  bytes         INTEGER NOT NULL      -- length(ptx)+length(cubin)+length(log)
) STRICT;

CREATE INDEX IF NOT EXISTS kernels_by_last_used ON kernels(last_used_ms);

-- A compile in progress, so that two processes do not compile one key at
-- once. The owner deletes its row when done. A row is taken over when it is
-- older than the compile wall-time limit plus 5 s, or when its host is this
-- host and no process `pid` lives there.
CREATE TABLE IF NOT EXISTS compiling (
  key        BLOB PRIMARY KEY,
  pid        INTEGER NOT NULL,
  host       TEXT NOT NULL,
  started_ms INTEGER NOT NULL
) STRICT;

-- Counters over the life of the file: hits, misses, evictions. Hits and
-- misses are counted in memory and written with the next write of the
-- process, by a stats read, and when the cache is closed.
CREATE TABLE IF NOT EXISTS counters (
  name  TEXT PRIMARY KEY,
  value INTEGER NOT NULL
) STRICT;

INSERT OR IGNORE INTO meta(name, value) VALUES ('format', '1');
INSERT OR IGNORE INTO counters(name, value) VALUES ('hits', 0), ('misses', 0), ('evictions', 0);
