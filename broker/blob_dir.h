// The job store's large buffers: one file each in a directory beside the
// SQLite file (schema/job_store.sql says which). Writing a file costs a copy
// into the page cache; a SQLite blob of the same size is written to the WAL
// and again at each checkpoint, and read back through the pager.
//
// Owned by the job store's thread: not thread-safe.
#pragma once

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
  // made durable by SyncDir().
  Status Write(const std::string& name, std::string_view data, bool sync) const;
  StatusOr<std::string> Read(const std::string& name) const;
  // Best effort: a file already gone is not an error.
  void Remove(const std::string& name) const;
  // Renames `from` to `to` (both names in the directory) and checks that
  // `to` is a regular file of one link (else removes it: kInvalid); with
  // `sync` its data is then on stable storage. `size` gets its size.
  Status Adopt(const std::string& from, const std::string& to, uint64_t* size, bool sync) const;
  // Removes the files whose names start with `prefix` and that were last
  // changed more than `age_s` seconds ago.
  void RemoveStale(const std::string& prefix, int64_t age_s) const;
  Status SyncDir() const;
  // The names of the regular files in the directory.
  StatusOr<std::vector<std::string>> List() const;

 private:
  explicit BlobDir(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

}  // namespace gpuq::broker
