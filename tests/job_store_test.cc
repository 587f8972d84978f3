// The job store on a real SQLite file and blob directory: which buffers
// become files, when the files go, what a restart finds (and what it does
// with a damaged job), ids and epochs across restarts, reads inside a
// transaction, a commit that runs out of space, and the migrations of
// format-1 and format-2 stores.
#include "broker/job_store.h"

#include <gtest/gtest.h>

#include <tuple>
#include <signal.h>
#include <sqlite3.h>
#include <sys/resource.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>

#include "schema/codec.h"
#include "tests/test_util.h"

namespace gpuq::broker {
namespace {

namespace fs = std::filesystem;
using schema::Arg;
using schema::JobState;

const Status& StatusOf(const Status& s) { return s; }
template <typename T>
const Status& StatusOf(const StatusOr<T>& s) {
  return s.status();
}
#define ASSERT_OK(expr)                                  \
  do {                                                   \
    const auto& _result = (expr);                        \
    ASSERT_TRUE(_result.ok()) << StatusOf(_result).ToString(); \
  } while (0)

// The blob directory's files: buffer files, or (`logs`) log segments.
std::set<std::string> Files(const std::string& dir, bool logs = false) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::string name = e.path().filename().string();
    if ((name.rfind("log-", 0) == 0) == logs) names.insert(std::move(name));
  }
  return names;
}

// Every file under `dir` with its size.
std::map<std::string, uintmax_t> FileSizes(const std::string& dir) {
  std::map<std::string, uintmax_t> sizes;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) sizes[e.path().string()] = e.file_size();
  }
  return sizes;
}

StoredJob Job(size_t inputs) {
  StoredJob j;
  j.tenant = "t";
  j.accepted_ms = 1000;
  j.spec.kernel.source = "extern \"C\" __global__ void k(const char*, const char*) {}";
  j.spec.kernel.entry = "k";
  j.spec.launch.grid = {1, 1, 1};
  j.spec.launch.block = {1, 1, 1};
  for (uint32_t i = 0; i < inputs; ++i) j.spec.args.push_back(Arg::In(i));
  return j;
}

std::string Bytes(size_t n, char seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(seed + i * 7);
  return s;
}

std::vector<std::string_view> Views(const std::vector<std::string>& buffers) {
  return {buffers.begin(), buffers.end()};
}

// Accepts a job with `inputs` (as many In arguments) under the store's next
// id, in a transaction of its own; returns the id.
StatusOr<uint64_t> Accept(JobStore& s, const std::vector<std::string>& inputs) {
  StoredJob job = Job(inputs.size());
  job.id = s.next_id();
  GPUQ_RETURN_IF_ERROR(s.Begin());
  Status inserted = s.Insert(job, Views(inputs));
  Status committed = s.Commit();
  GPUQ_RETURN_IF_ERROR(inserted);
  GPUQ_RETURN_IF_ERROR(committed);
  return job.id;
}

// Ends job `id` as done at `at_ms` with `outputs` (arguments 0 up), in a
// transaction of its own.
Status End(JobStore& s, uint64_t id, const std::vector<std::string>& outputs, int64_t at_ms) {
  StoredResult r;
  r.id = id;
  for (uint32_t i = 0; i < outputs.size(); ++i) r.outputs.push_back(i);
  GPUQ_RETURN_IF_ERROR(s.Begin());
  Status finished = s.Finish(r, Views(outputs), at_ms);
  Status committed = s.Commit();
  GPUQ_RETURN_IF_ERROR(finished);
  return committed;
}

Status Purge(JobStore& s, int64_t before_ms) {
  GPUQ_RETURN_IF_ERROR(s.Begin());
  Status purged = s.PurgeFinished(before_ms).status();
  Status committed = s.Commit();
  GPUQ_RETURN_IF_ERROR(purged);
  return committed;
}

// Runs statements on the store's SQLite file from outside, as damage or an
// older release would.
void Sql(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  std::unique_ptr<sqlite3, int (*)(sqlite3*)> owned(db, sqlite3_close);
  ASSERT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr), SQLITE_OK)
      << sqlite3_errmsg(db);
}

// One value read from the store's SQLite file from outside, as a blob.
std::string SqlValue(const std::string& path, const std::string& query) {
  sqlite3* db = nullptr;
  EXPECT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  std::unique_ptr<sqlite3, int (*)(sqlite3*)> owned(db, sqlite3_close);
  sqlite3_stmt* raw = nullptr;
  EXPECT_EQ(sqlite3_prepare_v2(db, query.c_str(), -1, &raw, nullptr), SQLITE_OK)
      << sqlite3_errmsg(db);
  std::unique_ptr<sqlite3_stmt, int (*)(sqlite3_stmt*)> stmt(raw, sqlite3_finalize);
  if (sqlite3_step(raw) != SQLITE_ROW) return "(no row)";
  const void* p = sqlite3_column_blob(raw, 0);
  return p ? std::string(static_cast<const char*>(p), sqlite3_column_bytes(raw, 0)) : "";
}

class JobStoreTest : public ::testing::Test {
 protected:
  // (Re)opens the store, as a broker start does.
  void Open(uint64_t log_segment_bytes = 64u << 20) {
    store_.reset();
    auto opened = JobStore::Open(path_, Durability::kProcessCrash, log_segment_bytes);
    ASSERT_TRUE(opened.ok()) << opened.status().ToString();
    store_ = std::move(*opened);
  }
  JobStore& store() { return *store_; }

  gpuq::testing::TempDir dir_;
  const std::string path_ = dir_.File("jobs.db");
  const std::string blobs_ = path_ + ".blobs";
  std::unique_ptr<JobStore> store_;
};

