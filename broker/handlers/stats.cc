#include "broker/handlers/handlers.h"

namespace gpuq::broker::handlers {

void Stats(BrokerCore& core, const RequestContext& ctx) {
  schema::ClientReply r;
  r.op = schema::ReplyOp::kStats;
  r.stats = EncodeStats(core.Snapshot(&ctx));
  core.Reply(ctx, std::move(r));
}

}  // namespace gpuq::broker::handlers
