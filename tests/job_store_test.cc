// The job store on a real SQLite file and blob directory: which buffers
// become files, when the files go, what a restart finds, and the migration
// of a format-1 store.
#include "broker/job_store.h"

#include <gtest/gtest.h>
#include <sqlite3.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>

#include "schema/codec.h"
#include "tests/test_util.h"

namespace gpuq::broker {
namespace {

namespace fs = std::filesystem;
using schema::Arg;

// The blob directory's files: buffer files, or (`logs`) log segments.
std::set<std::string> Files(const std::string& dir, bool logs = false) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::string name = e.path().filename().string();
    if ((name.rfind("log-", 0) == 0) == logs) names.insert(std::move(name));
  }
  return names;
}

StoredJob Job(size_t inputs) {
  StoredJob j;
  j.tenant = "t";
  j.client = "client-routing-id";
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

TEST(JobStore, LargeBuffersAreFilesThatLiveAsLongAsTheirRows) {
  gpuq::testing::TempDir dir;
  const std::string path = dir.File("jobs.db"), blobs = path + ".blobs";
  auto store = JobStore::Open(path, Durability::kProcessCrash);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  JobStore& s = **store;

  const std::string small = Bytes(kBlobFileMinBytes - 1, 'a');
  const std::string large = Bytes(kBlobFileMinBytes * 3 + 5, 'b');
  ASSERT_TRUE(s.Begin().ok());
  auto id = s.Insert(Job(2), {small, large});
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  ASSERT_TRUE(s.Commit().ok());
  const std::string in1 = "j" + std::to_string(*id) + ".i1";
  EXPECT_EQ(Files(blobs), std::set<std::string>{in1});
  EXPECT_EQ(gpuq::testing::ReadFile(blobs + "/" + in1), large);

  // A restart finds the job with both inputs, the large one from its file.
  store->reset();
  store = JobStore::Open(path, Durability::kProcessCrash);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  auto jobs = (*store)->LoadUnfinished(schema::Limits{});
  ASSERT_TRUE(jobs.ok()) << jobs.status().ToString();
  ASSERT_EQ(jobs->size(), 1u);
  ASSERT_EQ((*jobs)[0].inputs.size(), 2u);
  EXPECT_EQ((*jobs)[0].inputs[0], small);
  EXPECT_EQ((*jobs)[0].inputs[1], large);

  // Finishing drops the input file (after the commit) and writes the large
  // output's file.
  StoredResult r;
  r.id = *id;
  r.outputs = {0, 1};
  const std::string out_small = Bytes(10, 'c'), out_large = Bytes(kBlobFileMinBytes, 'd');
  ASSERT_TRUE((*store)->Begin().ok());
  ASSERT_TRUE((*store)->Finish(r, {out_small, out_large}, 5000).ok());
  EXPECT_TRUE(fs::exists(blobs + "/" + in1)) << "unlinked before its row's deletion committed";
  ASSERT_TRUE((*store)->Commit().ok());
  const std::string out1 = "j" + std::to_string(*id) + ".o1";
  EXPECT_EQ(Files(blobs), std::set<std::string>{out1});
  auto got = (*store)->GetResult(*id);
  ASSERT_TRUE(got.ok() && got->has_value());
  ASSERT_EQ((*got)->data.size(), 2u);
  EXPECT_EQ((*got)->data[0], out_small);
  EXPECT_EQ((*got)->data[1], out_large);

  // Past retention the result goes, and its file with it.
  ASSERT_TRUE((*store)->Begin().ok());
  auto purged = (*store)->PurgeFinished(6000);
  ASSERT_TRUE(purged.ok());
  EXPECT_EQ(*purged, 1u);
  ASSERT_TRUE((*store)->Commit().ok());
  EXPECT_TRUE(Files(blobs).empty());
}

TEST(JobStore, FilesNoCommittedRowNamesAreRemovedAtOpen) {
  gpuq::testing::TempDir dir;
  const std::string path = dir.File("jobs.db"), blobs = path + ".blobs";
  {
    auto store = JobStore::Open(path, Durability::kPowerLoss);
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE((*store)->Begin().ok());
    ASSERT_TRUE((*store)->Insert(Job(1), {Bytes(kBlobFileMinBytes, 'x')}).ok());
    ASSERT_TRUE((*store)->Commit().ok());
  }
  // As a crash between a file's write and its row's commit leaves them.
  gpuq::testing::WriteFile(blobs + "/j77.i0", "never committed");
  gpuq::testing::WriteFile(blobs + "/j1.o3", "never committed");
  gpuq::testing::WriteFile(blobs + "/README", "not the store's");
  auto store = JobStore::Open(path, Durability::kPowerLoss);
  ASSERT_TRUE(store.ok()) << store.status().ToString();
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
  ASSERT_TRUE(store.ok()) << store.status().ToString();
  auto jobs = (*store)->LoadUnfinished(schema::Limits{});
  ASSERT_TRUE(jobs.ok()) << jobs.status().ToString();
  ASSERT_EQ(jobs->size(), 1u);
  EXPECT_EQ((*jobs)[0].id, 7u);
  ASSERT_EQ((*jobs)[0].inputs.size(), 1u);
  EXPECT_EQ((*jobs)[0].inputs[0], Bytes(kBlobFileMinBytes * 2, 'm'));
  // New rows of the migrated store use files.
  ASSERT_TRUE((*store)->Begin().ok());
  auto id = (*store)->Insert(job, {Bytes(kBlobFileMinBytes, 'n')});
  ASSERT_TRUE(id.ok()) << id.status().ToString();
  ASSERT_TRUE((*store)->Commit().ok());
  EXPECT_TRUE(fs::exists(path + ".blobs/j" + std::to_string(*id) + ".i0"));
}

TEST(JobStore, ALocalFileThatFailsItsChecksLeavesNothingOfItsJob) {
  gpuq::testing::TempDir dir;
  const std::string path = dir.File("jobs.db"), blobs = path + ".blobs";
  auto store = JobStore::Open(path, Durability::kProcessCrash);
  ASSERT_TRUE(store.ok());
  JobStore& s = **store;
  const std::string good = Bytes(1000, 'g');
  gpuq::testing::WriteFile(blobs + "/c-good", good);
  gpuq::testing::WriteFile(blobs + "/c-other", "x");
  std::filesystem::create_symlink(blobs + "/c-other", blobs + "/c-link");
  ASSERT_TRUE(s.Begin().ok());
  // In the same transaction, a job that is fine...
  auto kept = s.Insert(Job(1), {}, {{"c-good", good.size()}});
  ASSERT_TRUE(kept.ok()) << kept.status().ToString();
  // ...and one whose second file is a symbolic link, and one whose file is
  // not the size it was said to be.
  gpuq::testing::WriteFile(blobs + "/c-fine", good);
  auto refused = s.Insert(Job(2), {}, {{"c-fine", good.size()}, {"c-link", 1}});
  EXPECT_EQ(refused.status().code(), Code::kInvalid);
  gpuq::testing::WriteFile(blobs + "/c-resized", good);
  auto resized = s.Insert(Job(1), {}, {{"c-resized", 5}});
  EXPECT_EQ(resized.status().code(), Code::kInvalid);
  ASSERT_TRUE(s.Commit().ok());
  auto jobs = s.LoadUnfinished(schema::Limits{});
  ASSERT_TRUE(jobs.ok()) << jobs.status().ToString();
  ASSERT_EQ(jobs->size(), 1u);
  EXPECT_EQ((*jobs)[0].id, *kept);
  ASSERT_EQ((*jobs)[0].inputs.size(), 1u);
  EXPECT_EQ((*jobs)[0].inputs[0], good);
  EXPECT_EQ(Files(blobs), (std::set<std::string>{"j" + std::to_string(*kept) + ".i0", "c-other"}));
}

TEST(JobStore, SmallBuffersGoToLogsWhoseSegmentsGoWhenNoRowNamesThem) {
  gpuq::testing::TempDir dir;
  const std::string path = dir.File("jobs.db"), blobs = path + ".blobs";
  // Segments of 8 KiB: three 3 KiB buffers fill one.
  auto store = JobStore::Open(path, Durability::kProcessCrash, 8192);
  ASSERT_TRUE(store.ok());
  std::vector<uint64_t> ids;
  std::vector<std::string> inputs;
  for (int round = 0; round < 3; ++round) {
    ASSERT_TRUE((*store)->Begin().ok());
    for (int k = 0; k < 3; ++k) {
      inputs.push_back(Bytes(3 * 1024, static_cast<char>('a' + inputs.size())));
      auto id = (*store)->Insert(Job(1), {inputs.back()});
      ASSERT_TRUE(id.ok()) << id.status().ToString();
      ids.push_back(*id);
    }
    ASSERT_TRUE((*store)->Commit().ok());
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
  ASSERT_TRUE(store.ok());
  EXPECT_EQ(Files(blobs, true), (std::set<std::string>{"log-i-1", "log-i-2", "log-i-3"}));
  auto jobs = (*store)->LoadUnfinished(schema::Limits{});
  ASSERT_TRUE(jobs.ok()) << jobs.status().ToString();
  ASSERT_EQ(jobs->size(), inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) EXPECT_EQ((*jobs)[i].inputs[0], inputs[i]);
  // Ending the jobs releases the input segments; their outputs go to the
  // output log.
  std::vector<std::string> outputs;
  ASSERT_TRUE((*store)->Begin().ok());
  for (uint64_t id : ids) {
    StoredResult r;
    r.id = id;
    r.outputs = {0};
    outputs.push_back(Bytes(2000, static_cast<char>('A' + outputs.size())));
    ASSERT_TRUE((*store)->Finish(r, {outputs.back()}, 5000, 1).ok());
  }
  ASSERT_TRUE((*store)->Commit().ok());
  std::set<std::string> logs = Files(blobs, true);
  EXPECT_EQ(std::count_if(logs.begin(), logs.end(),
                          [](const std::string& n) { return n.rfind("log-i-", 0) == 0; }),
            0)
      << "input segments no row names are gone";
  for (size_t i = 0; i < ids.size(); ++i) {
    auto got = (*store)->GetResult(ids[i]);
    ASSERT_TRUE(got.ok() && got->has_value()) << got.status().ToString();
    EXPECT_EQ((*got)->data[0], outputs[i]);
  }
  // Past retention, the output segments go too (but the one being appended
  // to, until it fills).
  ASSERT_TRUE((*store)->Begin().ok());
  ASSERT_TRUE((*store)->PurgeFinished(6000).ok());
  ASSERT_TRUE((*store)->Commit().ok());
  EXPECT_LE(Files(blobs, true).size(), 1u);
}

TEST(JobStore, AStoreOfAnUnknownFormatIsRefused) {
  gpuq::testing::TempDir dir;
  const std::string path = dir.File("jobs.db");
  {
    auto store = JobStore::Open(path, Durability::kProcessCrash);
    ASSERT_TRUE(store.ok());
  }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "UPDATE meta SET value = '9' WHERE name = 'format'", nullptr, nullptr,
                         nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  auto store = JobStore::Open(path, Durability::kProcessCrash);
  ASSERT_FALSE(store.ok());
  EXPECT_NE(store.status().message().find("unknown format"), std::string::npos);
}

}  // namespace
}  // namespace gpuq::broker