TEST(JobStore, LargeBuffersAreFilesThatLiveAsLongAsTheirRows) {
  gpuq::testing::TempDir dir;
  const std::string path = dir.File("jobs.db"), blobs = path + ".blobs";
  auto store = JobStore::Open(path, Durability::kProcessCrash);
  ASSERT_OK(store);

  const std::string small = Bytes(kBlobFileMinBytes - 1, 'a');
  const std::string large = Bytes(kBlobFileMinBytes * 3 + 5, 'b');
  auto id = Accept(**store, {small, large});
  ASSERT_OK(id);
  const std::string in1 = "j" + std::to_string(*id) + ".i1";
  EXPECT_EQ(Files(blobs), std::set<std::string>{in1});
  EXPECT_EQ(gpuq::testing::ReadFile(blobs + "/" + in1), large);

  // A restart finds the job with both inputs described, not read: the large
  // one by its file.
  store->reset();
  store = JobStore::Open(path, Durability::kProcessCrash);
  ASSERT_OK(store);
  auto resumed = (*store)->LoadUnfinished(schema::Limits{}, 2000);
  ASSERT_OK(resumed);
  ASSERT_EQ(resumed->jobs.size(), 1u);
  const StoredJob& job = resumed->jobs[0];
  ASSERT_EQ(job.inputs.size(), 2u);
  EXPECT_EQ(job.inputs[0].size, small.size());
  EXPECT_EQ(job.inputs[0].path, "");
  EXPECT_EQ(job.inputs[0].bytes, "") << "read at start";
  EXPECT_EQ(job.inputs[1].size, large.size());
  EXPECT_EQ(job.inputs[1].path, blobs + "/" + in1);
  EXPECT_EQ(job.inputs[1].bytes, "");
  // Its dispatch reads the small one.
  auto inputs = (*store)->LoadInputs(*id);
  ASSERT_OK(inputs);
  ASSERT_EQ(inputs->size(), 2u);
  EXPECT_EQ((*inputs)[0].bytes, small);
  EXPECT_EQ((*inputs)[1].path, blobs + "/" + in1);
  EXPECT_EQ((*inputs)[1].bytes, "");

  // Finishing drops the input file (after the commit) and writes the large
  // output's file.
  StoredResult r;
  r.id = *id;
  r.outputs = {0, 1};
  const std::string out_small = Bytes(10, 'c'), out_large = Bytes(kBlobFileMinBytes, 'd');
  ASSERT_OK((*store)->Begin());
  ASSERT_OK((*store)->Finish(r, {out_small, out_large}, 5000));
  EXPECT_TRUE(fs::exists(blobs + "/" + in1)) << "unlinked before its row's deletion committed";
  ASSERT_OK((*store)->Commit());
  const std::string out1 = "j" + std::to_string(*id) + ".o1";
  EXPECT_EQ(Files(blobs), std::set<std::string>{out1});
  auto got = (*store)->GetResult(*id);
  ASSERT_OK(got);
  ASSERT_TRUE(got->has_value());
  ASSERT_EQ((*got)->data.size(), 2u);
  EXPECT_EQ((*got)->data[0].bytes, out_small);
  EXPECT_EQ((*got)->data[1].path, blobs + "/" + out1);
  EXPECT_EQ(gpuq::testing::ReadFile((*got)->data[1].path), out_large);

  // Past retention the result goes, and its file with it.
  ASSERT_OK((*store)->Begin());
  auto purged = (*store)->PurgeFinished(6000);
  ASSERT_OK(purged);
  EXPECT_EQ(*purged, 1u);
  ASSERT_OK((*store)->Commit());
  EXPECT_TRUE(Files(blobs).empty());
}

TEST(JobStore, FilesNoCommittedRowNamesAreRemovedAtOpen) {
  gpuq::testing::TempDir dir;
  const std::string path = dir.File("jobs.db"), blobs = path + ".blobs";
  {
    auto store = JobStore::Open(path, Durability::kPowerLoss);
    ASSERT_OK(store);
    ASSERT_OK(Accept(**store, {Bytes(kBlobFileMinBytes, 'x')}));
  }
  // As a crash between a file's write and its row's commit leaves them.
  gpuq::testing::WriteFile(blobs + "/j77.i0", "never committed");
  gpuq::testing::WriteFile(blobs + "/j1.o3", "never committed");
  gpuq::testing::WriteFile(blobs + "/README", "not the store's");
  auto store = JobStore::Open(path, Durability::kPowerLoss);
  ASSERT_OK(store);
  EXPECT_EQ(Files(blobs), (std::set<std::string>{"j1.i0", "README"}));
}

