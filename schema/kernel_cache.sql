-- gpuq kernel cache, format version 1 (see schema/PROTOCOL.md, "Kernel cache").
-- One SQLite file in WAL mode, shared by any number of processes.

CREATE TABLE IF NOT EXISTS meta (
  name  TEXT PRIMARY KEY,
  value TEXT NOT NULL
) STRICT;

-- One row per cache key. key = SHA-256 over the cache-format version, NVRTC
-- version, target architecture, source, named headers, options and name
-- expressions (each length-prefixed).
CREATE TABLE IF NOT EXISTS kernels (
  key           BLOB PRIMARY KEY,     -- 32 bytes
  arch          TEXT NOT NULL,        -- sm_90, compute_90
  nvrtc_version TEXT NOT NULL,        -- "13.0"
  ok            INTEGER NOT NULL,     -- 1 compiled; 0 rejected (log says why)
  code          TEXT NOT NULL,        -- ok | compile_error | sandbox_violation
  ptx           BLOB NOT NULL,        -- empty when not ok
  cubin         BLOB NOT NULL,        -- empty for compute_XX or when not ok
  lowered       TEXT NOT NULL,        -- "expression\tlowered\n" per name expression
  log           TEXT NOT NULL,        -- NVRTC's log (the full log on failure)
  compile_us    INTEGER NOT NULL,     -- wall time of the sandboxed compile
  created_ms    INTEGER NOT NULL,     -- Unix time in milliseconds
  last_used_ms  INTEGER NOT NULL,
  hits          INTEGER NOT NULL DEFAULT 0,
  bytes         INTEGER NOT NULL      -- length(ptx)+length(cubin)+length(log)
) STRICT;

CREATE INDEX IF NOT EXISTS kernels_by_last_used ON kernels(last_used_ms);

-- A compile in progress, so that two processes do not compile one key at
-- once. The owner deletes its row when done; a row whose owner is dead, or
-- that is older than the compile wall-time limit, may be taken over.
CREATE TABLE IF NOT EXISTS compiling (
  key        BLOB PRIMARY KEY,
  pid        INTEGER NOT NULL,
  host       TEXT NOT NULL,
  started_ms INTEGER NOT NULL
) STRICT;

-- Lookup counters over the life of the file: hits, misses, evictions.
CREATE TABLE IF NOT EXISTS counters (
  name  TEXT PRIMARY KEY,
  value INTEGER NOT NULL
) STRICT;

INSERT OR IGNORE INTO meta(name, value) VALUES ('format', '1');
INSERT OR IGNORE INTO counters(name, value) VALUES ('hits', 0), ('misses', 0), ('evictions', 0);
