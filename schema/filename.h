// The names of the files in the broker's local directory (the job store's
// blob directory): what clients and workers write there (schema/PROTOCOL.md,
// "Local buffers") and what the store keeps (schema/job_store.sql). Every
// program that makes or reads one of these names calls this file, as
// leveldb's db/filename.h is called for its files.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace gpuq::schema {

enum class FileType {
  kClientInput,   // c-RANDOM: an input a client wrote, named in a submit
  kWorkerOutput,  // w-JOB-ATTEMPT-ARG: an output a local worker wrote
  kStoredInput,   // jJOB.iIDX: input IDX of job JOB, kept by the store
  kStoredOutput,  // jJOB.oIDX: output IDX of job JOB's result
  kInputLog,      // log-i-SEG: a segment of the store's input log
  kOutputLog,     // log-o-SEG: a segment of its output log
};

inline constexpr std::string_view kClientFilePrefix = "c-";
inline constexpr std::string_view kWorkerFilePrefix = "w-";
inline constexpr std::string_view kInputLogPrefix = "log-i-";
inline constexpr std::string_view kOutputLogPrefix = "log-o-";

// The region channel's socket (PROTOCOL.md, "Regions"), in the directory.
inline constexpr std::string_view kRegionSocketName = "regions.sock";
inline std::string RegionSocketPath(const std::string& local_dir) {
  return local_dir + "/" + std::string(kRegionSocketName);
}

// c- followed by 32 random hex digits.
std::string ClientFileName();
std::string WorkerOutputName(uint64_t job, uint32_t attempt, uint32_t arg);
// kind 'i' (input) or 'o' (output).
std::string StoredBufferName(uint64_t job, char kind, uint64_t idx);
// kind 'i' or 'o'.
std::string LogSegmentName(char kind, uint64_t seg);

struct ParsedFileName {
  FileType type = FileType::kClientInput;
  uint64_t job = 0, idx = 0, seg = 0;  // as the type has them
  uint32_t attempt = 0, arg = 0;
};
// What `name` is, or false for a name none of the above makes (numbers in
// decimal without leading signs, at most 19 digits).
bool ParseFileName(std::string_view name, ParsedFileName* out);

// Whether `name` carries the prefix of what a client, or a worker, may name
// (a peer may name only its own kind of file, never the store's).
inline bool IsClientFileName(std::string_view name) {
  return name.substr(0, kClientFilePrefix.size()) == kClientFilePrefix;
}
inline bool IsWorkerFileName(std::string_view name) {
  return name.substr(0, kWorkerFilePrefix.size()) == kWorkerFilePrefix;
}

}  // namespace gpuq::schema