TEST(JobStore, AFormatOneStoreIsMigratedWithItsJobs) {
  gpuq::testing::TempDir dir;
  const std::string path = dir.File("jobs.db");
  const StoredJob job = Job(1);
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
    // Format 1, as released: no in_file columns.
    const char* v1 =
        "PRAGMA journal_mode=WAL;"
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;"
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, tenant TEXT NOT NULL, client_key TEXT,"
        " priority INTEGER NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
        " suspect INTEGER NOT NULL DEFAULT 0, accepted_ms INTEGER NOT NULL,"
        " deadline_ms INTEGER NOT NULL, spec BLOB NOT NULL, client BLOB NOT NULL,"
        " finished_ms INTEGER) STRICT;"
        "CREATE TABLE job_inputs (job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,"
        " idx INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (job_id, idx)) STRICT,"
        " WITHOUT ROWID;"
        "CREATE TABLE results (job_id INTEGER PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,"
        " code TEXT NOT NULL, error TEXT NOT NULL, device TEXT NOT NULL, timing BLOB NOT NULL,"
        " outputs BLOB NOT NULL) STRICT;"
        "CREATE TABLE result_outputs (job_id INTEGER NOT NULL REFERENCES results(job_id)"
        " ON DELETE CASCADE, idx INTEGER NOT NULL, data BLOB NOT NULL,"
        " PRIMARY KEY (job_id, idx)) STRICT, WITHOUT ROWID;"
        "INSERT INTO meta VALUES ('format', '1');";
    ASSERT_EQ(sqlite3_exec(db, v1, nullptr, nullptr, nullptr), SQLITE_OK) << sqlite3_errmsg(db);
    sqlite3_stmt* st = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db,
                                 "INSERT INTO jobs(id, tenant, priority, state, accepted_ms, "
                                 "deadline_ms, spec, client) VALUES (7, 't', 4, 'queued', 1, 0, "
                                 "?1, x'00')",
                                 -1, &st, nullptr),
              SQLITE_OK);
    const std::string spec = schema::EncodeJobSpec(job.spec);
    sqlite3_bind_blob(st, 1, spec.data(), int(spec.size()), SQLITE_TRANSIENT);
    ASSERT_EQ(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    ASSERT_EQ(sqlite3_prepare_v2(db, "INSERT INTO job_inputs VALUES (7, 0, ?1)", -1, &st, nullptr),
              SQLITE_OK);
    const std::string input = Bytes(kBlobFileMinBytes * 2, 'm');  // inline in format 1
    sqlite3_bind_blob(st, 1, input.data(), int(input.size()), SQLITE_TRANSIENT);
    ASSERT_EQ(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    sqlite3_close(db);
  }
  auto store = JobStore::Open(path, Durability::kProcessCrash);
  ASSERT_OK(store);
  EXPECT_EQ(SqlValue(path, "SELECT value FROM meta WHERE name = 'format'"), "4");
  EXPECT_EQ((*store)->next_id(), 8u);
  auto resumed = (*store)->LoadUnfinished(schema::Limits{}, 2000);
  ASSERT_OK(resumed);
  EXPECT_TRUE(resumed->quarantined.empty());
  ASSERT_EQ(resumed->jobs.size(), 1u);
  EXPECT_EQ(resumed->jobs[0].id, 7u);
  ASSERT_EQ(resumed->jobs[0].inputs.size(), 1u);
  EXPECT_EQ(resumed->jobs[0].inputs[0].size, kBlobFileMinBytes * 2);
  auto inputs = (*store)->LoadInputs(7);
  ASSERT_OK(inputs);
  ASSERT_EQ(inputs->size(), 1u);
  EXPECT_EQ((*inputs)[0].bytes, Bytes(kBlobFileMinBytes * 2, 'm'));
  // New rows of the migrated store use files.
  auto id = Accept(**store, {Bytes(kBlobFileMinBytes, 'n')});
  ASSERT_OK(id);
  EXPECT_EQ(*id, 8u);
  EXPECT_TRUE(fs::exists(path + ".blobs/j8.i0"));
}

TEST_F(JobStoreTest, AFormatTwoStoreIsMigratedWithItsJobs) {
  // A format-2 store: the same tables, no 'next_id' or 'epoch', and no len
  // in inline and file rows.
  Open();
  const std::string inline_input = Bytes(100, 'i'), file_input = Bytes(kBlobFileMinBytes, 'f');
  ASSERT_OK(Accept(store(), {inline_input, file_input}));
  ASSERT_OK(Accept(store(), {}));
  ASSERT_OK(End(store(), 2, {}, 5000));
  store_.reset();
  Sql(path_,
      "UPDATE meta SET value = '2' WHERE name = 'format';"
      "DELETE FROM meta WHERE name IN ('next_id', 'epoch');"
      "UPDATE job_inputs SET len = NULL WHERE in_file <> 2;");

  Open();
  EXPECT_EQ(SqlValue(path_, "SELECT value FROM meta WHERE name = 'format'"), "4");
  EXPECT_EQ(store().epoch(), 1u);
  EXPECT_EQ(store().next_id(), 3u);
  auto resumed = store().LoadUnfinished(schema::Limits{}, 6000);
  ASSERT_OK(resumed);
  EXPECT_TRUE(resumed->quarantined.empty());
  ASSERT_EQ(resumed->jobs.size(), 1u);
  ASSERT_EQ(resumed->jobs[0].inputs.size(), 2u);
  EXPECT_EQ(resumed->jobs[0].inputs[0].size, inline_input.size());
  EXPECT_EQ(resumed->jobs[0].inputs[1].size, file_input.size());
  auto inputs = store().LoadInputs(1);
  ASSERT_OK(inputs);
  EXPECT_EQ((*inputs)[0].bytes, inline_input);
  EXPECT_EQ(gpuq::testing::ReadFile((*inputs)[1].path), file_input);
  // Job 2, the last, purged before any insert: its id is not issued again.
  ASSERT_OK(Purge(store(), 6000));
  Open();
  EXPECT_EQ(store().next_id(), 3u);
}

TEST(JobStore, ALocalFileThatFailsItsChecksLeavesNothingOfItsJob) {
  gpuq::testing::TempDir dir;
  const std::string path = dir.File("jobs.db"), blobs = path + ".blobs";
  auto store = JobStore::Open(path, Durability::kProcessCrash);
  ASSERT_OK(store);
  JobStore& s = **store;
  const std::string good = Bytes(1000, 'g');
  gpuq::testing::WriteFile(blobs + "/c-good", good);
  gpuq::testing::WriteFile(blobs + "/c-other", "x");
  std::filesystem::create_symlink(blobs + "/c-other", blobs + "/c-link");
  ASSERT_OK(s.Begin());
  // In the same transaction, a job that is fine...
  StoredJob kept = Job(1);
  kept.id = s.next_id();
  ASSERT_OK(s.Insert(kept, {}, {{"c-good", good.size()}}));
  // ...and one whose second file is a symbolic link, and one whose file is
  // not the size it was said to be. Neither takes an id.
  gpuq::testing::WriteFile(blobs + "/c-fine", good);
  StoredJob refused = Job(2);
  refused.id = s.next_id();
  EXPECT_EQ(s.Insert(refused, {}, {{"c-fine", good.size()}, {"c-link", 1}}).code(),
            Code::kInvalid);
  gpuq::testing::WriteFile(blobs + "/c-resized", good);
  StoredJob resized = Job(1);
  resized.id = s.next_id();
  EXPECT_EQ(resized.id, refused.id);
  EXPECT_EQ(s.Insert(resized, {}, {{"c-resized", 5}}).code(), Code::kInvalid);
  ASSERT_OK(s.Commit());
  auto resumed = s.LoadUnfinished(schema::Limits{}, 2000);
  ASSERT_OK(resumed);
  ASSERT_EQ(resumed->jobs.size(), 1u);
  EXPECT_EQ(resumed->jobs[0].id, kept.id);
  auto inputs = s.LoadInputs(kept.id);
  ASSERT_OK(inputs);
  ASSERT_EQ(inputs->size(), 1u);
  EXPECT_EQ(gpuq::testing::ReadFile((*inputs)[0].path), good);
  // The refused job's file that passed its checks is given back under the
  // client's name (the broker removes a refused submit's files itself).
  EXPECT_EQ(Files(blobs), (std::set<std::string>{"j" + std::to_string(kept.id) + ".i0",
                                                 "c-fine", "c-other"}));
}

