// One handler per client request (schema/PROTOCOL.md, "Client → broker"),
// each taking the request's context: the connection, rid and tenant it
// answers to. They run on the broker loop thread and never wait: what needs
// the store is handed to the store thread and answered when it is done.
#pragma once

#include "broker/core.h"
#include "broker/request_context.h"
#include "schema/messages.h"

namespace gpuq::broker::handlers {

// `frames`: the whole message (identity, protocol, header, payload...); the
// payload frames are taken.
void Submit(BrokerCore& core, const RequestContext& ctx, schema::ClientRequest& req,
            Frames& frames);
void Status(BrokerCore& core, const RequestContext& ctx, uint64_t id);
void Result(BrokerCore& core, const RequestContext& ctx, uint64_t id);
void Cancel(BrokerCore& core, const RequestContext& ctx, uint64_t id);
void Stats(BrokerCore& core, const RequestContext& ctx);
void Devices(BrokerCore& core, const RequestContext& ctx);
void Usage(BrokerCore& core, const RequestContext& ctx, const schema::ClientRequest& req);

}  // namespace gpuq::broker::handlers
