// gpuq::Region and its channel (include/gpuq/client.h; PROTOCOL.md,
// "Regions").
#include <poll.h>
#include <sys/mman.h>

#include "client/connection.h"
#include "gpuq/client.h"
#include "schema/region_channel.h"
#include "util/sealed_memfd.h"
#include "util/status.h"

namespace gpuq {
namespace client_internal {

bool RegionChannel::Late(const schema::RegionMessage& r) {
  if (abandoned.erase(r.rid) && r.op == schema::RegionOp::kRegistered) {
    // A register that timed out: the region has no owner here. Its
    // answer is ignored like any other that comes late.
    schema::RegionMessage drop;
    drop.op = schema::RegionOp::kUnregister;
    drop.rid = ++rid;
    drop.region = r.region;
    return schema::SendRegionMessage(fd.get(), drop, -1).ok();
  }
  return true;
}

StatusOr<bool> RegionChannel::ReadOne(schema::RegionMessage* r) {
  UniqueFd unexpected;  // a client is never handed one: closed
  auto got = schema::ReadRegionMessage(fd.get(), /*dontwait=*/true, r, &unexpected);
  if (!got.ok() && got.status().code() == Code::kUnavailable) fd.Reset();
  return got;
}

StatusOr<schema::RegionMessage> RegionChannel::Call(schema::RegionMessage m, int pass) {
  if (!fd.valid()) return Status(Code::kUnavailable, "the region channel is closed");
  // Answers that came after their calls stopped waiting, first: a region
  // registered too late goes before this request counts it.
  while (!abandoned.empty()) {
    schema::RegionMessage r;
    GPUQ_ASSIGN_OR_RETURN(bool got, ReadOne(&r));
    if (!got) break;
    (void)Late(r);
  }
  m.rid = ++rid;
  GPUQ_RETURN_IF_ERROR(schema::SendRegionMessage(fd.get(), m, pass));
  const auto until = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        until - std::chrono::steady_clock::now());
    pollfd p{fd.get(), POLLIN, 0};
    if (left.count() <= 0 || poll(&p, 1, static_cast<int>(left.count())) == 0) {
      if (m.op == schema::RegionOp::kRegister && abandoned.size() < 1024) abandoned.insert(m.rid);
      return Status(Code::kTimeout, "no answer on the region channel");
    }
    schema::RegionMessage r;
    GPUQ_ASSIGN_OR_RETURN(bool got, ReadOne(&r));
    if (!got) continue;
    // An error without a rid is the broker's answer to a request it could
    // not read: this one (one request at a time is outstanding). Another
    // rid answers an earlier request that timed out.
    if (r.rid != m.rid && !(r.rid == 0 && r.op == schema::RegionOp::kError)) {
      (void)Late(r);
      continue;
    }
    if (r.op == schema::RegionOp::kError) return Status(r.code, r.error);
    return r;
  }
}

}  // namespace client_internal

Region::~Region() {
  (void)Unregister();
  // The mapping is this process's own: unmapped here, whatever the broker
  // does (the workers' mappings are theirs).
  if (data_) munmap(data_, size_);
  if (fd_ >= 0) close(fd_);
}

Status Region::Unregister() {
  if (!channel_) return Status::Ok();
  auto* ch = static_cast<client_internal::RegionChannel*>(channel_.get());
  schema::RegionMessage m;
  m.op = schema::RegionOp::kUnregister;
  m.region = id_;
  auto r = ch->Call(std::move(m));
  channel_.reset();
  return r.ok() ? Status::Ok() : r.status();
}

schema::Arg Region::Range(schema::ArgKind kind, uint64_t offset, uint64_t size) const {
  if (size == 0 && offset <= size_) size = size_ - offset;
  return schema::Arg::InRegion(kind, id_, offset, size);
}
schema::Arg Region::In(uint64_t offset, uint64_t size) const {
  return Range(schema::ArgKind::kIn, offset, size);
}
schema::Arg Region::Out(uint64_t offset, uint64_t size) const {
  return Range(schema::ArgKind::kOut, offset, size);
}
schema::Arg Region::InOut(uint64_t offset, uint64_t size) const {
  return Range(schema::ArgKind::kInOut, offset, size);
}

}  // namespace gpuq