// With --durability power, a commit whose rows name a file new to the
// directory (a buffer's own file, or a new log segment) syncs the directory.
TEST(JobStore, ANewLogSegmentIsADurableDirectoryEntry) {
  gpuq::testing::TempDir dir;
  auto store = JobStore::Open(dir.File("jobs.db"), Durability::kPowerLoss);
  ASSERT_OK(store);
  JobStore& s = **store;
  const uint64_t before = s.dir_syncs();
  StoredJob job = Job(1);
  job.id = s.next_id();
  ASSERT_OK(s.Begin());
  ASSERT_OK(s.Insert(job, {Bytes(4096, 'l')}));  // goes to log-i-1, new
  ASSERT_OK(s.Commit());
  EXPECT_GT(s.dir_syncs(), before) << "the new segment's entry was never synced";
}

TEST(JobStore, SmallBuffersGoToLogsWhoseSegmentsGoWhenNoRowNamesThem) {
  gpuq::testing::TempDir dir;
  const std::string path = dir.File("jobs.db"), blobs = path + ".blobs";
  // Segments of 8 KiB: three 3 KiB buffers fill one.
  auto store = JobStore::Open(path, Durability::kProcessCrash, 8192);
  ASSERT_OK(store);
  std::vector<uint64_t> ids;
  std::vector<std::string> inputs;
  for (int round = 0; round < 3; ++round) {
    ASSERT_OK((*store)->Begin());
    for (int k = 0; k < 3; ++k) {
      inputs.push_back(Bytes(3 * 1024, static_cast<char>('a' + inputs.size())));
      StoredJob job = Job(1);
      job.id = (*store)->next_id();
      ASSERT_OK((*store)->Insert(job, {inputs.back()}));
      ids.push_back(job.id);
    }
    ASSERT_OK((*store)->Commit());
  }
  EXPECT_TRUE(Files(blobs).empty()) << "no buffer file of its own";
  EXPECT_EQ(Files(blobs, true), (std::set<std::string>{"log-i-1", "log-i-2", "log-i-3"}));
  // A segment's tail that no row names (a crash before the commit) is
  // harmless; a segment no row names is removed at start.
  {
    std::ofstream(blobs + "/log-i-2", std::ios::app) << "bytes of no committed row";
    std::ofstream(blobs + "/log-o-9") << "a segment of no committed row";
  }
  store->reset();
  store = JobStore::Open(path, Durability::kProcessCrash, 8192);
  ASSERT_OK(store);
  EXPECT_EQ(Files(blobs, true), (std::set<std::string>{"log-i-1", "log-i-2", "log-i-3"}));
  auto resumed = (*store)->LoadUnfinished(schema::Limits{}, 2000);
  ASSERT_OK(resumed);
  ASSERT_EQ(resumed->jobs.size(), inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    auto loaded = (*store)->LoadInputs(ids[i]);
    ASSERT_OK(loaded);
    EXPECT_EQ((*loaded)[0].bytes, inputs[i]);
  }
  // Ending the jobs releases the input segments; their outputs go to the
  // output log.
  std::vector<std::string> outputs;
  ASSERT_OK((*store)->Begin());
  for (uint64_t id : ids) {
    StoredResult r;
    r.id = id;
    r.outputs = {0};
    outputs.push_back(Bytes(2000, static_cast<char>('A' + outputs.size())));
    ASSERT_OK((*store)->Finish(r, {outputs.back()}, 5000, 1));
  }
  ASSERT_OK((*store)->Commit());
  std::set<std::string> logs = Files(blobs, true);
  EXPECT_EQ(std::count_if(logs.begin(), logs.end(),
                          [](const std::string& n) { return n.rfind("log-i-", 0) == 0; }),
            0)
      << "input segments no row names are gone";
  for (size_t i = 0; i < ids.size(); ++i) {
    auto got = (*store)->GetResult(ids[i]);
    ASSERT_OK(got);
    ASSERT_TRUE(got->has_value());
    EXPECT_EQ((*got)->data[0].bytes, outputs[i]);
  }
  // Past retention, the output segments go too (but the one being appended
  // to, until it fills).
  ASSERT_OK((*store)->Begin());
  ASSERT_OK((*store)->PurgeFinished(6000));
  ASSERT_OK((*store)->Commit());
  EXPECT_LE(Files(blobs, true).size(), 1u);
}

TEST(JobStore, AStoreOfAnUnknownFormatIsRefused) {
  gpuq::testing::TempDir dir;
  const std::string path = dir.File("jobs.db");
  {
    auto store = JobStore::Open(path, Durability::kProcessCrash);
    ASSERT_OK(store);
  }
  Sql(path, "UPDATE meta SET value = '9' WHERE name = 'format'");
  auto store = JobStore::Open(path, Durability::kProcessCrash);
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find("unknown format"), std::string::npos);
}

