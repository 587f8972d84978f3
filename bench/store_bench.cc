// Job store benchmark: what the broker's loop spends in SQLite per job (one
// Insert when accepted, one Finish when it ends; and the Insert alone),
// grouped as the loop groups them (one transaction per batch), beside the
// floor measured in the same run: a bare insert of a row of the same size
// into a one-table database in the same batches.
//   gpuq-bench-store [--benchmark_min_time=...]
#include <benchmark/benchmark.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "broker/job_store.h"
#include "schema/codec.h"
#include "util/sqlite.h"

namespace {

using gpuq::broker::Durability;
using gpuq::broker::JobStore;
using gpuq::broker::StoredJob;
using gpuq::broker::StoredResult;

constexpr int kBatch = 64;  // jobs per loop iteration under load

std::string TempPath(const std::string& name) {
  static const std::string dir = [] {
    std::string d = std::filesystem::temp_directory_path().string() + "/gpuq-bench-XXXXXX";
    if (!mkdtemp(d.data())) std::abort();
    return d;
  }();
  return dir + "/" + name;
}

StoredJob EmptyKernelJob() {
  StoredJob j;
  j.tenant = "bench";
  j.accepted_ms = 1;
  j.spec.kernel.source = "extern \"C\" __global__ void empty() {}\n";
  j.spec.kernel.entry = "empty";
  j.spec.launch.grid = {1, 1, 1};
  j.spec.launch.block = {1, 1, 1};
  return j;
}

void Check(const gpuq::Status& s) {
  if (!s.ok()) {
    fprintf(stderr, "%s\n", s.ToString().c_str());
    std::abort();
  }
}

// Accept and end a job, kBatch jobs per transaction: the loop's store work
// for one job with `range(0)` 4 KB inputs and as many outputs (0: the empty
// kernel of benchmark a/c; 2: about benchmark b's saxpy, two in, one out).
void BM_StoreJobLifecycle(benchmark::State& state) {
  static int n = 0;
  auto store = JobStore::Open(TempPath("jobs" + std::to_string(n++) + ".db"),
                              Durability::kProcessCrash);
  Check(store.status());
  StoredJob job = EmptyKernelJob();
  const std::string buffer(4096, 'b');
  const std::vector<std::string_view> buffers(static_cast<size_t>(state.range(0)), buffer);
  std::vector<uint64_t> ids;
  for (auto _ : state) {
    Check((*store)->Begin());
    ids.clear();
    for (int i = 0; i < kBatch; ++i) {
      job.id = (*store)->next_id();
      Check((*store)->Insert(job, buffers));
      ids.push_back(job.id);
    }
    Check((*store)->Commit());
    Check((*store)->Begin());
    for (uint64_t id : ids) {
      StoredResult r;
      r.id = id;
      Check((*store)->Finish(r, buffers, 2, buffers.size()));
    }
    Check((*store)->Commit());
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}
BENCHMARK(BM_StoreJobLifecycle)->Arg(0)->Arg(2);

// The hot path alone: accept kBatch jobs without buffers per transaction
// (what the broker's loop writes for a burst of submits).
void BM_StoreInsert(benchmark::State& state) {
  static int n = 0;
  auto store = JobStore::Open(TempPath("insert" + std::to_string(n++) + ".db"),
                              Durability::kProcessCrash);
  Check(store.status());
  StoredJob job = EmptyKernelJob();
  for (auto _ : state) {
    Check((*store)->Begin());
    for (int i = 0; i < kBatch; ++i) {
      job.id = (*store)->next_id();
      Check((*store)->Insert(job, {}));
    }
    Check((*store)->Commit());
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}
BENCHMARK(BM_StoreInsert);

// Floor: one insert of a row as large as the job's spec, kBatch per
// transaction, WAL and synchronous=NORMAL as the store.
void BM_BareSqliteInsert(benchmark::State& state) {
  static int n = 0;
  auto db = gpuq::sql::Db::Open(TempPath("bare" + std::to_string(n++) + ".db"));
  Check(db.status());
  Check(db->Exec("PRAGMA synchronous=NORMAL; CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)"));
  auto ins = db->Prepare("INSERT INTO t(v) VALUES (?1)");
  Check(ins.status());
  const std::string spec = gpuq::schema::EncodeJobSpec(EmptyKernelJob().spec);
  for (auto _ : state) {
    Check(db->Exec("BEGIN IMMEDIATE"));
    for (int i = 0; i < kBatch; ++i) {
      ins->Reset();
      Check(ins->BindBlob(1, spec).Run());
    }
    Check(db->Exec("COMMIT"));
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}
BENCHMARK(BM_BareSqliteInsert);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  std::filesystem::remove_all(std::filesystem::path(TempPath("x")).parent_path());
  return 0;
}
