#include "worker/gpu_worker.h"

#include <spdlog/spdlog.h>
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cerrno>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <random>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "schema/codec.h"
#include "schema/filename.h"
#include "util/cpu_relax.h"
#include "util/file_io.h"
#include "util/plain_file.h"
#include "util/sha256.h"
#include "worker/gpu_health.h"
#include "worker/pinned_pool.h"
#include "worker/regions.h"

namespace gpuq::worker {
namespace {

using schema::Arg;
using schema::ArgKind;
using schema::BrokerMessage;
using schema::BrokerOp;
using schema::JobState;
using schema::WorkerMessage;
using schema::WorkerOp;
using Clock = std::chrono::steady_clock;

std::atomic<bool> g_stop{false};

uint64_t MicrosSince(Clock::time_point t) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - t).count());
}

// CUmodules whose last user is gone. Unloading can wait on the GPU, so only
// executor threads (never the protocol thread) unload them, between jobs.
class Graveyard {
 public:
  void Bury(CUmodule m) {
    std::lock_guard lock(mu_);
    modules_.push_back(m);
  }
  void Clear(const CudaDriver& cu) {
    std::vector<CUmodule> dead;
    {
      std::lock_guard lock(mu_);
      dead.swap(modules_);
    }
    for (CUmodule m : dead) (void)cu.cuModuleUnload(m);
  }

 private:
  std::mutex mu_;
  std::vector<CUmodule> modules_;  // GUARDED_BY(mu_)
};

// A module image and, once an executor has needed it, the loaded CUmodule.
// Owned by shared_ptr: the module set and each job that uses it.
struct Module {
  Module(std::string k, std::string img, Graveyard* g)
      : key(std::move(k)), image(std::move(img)), graveyard(g) {}
  ~Module() {
    if (loaded) graveyard->Bury(loaded);
  }
  const std::string key;
  const std::string image;  // CUBIN, or NUL-terminated PTX
  Graveyard* const graveyard;
  std::mutex mu;
  CUmodule loaded = nullptr;                  // GUARDED_BY(mu)
  Status refused;  // GUARDED_BY(mu): over the worker's ModuleBounds, never loaded
  struct Function {
    CUfunction fn = nullptr;
    std::optional<std::vector<size_t>> params;  // ParamSizes, asked once
    Status refused;                             // its local memory over the bound
  };
  std::map<std::string, Function> functions;  // GUARDED_BY(mu)
};

struct Task {
  BrokerMessage job;
  std::vector<zmq::message_t> frames;  // [protocol, header, payload...]
  size_t first_buffer = 2;             // frame of payload index 0
  std::shared_ptr<Module> module;
  // A job of several launches: its modules, in the order of job.modules.
  std::vector<std::shared_ptr<Module>> modules;
  std::atomic<int64_t> started_ns{0};  // steady clock, set by the executor
  // A job of several launches: the executor's progress word (launches
  // finished, written by the GPU after each), read to name the launch that
  // ran past the time limit. Null until the executor takes the job.
  std::atomic<const volatile uint32_t*> progress{nullptr};
};

// A CUDA graph of a job of several launches (PROTOCOL.md, "Jobs of several
// launches"): a chain of kernel nodes, each followed by an event record
// node, instantiated once; a later job of the same shape sets the kernel
// nodes' parameters and launches it. Owned by its executor's GraphCache.
struct Graph {
  CUgraph graph = nullptr;
  CUgraphExec exec = nullptr;
  std::vector<CUgraphNode> kernels;
  std::vector<CUfunction> functions;             // each kernel node's
  std::vector<std::shared_ptr<Module>> modules;  // keeps the functions loaded
};

// One executor's graphs, by shape, least recently used evicted. Touched by
// that executor's thread only.
class GraphCache {
 public:
  GraphCache(const CudaDriver& cu, size_t capacity) : cu_(cu), capacity_(capacity) {}
  ~GraphCache() { Clear(); }
  GraphCache(const GraphCache&) = delete;
  GraphCache& operator=(const GraphCache&) = delete;
  Graph* Find(const std::string& shape) {
    auto it = index_.find(shape);
    if (it == index_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second);
    return &it->second->second;
  }
  // Takes `g`; evicts the least recently used past the capacity.
  Graph* Put(const std::string& shape, Graph g) {
    order_.emplace_front(shape, std::move(g));
    index_[shape] = order_.begin();
    while (order_.size() > std::max<size_t>(capacity_, 1)) {
      Destroy(order_.back().second);
      index_.erase(order_.back().first);
      order_.pop_back();
    }
    return &order_.front().second;
  }
  void Clear() {
    for (auto& [shape, g] : order_) Destroy(g);
    order_.clear();
    index_.clear();
  }
  size_t size() const { return order_.size(); }
  void Destroy(Graph& g) {
    if (g.exec) (void)cu_.cuGraphExecDestroy(g.exec);
    if (g.graph) (void)cu_.cuGraphDestroy(g.graph);
    g = Graph();
  }

 private:
  const CudaDriver& cu_;
  size_t capacity_;
  std::list<std::pair<std::string, Graph>> order_;
  std::unordered_map<std::string, std::list<std::pair<std::string, Graph>>::iterator> index_;
};

// What an executor thread owns besides its stream: events marking each
// launch of a job of several, the progress word the GPU writes after each,
// and its graphs.
struct ExecutorState {
  std::vector<CUevent> marks;  // marks[i]: before launch i (marks[n]: after the last)
  volatile uint32_t* progress = nullptr;  // page-locked, mapped for the device
  CUdeviceptr progress_dev = 0;
  bool memops = true;  // cuStreamWriteValue32 works here
  std::unique_ptr<GraphCache> graphs;
};

struct Done {
  std::shared_ptr<Task> task;
  WorkerMessage result;
  std::vector<zmq::message_t> data;
  bool sticky = false;
};

// The worker's module set: the same LRU as the broker's view of it
// (PROTOCOL.md, "Module images").
class ModuleSet {
 public:
  explicit ModuleSet(size_t capacity) : capacity_(capacity) {}
  std::shared_ptr<Module> Touch(const std::string& key) {
    auto it = index_.find(key);
    if (it == index_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second.second);
    return it->second.first;
  }
  void Put(std::shared_ptr<Module> m) {
    // The key is copied first: in `a[k] = {std::move(m), ...}` the right side
    // is evaluated before the left (C++17), so m->key would read a moved-from
    // pointer.
    const std::string key = m->key;
    index_.erase(key);
    order_.remove(key);
    order_.push_front(key);
    index_[key] = {std::move(m), order_.begin()};
    while (order_.size() > capacity_) {
      index_.erase(order_.back());
      order_.pop_back();
    }
  }
  void Clear() {
    index_.clear();
    order_.clear();
  }

 private:
  size_t capacity_;
  std::list<std::string> order_;
  std::unordered_map<std::string,
                     std::pair<std::shared_ptr<Module>, std::list<std::string>::iterator>>
      index_;
};

// Outputs this large go to files when the job has an out_dir.
constexpr size_t kLocalFileMinBytes = 64 * 1024;

// A local input file (PROTOCOL.md, "Local buffers"), read into page-locked
// memory for its copy to the device. Never mapped: its client may still
// hold the file and shrink it, and a mapped file that shrinks kills its
// reader with SIGBUS; a read that comes up short is an error of this job.
StatusOr<zmq::message_t> ReadLocalInput(PinnedPool& pool, const std::string& path,
                                        uint64_t size) {
  GPUQ_ASSIGN_OR_RETURN(UniqueFd fd, OpenPlainFile(path, {.size = size}));
  zmq::message_t m = pool.Message(size);
  GPUQ_RETURN_IF_ERROR(ReadExactly(fd.get(), m.data(), size, path));
  return m;
}

// A new file (never one that is there already, nor through a symbolic link),
// removed again unless it was written whole: a disk that fills half way
// leaves nothing behind, and says resource_exhausted (util/file_io.h).
Status WriteFile(const std::string& path, const void* data, size_t size) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return FileError("creating " + path, errno);
  Status s = WriteAll(fd, std::string_view(static_cast<const char*>(data), size), path);
  if (close(fd) != 0 && s.ok()) s = FileError("writing " + path, errno);
  if (!s.ok()) (void)unlink(path.c_str());
  return s;
}

}  // namespace

