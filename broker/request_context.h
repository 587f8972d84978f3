// Who sent a client request, and its id: what every handler answers to
// (redpanda's request_context plays the same part). A reply is addressed to
// the connection, never to a bare routing id (broker/connections.h).
#pragma once

#include <cstdint>
#include <string>

#include "broker/connections.h"

namespace gpuq::broker {

struct RequestContext {
  ConnectionRef conn;
  uint64_t rid = 0;
  std::string tenant;  // bound to the CURVE key; "" off CURVE (a job's own field counts)
  bool operator_ = false;  // an operator key: sees every tenant's stats
  // A tenant bound to its key sees only its own jobs.
  bool Sees(const std::string& job_tenant) const {
    return tenant.empty() || tenant == job_tenant;
  }
};

}  // namespace gpuq::broker
