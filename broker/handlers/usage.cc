#include "broker/handlers/handlers.h"

namespace gpuq::broker::handlers {

// A tenant bound to its key sees its own usage only; an operator key, and
// the ipc endpoint (guarded by file permissions, where the tenant is the
// caller's word anyway), see any tenant's, or all.
void Usage(BrokerCore& core, const RequestContext& ctx, const schema::ClientRequest& req) {
  std::string tenant = req.tenant;
  if (!ctx.tenant.empty() && !ctx.operator_) {
    if (!tenant.empty() && tenant != ctx.tenant) {
      return core.ReplyError(ctx, Error(Code::kForbidden, "a tenant sees its own usage only"));
    }
    tenant = ctx.tenant;
  }
  if (req.until_ms != 0 && req.until_ms <= req.since_ms) {
    return core.ReplyError(ctx, Error(Code::kInvalid, "until_ms must be after since_ms"));
  }
  ReadOp& read = core.ReadFor(ctx, ReadOp::Kind::kUsage, 0, kReadUsage);
  read.usage_tenant = std::move(tenant);
  read.since_ms = static_cast<int64_t>(std::min<uint64_t>(req.since_ms, INT64_MAX));
  read.until_ms = static_cast<int64_t>(std::min<uint64_t>(req.until_ms, INT64_MAX));
}

}  // namespace gpuq::broker::handlers
