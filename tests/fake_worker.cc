// gpuq-fake-worker: a test double of gpuq-worker for tests without a GPU. It
// speaks the worker protocol (GPUQW/1) for real but runs nothing on a GPU:
//   - an out buffer comes back filled with the byte (argument index + 1);
//   - an inout buffer comes back with every byte incremented by 1;
//   - the entry name picks a behaviour: "slow*" takes 100 ms, "crash*" makes
//     the process exit at once (as a faulting worker would), "fault*"
//     reports kernel_fault when it is the only job in flight and otherwise
//     disconnects and exits (a sticky fault, culprit unknown), "hang*" never
//     answers (heartbeats go on).
// It keeps the module set of PROTOCOL.md ("Module images") and fails a job
// whose module it was never sent, so tests also check the broker's side.
// With --streams N it runs N jobs at once and the others wait, in arrival
// order; its heartbeats name the jobs begun (`running`) unless --no-running.
// Lives in tests/ only; never a product, demo or benchmark.
#include <CLI/CLI.hpp>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <random>
#include <cstdio>
#include <list>
#include <map>
#include <set>
#include <thread>
#include <unordered_map>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "schema/codec.h"
#include "schema/filename.h"
#include "schema/region_channel.h"
#include "tests/fake_device.h"
#include "util/curve_keys.h"
#include "util/plain_file.h"
#include "util/sealed_memfd.h"
#include "worker/worker_supervisor.h"

using namespace gpuq;
using namespace gpuq::schema;
using Clock = std::chrono::steady_clock;

namespace {

struct Pending {
  Clock::time_point due;  // once begun
  BrokerMessage job;
  std::vector<zmq::message_t> frames;
  Clock::duration runs{};  // how long it takes once begun
  uint64_t seq = 0;        // arrival order
  bool begun = false;
};

class ModuleSet {
 public:
  explicit ModuleSet(size_t n) : n_(n) {}
  bool Has(const std::string& k) const { return index_.count(k) > 0; }
  void Touch(const std::string& k) {
    auto it = index_.find(k);
    if (it != index_.end()) {
      order_.splice(order_.begin(), order_, it->second);
      return;
    }
    order_.push_front(k);
    index_[k] = order_.begin();
    if (order_.size() > n_) {
      index_.erase(order_.back());
      order_.pop_back();
    }
  }

 private:
  size_t n_;
  std::list<std::string> order_;
  std::unordered_map<std::string, std::list<std::string>::iterator> index_;
};

}  // namespace

