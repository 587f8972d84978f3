// The pipe protocol between the compile service and its sandboxed helper
// process (gpuq-nvrtc): one msgpack request on the helper's stdin, one
// msgpack reply on its stdout, then the helper exits. The parent treats the
// reply as untrusted (the helper ran NVRTC on untrusted source) and decodes
// it with limits.
#pragma once

#include <string>
#include <string_view>

#include "broker/compile/compile_request.h"

namespace gpuq::compile {

struct SandboxRequest {
  CompileRequest compile;
  std::string cuda_include;  // the one directory the helper may read
};

std::string EncodeSandboxRequest(const SandboxRequest& r);
Status DecodeSandboxRequest(std::string_view bytes, SandboxRequest* out);

std::string EncodeSandboxReply(const CompileOutput& o);
// `max_bytes` bounds what the parent accepts.
Status DecodeSandboxReply(std::string_view bytes, CompileOutput* out);

}  // namespace gpuq::compile