// Defect: ids were SQLite rowids, handed out again once the highest rows
// were purged (and an old owner's "cancel 1" cancelled a stranger's job).
TEST_F(JobStoreTest, PurgedIdsAreNotIssuedAgainAfterARestart) {
  Open();
  EXPECT_EQ(store().next_id(), 1u);
  for (uint64_t id = 1; id <= 3; ++id) {
    ASSERT_EQ(*Accept(store(), {}), id);
    ASSERT_OK(End(store(), id, {}, 5000));
  }
  ASSERT_OK(Purge(store(), 6000));
  ASSERT_EQ(*store().CountJobs(), 0u);

  Open();
  EXPECT_EQ(store().next_id(), 4u);
  ASSERT_OK(store().Begin());
  StoredJob old = Job(0);
  old.id = 1;
  EXPECT_EQ(store().Insert(old, {}).code(), Code::kInternal);
  ASSERT_OK(store().Commit());
  EXPECT_EQ(*Accept(store(), {}), 4u);
}

TEST_F(JobStoreTest, PurgedIdsAreNotIssuedAgainInTheSameSession) {
  Open();
  for (uint64_t id = 1; id <= 3; ++id) {
    ASSERT_OK(Accept(store(), {}));
    ASSERT_OK(End(store(), id, {}, 5000));
  }
  ASSERT_OK(Purge(store(), 6000));
  EXPECT_EQ(store().next_id(), 4u);
  EXPECT_EQ(SqlValue(path_, "SELECT value FROM meta WHERE name = 'next_id'"), "4");
  // No row holds id 3 any more, but it was issued.
  ASSERT_OK(store().Begin());
  StoredJob again = Job(0);
  again.id = 3;
  EXPECT_EQ(store().Insert(again, {}).code(), Code::kInternal);
  ASSERT_OK(store().Commit());
  EXPECT_EQ(*Accept(store(), {}), 4u);
}

TEST_F(JobStoreTest, EachOpenIsANewEpoch) {
  for (uint64_t epoch = 1; epoch <= 3; ++epoch) {
    Open();
    EXPECT_EQ(store().epoch(), epoch);
  }
}

// Defect: one damaged input of one queued job made LoadUnfinished fail, and
// the broker did not start.
TEST_F(JobStoreTest, ADamagedJobIsEndedAtStartAndTheOthersResume) {
  Open();
  const std::string tiny = Bytes(10, 't'), logged = Bytes(3072, 'l'),
                    large = Bytes(kBlobFileMinBytes, 'L');
  const uint64_t healthy = *Accept(store(), {tiny, logged, large});
  const uint64_t no_file = *Accept(store(), {large});
  const uint64_t short_file = *Accept(store(), {large});
  const uint64_t bad_spec = *Accept(store(), {});
  const uint64_t short_log = *Accept(store(), {logged});  // the segment's last bytes
  store_.reset();
  const auto name = [](uint64_t id, int idx) {
    return "j" + std::to_string(id) + ".i" + std::to_string(idx);
  };
  fs::remove(blobs_ + "/" + name(no_file, 0));
  fs::resize_file(blobs_ + "/" + name(short_file, 0), 100);
  fs::resize_file(blobs_ + "/log-i-1", 2 * logged.size() - 1);
  Sql(path_, "UPDATE jobs SET spec = x'c1' WHERE id = " + std::to_string(bad_spec));

  Open();
  auto resumed = store().LoadUnfinished(schema::Limits{}, 7000);
  ASSERT_OK(resumed);
  ASSERT_EQ(resumed->jobs.size(), 1u);
  EXPECT_EQ(resumed->jobs[0].id, healthy);
  std::map<uint64_t, std::string> reasons;
  for (const ResumeSet::Quarantined& q : resumed->quarantined) {
    EXPECT_EQ(q.tenant, "t");
    reasons[q.id] = q.reason;
  }
  EXPECT_EQ(reasons[no_file], "input 0 (" + name(no_file, 0) + "): No such file or directory");
  EXPECT_EQ(reasons[short_file], "input 0 (" + name(short_file, 0) + "): holds 100 bytes, not " +
                                     std::to_string(large.size()));
  EXPECT_EQ(reasons[short_log], "input 0 (log-i-1 bytes 3072+3072): the segment holds 6143 bytes");
  EXPECT_EQ(reasons[bad_spec].rfind("spec: ", 0), 0u) << reasons[bad_spec];
  EXPECT_EQ(reasons.size(), 4u);

  // Each ended as failed, its result saying why; the healthy job's inputs
  // read back.
  for (const auto& [id, reason] : reasons) {
    auto result = store().GetResult(id);
    ASSERT_OK(result);
    ASSERT_TRUE(result->has_value());
    EXPECT_EQ((*result)->state, JobState::kFailed);
    EXPECT_EQ((*result)->code, Code::kIoError);
    EXPECT_EQ((*result)->error, "damaged in the job store: " + reason);
  }
  auto inputs = store().LoadInputs(healthy);
  ASSERT_OK(inputs);
  ASSERT_EQ(inputs->size(), 3u);
  EXPECT_EQ((*inputs)[0].bytes, tiny);
  EXPECT_EQ((*inputs)[1].bytes, logged);
  EXPECT_EQ(gpuq::testing::ReadFile((*inputs)[2].path), large);

  // That was committed: the next start finds only the healthy job.
  Open();
  resumed = store().LoadUnfinished(schema::Limits{}, 8000);
  ASSERT_OK(resumed);
  EXPECT_TRUE(resumed->quarantined.empty());
  ASSERT_EQ(resumed->jobs.size(), 1u);
  EXPECT_FALSE(fs::exists(blobs_ + "/" + name(short_file, 0)));
}

