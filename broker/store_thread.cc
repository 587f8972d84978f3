#include "broker/store_thread.h"

#include <cstdlib>
#include <thread>

#include <pthread.h>
#include <unistd.h>

#include <set>

#include "util/cpu_relax.h"
#include "util/plain_file.h"

namespace gpuq::broker {
namespace {

std::vector<std::string_view> Views(const std::vector<zmq::message_t>& frames) {
  std::vector<std::string_view> v;
  v.reserve(frames.size());
  for (const auto& f : frames) v.emplace_back(static_cast<const char*>(f.data()), f.size());
  return v;
}

// Reads the files among `buffers` into their bytes, `budget` bytes at most.
Status ReadFiles(std::vector<StoredBuffer>& buffers, uint64_t budget) {
  uint64_t total = 0;
  for (const StoredBuffer& b : buffers) total += b.size;  // those held in the database too
  if (total > budget) {
    return Error(Code::kResourceExhausted,
                 "the reply would hold " + std::to_string(total) + " bytes; at most " +
                     std::to_string(budget) + " may wait unread for one connection");
  }
  for (StoredBuffer& b : buffers) {
    if (b.path.empty()) continue;
    auto fd = OpenPlainFile(b.path, {.size = b.size});
    if (!fd.ok()) return Error(Code::kIoError, fd.status().message());
    b.bytes.resize(b.size);
    GPUQ_RETURN_IF_ERROR(ReadExactly(fd->get(), b.bytes.data(), b.size, b.path));
    b.path.clear();
  }
  return Status::Ok();
}

}  // namespace

StoreThread::StoreThread(std::unique_ptr<JobStore> store, std::function<void()> wake,
                         std::chrono::microseconds spin)
    : store_(std::move(store)), wake_(std::move(wake)), spin_(spin), thread_([this] { Loop(); }) {}

StoreThread::~StoreThread() {
  {
    MutexLock lock(&mu_);
    stop_ = true;
  }
  cv_.Signal();
  thread_.join();
}

void StoreThread::Submit(std::unique_ptr<Batch> batch) {
  ++in_flight_;
  {
    MutexLock lock(&mu_);
    todo_.push_back(std::move(batch));
  }
  has_work_.store(true, std::memory_order_release);
  cv_.Signal();
}

std::vector<std::unique_ptr<Batch>> StoreThread::TakeDone() {
  std::vector<std::unique_ptr<Batch>> out;
  {
    MutexLock lock(&mu_);
    out.swap(done_);
  }
  in_flight_ -= out.size();
  return out;
}

void StoreThread::Loop() {
  pthread_setname_np(pthread_self(), "gpuq-store");
  // The test hook GPUQ_TEST_STORE_DELAY_MS: each batch waits this long first,
  // as on a slow disk (tests of what may happen before a row commits).
  const char* delay_env = getenv("GPUQ_TEST_STORE_DELAY_MS");
  const auto delay = std::chrono::milliseconds(delay_env ? std::atoi(delay_env) : 0);
  for (;;) {
    if (spin_.count() > 0) {
      const auto until = std::chrono::steady_clock::now() + spin_;
      while (!has_work_.load(std::memory_order_acquire) &&
             (std::chrono::steady_clock::now() < until ||
              busy_.load(std::memory_order_relaxed))) {
        CpuRelax();
      }
    }
    std::vector<std::unique_ptr<Batch>> work;
    {
      MutexLock lock(&mu_);
      has_work_.store(false, std::memory_order_relaxed);
      while (todo_.empty() && !stop_) cv_.Wait();
      if (todo_.empty()) return;  // stopping, and nothing left
      work.swap(todo_);
    }
    for (auto& b : work) {
      if (delay.count() > 0) std::this_thread::sleep_for(delay);
      Run(*b);
      {
        MutexLock lock(&mu_);
        done_.push_back(std::move(b));
      }
      wake_();
    }
  }
}

void StoreThread::Run(Batch& b) {
  if (b.has_writes()) {
    Status s = store_->Begin();
    if (s.ok()) {
      // Jobs whose row this batch does not insert: their other writes are
      // skipped (they would name a row that is not there).
      std::set<uint64_t> not_inserted;
      for (InsertOp& op : b.inserts) {
        if (!op.row.key.empty()) {
          auto found = store_->FindByKey(op.row.tenant, op.row.key);
          if (!found.ok()) {
            op.status = found.status();
            not_inserted.insert(op.row.id);
            continue;
          }
          if (*found) {
            op.existing = **found;
            not_inserted.insert(op.row.id);
            continue;
          }
        }
        op.status = store_->InsertWithSpec(op.row, *op.spec, Views(op.frames), op.files);
        if (!op.status.ok()) not_inserted.insert(op.row.id);
      }
      for (FinishOp& op : b.finishes) {
        if (not_inserted.count(op.result.id)) continue;
        (void)store_->Finish(op.result, Views(op.frames), op.finished_ms, op.inputs, op.files);
      }
      for (const AttemptsOp& op : b.attempts) {
        if (not_inserted.count(op.id)) continue;
        (void)store_->SetAttempts(op.id, op.attempts, op.suspect);
      }
      if (b.purge_before_ms) {
        auto purged = store_->PurgeFinished(b.purge_before_ms);
        if (purged.ok()) b.purged = *purged;
      }
      s = store_->Commit();
    }
    b.status = s;
    if (!s.ok()) {
      for (InsertOp& op : b.inserts) {
        if (op.status.ok() && !op.existing) op.status = s;
      }
    }
  }
  for (const std::string& path : b.unlink) (void)::unlink(path.c_str());
  for (ReadOp& r : b.reads) RunRead(r);
}

void StoreThread::RunRead(ReadOp& r) {
  auto fail = [&](const Status& s) { r.status = s; };
  switch (r.kind) {
    case ReadOp::Kind::kStatus:
    case ReadOp::Kind::kResult: {
      auto job = store_->Get(r.id);
      if (!job.ok()) return fail(job.status());
      r.job = std::move(*job);
      // Another tenant's job is no job at all (RequestContext::Sees): none
      // of its result is read, so no error of reading it can tell it apart.
      if (r.job && !r.tenant.empty() && r.job->tenant != r.tenant) r.job.reset();
      if (!r.job || !schema::IsTerminal(r.job->state)) return;
      auto result = r.kind == ReadOp::Kind::kStatus ? store_->GetResultMeta(r.id)
                                                    : store_->GetResult(r.id);
      if (!result.ok()) return fail(result.status());
      r.result = std::move(*result);
      if (r.result && r.kind == ReadOp::Kind::kResult &&
          !(r.client_local && r.job->spec.local_out)) {
        if (Status s = ReadFiles(r.result->data, r.max_bytes); !s.ok()) return fail(s);
      }
      return;
    }
    case ReadOp::Kind::kUsage: {
      auto usage = store_->GetUsage(r.usage_tenant, r.since_ms, r.until_ms);
      if (!usage.ok()) return fail(usage.status());
      r.usage = std::move(*usage);
      return;
    }
    case ReadOp::Kind::kInputs: {
      auto inputs = store_->LoadInputs(r.id);
      if (!inputs.ok()) return fail(inputs.status());
      r.inputs = std::move(*inputs);
      if (r.read_files) {
        if (Status s = ReadFiles(r.inputs, r.max_bytes); !s.ok()) return fail(s);
      }
      return;
    }
  }
}

}  // namespace gpuq::broker
