#include "broker/handlers/handlers.h"

namespace gpuq::broker::handlers {

void Devices(BrokerCore& core, const RequestContext& ctx) {
  schema::ClientReply r;
  r.op = schema::ReplyOp::kDevices;
  r.workers = core.WorkerViews();
  if (core.LocalClients()) r.local_dir = core.local_dir();
  core.Reply(ctx, std::move(r));
}

}  // namespace gpuq::broker::handlers