StatusOr<schema::DeviceInfo> QueryDevice(const CudaDriver& cu, int ordinal) {
  CUdevice dev;
  GPUQ_CU_CHECK(cu, cuDeviceGet(&dev, ordinal), Code::kNotFound);
  schema::DeviceInfo d;
  d.ordinal = static_cast<uint32_t>(ordinal);
  char name[256] = {};
  GPUQ_CU_CHECK(cu, cuDeviceGetName(name, sizeof name - 1, dev), Code::kUnavailable);
  d.name = name;
  CUuuid uuid;
  GPUQ_CU_CHECK(cu, cuDeviceGetUuid(&uuid, dev), Code::kUnavailable);
  const auto* u = reinterpret_cast<const uint8_t*>(uuid.bytes);
  std::string hex = ToHex(u, 16);
  d.uuid = "GPU-" + hex.substr(0, 8) + "-" + hex.substr(8, 4) + "-" + hex.substr(12, 4) + "-" +
           hex.substr(16, 4) + "-" + hex.substr(20);
  size_t total = 0;
  GPUQ_CU_CHECK(cu, cuDeviceTotalMem(&total, dev), Code::kUnavailable);
  d.total_bytes = total;
  auto attr = [&](CUdevice_attribute a) {
    int v = 0;
    cu.cuDeviceGetAttribute(&v, a, dev);
    return static_cast<uint32_t>(v);
  };
  d.cc_major = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
  d.cc_minor = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
  d.sm_count = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
  d.clock_khz = attr(CU_DEVICE_ATTRIBUTE_CLOCK_RATE);
  d.l2_bytes = attr(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE);
  d.managed_memory = attr(CU_DEVICE_ATTRIBUTE_MANAGED_MEMORY) != 0;
  d.max_threads_per_block = attr(CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK);
  d.max_block = {attr(CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X), attr(CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y),
                 attr(CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z)};
  d.max_grid = {attr(CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X), attr(CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y),
                attr(CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z)};
  d.max_shared_per_block = attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK);
  d.max_shared_optin = attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN);
  return d;
}

class GpuWorker::Impl {
 public:
  Impl(WorkerOptions o, std::shared_ptr<const CudaDriver> cu)
      : opt_(std::move(o)), cu_(std::move(cu)), modules_(opt_.module_slots) {}
  ~Impl();
  Status Init();
  int Run();

 private:
  // Executor side (runs on executor threads).
  void ExecutorLoop(int index);
  Done Execute(const std::shared_ptr<Task>& task, CUstream stream, CUevent ev[4],
               ExecutorState& xs);
  Done ExecuteLaunches(const std::shared_ptr<Task>& task, CUstream stream, CUevent ev[4],
                       ExecutorState& xs);
  // The launch's limits and its arguments against the kernel's parameters.
  // `params`: the kernel's parameters' sizes (null: unknown).
  Status LaunchChecks(const schema::LaunchSpec& launch, CUfunction fn,
                      const std::vector<size_t>* params, const std::vector<schema::Arg>& args);
  // The host side of a job's buffers: in[i], the bytes of buffer i's input
  // (in and inout: a payload frame, a local file read into `read`, or a
  // range of a region); region[i], where a range of a region lives (any
  // kind), null for a buffer that travels. `held` keeps the regions mapped
  // until the job's copies are done.
  struct HostBuffers {
    std::vector<zmq::message_t> read;
    std::vector<std::string_view> in;
    std::vector<char*> region;
    std::vector<std::shared_ptr<const WorkerRegions::Region>> held;
  };
  Status ReadInputs(const Task& task, const std::vector<Arg>& buffers, HostBuffers* host);
  // Outputs of kLocalFileMinBytes or more to files of the job's out_dir.
  Status OutputsToFiles(const BrokerMessage& job, Done& d);

  // Protocol side (the main thread).
  // Results wait in the outbox until FlushResults() sends them together:
  // one message, or a batch. Other messages go at once (after the outbox).
  void Send(const WorkerMessage& m, std::vector<zmq::message_t>* payload = nullptr);
  void FlushResults();
  void SendReady();
  void Heartbeat();
  // A message from the broker, or each message of a batch, in order.
  void OnBrokerFrames(std::vector<zmq::message_t>& frames);
  void OnBrokerMessage(std::vector<zmq::message_t>& frames);
  void OnLivenessMessage(std::vector<zmq::message_t>& frames);
  void Finish(Done& d);
  [[noreturn]] void Leave(int code, const std::string& reason);

  WorkerOptions opt_;
  std::shared_ptr<const CudaDriver> cu_;
  schema::DeviceInfo device_;
  CUdevice dev_ = 0;
  CUcontext ctx_ = nullptr;  // the primary context, retained
  ModuleBounds bounds_;      // set once, before the executors start
  zmq::context_t zctx_;
  zmq::socket_t sock_;
  // The liveness connection (PROTOCOL.md, "Liveness"): heartbeats with the
  // token, apart from the jobs and results, which may be large.
  zmq::socket_t live_;
  std::string token_;
  bool registered_ = false;  // heard from the broker since the last ready
  std::vector<std::pair<std::string, std::vector<zmq::message_t>>> outbox_;
  int done_fd_ = -1;
  std::unique_ptr<PinnedPool> pinned_;  // outputs' host buffers
  // Registered regions (PROTOCOL.md, "Regions"); null without a local
  // directory.
  std::unique_ptr<WorkerRegions> regions_;
  ModuleSet modules_;
  Graveyard graveyard_;
  std::atomic<uint64_t> free_bytes_{0};
  // The GPU's health (NVML), sampled for each heartbeat and ready; null
  // where NVML cannot be had. Main thread only.
  std::unique_ptr<GpuHealthMonitor> health_;
  // Refreshes free_bytes_ unless it was less than kMemInfoInterval ago.
  void RefreshFreeBytes();
  static constexpr std::chrono::milliseconds kMemInfoInterval{50};
  std::atomic<int64_t> next_meminfo_ns_{0};

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Task>> queue_;  // GUARDED_BY(mu_)
  std::atomic<size_t> queued_{0};            // queue_.size(), read without mu_
  std::atomic<bool> spinning_{false};        // one executor spins at a time
  std::vector<Done> done_;                   // GUARDED_BY(mu_)
  bool stopping_ = false;                    // GUARDED_BY(mu_)
  std::vector<std::thread> executors_;

  // Jobs received and not yet answered (main thread only), by id and
  // attempt: a worker that registered again may hold two attempts of one
  // job (the broker sent it again), each with its own time limit.
  std::map<std::pair<uint64_t, uint32_t>, std::shared_ptr<Task>> inflight_;
  std::string name_;
};

// The test hook GPUQ_TEST_INJECT_XID=XID or UUID:XID: a critical Xid that
// this GPU's health reports once, as if NVML had (GPU tests of draining).
static uint32_t InjectedXid(const std::string& uuid) {
  const char* env = getenv("GPUQ_TEST_INJECT_XID");
  if (!env || !*env) return 0;
  std::string v = env;
  if (auto colon = v.rfind(':'); colon != std::string::npos) {
    if (v.substr(0, colon) != uuid) return 0;
    v = v.substr(colon + 1);
  }
  return static_cast<uint32_t>(std::strtoul(v.c_str(), nullptr, 10));
}

