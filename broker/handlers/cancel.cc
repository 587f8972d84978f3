#include "broker/handlers/handlers.h"

namespace gpuq::broker::handlers {

void Cancel(BrokerCore& core, const RequestContext& ctx, uint64_t id) {
  Job* job = core.jobs().Find(id);
  if (job && !ctx.Sees(job->tenant)) {
    return core.ReplyError(ctx, Error(Code::kNotFound, "no job " + std::to_string(id)), 0, id);
  }
  // A dispatched job keeps its worker slot until the worker answers; its
  // result is then dropped. The reply comes once the cancel has committed
  // (or, for a job that had ended, with the state it ended in).
  if (job) return core.Cancel(*job, ctx);
  core.ReadFor(ctx, ReadOp::Kind::kStatus, id, kReadCancel);
}

}  // namespace gpuq::broker::handlers
