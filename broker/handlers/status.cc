#include "broker/handlers/handlers.h"

namespace gpuq::broker::handlers {

void Status(BrokerCore& core, const RequestContext& ctx, uint64_t id) {
  const Job* job = core.jobs().Find(id);
  if (job && !ctx.Sees(job->tenant)) {
    return core.ReplyError(ctx, Error(Code::kNotFound, "no job " + std::to_string(id)), 0, id);
  }
  if (job && !job->ended()) {
    schema::ClientReply r;
    r.op = schema::ReplyOp::kStatus;
    r.id = id;
    r.state = job->state;
    r.attempts = job->attempts;
    if (job->state == schema::JobState::kDispatched) {
      if (const Worker* w = core.workers().Find(job->worker)) r.device = w->device.uuid;
    }
    return (void)core.Reply(ctx, std::move(r));
  }
  // Ended (its result committed, or about to be): the store answers.
  core.ReadFor(ctx, ReadOp::Kind::kStatus, id, kReadStatus);
}

}  // namespace gpuq::broker::handlers
