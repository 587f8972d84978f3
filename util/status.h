// gpuq's one error type (include/gpuq/status.h, public) and, for gpuq's own
// code, the macros that return a failure early. Each C library gets a
// checking macro that converts its return code into a Status at the call
// site.
#pragma once

#include "gpuq/status.h"


#define GPUQ_CONCAT_INNER(a, b) a##b
#define GPUQ_CONCAT(a, b) GPUQ_CONCAT_INNER(a, b)

#define GPUQ_RETURN_IF_ERROR(expr)              \
  do {                                          \
    ::gpuq::Status _gpuq_status = (expr);       \
    if (!_gpuq_status.ok()) return _gpuq_status; \
  } while (0)

#define GPUQ_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return tmp.status();              \
  lhs = std::move(tmp).value()

#define GPUQ_ASSIGN_OR_RETURN(lhs, expr) \
  GPUQ_ASSIGN_OR_RETURN_IMPL(GPUQ_CONCAT(_gpuq_or_, __LINE__), lhs, expr)