Status GpuWorker::Impl::Init() {
  GPUQ_ASSIGN_OR_RETURN(device_, QueryDevice(*cu_, opt_.device));
  GPUQ_CU_CHECK(*cu_, cuDeviceGet(&dev_, opt_.device), Code::kNotFound);
  GPUQ_CU_CHECK(*cu_, cuDevicePrimaryCtxRetain(&ctx_, dev_), Code::kUnavailable);
  GPUQ_CU_CHECK(*cu_, cuCtxSetCurrent(ctx_), Code::kUnavailable);
  GPUQ_RETURN_IF_ERROR(KeepPoolMemory(*cu_, dev_));
  bounds_ = {.module_bytes = opt_.module_bytes,
             .local_bytes = opt_.local_bytes,
             .resident_threads = ResidentThreads(*cu_, dev_)};
  pinned_ = std::make_unique<PinnedPool>(*cu_, opt_.pinned_bytes);
  size_t free = 0, total = 0;
  GPUQ_CU_CHECK(*cu_, cuMemGetInfo(&free, &total), Code::kUnavailable);
  free_bytes_ = device_.free_bytes = free;
  health_ = GpuHealthMonitor::Open(device_.uuid, InjectedXid(device_.uuid));
  done_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (done_fd_ < 0) return Error(Code::kResourceExhausted, "eventfd failed");
  char host[128] = {};
  gethostname(host, sizeof host - 1);
  name_ = std::string(host) + ":" + std::to_string(getpid()) + ":" + std::to_string(opt_.device);
  for (zmq::socket_t* s : {&sock_, &live_}) {
    *s = zmq::socket_t(zctx_, zmq::socket_type::dealer);
    s->set(zmq::sockopt::linger, 2000);
    s->set(zmq::sockopt::sndhwm, 100000);
    s->set(zmq::sockopt::rcvhwm, 100000);
    if (!opt_.secret_key.empty()) {
      s->set(zmq::sockopt::curve_serverkey, opt_.server_key);
      s->set(zmq::sockopt::curve_publickey, opt_.public_key);
      s->set(zmq::sockopt::curve_secretkey, opt_.secret_key);
    }
    try {
      s->connect(opt_.broker);
    } catch (const zmq::error_t& e) {
      return Error(Code::kUnavailable, "connect " + opt_.broker + ": " + e.what());
    }
  }
  std::random_device random;
  for (int i = 0; i < 32; ++i) token_.push_back("0123456789abcdef"[random() % 16]);
  if (!opt_.local_dir.empty()) {
    regions_ = std::make_unique<WorkerRegions>(cu_, ctx_, opt_.local_dir, token_);
    regions_->Start();
  }
  for (uint32_t i = 0; i < std::max<uint32_t>(1, opt_.streams); ++i) {
    executors_.emplace_back([this, i] { ExecutorLoop(static_cast<int>(i)); });
  }
  return Status::Ok();
}

GpuWorker::Impl::~Impl() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : executors_) t.join();
  regions_.reset();
  inflight_.clear();
  modules_.Clear();
  if (ctx_) {
    // ZeroMQ may still hold outputs in pinned buffers: it lets go of them
    // when its context closes.
    sock_.close();
    live_.close();
    zctx_.close();
    (void)cu_->cuCtxSetCurrent(ctx_);
    if (pinned_) pinned_->FreeAll();
    graveyard_.Clear(*cu_);
    (void)cu_->cuDevicePrimaryCtxRelease(dev_);
  }
  if (done_fd_ >= 0) close(done_fd_);
}

// ---------------------------------------------------------------- executors

void GpuWorker::Impl::ExecutorLoop(int index) {
  if (cu_->cuCtxSetCurrent(ctx_) != CUDA_SUCCESS) return;
  CUstream stream = nullptr;
  CUevent ev[4] = {};
  // One owner for the stream and events: this thread, released at its end.
  struct Resources {
    const CudaDriver& cu;
    CUstream& stream;
    CUevent* ev;
    ~Resources() {
      for (int i = 0; i < 4; ++i) {
        if (ev[i]) (void)cu.cuEventDestroy(ev[i]);
      }
      if (stream) (void)cu.cuStreamDestroy(stream);
    }
  } owned{*cu_, stream, ev};
  ExecutorState xs;
  // Released before the stream and events above (declared after them).
  struct StateOwner {
    const CudaDriver& cu;
    ExecutorState& xs;
    ~StateOwner() {
      xs.graphs.reset();
      for (CUevent e : xs.marks) (void)cu.cuEventDestroy(e);
      if (xs.progress) (void)cu.cuMemFreeHost(const_cast<uint32_t*>(xs.progress));
    }
  } state_owner{*cu_, xs};
  if (cu_->cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING) != CUDA_SUCCESS) return;
  for (auto& e : ev) {
    if (cu_->cuEventCreate(&e, CU_EVENT_DEFAULT) != CUDA_SUCCESS) return;
  }
  xs.graphs = std::make_unique<GraphCache>(*cu_, opt_.graph_slots);
  void* word = nullptr;
  if (cu_->cuMemHostAlloc(&word, sizeof(uint32_t), CU_MEMHOSTALLOC_DEVICEMAP) == CUDA_SUCCESS) {
    xs.progress = static_cast<volatile uint32_t*>(word);
    *xs.progress = 0;
    if (cu_->cuMemHostGetDevicePointer(&xs.progress_dev, word, 0) != CUDA_SUCCESS) {
      xs.memops = false;
    }
  } else {
    xs.memops = false;
  }
  spdlog::debug("executor {} ready", index);
  for (;;) {
    std::shared_ptr<Task> task;
    if (opt_.spin.count() > 0 && queued_.load(std::memory_order_relaxed) == 0 &&
        !spinning_.exchange(true)) {
      // One executor waits for the next job awake, so that a job arriving
      // soon starts without a futex wake-up.
      const auto until = Clock::now() + opt_.spin;
      while (queued_.load(std::memory_order_relaxed) == 0 && Clock::now() < until) CpuRelax();
      spinning_.store(false);
    }
    {
      std::unique_lock lock(mu_);
      cv_.wait_for(lock, opt_.heartbeat, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      if (queue_.empty()) {
        // Idle: keep the free memory that heartbeats report current (other
        // processes may use this GPU too). Executor 0 does it, off the
        // protocol thread.
        lock.unlock();
        if (index == 0) RefreshFreeBytes();
        continue;
      }
      task = std::move(queue_.front());
      queue_.pop_front();
      queued_.store(queue_.size(), std::memory_order_relaxed);
    }
    graveyard_.Clear(*cu_);
    task->started_ns = Clock::now().time_since_epoch().count();
    Done d = task->job.launches.empty() ? Execute(task, stream, ev, xs)
                                        : ExecuteLaunches(task, stream, ev, xs);
    const bool sticky = d.sticky;
    {
      std::lock_guard lock(mu_);
      done_.push_back(std::move(d));
    }
    uint64_t one = 1;
    (void)!write(done_fd_, &one, sizeof one);
    // After the result is on its way: the free memory that heartbeats and
    // placement see, at most every kMemInfoInterval by any executor
    // (cuMemGetInfo costs far more than an empty job).
    if (!sticky) RefreshFreeBytes();
  }
}

void GpuWorker::Impl::RefreshFreeBytes() {
  const int64_t now = Clock::now().time_since_epoch().count();
  int64_t due = next_meminfo_ns_.load(std::memory_order_relaxed);
  if (now < due) return;
  const int64_t next =
      now + std::chrono::duration_cast<Clock::duration>(kMemInfoInterval).count();
  if (!next_meminfo_ns_.compare_exchange_strong(due, next)) return;  // another does it
  size_t free = 0, total = 0;
  if (cu_->cuMemGetInfo(&free, &total) == CUDA_SUCCESS) free_bytes_ = free;
}