TEST_F(JobStoreTest, AnInputDamagedAfterStartIsReportedWhenItsJobIsLoaded) {
  Open();
  const uint64_t id = *Accept(store(), {Bytes(10, 'a'), Bytes(2000, 'b')});
  fs::remove(blobs_ + "/log-i-1");
  auto inputs = store().LoadInputs(id);
  EXPECT_EQ(inputs.status().code(), Code::kIoError);
  EXPECT_NE(inputs.status().message().find("input 1 (log-i-1 bytes 0+2000): "),
            std::string::npos)
      << inputs.status().message();
}

// Defect: a fetch in the loop iteration of the job's result (after Finish,
// before Commit) failed: the output was still in the log's pending buffer.
TEST_F(JobStoreTest, ReadsInsideATransactionSeeItsWrites) {
  Open();
  const std::string input = Bytes(4096, 'i'), output = Bytes(4096, 'o');
  ASSERT_OK(store().Begin());
  StoredJob job = Job(1);
  job.id = store().next_id();
  ASSERT_OK(store().Insert(job, {input}));
  auto inputs = store().LoadInputs(job.id);
  ASSERT_OK(inputs);
  EXPECT_EQ((*inputs)[0].bytes, input);

  StoredResult r;
  r.id = job.id;
  r.outputs = {0};
  ASSERT_OK(store().Finish(r, {output}, 5000, 1));
  auto result = store().GetResult(job.id);
  ASSERT_OK(result);
  ASSERT_TRUE(result->has_value());
  ASSERT_EQ((*result)->data.size(), 1u);
  EXPECT_EQ((*result)->data[0].bytes, output);
  ASSERT_OK(store().Commit());

  result = store().GetResult(job.id);
  ASSERT_OK(result);
  EXPECT_EQ((*result)->data[0].bytes, output);
}

// Defect: a fetch or status of a job with an output stored as a file read
// the whole file into memory.
TEST_F(JobStoreTest, OutputsComeInStoredOrderWithFilesByPath) {
  Open();
  const uint64_t id = *Accept(store(), {});
  // Frames for arguments 2 (small) and 0 (large: a file of the store), then
  // a local worker's file for argument 1.
  const std::string small = Bytes(100, 's'), large = Bytes(kBlobFileMinBytes + 1, 'L'),
                    local = Bytes(5000, 'w');
  gpuq::testing::WriteFile(blobs_ + "/w-1-1-1", local);
  StoredResult r;
  r.id = id;
  r.device = "GPU-0";
  r.attempts = 2;
  r.timing.kernel_us = 42;
  r.outputs = {2, 0, 1};
  ASSERT_OK(store().Begin());
  ASSERT_OK(store().Finish(r, {small, large}, 5000, 0, {{"w-1-1-1", local.size()}}));
  ASSERT_OK(store().Commit());

  auto result = store().GetResult(id);
  ASSERT_OK(result);
  ASSERT_TRUE(result->has_value());
  const StoredResult& got = **result;
  EXPECT_EQ(got.outputs, (std::vector<uint32_t>{2, 0, 1}));
  ASSERT_EQ(got.data.size(), 3u);
  EXPECT_EQ(got.data[0].bytes, small);
  EXPECT_EQ(got.data[0].path, "");
  EXPECT_EQ(got.data[1].path, store().OutputPath(id, 1));
  EXPECT_EQ(got.data[1].size, large.size());
  EXPECT_EQ(got.data[1].bytes, "") << "read a file output";
  EXPECT_EQ(got.data[2].path, store().OutputPath(id, 2));
  EXPECT_EQ(got.data[2].size, local.size());
  EXPECT_EQ(gpuq::testing::ReadFile(got.data[1].path), large);
  EXPECT_EQ(gpuq::testing::ReadFile(got.data[2].path), local);

  auto meta = store().GetResultMeta(id);
  ASSERT_OK(meta);
  ASSERT_TRUE(meta->has_value());
  EXPECT_EQ((*meta)->state, JobState::kDone);
  EXPECT_EQ((*meta)->device, "GPU-0");
  EXPECT_EQ((*meta)->attempts, 2u);
  EXPECT_EQ((*meta)->timing.kernel_us, 42u);
  EXPECT_EQ((*meta)->outputs, (std::vector<uint32_t>{2, 0, 1}));
  EXPECT_TRUE((*meta)->data.empty());
}

// schema/job_store.sql: timing and outputs are raw little-endian integers.
TEST_F(JobStoreTest, TimingAndOutputsAreStoredAsTheFormatSays) {
  Open();
  const uint64_t id = *Accept(store(), {});
  StoredResult r;
  r.id = id;
  r.timing = {.queue_us = 1, .compile_us = 2, .load_us = 3, .h2d_us = 4, .kernel_us = 0x0102,
              .d2h_us = 6, .total_us = 7, .cache_hit = true, .launch_us = {9, 0x0a0b}};
  r.outputs = {3, 0x01000002};
  ASSERT_OK(store().Begin());
  ASSERT_OK(store().Finish(r, {"", ""}, 5000, 0));
  ASSERT_OK(store().Commit());
  auto meta = store().GetResultMeta(id);
  ASSERT_OK(meta);
  ASSERT_TRUE(meta->has_value());
  EXPECT_EQ((*meta)->timing, r.timing) << "a job of several launches' times read back";
  store_.reset();
  std::string timing;
  for (uint64_t v : {1, 2, 3, 4, 0x0102, 6, 7, 1, 9, 0x0a0b}) {
    for (int b = 0; b < 8; ++b) timing.push_back(static_cast<char>(v >> (8 * b)));
  }
  const std::string where = " FROM results WHERE job_id = " + std::to_string(id);
  EXPECT_EQ(SqlValue(path_, "SELECT timing" + where), timing);
  EXPECT_EQ(SqlValue(path_, "SELECT outputs" + where), std::string("\3\0\0\0\2\0\0\1", 8));
}

