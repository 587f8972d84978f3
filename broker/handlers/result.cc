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
  ReadOp& read = core.ReadFor(ctx, ReadOp::Kind::kResult, id, kReadResult);
  read.client_local = core.LocalClients();
  read.max_bytes = core.ReplyBudget(ctx.conn);
}

}  // namespace gpuq::broker::handlers
