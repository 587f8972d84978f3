// The pipe protocol between the compile service and its sandboxed helper
// process (gpuq-nvrtc). The helper starts, warms NVRTC up on a fixed kernel
// and confines itself, then writes one byte on its stdout: kReadyNamespaces
// or kReadyLandlock (how it is confined), or kCannotConfine followed by a
// reply holding the error, after which it exits. A ready helper reads one
// msgpack request on its stdin to EOF, writes one reply on its stdout, and
// exits. A reply is framed (its length as 4 bytes, little-endian, then the
// msgpack bytes), so that the parent has it whole without waiting for the
// helper's exit. Everything the helper needs to confine itself comes on
// its command line from the parent, never in the request, which is read only
// once it is confined. The parent treats the reply as untrusted (the helper
// ran NVRTC on untrusted source) and decodes it with limits.
#pragma once

#include <string>
#include <string_view>

#include "broker/compile/compile_request.h"

namespace gpuq::compile {

// In a user and mount namespace that shows only the toolkit's headers, and
// under Landlock.
inline constexpr char kReadyNamespaces = 'N';
// Under Landlock alone (user namespaces are not allowed here, or were not
// asked for).
inline constexpr char kReadyLandlock = 'L';
inline constexpr char kCannotConfine = 'X';

std::string EncodeSandboxRequest(const CompileRequest& r);
Status DecodeSandboxRequest(std::string_view bytes, CompileRequest* out);

// The framed reply.
std::string EncodeSandboxReply(const CompileOutput& o);
// Decodes a framed reply. Returns kUnavailable while `bytes` holds only the
// beginning of one (read more), kTooLarge when the frame says it is over
// `max_bytes`, kInternal when it is malformed or followed by more bytes.
Status DecodeSandboxReply(std::string_view bytes, CompileOutput* out,
                          size_t max_bytes = 512u << 20);

}  // namespace gpuq::compile
