// The job store's large buffers: one file each in a directory beside the
// SQLite file (schema/job_store.sql says which). Writing a file costs a copy
// into the page cache; a SQLite blob of the same size is written to the WAL
// and again at each checkpoint, and read back through the pager.
//
// Owned by the job store's thread: not thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace gpuq::broker {

class BlobDir {
 public:
  // Creates the directory if needed (mode 0700: inputs are tenants' data).
  static StatusOr<BlobDir> Open(std::string path);

  const std::string& path() const { return path_; }

  // Writes `name` whole, replacing any file of that name; with `sync` it is
  // on stable storage (fdatasync) when this returns. The directory entry is
  // made durable by SyncDir(). On failure no file `name` is left.
  Status Write(const std::string& name, std::string_view data, bool sync) const;
  StatusOr<std::string> Read(const std::string& name) const;
  // The size of `name`, a regular file (not a link). On failure the
  // message is the reason alone ("No such file or directory", "not a
  // regular file"): the caller names the file as its reader knows it.
  StatusOr<uint64_t> Size(const std::string& name) const;
  // Best effort: a file already gone is not an error.
  void Remove(const std::string& name) const;
  // Renames `from` to `to` (both names in the directory) and checks that
  // `to` is a regular file of one link (else removes it: kInvalid); with
  // `sync` its data is then on stable storage. `size` gets its size. On any
  // failure after the rename, `to` is removed.
  Status Adopt(const std::string& from, const std::string& to, uint64_t* size, bool sync) const;
  // Undoes an Adopt: `to` goes back to its peer's name `from` (best effort;
  // where that fails, `to` is removed).
  void Unadopt(const std::string& from, const std::string& to) const;
  // Removes the files whose names start with `prefix` and that were last
  // changed more than `age_s` seconds ago.
  void RemoveStale(const std::string& prefix, int64_t age_s) const;
  Status SyncDir() const;
  // How many times SyncDir() made the directory durable.
  uint64_t dir_syncs() const { return dir_syncs_; }
  // The names of the regular files in the directory.
  StatusOr<std::vector<std::string>> List() const;

 private:
  explicit BlobDir(std::string path) : path_(std::move(path)) {}
  std::string path_;
  mutable uint64_t dir_syncs_ = 0;
};

// The job store's small buffers (1 KiB up to the file threshold), appended
// to log segments of the blob directory (PREFIX-N; inputs and outputs have a
// log each, as they live for different times): each byte is written once,
// where a SQLite blob of a few KiB takes overflow pages, a WAL frame and a
// checkpoint. Rows name (segment, offset, length). Appends of a transaction
// are written by one write() before its commit (and synced first with power
// durability); a segment no row names any more is removed, except the one
// being appended to. A crash leaves at most unnamed bytes at a segment's end;
// a failed transaction leaves none (Aborted() cuts them off).
//
// Owned by the job store's thread: not thread-safe.
class BlobLog {
 public:
  struct Ref {
    uint64_t seg = 0, off = 0, len = 0;
  };
  // What RollbackTo() goes back to.
  struct Mark {
    size_t rows = 0, bytes = 0;
  };
  // `live`: rows per segment, as the store holds them. Segments of the
  // directory that no row names are removed; appends go to a new segment.
  static StatusOr<std::unique_ptr<BlobLog>> Open(const BlobDir* dir, std::string prefix,
                                                 std::map<uint64_t, uint64_t> live,
                                                 uint64_t segment_bytes);
  ~BlobLog();
  BlobLog(const BlobLog&) = delete;
  BlobLog& operator=(const BlobLog&) = delete;

  // The file name of segment `seg` (in the blob directory).
  std::string Name(uint64_t seg) const { return prefix_ + std::to_string(seg); }

  // Inside a transaction.
  Ref Append(std::string_view data);
  void Release(uint64_t seg);  // a row naming `seg` is deleted
  Mark mark() const { return {added_.size(), pending_.size()}; }
  // Drops the appends since `m` (their rows were rolled back).
  void RollbackTo(const Mark& m);

  // Before the commit: writes the appends (and syncs them when `sync`).
  // On failure part of them may be in the segment until Aborted().
  Status Flush(bool sync);
  // After the commit: counts the rows, removes dead segments, starts a new
  // segment when this one is full.
  void Committed();
  // After a rollback: forgets the transaction's appends and releases, and
  // cuts off whatever of them Flush() wrote, so that the next append starts
  // where its row will say.
  void Aborted();

  // The bytes `r` names, committed or appended by the open transaction.
  StatusOr<std::string> Read(const Ref& r) const;
  // Whether the segment holds `r`'s range, without reading it. On failure
  // the message is the reason alone (see BlobDir::Size).
  Status Check(const Ref& r) const;

 private:
  BlobLog(const BlobDir* dir, std::string prefix, uint64_t segment_bytes)
      : dir_(dir), prefix_(std::move(prefix)), segment_bytes_(segment_bytes) {}

  const BlobDir* dir_;
  const std::string prefix_;  // "log-i-" or "log-o-"
  const uint64_t segment_bytes_;
  std::map<uint64_t, uint64_t> live_;  // rows per segment (committed)
  uint64_t seg_ = 0;                   // the segment appended to
  int fd_ = -1;                        // open from its first write; owned
  // Invariant: bytes of the segment below committed_size_ are committed (or
  // dead); those from it up were written by the open transaction. The file
  // holds size_ bytes but after a failed Flush(), until Aborted().
  uint64_t size_ = 0;                  // its bytes written
  uint64_t committed_size_ = 0;
  std::string pending_;                // appends not yet written: bytes size_ on
  std::vector<uint64_t> added_, released_;  // segments, per row, this transaction
};

}  // namespace gpuq::broker
