#include "broker/handlers/handlers.h"

namespace gpuq::broker::handlers {

void Result(BrokerCore& core, const RequestContext& ctx, uint64_t id) {
  const Job* job = core.jobs().Find(id);
  // Not ended yet: its status.
  if (job && !job->ended()) return Status(core, ctx, id);
  if (job && !ctx.Sees(job->tenant)) {
    return core.ReplyError(ctx, Error(Code::kNotFound, "no job " + std::to_string(id)), 0, id);
  }
  // The store reads it, output files included unless the client can read
  // them itself; never more than the client's connection may hold unread.
  core.FetchResult(ctx, id);
}

}  // namespace gpuq::broker::handlers