// Lowers this process's file size limit (RLIMIT_FSIZE) while it lives: a
// write past `bytes` into any file fails with EFBIG, as on a full disk (with
// SIGXFSZ ignored, which would otherwise end the process).
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    old_handler_ = signal(SIGXFSZ, SIG_IGN);
    getrlimit(RLIMIT_FSIZE, &saved_);
    rlimit lowered = saved_;
    lowered.rlim_cur = bytes;
    ok_ = setrlimit(RLIMIT_FSIZE, &lowered) == 0;
  }
  ~FileSizeLimit() {
    setrlimit(RLIMIT_FSIZE, &saved_);
    signal(SIGXFSZ, old_handler_);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;
  bool ok() const { return ok_; }

 private:
  rlimit saved_{};
  sighandler_t old_handler_ = SIG_DFL;
  bool ok_ = false;
};

// Defect: a failed write left a partial buffer file and partial bytes at a
// log segment's end, and every failure read as a generic io_error.
// A result whose commit fails is written again later, naming the same
// worker files: the failed transaction must give them back, not remove them.
TEST_F(JobStoreTest, AFailedCommitGivesAWorkersFilesBackForTheRetry) {
  Open();
  const uint64_t id = *Accept(store(), {});
  std::map<std::string, uintmax_t> before = FileSizes(dir_.path());
  uintmax_t largest = 0;
  for (const auto& [file, size] : before) largest = std::max(largest, size);
  const std::string local = Bytes(200 * 1024, 'w');
  gpuq::testing::WriteFile(blobs_ + "/w-1-1-0", local);
  StoredResult r;
  r.id = id;
  r.device = "GPU-0";
  r.attempts = 1;
  r.outputs = {0};
  const std::vector<schema::LocalFile> files = {{"w-1-1-0", local.size()}};
  {
    // SQLite's write of the result cannot fit (the rename needs no room).
    FileSizeLimit limit(largest + 512);
    ASSERT_TRUE(limit.ok());
    ASSERT_OK(store().Begin());
    (void)store().Finish(r, {}, 5000, 0, files);
    Status committed = store().Commit();
    ASSERT_FALSE(committed.ok()) << "committed under the limit";
  }
  EXPECT_EQ(gpuq::testing::ReadFile(blobs_ + "/w-1-1-0"), local)
      << "the failed commit took the worker's file away";
  EXPECT_FALSE(std::filesystem::exists(store().OutputPath(id, 0)));
  // The retry finds the file and commits.
  ASSERT_OK(store().Begin());
  ASSERT_OK(store().Finish(r, {}, 5000, 0, files));
  ASSERT_OK(store().Commit());
  auto result = store().GetResult(id);
  ASSERT_OK(result);
  ASSERT_TRUE(result->has_value());
  ASSERT_EQ((*result)->data.size(), 1u);
  EXPECT_EQ(gpuq::testing::ReadFile((*result)->data[0].path), local);
}

TEST_F(JobStoreTest, ACommitThatRunsOutOfSpaceLeavesNothingAndTheStoreServesOn) {
  Open();
  const std::string earlier = Bytes(4096, 'e');
  const uint64_t first = *Accept(store(), {earlier});
  const uint64_t id = store().next_id();
  const std::map<std::string, uintmax_t> before = FileSizes(dir_.path());
  uintmax_t largest = 0;
  for (const auto& [file, size] : before) largest = std::max(largest, size);

  const std::string large = Bytes(256 * 1024, 'L'), logged = Bytes(4096, 'l');
  // Tries to commit one job of `inputs` as job `id`: the Status of Commit()
  // (and Insert's in `inserted`).
  auto try_commit = [&](const std::vector<std::string>& inputs, Status* inserted) {
    StoredJob job = Job(inputs.size());
    job.id = id;
    Status begun = store().Begin();
    if (!begun.ok()) return begun;
    *inserted = store().Insert(job, Views(inputs));
    return store().Commit();
  };
  auto expect_nothing_left = [&](const Status& committed) {
    EXPECT_EQ(committed.code(), Code::kResourceExhausted) << committed.ToString();
    EXPECT_NE(committed.message().find("no space"), std::string::npos) << committed.ToString();
    EXPECT_FALSE(store().in_transaction());
    EXPECT_EQ(store().next_id(), id);
    std::map<std::string, uintmax_t> now = FileSizes(blobs_);
    std::map<std::string, uintmax_t> then;
    for (const auto& [file, size] : before) {
      if (file.rfind(blobs_, 0) == 0) then[file] = size;
    }
    EXPECT_EQ(now, then) << "a buffer file or log bytes of the failed transaction are left";
  };
  {
    // Just above every file of the store: SQLite appends a commit's pages
    // to the end of its WAL, so no commit fits.
    FileSizeLimit limit(largest + 512);
    ASSERT_TRUE(limit.ok());
    Status inserted;
    // A 256 KiB input: its own file cannot be written; the Insert fails,
    // and the Commit with it.
    Status committed = try_commit({large}, &inserted);
    EXPECT_EQ(inserted.code(), Code::kResourceExhausted) << inserted.ToString();
    expect_nothing_left(committed);
    // No input: SQLite's own write fails.
    committed = try_commit({}, &inserted);
    EXPECT_TRUE(inserted.ok()) << inserted.ToString();
    expect_nothing_left(committed);
    // A 4 KiB input: its log append fits, then SQLite's write fails.
    committed = try_commit({logged}, &inserted);
    EXPECT_TRUE(inserted.ok()) << inserted.ToString();
    expect_nothing_left(committed);
  }
  {
    // The log segment's append is cut short, part of it written.
    FileSizeLimit limit(before.at(blobs_ + "/log-i-1") + 1024);
    ASSERT_TRUE(limit.ok());
    Status inserted;
    Status committed = try_commit({logged}, &inserted);
    EXPECT_NE(committed.message().find("log-i-1"), std::string::npos) << committed.ToString();
    expect_nothing_left(committed);
  }

  // Space is back: the same jobs commit under the same ids and read back.
  ASSERT_OK(store().Begin());
  StoredJob job = Job(1);
  job.id = id;
  ASSERT_OK(store().Insert(job, {large}));
  job.id = id + 1;
  ASSERT_OK(store().Insert(job, {logged}));
  ASSERT_OK(store().Commit());
  Open();
  auto resumed = store().LoadUnfinished(schema::Limits{}, 2000);
  ASSERT_OK(resumed);
  EXPECT_TRUE(resumed->quarantined.empty());
  ASSERT_EQ(resumed->jobs.size(), 3u);
  const std::map<uint64_t, std::string> expected = {
      {first, earlier}, {id, large}, {id + 1, logged}};
  for (const auto& [job_id, bytes] : expected) {
    auto inputs = store().LoadInputs(job_id);
    ASSERT_OK(inputs);
    ASSERT_EQ(inputs->size(), 1u);
    const StoredBuffer& in = (*inputs)[0];
    EXPECT_EQ(in.path.empty() ? in.bytes : gpuq::testing::ReadFile(in.path), bytes)
        << "job " << job_id;
  }
}