int main(int argc, char** argv) {
  std::string endpoint, arch = "sm_90", uuid, name;
  uint32_t slots = 4, module_slots = 16;
  int heartbeat_ms = 100, delay_us = 0;
  CLI::App app{"gpuq-fake-worker: a test double of gpuq-worker (no GPU)"};
  app.add_option("--broker", endpoint)->required();
  app.add_option("--arch", arch);
  app.add_option("--uuid", uuid);
  app.add_option("--slots", slots);
  app.add_option("--module-slots", module_slots);
  app.add_option("--heartbeat-ms", heartbeat_ms);
  app.add_option("--delay-us", delay_us, "Time each job takes");
  uint32_t streams = 0;
  app.add_option("--streams", streams,
                 "Jobs run at once, the others wait in arrival order (0: every job held)");
  bool no_running = false;
  app.add_flag("--no-running", no_running,
               "Heartbeats do not name the jobs begun (as a worker of an earlier protocol)");
  std::string local_dir;
  app.add_option("--local-dir", local_dir, "The broker's local directory (local buffers)");
  std::string server_key, key;
  app.add_option("--server-key", server_key, "CURVE: the broker's public key file");
  app.add_option("--key", key, "CURVE: this worker's secret key file");
  // GPU health as a worker with NVML reports it (PROTOCOL.md, "GPU health"):
  // fixed plausible figures, and a critical Xid after some jobs.
  bool with_health = false;
  app.add_flag("--health", with_health, "Report GPU health with ready and heartbeats");
  uint64_t xid_after_jobs = 0;
  uint32_t xid = 79;
  app.add_option("--xid-after-jobs", xid_after_jobs,
                 "With --health: report a critical Xid once this many jobs have finished");
  app.add_option("--xid", xid, "The Xid of --xid-after-jobs");
  // What a supervisor gives gpuq-worker (gpuqd --workers N --worker-bin
  // gpuq-fake-worker): the double takes the same command line.
  int device = 0, spin_us = 0;
  uint64_t module_mib = 0, local_mib = 0;
  pid_t parent = 0;
  app.add_option("--device", device);
  app.add_option("--spin-us", spin_us);
  app.add_option("--module-memory-mib", module_mib);
  app.add_option("--local-memory-mib", local_mib);
  app.add_option("--parent-pid", parent);
  CLI11_PARSE(app, argc, argv);
  if (parent > 0 && !gpuq::worker::EndWithParent(parent)) return 1;
  uint64_t jobs_done = 0;
  auto health = [&] {
    schema::GpuHealth h;
    if (!with_health) return h;
    h.known = true;
    h.util_pct = 42;
    h.mem_used_bytes = 3ull << 30;
    h.temp_c = 55;
    h.power_mw = 250000;
    h.ecc_corrected = 1;
    if (xid_after_jobs && jobs_done >= xid_after_jobs) {
      h.xid_events = 1;
      h.last_xid = xid;
      h.drain = "critical Xid " + std::to_string(xid) + " (reported by the worker test double)";
    }
    return h;
  };
  if (uuid.empty()) uuid = "GPU-fake-" + std::to_string(getpid());
  name = "fake:" + std::to_string(getpid()) + ":0";

  zmq::context_t ctx;
  // Two connections, as gpuq-worker has (PROTOCOL.md, "Liveness"): jobs and
  // results on one, heartbeats with the token on the other.
  auto open = [&]() -> std::optional<zmq::socket_t> {
    zmq::socket_t s(ctx, zmq::socket_type::dealer);
    s.set(zmq::sockopt::linger, 0);
    if (!key.empty()) {
      auto server = ReadCurvePublicKey(server_key);
      auto mine = ReadCurveSecretKey(key);
      if (!server.ok() || !mine.ok()) return std::nullopt;
      s.set(zmq::sockopt::curve_serverkey, *server);
      s.set(zmq::sockopt::curve_publickey, mine->public_key);
      s.set(zmq::sockopt::curve_secretkey, mine->secret_key);
    }
    s.connect(endpoint);
    return s;
  };
  auto control = open(), liveness = open();
  if (!control || !liveness) return 2;
  zmq::socket_t& sock = *control;
  std::string token;
  std::random_device random;
  for (int i = 0; i < 32; ++i) token.push_back("0123456789abcdef"[random() % 16]);
  bool registered = false;  // heard from the broker since the last ready
  // Results of one round go together: one message, or a batch.
  std::vector<std::pair<std::string, std::vector<zmq::message_t>>> outbox;
  auto flush = [&] {
    if (outbox.empty()) return;
    std::vector<zmq::message_t> frames;
    frames.emplace_back(kWorkerProtocol.data(), kWorkerProtocol.size());
    if (outbox.size() > 1) {
      Batch b;
      for (auto& [h, p] : outbox) b.parts.push_back(static_cast<uint32_t>(1 + p.size()));
      const std::string bh = EncodeBatch(b);
      frames.emplace_back(bh.data(), bh.size());
    }
    for (auto& [h, p] : outbox) {
      frames.emplace_back(h.data(), h.size());
      for (auto& f : p) frames.push_back(std::move(f));
    }
    outbox.clear();
    zmq::send_multipart(sock, frames);
  };
  auto send = [&](const WorkerMessage& m, std::vector<zmq::message_t>* payload = nullptr) {
    std::vector<zmq::message_t> frames;
    if (payload) {
      for (auto& p : *payload) frames.push_back(std::move(p));
    }
    outbox.emplace_back(EncodeWorkerMessage(m), std::move(frames));
    if (m.op != WorkerOp::kResult) flush();
  };
  auto ready = [&] {
    WorkerMessage m;
    m.op = WorkerOp::kReady;
    m.worker = name;
    m.device = testing::FakeDevice("fake GPU", uuid, arch);
    m.slots = slots;
    m.module_slots = module_slots;
    m.local_dir = local_dir;
    m.token = token;
    m.health = health();
    registered = false;
    send(m);
  };
  // The region channel (PROTOCOL.md, "Regions"), as gpuq-worker keeps it:
  // connected before ready when the worker is local, again after the broker
  // closed it; every region handed over is mapped until dropped.
  UniqueFd region_chan;
  std::map<uint64_t, Mapping> regions;
  auto connect_regions = [&] {
    if (local_dir.empty() || region_chan.valid()) return;
    auto c = ConnectRegionChannel(local_dir, token);
    if (c.ok()) region_chan = std::move(*c);
  };
  auto read_regions = [&] {
    while (region_chan.valid()) {
      RegionMessage m;
      UniqueFd fd;
      auto got = ReadRegionMessage(region_chan.get(), /*dontwait=*/true, &m, &fd);
      if (got.ok() && !*got) return;
      if (!got.ok()) {
        region_chan.Reset();
        regions.clear();
        return;
      }
      if (m.op == RegionOp::kRegion && fd.valid()) {
        auto map = Mapping::Map(fd.get(), m.size);
        if (map.ok()) regions[m.region] = std::move(*map);
      } else if (m.op == RegionOp::kDrop) {
        regions.erase(m.region);
      }
    }
  };
  connect_regions();
  ready();
  ModuleSet modules(module_slots);
  std::vector<Pending> pending;
  uint64_t next_seq = 0;
  // Begins waiting jobs, oldest first, while fewer than --streams run.
  auto begin_waiting = [&] {
    for (;;) {
      size_t running = 0;
      Pending* oldest = nullptr;
      for (Pending& p : pending) {
        if (p.begun) {
          ++running;
        } else if (!oldest || p.seq < oldest->seq) {
          oldest = &p;
        }
      }
      if (!oldest || (streams && running >= streams)) return;
      oldest->begun = true;
      oldest->due = Clock::now() + oldest->runs;
    }
  };
  auto last_heard = Clock::now();
  auto next_beat = Clock::now();
  const Limits limits = Limits::ForWorkers();
  // A message, or each message of a batch, as [protocol, header, payload...].
  auto split = [](std::vector<zmq::message_t>& frames) {
    std::vector<std::vector<zmq::message_t>> out;
    if (frames.size() >= 2 && IsBatch(frames[1].to_string_view())) {
      std::vector<uint64_t> sizes;
      for (size_t i = 2; i < frames.size(); ++i) sizes.push_back(frames[i].size());
      Batch b;
      if (!DecodeBatch(frames[1].to_string_view(), sizes, {}, &b).ok()) return out;
      size_t next = 2;
      for (uint32_t n : b.parts) {
        std::vector<zmq::message_t> one;
        one.emplace_back().copy(frames[0]);
        for (uint32_t i = 0; i < n; ++i) one.push_back(std::move(frames[next++]));
        out.push_back(std::move(one));
      }
      return out;
    }
    out.push_back(std::move(frames));
    return out;
  };
  for (;;) {
    zmq::pollitem_t items[] = {{sock.handle(), 0, ZMQ_POLLIN, 0},
                               {liveness->handle(), 0, ZMQ_POLLIN, 0},
                               {nullptr, region_chan.get(), ZMQ_POLLIN, 0}};
    // Awake for the next job due, so that a job's time is what it asked.
    auto wait = std::chrono::milliseconds(5);
    for (const Pending& p : pending) {
      if (!p.begun || p.job.entry.rfind("hang", 0) == 0) continue;  // never due
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(p.due - Clock::now());
      wait = std::max(std::chrono::milliseconds(0), std::min(wait, left));
    }
    zmq::poll(items, region_chan.valid() ? 3 : 2, wait);
    const auto now = Clock::now();
    read_regions();
    if (registered && now >= next_beat) {
      connect_regions();
      next_beat = now + std::chrono::milliseconds(heartbeat_ms);
      WorkerMessage hb;
      hb.op = WorkerOp::kHeartbeat;
      hb.free_bytes = 1ull << 34;
      hb.inflight = static_cast<uint32_t>(pending.size());
      hb.token = token;
      hb.health = health();
      if (!no_running) {
        hb.running.emplace();
        for (const Pending& p : pending) {
          if (p.begun) hb.running->push_back({p.job.id, p.job.attempt});
        }
      }
      const std::string h = EncodeWorkerMessage(hb);
      std::vector<zmq::message_t> frames;
      frames.emplace_back(kWorkerProtocol.data(), kWorkerProtocol.size());
      frames.emplace_back(h.data(), h.size());
      zmq::send_multipart(*liveness, frames);
    }
    if (now - last_heard > std::chrono::milliseconds(heartbeat_ms * 3)) {
      // The broker went silent (restarted?): register again.
      modules = ModuleSet(module_slots);
      pending.clear();
      ready();
      last_heard = now;
    }
    // The liveness connection: the broker's heartbeats, or a disconnect
    // when it does not know the token (it restarted).
    while (items[1].revents & ZMQ_POLLIN) {
      std::vector<zmq::message_t> frames;
      if (!zmq::recv_multipart(*liveness, std::back_inserter(frames), zmq::recv_flags::dontwait)) {
        break;
      }
      last_heard = Clock::now();
      if (frames.size() < 2) continue;
      BrokerMessage m;
      if (!DecodeBrokerMessage(frames[1].to_string_view(), {}, limits, &m).ok()) continue;
      if (m.op == BrokerOp::kDisconnect && registered) {
        modules = ModuleSet(module_slots);
        pending.clear();
        ready();
      }
    }
    while (items[0].revents & ZMQ_POLLIN) {
      std::vector<zmq::message_t> received;
      if (!zmq::recv_multipart(sock, std::back_inserter(received), zmq::recv_flags::dontwait)) {
        break;
      }
      last_heard = Clock::now();
      for (auto& frames : split(received)) {
        if (frames.size() < 2) continue;
        std::vector<uint64_t> sizes;
        for (size_t i = 2; i < frames.size(); ++i) sizes.push_back(frames[i].size());
        BrokerMessage m;
        if (!DecodeBrokerMessage(frames[1].to_string_view(), sizes, limits, &m).ok()) continue;
        if (m.op == BrokerOp::kDisconnect) {
          modules = ModuleSet(module_slots);
          pending.clear();
          ready();
          continue;
        }
        registered = true;
        if (m.op != BrokerOp::kJob) continue;
        // A job of several launches behaves as its last launch's entry
        // says (slow, hang, fault, ...), with every module checked in order.
        std::string missing;
        if (m.launches.empty()) {
          if (m.image == ImageKind::kNone && !modules.Has(m.module)) missing = m.module;
          modules.Touch(m.module);
        } else {
          for (const schema::ModuleRef& ref : m.modules) {
            if (ref.image == ImageKind::kNone && !modules.Has(ref.key) && missing.empty()) {
              missing = ref.key;
            }
            modules.Touch(ref.key);
          }
          m.entry = m.launches.back().entry;
        }
        Pending p{{}, m, std::move(frames), std::chrono::microseconds(delay_us), next_seq++};
        if (m.entry.rfind("slow", 0) == 0) p.runs += std::chrono::milliseconds(100);
        // "msN...": runs N milliseconds.
        if (m.entry.rfind("ms", 0) == 0) {
          p.runs += std::chrono::milliseconds(std::atoi(m.entry.c_str() + 2));
        }
        if (m.entry.rfind("crash", 0) == 0) _exit(3);
        if (!missing.empty()) p.job.entry = "!module " + missing + " was never sent";
        pending.push_back(std::move(p));
      }
    }
    // Finish what is due.
    begin_waiting();
    for (size_t i = 0; i < pending.size();) {
      Pending& p = pending[i];
      if (!p.begun || p.job.entry.rfind("hang", 0) == 0 || Clock::now() < p.due) {
        ++i;
        continue;
      }
      WorkerMessage r;
      r.op = WorkerOp::kResult;
      r.id = p.job.id;
      r.attempt = p.job.attempt;
      r.timing.kernel_us = 1;
      if (!p.job.graph) r.timing.launch_us.assign(p.job.launches.size(), 1);
      // The launches of a job of several run on the last launch's terms; an
      // error names it, as gpuq-worker's do.
      const std::string launch_word =
          p.job.launches.empty() ? ""
                                 : "launch " + std::to_string(p.job.launches.size() - 1) + ": ";
      std::vector<zmq::message_t> out;
      if (p.job.entry.rfind("!module", 0) == 0) {
        r.state = JobState::kFailed;
        r.code = Code::kLaunchError;
        r.error = p.job.entry.substr(1);
      } else if (p.job.entry.rfind("fault", 0) == 0) {
        if (pending.size() > 1) {
          WorkerMessage bye;
          bye.op = WorkerOp::kDisconnect;
          bye.reason = "sticky CUDA error: CUDA_ERROR_ILLEGAL_ADDRESS";
          send(bye);
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
          _exit(2);
        }
        r.state = JobState::kFailed;
        r.code = Code::kKernelFault;
        r.error =
            launch_word + "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered";
      } else {
        r.state = JobState::kDone;
        const std::vector<Arg>& buffers = p.job.launches.empty() ? p.job.args : p.job.buffers;
        read_regions();  // a region is handed over before the first job naming it
        for (uint32_t a = 0; a < buffers.size(); ++a) {
          const Arg& arg = buffers[a];
          if (arg.in_region()) {
            // The same bytes as a sent buffer would get, in the region.
            auto it = regions.find(arg.region);
            if (it == regions.end() || arg.offset + arg.size > it->second.size()) {
              r.state = JobState::kFailed;
              r.code = Code::kUnavailable;
              r.error = "region " + std::to_string(arg.region) + " is not mapped here";
              r.outputs.clear();
              out.clear();
              break;
            }
            auto* bytes = reinterpret_cast<uint8_t*>(it->second.data()) + arg.offset;
            if (arg.kind == ArgKind::kOut) memset(bytes, static_cast<int>(a + 1), arg.size);
            if (arg.kind == ArgKind::kInOut) {
              for (uint64_t b = 0; b < arg.size; ++b) bytes[b] = static_cast<uint8_t>(bytes[b] + 1);
            }
            continue;
          }
          if (arg.kind == ArgKind::kOut) {
            out.emplace_back(arg.size);
            memset(out.back().data(), static_cast<int>(a + 1), arg.size);
            r.outputs.push_back(a);
          } else if (arg.kind == ArgKind::kInOut) {
            // A payload frame, or after them a local file (read whole).
            const size_t frames = p.frames.size() - 2;
            zmq::message_t in;
            if (arg.frame < frames) {
              in.copy(p.frames[2 + arg.frame]);
            } else {
              // Read as gpuq-worker reads it: never mapped, a short read
              // fails the job.
              const LocalFile& f = p.job.files[arg.frame - frames];
              fprintf(stderr, "job %llu: input %u from local file %s\n",
                      (unsigned long long)p.job.id, a, f.name.c_str());
              in.rebuild(f.size);
              auto fd = OpenPlainFile(f.name, {.size = f.size});
              Status read = fd.ok() ? ReadExactly(fd->get(), in.data(), f.size, f.name)
                                    : fd.status();
              if (!read.ok()) {
                r.state = JobState::kFailed;
                r.code = Code::kIoError;
                r.error = read.message();
                r.outputs.clear();
                out.clear();
                break;
              }
            }
            out.emplace_back(in.size());
            auto* src = static_cast<const uint8_t*>(in.data());
            auto* dst = static_cast<uint8_t*>(out.back().data());
            for (size_t b = 0; b < in.size(); ++b) dst[b] = static_cast<uint8_t>(src[b] + 1);
            r.outputs.push_back(a);
          }
        }
      }
      if (!p.job.out_dir.empty() && r.state == JobState::kDone) {
        // Outputs of 64 KiB or more as files of the out_dir, after the frames.
        std::vector<zmq::message_t> kept;
        std::vector<uint32_t> frame_args, file_args;
        for (size_t k = 0; k < out.size(); ++k) {
          if (out[k].size() < 64 * 1024) {
            kept.push_back(std::move(out[k]));
            frame_args.push_back(r.outputs[k]);
            continue;
          }
          const std::string name = schema::WorkerOutputName(r.id, r.attempt, r.outputs[k]);
          FILE* fp = fopen((p.job.out_dir + "/" + name).c_str(), "wb");
          if (!fp || fwrite(out[k].data(), 1, out[k].size(), fp) != out[k].size()) _exit(4);
          fclose(fp);
          r.files.push_back({name, out[k].size()});
          fprintf(stderr, "job %llu: output %u to local file %s\n", (unsigned long long)r.id,
                  r.outputs[k], name.c_str());
          file_args.push_back(r.outputs[k]);
        }
        out = std::move(kept);
        r.outputs = std::move(frame_args);
        r.outputs.insert(r.outputs.end(), file_args.begin(), file_args.end());
      }
      // "wcrash": dies after writing its outputs, before it can report them.
      if (p.job.entry.rfind("wcrash", 0) == 0) _exit(3);
      send(r, &out);
      ++jobs_done;
      // Answered: its place goes to the last (order does not matter here).
      if (i + 1 != pending.size()) std::swap(pending[i], pending.back());
      pending.pop_back();
    }
    begin_waiting();
    flush();
  }
}