Status CheckLaunchLimits(const CudaDriver& cu, const schema::DeviceInfo& d,
                         const schema::LaunchSpec& launch, CUfunction fn, int fn_max_threads) {
  const auto& b = launch.block;
  const auto& g = launch.grid;
  if (b.x > d.max_block.x || b.y > d.max_block.y || b.z > d.max_block.z ||
      b.Count() > d.max_threads_per_block) {
    return Error(Code::kInvalid, "block " + std::to_string(b.x) + "x" + std::to_string(b.y) +
                                     "x" + std::to_string(b.z) + " is over the device's limits");
  }
  if (g.x > d.max_grid.x || g.y > d.max_grid.y || g.z > d.max_grid.z) {
    return Error(Code::kInvalid, "grid is over the device's limits");
  }
  if (fn_max_threads < 0 &&
      cu.cuFuncGetAttribute(&fn_max_threads, CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, fn) !=
          CUDA_SUCCESS) {
    fn_max_threads = -1;
  }
  if (fn_max_threads >= 0 && b.Count() > static_cast<uint64_t>(fn_max_threads)) {
    return Error(Code::kLaunchError, "the kernel can run at most " +
                                         std::to_string(fn_max_threads) +
                                         " threads per block (registers), " +
                                         std::to_string(b.Count()) + " asked");
  }
  const uint32_t shared = launch.shared_bytes;
  if (shared > d.max_shared_optin) {
    return Error(Code::kInvalid, "dynamic shared memory " + std::to_string(shared) +
                                     " bytes is over the device's limit of " +
                                     std::to_string(d.max_shared_optin));
  }
  if (shared > d.max_shared_per_block) {
    // Above 48 KB a kernel must opt in through its function attribute. The
    // attribute is the function's, which every stream's launches share: it
    // is set to all this kernel can have (the device's opt-in limit less its
    // static shared memory), the same value whoever sets it. Set to each
    // launch's own size, a launch of less between another's check and its
    // launch made that launch fail.
    int fixed = 0;
    GPUQ_CU_CHECK(cu, cuFuncGetAttribute(&fixed, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn),
                  Code::kLaunchError);
    const uint32_t most = d.max_shared_optin - std::min<uint32_t>(d.max_shared_optin,
                                                                   static_cast<uint32_t>(fixed));
    if (shared > most) {
      return Error(Code::kInvalid, "dynamic shared memory " + std::to_string(shared) +
                                       " bytes and the kernel's own " + std::to_string(fixed) +
                                       " pass the device's limit of " +
                                       std::to_string(d.max_shared_optin));
    }
    GPUQ_CU_CHECK(cu,
                  cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                     static_cast<int>(most)),
                  Code::kLaunchError);
  }
  return Status::Ok();
}

Status CheckArgs(const std::vector<size_t>* params, const std::vector<schema::Arg>& args) {
  if (!params) return Status::Ok();
  if (params->size() != args.size()) {
    return Error(Code::kInvalid, "the kernel takes " + std::to_string(params->size()) +
                                     " arguments, " + std::to_string(args.size()) + " given");
  }
  for (size_t i = 0; i < args.size(); ++i) {
    const schema::Arg& a = args[i];
    const size_t given = a.kind == schema::ArgKind::kScalar ? schema::ScalarSize(a.type) : 8;
    if ((*params)[i] != given) {
      return Error(Code::kInvalid, "argument " + std::to_string(i) + " is " +
                                       std::to_string(given) + " bytes, and the kernel's " +
                                       "parameter " + std::to_string(i) + " " +
                                       std::to_string((*params)[i]));
    }
  }
  return Status::Ok();
}

Status GpuWorker::Impl::LaunchChecks(const schema::LaunchSpec& launch, CUfunction fn,
                                     const std::vector<size_t>* params,
                                     const std::vector<schema::Arg>& args) {
  GPUQ_RETURN_IF_ERROR(CheckLaunchLimits(*cu_, device_, launch, fn));
  return CheckArgs(params, args);
}

namespace {

// The module loaded (once, by whichever executor needs it first) and its
// kernel `entry`. CUDA_SUCCESS with `refused` set where the module or the
// kernel would take more device memory than `bounds` allow (remembered:
// the module is never loaded, the kernel never launched).
CUresult LoadFunction(const CudaDriver& cu, const ModuleBounds& bounds, Module& m,
                      const std::string& entry, CUfunction* fn, const char** what,
                      const std::vector<size_t>** params, Status* refused) {
  std::lock_guard lock(m.mu);
  if (!m.refused.ok()) {
    *refused = m.refused;
    return CUDA_SUCCESS;
  }
  if (!m.loaded) {
    LoadedModule load = LoadModule(cu, m.image, bounds);
    if (load.error != CUDA_SUCCESS) {
      *what = "loading the module";
      return load.error;
    }
    if (!load.refused.ok()) {
      m.refused = *refused = load.refused;
      return CUDA_SUCCESS;
    }
    m.loaded = load.module;
  }
  auto it = m.functions.find(entry);
  if (it == m.functions.end()) {
    CUfunction found = nullptr;
    CUresult e = cu.cuModuleGetFunction(&found, m.loaded, entry.c_str());
    if (e != CUDA_SUCCESS) {
      *what = "finding the kernel";
      return e;
    }
    it = m.functions
             .emplace(entry, Module::Function{found, ParamSizes(cu, found),
                                              CheckLocalMemory(cu, found, bounds)})
             .first;
  }
  if (!it->second.refused.ok()) {
    *refused = it->second.refused;
    return CUDA_SUCCESS;
  }
  *fn = it->second.fn;
  // The entry stays while the module does (the task holds it).
  *params = it->second.params ? &*it->second.params : nullptr;
  return CUDA_SUCCESS;
}

// Device memory from the stream-ordered pool, owned here and freed on every
// path (after the stream's work: the destructor synchronizes).
struct DeviceBuffers {
  const CudaDriver& cu;
  CUstream stream;
  std::vector<CUdeviceptr> ptrs;
  ~DeviceBuffers() {
    for (CUdeviceptr p : ptrs) {
      if (p) (void)cu.cuMemFreeAsync(p, stream);
    }
    (void)cu.cuStreamSynchronize(stream);
  }
};

// The shape of a job of several launches, which its graph is kept by: the
// modules, and per launch its kernel, dimensions and argument kinds (the
// values are parameters of the graph's nodes).
std::string GraphShape(const BrokerMessage& job) {
  std::string s;
  auto put = [&s](uint64_t v) { s.append(reinterpret_cast<const char*>(&v), sizeof v); };
  for (const schema::ModuleRef& m : job.modules) s += m.key;
  put(job.launches.size());
  for (const schema::KernelLaunch& l : job.launches) {
    put(l.source);
    s += l.entry;
    s.push_back('\0');
    for (uint32_t v : {l.launch.grid.x, l.launch.grid.y, l.launch.grid.z, l.launch.block.x,
                       l.launch.block.y, l.launch.block.z, l.launch.shared_bytes}) {
      put(v);
    }
    put(l.args.size());
    for (const Arg& a : l.args) {
      put(static_cast<uint64_t>(a.kind) << 8 | static_cast<uint64_t>(a.type));
    }
  }
  for (const Arg& b : job.buffers) put(static_cast<uint64_t>(b.kind));
  return s;
}

}  // namespace

Status GpuWorker::Impl::ReadInputs(const Task& task, const std::vector<Arg>& buffers,
                                   HostBuffers* host) {
  const BrokerMessage& job = task.job;
  std::vector<std::string_view>* in = &host->in;
  std::vector<zmq::message_t>* read = &host->read;
  in->assign(buffers.size(), {});
  host->region.assign(buffers.size(), nullptr);
  const size_t frames = task.frames.size() - task.first_buffer;
  read->reserve(job.files.size());  // views into read must not move
  for (size_t i = 0; i < buffers.size(); ++i) {
    const Arg& a = buffers[i];
    if (a.in_region() &&
        (a.kind == ArgKind::kIn || a.kind == ArgKind::kOut || a.kind == ArgKind::kInOut)) {
      // The broker hands a region over before any job that names it; it
      // may still be being locked.
      std::shared_ptr<const WorkerRegions::Region> r;
      if (regions_) r = regions_->Get(a.region, std::chrono::seconds(30));
      if (!r) {
        return Error(Code::kUnavailable,
                     "region " + std::to_string(a.region) + " was not handed to this worker");
      }
      if (a.offset > r->map.size() || a.size > r->map.size() - a.offset) {
        return Error(Code::kInvalid, "buffer " + std::to_string(i) + ": range past region " +
                                         std::to_string(a.region) + "'s end");
      }
      host->region[i] = r->map.data() + a.offset;
      if (a.kind != ArgKind::kOut) (*in)[i] = std::string_view(host->region[i], a.size);
      host->held.push_back(std::move(r));
      continue;
    }
    if (a.kind != ArgKind::kIn && a.kind != ArgKind::kInOut) continue;
    if (a.frame < frames) {
      const zmq::message_t& f = task.frames[task.first_buffer + a.frame];
      (*in)[i] = std::string_view(static_cast<const char*>(f.data()), f.size());
      continue;
    }
    const schema::LocalFile& lf = job.files[a.frame - frames];
    auto m = ReadLocalInput(*pinned_, lf.name, lf.size);
    if (!m.ok()) return m.status();
    read->push_back(std::move(*m));
    (*in)[i] = std::string_view(static_cast<const char*>(read->back().data()),
                                read->back().size());
  }
  return Status::Ok();
}