// The usage table: each result adds to its tenant's row of its hour, in the
// result's transaction; totals survive a reopen and sum over a window.
TEST_F(JobStoreTest, UsageCountsEveryResultByTenantAndHour) {
  Open();
  const int64_t hour = 3600000;
  auto finish = [&](uint64_t id, JobState state, uint64_t queue_us, uint64_t total_us,
                    uint64_t kernel_us, uint64_t input_bytes, std::vector<std::string> outs,
                    int64_t at_ms) {
    StoredResult r;
    r.id = id;
    r.tenant = "t";
    r.state = state;
    r.code = state == JobState::kFailed ? Code::kKernelFault : Code::kOk;
    r.timing.queue_us = queue_us;
    r.timing.total_us = total_us;
    r.timing.kernel_us = kernel_us;
    r.input_bytes = input_bytes;
    for (uint32_t i = 0; i < outs.size(); ++i) r.outputs.push_back(i);
    ASSERT_OK(store().Begin());
    ASSERT_OK(store().Finish(r, Views(outs), at_ms));
    ASSERT_OK(store().Commit());
  };
  const uint64_t a = *Accept(store(), {Bytes(100, 'a')});
  const uint64_t b = *Accept(store(), {});
  const uint64_t c = *Accept(store(), {});
  finish(a, JobState::kDone, 10, 510, 300, 100, {Bytes(40, 'o')}, 5 * hour + 10);
  finish(b, JobState::kFailed, 20, 120, 0, 0, {}, 5 * hour + 20);
  finish(c, JobState::kCanceled, 70, 70, 0, 0, {}, 7 * hour);
  store_.reset();
  Open();
  auto all = store().GetUsage("", 0, 0);
  ASSERT_OK(all);
  ASSERT_EQ(all->size(), 1u);
  const TenantUsage& u = (*all)[0];
  EXPECT_EQ(u.tenant, "t");
  EXPECT_EQ(u.done, 1u);
  EXPECT_EQ(u.failed, 1u);
  EXPECT_EQ(u.canceled, 1u);
  EXPECT_EQ(u.expired, 0u);
  EXPECT_EQ(u.gpu_us, 500u + 100u) << "total - queue; 0 for a job that never ran";
  EXPECT_EQ(u.kernel_us, 300u);
  EXPECT_EQ(u.bytes_in, 100u);
  EXPECT_EQ(u.bytes_out, 40u);
  EXPECT_EQ(SqlValue(path_, "SELECT COUNT(*) FROM usage"), "2") << "one row per hour";
  // A window of hour 5 alone (to the hour), and of nothing.
  auto five = store().GetUsage("t", 5 * hour + 30, 6 * hour);
  ASSERT_OK(five);
  ASSERT_EQ(five->size(), 1u);
  EXPECT_EQ((*five)[0].canceled, 0u);
  EXPECT_EQ((*five)[0].done + (*five)[0].failed, 2u);
  auto other = store().GetUsage("someone-else", 0, 0);
  ASSERT_OK(other);
  EXPECT_TRUE(other->empty());
  // Several tenants and hours in one transaction (one row written for each).
  const uint64_t d = *Accept(store(), {}), e = *Accept(store(), {}), f = *Accept(store(), {});
  ASSERT_OK(store().Begin());
  for (auto [id, tenant, at] : {std::tuple{d, "u", 5 * hour}, std::tuple{e, "t", 5 * hour},
                                std::tuple{f, "u", 9 * hour}}) {
    StoredResult r;
    r.id = id;
    r.tenant = tenant;
    r.timing.queue_us = 1;
    r.timing.total_us = 11;
    ASSERT_OK(store().Finish(r, {}, at));
  }
  ASSERT_OK(store().Commit());
  auto both = store().GetUsage("", 0, 0);
  ASSERT_OK(both);
  ASSERT_EQ(both->size(), 2u);
  EXPECT_EQ((*both)[0].tenant, "t");
  EXPECT_EQ((*both)[0].done, 2u);
  EXPECT_EQ((*both)[1].tenant, "u");
  EXPECT_EQ((*both)[1].done, 2u);
  EXPECT_EQ((*both)[1].gpu_us, 20u);
  // A purge of the results leaves the usage.
  ASSERT_OK(Purge(store(), 100 * hour));
  auto kept = store().GetUsage("", 0, 0);
  ASSERT_OK(kept);
  ASSERT_EQ(kept->size(), 2u);
  EXPECT_EQ((*kept)[0].done, 2u);
}

}  // namespace
}  // namespace gpuq::broker
