// Registered regions (PROTOCOL.md, "Regions"): memory a client on the
// broker's host shares with the service, handed over once as a sealed memfd
// on the region channel, and named by jobs as ranges {region, offset, size}.
//
// RegionTable is the bookkeeping: which regions are there, whose they are,
// which unfinished jobs name them and which ranges those jobs write (two
// unfinished jobs never write overlapping bytes of a region). A region ends
// when its client unregisters it or goes away; it is dropped (its descriptor
// closed, the workers told to unmap it) once no unfinished job names it.
//
// RegionServer is the channel: a Unix seqpacket socket in the local
// directory, served by the broker loop (never blocking: every descriptor is
// non-blocking), with clients that register and unregister regions and the
// local workers that are handed them.
//
// Owned by the broker loop thread: not thread-safe.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>
#include <zmq.hpp>

#include "gpuq/status.h"
#include "schema/messages.h"
#include "util/clock.h"
#include "util/fd.h"

namespace gpuq::broker {

class BrokerCore;

struct RegionLimits {
  uint32_t regions_per_tenant = 64;
  uint64_t bytes_per_tenant = 64ull << 30;
  // In all, whatever the tenants (on the ipc endpoint a tenant is the
  // caller's word, and every local worker locks every region).
  uint32_t regions = 1024;
  uint64_t bytes = 256ull << 30;
  size_t connections = 1024;  // region channel connections at once
};

class RegionTable {
 public:
  struct Region {
    uint64_t id = 0;
    std::string tenant;
    uint64_t size = 0;
    // Shared with the messages that hand it to workers and wait in their
    // queues: one descriptor per region, however many wait.
    std::shared_ptr<const UniqueFd> fd;
    int owner = -1;  // the client channel that registered it
    bool ended = false;
    std::string why;  // why it ended
    std::set<uint64_t> jobs;  // unfinished jobs that name it
    // The ranges those jobs write: offset -> (end, job); never overlapping.
    std::map<uint64_t, std::pair<uint64_t, uint64_t>> writes;
  };

  explicit RegionTable(RegionLimits limits = {}) : limits_(limits) {}
  void SetLimits(RegionLimits limits) { limits_ = limits; }

  // Registers `fd` (checked by the caller: a sealed memfd of `size` bytes)
  // for `tenant`; its id, random and never 0. kResourceExhausted past the
  // tenant's limits.
  StatusOr<uint64_t> Add(const std::string& tenant, uint64_t size, UniqueFd fd, int owner);
  // Whether a job of `tenant` may use the region ranges among `buffers`:
  // each names a live region of the tenant, lies within it, and writes
  // (out, inout) no byte that another unfinished job, or another of its own
  // buffers, writes. kOk for a job that names none.
  Status Check(const std::string& tenant, const std::vector<schema::Arg>& buffers) const;
  // Records job `job` as using them (after Check).
  void Use(uint64_t job, const std::vector<schema::Arg>& buffers);
  // The job has ended (or its worker has answered): its uses are gone.
  // Returns the regions that were waiting only for it (ended, now unused):
  // the caller drops them from the workers. They are gone from the table.
  std::vector<uint64_t> Release(uint64_t job);
  // Ends region `id` (no new job may name it). Returns the unfinished jobs
  // that name it; the region is gone at once when there are none (then
  // `gone` is set).
  std::set<uint64_t> End(uint64_t id, const std::string& why, bool* gone);
  // Whether every region `job` uses is live (it was Use()d and none ended).
  bool Live(uint64_t job) const;

  const Region* Find(uint64_t id) const;
  const std::map<uint64_t, Region>& all() const { return regions_; }
  // Tenants with a region counted (none is kept for a tenant that holds none).
  size_t tenants_counted() const { return by_tenant_.size(); }

 private:
  struct Use_ {
    uint64_t region = 0, offset = 0, end = 0;
    bool writes = false;
  };
  // Takes `r` out of its tenant's counts and the total.
  void Uncount(const Region& r);
  RegionLimits limits_;
  std::map<uint64_t, Region> regions_;
  std::unordered_map<uint64_t, std::vector<Use_>> uses_;  // by job
  std::map<std::string, std::pair<uint32_t, uint64_t>> by_tenant_;  // count, bytes
  uint64_t total_bytes_ = 0;
};

// Whether any of a job's buffers lives in a region.
bool NamesRegions(const schema::JobSpec& spec);

class RegionServer {
 public:
  explicit RegionServer(BrokerCore& core) : core_(core) {}
  // Serves the region channel at `path`. Without it (not called, or an
  // error), no client can register a region and no job names one.
  Status Listen(const std::string& path);
  bool listening() const { return listener_.valid(); }
  // Appends the descriptors to poll: the listener and every connection.
  void PollItems(std::vector<zmq::pollitem_t>* items) const;
  // Serves what is ready among `items` (as PollItems made them).
  void OnPoll(const zmq::pollitem_t* items, size_t n);
  // Whether the worker of `token` has its channel, so can be handed regions.
  bool HasWorker(const std::string& token) const { return workers_.count(token) > 0; }
  // The worker of `token` registered (ready) as a worker of this host: a
  // channel that said hello with its token is handed the regions now.
  void WorkerReady(const std::string& token);
  // Tells every worker channel to unmap region `id` (it is gone).
  void Dropped(uint64_t id);
  // Closes connections that have not said hello within kHelloWithin of
  // their accept: a peer that says nothing holds no place under the bound.
  void Tick();
  static constexpr std::chrono::seconds kHelloWithin{5};

 private:
  // A message waiting for room in a worker's socket, with the descriptor
  // it passes (the region's own, kept open while the message waits).
  struct Outgoing {
    std::string bytes;
    uint64_t region = 0;  // the region a kRegion message hands over
    std::shared_ptr<const UniqueFd> fd;
  };
  static constexpr size_t kMaxQueued = 65536;
  struct Conn {
    UniqueFd fd;
    bool hello = false, worker = false;
    bool verified = false;  // a worker's: registered, local, by its token
    bool broken = false;  // to be closed (Sweep)
    MonoTime accepted{};
    std::string token;
    std::set<uint64_t> regions;  // a client's, live
    std::deque<Outgoing> out;    // a worker's, in order
  };
  void Accept();
  // False when the connection is to be closed.
  bool OnReadable(Conn& c);
  void OnMessage(Conn& c, schema::RegionMessage& m, UniqueFd fd);
  void Reply(Conn& c, const schema::RegionMessage& m);
  void ReplyError(Conn& c, uint64_t rid, const Status& s);
  // Hands region `r` to a worker's channel (queued behind what waits).
  void SendRegion(Conn& w, const RegionTable::Region& r);
  void Enqueue(Conn& w, const schema::RegionMessage& m, std::shared_ptr<const UniqueFd> pass);
  // Sends what waits, as far as the socket takes it.
  void Flush(Conn& w);
  // Attaches the channel of `token` once the worker endpoint knows it.
  void Verify(const std::string& token);
  void Close(int fd);
  // Closes the connections marked broken.
  void Sweep();
  void EndRegion(uint64_t id, const std::string& why);

  BrokerCore& core_;
  UniqueFd listener_;
  std::string path_;
  std::map<int, Conn> conns_;
  std::map<std::string, int> workers_;  // token -> its channel's descriptor (attached)
  std::map<std::string, int> pending_;  // token -> a channel that waits for its ready
  MonoTime accept_paused_until_{};
  bool refused_logged_ = false;
};

}  // namespace gpuq::broker