Status GpuWorker::Impl::OutputsToFiles(const BrokerMessage& job, Done& d) {
  WorkerMessage& r = d.result;
  if (job.out_dir.empty()) return Status::Ok();
  // Large outputs go to files of the local directory, written from the
  // pinned copies; the rest stay frames. Outputs list frames, then files.
  std::vector<zmq::message_t> kept;
  std::vector<uint32_t> frame_args, file_args;
  for (size_t k = 0; k < d.data.size(); ++k) {
    zmq::message_t& out = d.data[k];
    if (out.size() < kLocalFileMinBytes) {
      kept.push_back(std::move(out));
      frame_args.push_back(r.outputs[k]);
      continue;
    }
    const std::string name = schema::WorkerOutputName(job.id, job.attempt, r.outputs[k]);
    if (Status s = WriteFile(job.out_dir + "/" + name, out.data(), out.size()); !s.ok()) {
      for (const schema::LocalFile& f : r.files) (void)unlink((job.out_dir + "/" + f.name).c_str());
      r.files.clear();
      d.data.clear();
      r.outputs.clear();
      return s;
    }
    r.files.push_back({name, out.size()});
    file_args.push_back(r.outputs[k]);
  }
  d.data = std::move(kept);
  r.outputs = std::move(frame_args);
  r.outputs.insert(r.outputs.end(), file_args.begin(), file_args.end());
  return Status::Ok();
}

namespace {

// A failed result of `task`, for the Execute functions.
struct Failer {
  const CudaDriver& cu;
  Done& d;
  Done Fail(Code code, std::string error) {
    // A failed result is its code and error: outputs copied before the
    // failure do not go with it.
    d.data.clear();
    d.result.outputs.clear();
    d.result.code = code;
    d.result.error = std::move(error);
    return std::move(d);
  }
  Done CuFail(CUresult e, const std::string& what) {
    d.sticky = IsSticky(e);
    const Code code = d.sticky ? Code::kKernelFault
                      : e == CUDA_ERROR_OUT_OF_MEMORY ? Code::kResourceExhausted
                                                      : Code::kLaunchError;
    return Fail(code, what + ": " + cu.Describe(e));
  }
};

Done Started(const std::shared_ptr<Task>& task) {
  Done d;
  d.task = task;
  WorkerMessage& r = d.result;
  r.op = WorkerOp::kResult;
  r.id = task->job.id;
  r.attempt = task->job.attempt;
  r.state = JobState::kFailed;
  return d;
}

}  // namespace

Done GpuWorker::Impl::Execute(const std::shared_ptr<Task>& task, CUstream stream,
                              CUevent ev[4], ExecutorState&) {
  const BrokerMessage& job = task->job;
  Done d = Started(task);
  WorkerMessage& r = d.result;
  Failer f{*cu_, d};

  // Module and function.
  const auto t_load = Clock::now();
  CUfunction fn = nullptr;
  const char* what = "";
  const std::vector<size_t>* param_sizes = nullptr;
  Status refused;
  if (CUresult e = LoadFunction(*cu_, bounds_, *task->module, job.entry, &fn, &what,
                                &param_sizes, &refused);
      e != CUDA_SUCCESS) {
    return f.CuFail(e, std::string(what) + " '" + job.entry + "'");
  }
  if (!refused.ok()) return f.Fail(refused.code(), "'" + job.entry + "': " + refused.message());
  r.timing.load_us = MicrosSince(t_load);
  if (Status s = LaunchChecks(job.launch, fn, param_sizes, job.args); !s.ok()) {
    return f.Fail(s.code(), s.message());
  }

  // Inputs: payload frames, then the job's local files (PROTOCOL.md, "Local
  // buffers"), read for the copy. Declared before the device buffers, whose
  // owner synchronizes the stream: the bytes outlive every copy.
  HostBuffers host;
  if (Status s = ReadInputs(*task, job.args, &host); !s.ok()) {
    return f.Fail(s.code() == Code::kUnavailable ? s.code() : Code::kIoError, s.message());
  }
  const std::vector<std::string_view>& in = host.in;

  DeviceBuffers buffers{*cu_, stream, {}};
  std::vector<uint64_t> slots(job.args.size());
  std::vector<void*> params(job.args.size());
  std::vector<std::pair<size_t, uint64_t>> outs;  // (arg index, size)
  for (size_t i = 0; i < job.args.size(); ++i) {
    const Arg& a = job.args[i];
    params[i] = &slots[i];
    if (a.kind == ArgKind::kScalar) {
      slots[i] = a.bits;  // little-endian: the low bytes hold the value
      continue;
    }
    const uint64_t size = a.kind == ArgKind::kOut ? a.size : in[i].size();
    CUdeviceptr p = 0;
    if (size > 0) {
      CUresult e = cu_->cuMemAllocAsync(&p, size, stream);
      if (e != CUDA_SUCCESS) return f.CuFail(e, "allocating a buffer");
      buffers.ptrs.push_back(p);
    }
    slots[i] = p;
    if (a.kind != ArgKind::kIn) outs.emplace_back(i, size);
  }
  CUresult e = cu_->cuEventRecord(ev[0], stream);
  if (e != CUDA_SUCCESS) return f.CuFail(e, "event");
  // Every byte a kernel can read is written first: inputs copied, outputs
  // zeroed. Nothing of an earlier job is readable.
  for (size_t i = 0; i < job.args.size(); ++i) {
    const Arg& a = job.args[i];
    if (a.kind == ArgKind::kScalar || slots[i] == 0) continue;
    if (a.kind == ArgKind::kOut) {
      e = cu_->cuMemsetD8Async(slots[i], 0, a.size, stream);
    } else {
      e = cu_->cuMemcpyHtoDAsync(slots[i], in[i].data(), in[i].size(), stream);
    }
    if (e != CUDA_SUCCESS) return f.CuFail(e, "copying inputs to the device");
  }
  cu_->cuEventRecord(ev[1], stream);
  const auto& g = job.launch.grid;
  const auto& b = job.launch.block;
  e = cu_->cuLaunchKernel(fn, g.x, g.y, g.z, b.x, b.y, b.z, job.launch.shared_bytes, stream,
                          params.data(), nullptr);
  if (e != CUDA_SUCCESS) return f.CuFail(e, "launch");
  cu_->cuEventRecord(ev[2], stream);
  for (auto [i, size] : outs) {
    if (host.region[i]) {
      // Back into its region, in place: nothing travels.
      e = cu_->cuMemcpyDtoHAsync(host.region[i], slots[i], size, stream);
      if (e != CUDA_SUCCESS) return f.CuFail(e, "copying outputs from the device");
      continue;
    }
    zmq::message_t out = pinned_->Message(size);
    if (size > 0) {
      e = cu_->cuMemcpyDtoHAsync(out.data(), slots[i], size, stream);
      if (e != CUDA_SUCCESS) return f.CuFail(e, "copying outputs from the device");
    }
    d.data.push_back(std::move(out));
    r.outputs.push_back(static_cast<uint32_t>(i));
  }
  cu_->cuEventRecord(ev[3], stream);
  e = cu_->cuStreamSynchronize(stream);
  if (e != CUDA_SUCCESS) {
    d.data.clear();
    r.outputs.clear();
    return f.CuFail(e, "kernel");
  }
  if (Status s = OutputsToFiles(job, d); !s.ok()) return f.Fail(s.code(), s.message());
  float ms[3] = {};
  for (int k = 0; k < 3; ++k) cu_->cuEventElapsedTime(&ms[k], ev[k], ev[k + 1]);
  r.timing.h2d_us = static_cast<uint64_t>(ms[0] * 1000.0f);
  r.timing.kernel_us = static_cast<uint64_t>(ms[1] * 1000.0f);
  r.timing.d2h_us = static_cast<uint64_t>(ms[2] * 1000.0f);
  r.state = JobState::kDone;
  r.code = Code::kOk;
  return d;
}

// A job of several launches (PROTOCOL.md, "Jobs of several launches"): its
// buffers allocated and filled once, its launches in order on this stream
// (or replayed as this executor's graph of their shape), its outputs copied
// back after the last. ev[0..3] mark the copies in, the launches and the
// copies out as for one launch; xs.marks each launch.
Done GpuWorker::Impl::ExecuteLaunches(const std::shared_ptr<Task>& task, CUstream stream,
                                      CUevent ev[4], ExecutorState& xs) {
  const BrokerMessage& job = task->job;
  Done d = Started(task);
  WorkerMessage& r = d.result;
  Failer f{*cu_, d};
  const size_t n = job.launches.size();
  auto which = [](size_t i) { return "launch " + std::to_string(i); };

  // Modules and functions, and each launch's checks.
  const auto t_load = Clock::now();
  std::vector<CUfunction> fns(n);
  for (size_t i = 0; i < n; ++i) {
    const schema::KernelLaunch& l = job.launches[i];
    // A launch like the one before it (a chain of one kernel) passed its
    // checks already.
    if (i > 0 && l.source == job.launches[i - 1].source && l.entry == job.launches[i - 1].entry &&
        l.launch == job.launches[i - 1].launch &&
        l.args.size() == job.launches[i - 1].args.size() &&
        std::equal(l.args.begin(), l.args.end(), job.launches[i - 1].args.begin(),
                   [](const Arg& a, const Arg& b) {
                     return a.kind == b.kind && (a.kind != ArgKind::kScalar || a.type == b.type);
                   })) {
      fns[i] = fns[i - 1];
      continue;
    }
    const char* what = "";
    const std::vector<size_t>* param_sizes = nullptr;
    Status refused;
    if (CUresult e = LoadFunction(*cu_, bounds_, *task->modules[l.source], l.entry, &fns[i],
                                  &what, &param_sizes, &refused);
        e != CUDA_SUCCESS) {
      return f.CuFail(e, which(i) + ": " + what + " '" + l.entry + "'");
    }
    if (!refused.ok()) {
      return f.Fail(refused.code(), which(i) + ": '" + l.entry + "': " + refused.message());
    }
    if (Status s = LaunchChecks(l.launch, fns[i], param_sizes, l.args); !s.ok()) {
      return f.Fail(s.code(), which(i) + ": " + s.message());
    }
  }
  r.timing.load_us = MicrosSince(t_load);
  while (xs.marks.size() < n + 1) {
    CUevent e = nullptr;
    if (CUresult err = cu_->cuEventCreate(&e, CU_EVENT_DEFAULT); err != CUDA_SUCCESS) {
      return f.CuFail(err, "creating events");
    }
    xs.marks.push_back(e);
  }

  HostBuffers host;
  if (Status s = ReadInputs(*task, job.buffers, &host); !s.ok()) {
    return f.Fail(s.code() == Code::kUnavailable ? s.code() : Code::kIoError, s.message());
  }
  const std::vector<std::string_view>& in = host.in;
  DeviceBuffers buffers{*cu_, stream, {}};
  std::vector<CUdeviceptr> ptr(job.buffers.size(), 0);
  for (size_t i = 0; i < job.buffers.size(); ++i) {
    const Arg& a = job.buffers[i];
    const bool framed = a.kind == ArgKind::kIn || a.kind == ArgKind::kInOut;
    const uint64_t size = framed ? in[i].size() : a.size;
    if (size == 0) continue;
    CUresult e = cu_->cuMemAllocAsync(&ptr[i], size, stream);
    if (e != CUDA_SUCCESS) return f.CuFail(e, "allocating buffer " + std::to_string(i));
    buffers.ptrs.push_back(ptr[i]);
  }
  // Each launch's parameters: scalar values, and buffer pointers at their
  // offsets (bounds were checked by the decoder); launch i's are
  // params[first[i]...].
  size_t total_args = 0;
  for (const schema::KernelLaunch& l : job.launches) total_args += l.args.size();
  std::vector<uint64_t> slots(total_args);
  std::vector<void*> params(total_args);
  std::vector<size_t> first(n + 1, 0);
  for (size_t i = 0, at = 0; i < n; ++i) {
    first[i] = at;
    for (const Arg& a : job.launches[i].args) {
      slots[at] = a.kind == ArgKind::kScalar ? a.bits : ptr[a.buffer] + a.offset;
      params[at] = &slots[at];
      ++at;
    }
  }
  auto params_of = [&](size_t i) { return params.data() + first[i]; };

  CUresult e = cu_->cuEventRecord(ev[0], stream);
  if (e != CUDA_SUCCESS) return f.CuFail(e, "event");
  // Every byte a kernel can read is written first: inputs copied, out and
  // scratch buffers zeroed.
  for (size_t i = 0; i < job.buffers.size(); ++i) {
    const Arg& a = job.buffers[i];
    if (!ptr[i]) continue;
    if (a.kind == ArgKind::kOut || a.kind == ArgKind::kScratch) {
      e = cu_->cuMemsetD8Async(ptr[i], 0, a.size, stream);
    } else {
      e = cu_->cuMemcpyHtoDAsync(ptr[i], in[i].data(), in[i].size(), stream);
    }
    if (e != CUDA_SUCCESS) return f.CuFail(e, "copying inputs to the device");
  }
  cu_->cuEventRecord(ev[1], stream);
  if (xs.progress && xs.memops && !job.graph) {
    *xs.progress = 0;
    task->progress.store(xs.progress);
  }
  if (job.graph) {
    // Launch i as a kernel node: `fn`, its dimensions, its parameters.
    auto node = [&](size_t i, CUfunction fn) {
      const schema::LaunchSpec& l = job.launches[i].launch;
      CUDA_KERNEL_NODE_PARAMS p = {};
      p.func = fn;
      p.gridDimX = l.grid.x;
      p.gridDimY = l.grid.y;
      p.gridDimZ = l.grid.z;
      p.blockDimX = l.block.x;
      p.blockDimY = l.block.y;
      p.blockDimZ = l.block.z;
      p.sharedMemBytes = l.shared_bytes;
      p.kernelParams = params_of(i);
      return p;
    };
    const std::string shape = GraphShape(job);
    Graph* g = xs.graphs->Find(shape);
    if (!g) {
      // Built once: kernel nodes in a chain. No event nodes between them:
      // they would cost more than the launches (docs/BENCHMARKS.md), so a
      // graph's timing is the span of its launches.
      Graph built;
      e = cu_->cuGraphCreate(&built.graph, 0);
      CUgraphNode prev = nullptr;
      for (size_t i = 0; i < n && e == CUDA_SUCCESS; ++i) {
        const CUDA_KERNEL_NODE_PARAMS p = node(i, fns[i]);
        CUgraphNode kernel = nullptr;
        e = cu_->cuGraphAddKernelNode(&kernel, built.graph, prev ? &prev : nullptr, prev ? 1 : 0,
                                      &p);
        if (e != CUDA_SUCCESS) break;
        built.kernels.push_back(kernel);
        built.functions.push_back(fns[i]);
        prev = kernel;
      }
      if (e == CUDA_SUCCESS) e = cu_->cuGraphInstantiate(&built.exec, built.graph, 0);
      if (e != CUDA_SUCCESS) {
        xs.graphs->Destroy(built);
        return f.CuFail(e, "building the job's CUDA graph");
      }
      built.modules = task->modules;
      g = xs.graphs->Put(shape, std::move(built));
    } else {
      for (size_t i = 0; i < n; ++i) {
        // The graph's own function (its module is kept with it): the same
        // kernel, perhaps from an earlier load of the module.
        const CUDA_KERNEL_NODE_PARAMS p = node(i, g->functions[i]);
        e = cu_->cuGraphExecKernelNodeSetParams(g->exec, g->kernels[i], &p);
        if (e != CUDA_SUCCESS) return f.CuFail(e, which(i) + ": setting the graph's parameters");
      }
    }
    e = cu_->cuGraphLaunch(g->exec, stream);
    if (e != CUDA_SUCCESS) return f.CuFail(e, "launching the job's CUDA graph");
  } else {
    cu_->cuEventRecord(xs.marks[0], stream);
    for (size_t i = 0; i < n; ++i) {
      const schema::LaunchSpec& l = job.launches[i].launch;
      e = cu_->cuLaunchKernel(fns[i], l.grid.x, l.grid.y, l.grid.z, l.block.x, l.block.y,
                              l.block.z, l.shared_bytes, stream, params_of(i), nullptr);
      if (e != CUDA_SUCCESS) return f.CuFail(e, which(i));
      cu_->cuEventRecord(xs.marks[i + 1], stream);
      if (xs.memops && xs.progress) {
        // Launches finished so far, for naming the one that faults or runs
        // past the time limit.
        if (cu_->cuStreamWriteValue32(stream, xs.progress_dev, static_cast<uint32_t>(i + 1),
                                      0) != CUDA_SUCCESS) {
          xs.memops = false;
        }
      }
    }
  }
  cu_->cuEventRecord(ev[2], stream);
  for (size_t i = 0; i < job.buffers.size(); ++i) {
    const Arg& a = job.buffers[i];
    if (a.kind != ArgKind::kOut && a.kind != ArgKind::kInOut) continue;
    const uint64_t size = a.kind == ArgKind::kOut ? a.size : in[i].size();
    if (host.region[i]) {
      // Back into its region, in place: nothing travels.
      e = cu_->cuMemcpyDtoHAsync(host.region[i], ptr[i], size, stream);
      if (e != CUDA_SUCCESS) return f.CuFail(e, "copying outputs from the device");
      continue;
    }
    zmq::message_t out = pinned_->Message(size);
    if (size > 0) {
      e = cu_->cuMemcpyDtoHAsync(out.data(), ptr[i], size, stream);
      if (e != CUDA_SUCCESS) return f.CuFail(e, "copying outputs from the device");
    }
    d.data.push_back(std::move(out));
    r.outputs.push_back(static_cast<uint32_t>(i));
  }
  cu_->cuEventRecord(ev[3], stream);
  e = cu_->cuStreamSynchronize(stream);
  task->progress.store(nullptr);
  if (e != CUDA_SUCCESS) {
    d.data.clear();
    r.outputs.clear();
    // The progress word is host memory: readable after a fault too.
    const std::string at = !job.graph && xs.memops && xs.progress && *xs.progress < n
                               ? which(*xs.progress)
                               : "launches 0-" + std::to_string(n - 1);
    return f.CuFail(e, at);
  }
  if (Status s = OutputsToFiles(job, d); !s.ok()) return f.Fail(s.code(), s.message());
  float ms[3] = {};
  for (int k = 0; k < 3; ++k) cu_->cuEventElapsedTime(&ms[k], ev[k], ev[k + 1]);
  r.timing.h2d_us = static_cast<uint64_t>(ms[0] * 1000.0f);
  r.timing.kernel_us = static_cast<uint64_t>(ms[1] * 1000.0f);
  r.timing.d2h_us = static_cast<uint64_t>(ms[2] * 1000.0f);
  if (!job.graph) {
    r.timing.launch_us.resize(n);
    for (size_t i = 0; i < n; ++i) {
      float t = 0;
      cu_->cuEventElapsedTime(&t, xs.marks[i], xs.marks[i + 1]);
      r.timing.launch_us[i] = static_cast<uint64_t>(t * 1000.0f);
    }
  }
  r.state = JobState::kDone;
  r.code = Code::kOk;
  return d;
}

// ---------------------------------------------------------------- protocol

void GpuWorker::Impl::Send(const WorkerMessage& m, std::vector<zmq::message_t>* payload) {
  std::vector<zmq::message_t> frames;
  if (payload) {
    for (auto& p : *payload) frames.push_back(std::move(p));
  }
  outbox_.emplace_back(schema::EncodeWorkerMessage(m), std::move(frames));
  if (m.op != WorkerOp::kResult) FlushResults();
}

void GpuWorker::Impl::FlushResults() {
  if (outbox_.empty()) return;
  std::vector<zmq::message_t> frames;
  frames.emplace_back(schema::kWorkerProtocol.data(), schema::kWorkerProtocol.size());
  if (outbox_.size() > 1) {
    schema::Batch b;
    for (const auto& [h, p] : outbox_) b.parts.push_back(static_cast<uint32_t>(1 + p.size()));
    const std::string bh = schema::EncodeBatch(b);
    frames.emplace_back(bh.data(), bh.size());
  }
  for (auto& [h, p] : outbox_) {
    frames.emplace_back(h.data(), h.size());
    for (auto& f : p) frames.push_back(std::move(f));
  }
  outbox_.clear();
  try {
    zmq::send_multipart(sock_, frames);
  } catch (const zmq::error_t& e) {
    spdlog::error("send to the broker failed: {}", e.what());
  }
}

void GpuWorker::Impl::Heartbeat() {
  // On the liveness connection once the broker knows the token; until then
  // the broker has nothing to hear (it answers ready first).
  if (!registered_) return;
  WorkerMessage hb;
  hb.op = WorkerOp::kHeartbeat;
  hb.free_bytes = free_bytes_;
  hb.inflight = static_cast<uint32_t>(inflight_.size());
  hb.token = token_;
  if (health_) hb.health = health_->Sample();
  // The jobs an executor has begun: the broker's backstop for run-time
  // limits counts from there, not from the dispatch (a job may wait here
  // behind others for longer than its limit).
  hb.running.emplace();
  for (const auto& [key, t] : inflight_) {
    if (t->started_ns.load()) hb.running->push_back({key.first, key.second});
  }
  const std::string h = schema::EncodeWorkerMessage(hb);
  try {
    live_.send(zmq::buffer(schema::kWorkerProtocol), zmq::send_flags::sndmore);
    live_.send(zmq::buffer(h), zmq::send_flags::dontwait);
  } catch (const zmq::error_t& e) {
    spdlog::error("heartbeat to the broker failed: {}", e.what());
  }
}

void GpuWorker::Impl::SendReady() {
  WorkerMessage m;
  m.op = WorkerOp::kReady;
  m.worker = name_;
  m.device = device_;
  m.device.free_bytes = free_bytes_;
  m.slots = opt_.slots;
  m.module_slots = opt_.module_slots;
  m.local_dir = opt_.local_dir;
  m.token = token_;
  if (health_) m.health = health_->Sample();
  registered_ = false;
  Send(m);
}

void GpuWorker::Impl::Leave(int code, const std::string& reason) {
  WorkerMessage bye;
  bye.op = WorkerOp::kDisconnect;
  bye.reason = reason;
  Send(bye);  // after the results waiting in the outbox
  spdlog::error("leaving: {}", reason);
  // Executor threads may be stuck in the driver: nothing in this process
  // can be joined or cleaned up. Terminating the ZeroMQ context waits (up to
  // the socket's linger) until what was sent has left; only then exit.
  sock_.close();
  live_.close();
  zctx_.close();
  _exit(code);
}

void GpuWorker::Impl::OnBrokerFrames(std::vector<zmq::message_t>& frames) {
  if (frames.size() >= 2 && schema::IsBatch(frames[1].to_string_view())) {
    std::vector<uint64_t> sizes;
    for (size_t i = 2; i < frames.size(); ++i) sizes.push_back(frames[i].size());
    schema::Batch b;
    if (Status s = schema::DecodeBatch(frames[1].to_string_view(), sizes, {}, &b); !s.ok()) {
      spdlog::error("bad batch from the broker: {}", s.ToString());
      return;
    }
    size_t next = 2;
    for (uint32_t n : b.parts) {
      std::vector<zmq::message_t> one;
      one.emplace_back().copy(frames[0]);
      for (uint32_t i = 0; i < n; ++i) one.push_back(std::move(frames[next++]));
      OnBrokerMessage(one);
    }
    return;
  }
  OnBrokerMessage(frames);
}

void GpuWorker::Impl::OnLivenessMessage(std::vector<zmq::message_t>& frames) {
  if (frames.size() < 2) return;
  BrokerMessage m;
  if (!schema::DecodeBrokerMessage(frames[1].to_string_view(), {}, {}, &m).ok()) return;
  if (m.op == BrokerOp::kDisconnect && registered_) {
    // The broker does not know the token: it restarted. Start over.
    spdlog::info("broker: {}; registering again", m.error);
    modules_.Clear();
    SendReady();
  }
}

void GpuWorker::Impl::OnBrokerMessage(std::vector<zmq::message_t>& frames) {
  if (frames.size() < 2) return;
  if (!schema::CheckProtocolFrame(frames[0].to_string_view(), schema::kWorkerProtocol).ok()) {
    return;
  }
  std::vector<uint64_t> sizes;
  for (size_t i = 2; i < frames.size(); ++i) sizes.push_back(frames[i].size());
  BrokerMessage m;
  if (Status s = schema::DecodeBrokerMessage(frames[1].to_string_view(), sizes,
                                               schema::Limits::ForWorkers(), &m);
      !s.ok()) {
    spdlog::error("bad message from the broker: {}", s.ToString());
    return;
  }
  if (m.op != BrokerOp::kDisconnect) registered_ = true;
  switch (m.op) {
    case BrokerOp::kHeartbeat:
      return;
    case BrokerOp::kError:
      spdlog::error("the broker refused a message: {}: {}", CodeName(m.code), m.error);
      return;
    case BrokerOp::kDisconnect:
      // The broker forgot us (restart) or is stopping: start over. Jobs in
      // flight were requeued by it; their results will be dropped there.
      spdlog::info("broker: {}; registering again", m.error);
      modules_.Clear();
      SendReady();
      return;
    case BrokerOp::kJob:
      break;
  }
  auto task = std::make_shared<Task>();
  // Modules in the order the broker touched them (PROTOCOL.md, "Module
  // images"); an image travels as the payload frame before the buffers,
  // which index past it.
  size_t next_image = 2;
  auto take = [&](const std::string& key, schema::ImageKind image) {
    if (image == schema::ImageKind::kNone) return modules_.Touch(key);
    std::string bytes = frames[next_image++].to_string();  // keeps PTX NUL-terminated
    auto module = std::make_shared<Module>(key, std::move(bytes), &graveyard_);
    modules_.Put(module);
    return module;
  };
  std::string missing;
  if (m.launches.empty()) {
    task->module = take(m.module, m.image);
    if (!task->module) missing = m.module;
  } else {
    for (const schema::ModuleRef& ref : m.modules) {
      task->modules.push_back(take(ref.key, ref.image));
      if (!task->modules.back() && missing.empty()) missing = ref.key;
    }
  }
  task->job = std::move(m);
  task->frames = std::move(frames);
  inflight_[{task->job.id, task->job.attempt}] = task;
  if (!missing.empty()) {
    Done d;
    d.task = task;
    d.result.op = WorkerOp::kResult;
    d.result.id = task->job.id;
    d.result.attempt = task->job.attempt;
    d.result.state = JobState::kFailed;
    d.result.code = Code::kLaunchError;
    d.result.error = "module " + missing + " is not held by this worker";
    Finish(d);
    return;
  }
  {
    std::lock_guard lock(mu_);
    queue_.push_back(std::move(task));
    queued_.store(queue_.size(), std::memory_order_relaxed);
  }
  cv_.notify_one();
}

void GpuWorker::Impl::Finish(Done& d) {
  if (d.sticky) {
    // The context is gone. Alone, this job is the culprit; otherwise the
    // broker replays every job in flight, one at a time.
    const std::string what = d.result.error;
    if (inflight_.size() == 1) {
      Send(d.result);
      Leave(kExitFault, "sticky CUDA error in job " + std::to_string(d.result.id) + ": " + what);
    }
    Leave(kExitFault, "sticky CUDA error with " + std::to_string(inflight_.size()) +
                          " jobs in flight: " + what);
  }
  inflight_.erase({d.result.id, d.result.attempt});
  Send(d.result, &d.data);
}

int GpuWorker::Impl::Run() {
  spdlog::info("worker {} serving {} ({}, {}) for {}", name_, device_.name, device_.Arch(),
               device_.uuid, opt_.broker);
  SendReady();
  auto next_beat = Clock::now() + opt_.heartbeat;
  auto last_heard = Clock::now();
  auto last_activity = Clock::now();  // a message or a finished job
  while (!g_stop.load()) {
    zmq::pollitem_t items[] = {{sock_.handle(), 0, ZMQ_POLLIN, 0},
                               {nullptr, done_fd_, ZMQ_POLLIN, 0},
                               {live_.handle(), 0, ZMQ_POLLIN, 0}};
    // With --spin-us: awake for that long after a message or a finished
    // job, and all the while a job runs (its result is sent the moment it
    // is done, not a wake-up later).
    const bool spin = opt_.spin.count() > 0 &&
                      (!inflight_.empty() || Clock::now() - last_activity < opt_.spin);
    try {
      zmq::poll(items, 3, std::chrono::milliseconds(spin ? 0 : 10));
    } catch (const zmq::error_t& e) {
      if (e.num() != EINTR) break;
    }
    if (items[1].revents) {
      uint64_t n;
      (void)!read(done_fd_, &n, sizeof n);
    }
    for (int i = 0; i < 1024; ++i) {
      std::vector<zmq::message_t> frames;
      if (!zmq::recv_multipart(sock_, std::back_inserter(frames), zmq::recv_flags::dontwait)) {
        break;
      }
      last_heard = last_activity = Clock::now();
      OnBrokerFrames(frames);
    }
    for (int i = 0; i < 64; ++i) {
      std::vector<zmq::message_t> frames;
      if (!zmq::recv_multipart(live_, std::back_inserter(frames), zmq::recv_flags::dontwait)) {
        break;
      }
      last_heard = Clock::now();
      OnLivenessMessage(frames);
    }
    std::vector<Done> done;
    {
      std::lock_guard lock(mu_);
      done.swap(done_);
    }
    // A sticky fault ends this process in Finish(): the jobs that finished
    // whole beside it go first, so that their results are sent (not run
    // again elsewhere) and the fault's culprit may be the one left.
    std::stable_partition(done.begin(), done.end(), [](const Done& d) { return !d.sticky; });
    for (Done& d : done) Finish(d);
    FlushResults();  // what finished together goes together
    const auto now = Clock::now();
    if (!done.empty()) last_activity = now;
    // Run-time limits: a kernel cannot be stopped from inside the process.
    for (const auto& [key, t] : inflight_) {
      const uint64_t id = key.first;
      const int64_t started = t->started_ns.load();
      if (!started || !t->job.time_limit_ms) continue;
      const auto ran = now - Clock::time_point(Clock::duration(started));
      if (ran > std::chrono::milliseconds(t->job.time_limit_ms)) {
        WorkerMessage r;
        r.op = WorkerOp::kResult;
        r.id = id;
        r.attempt = t->job.attempt;
        r.state = JobState::kFailed;
        r.code = Code::kTimeout;
        r.error = "the kernel ran past its limit of " + std::to_string(t->job.time_limit_ms) +
                  " ms and was stopped (its worker process was ended)";
        const volatile uint32_t* progress = t->progress.load();
        const uint32_t finished = progress ? *progress : 0;
        if (progress && finished < t->job.launches.size()) {
          // The launches that finished, as the GPU wrote them: the next one
          // ran past the limit (after the last, the copies back did).
          r.error = "launch " + std::to_string(finished) + ": " + r.error;
        } else if (!t->job.launches.empty()) {
          r.error = "launches 0-" + std::to_string(t->job.launches.size() - 1) + ": " + r.error;
        }
        Send(r);
        Leave(kExitTimeout, "job " + std::to_string(id) + " ran past its time limit");
      }
    }
    if (now >= next_beat) {
      next_beat = now + opt_.heartbeat;
      Heartbeat();
    }
    if (now - last_heard > opt_.heartbeat * 3) {
      // The broker is silent: it may have restarted. Register again.
      last_heard = now;
      modules_.Clear();
      SendReady();
    }
  }
  WorkerMessage bye;
  bye.op = WorkerOp::kDisconnect;
  bye.reason = "worker stopping";
  Send(bye);
  return 0;
}

GpuWorker::GpuWorker(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuWorker::~GpuWorker() = default;

StatusOr<std::unique_ptr<GpuWorker>> GpuWorker::Create(WorkerOptions options,
                                                      std::shared_ptr<const CudaDriver> driver) {
  auto impl = std::make_unique<Impl>(std::move(options), std::move(driver));
  GPUQ_RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<GpuWorker>(new GpuWorker(std::move(impl)));
}

int GpuWorker::Run() { return impl_->Run(); }
void GpuWorker::RequestStop() { g_stop.store(true); }

}  // namespace gpuq::worker
