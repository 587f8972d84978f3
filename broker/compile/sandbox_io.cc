#include "broker/compile/sandbox_io.h"

#include <msgpack.hpp>

namespace gpuq::compile {
namespace {

using Packer = msgpack::packer<msgpack::sbuffer>;

void Str(Packer& p, std::string_view s) {
  p.pack_str(static_cast<uint32_t>(s.size()));
  p.pack_str_body(s.data(), static_cast<uint32_t>(s.size()));
}
void Bin(Packer& p, std::string_view s) {
  p.pack_bin(static_cast<uint32_t>(s.size()));
  p.pack_bin_body(s.data(), static_cast<uint32_t>(s.size()));
}
void StrList(Packer& p, const std::vector<std::string>& v) {
  p.pack_array(static_cast<uint32_t>(v.size()));
  for (const auto& s : v) Str(p, s);
}

Status Bad(std::string_view what) {
  return Error(Code::kInternal, "compile helper pipe: " + std::string(what));
}

// Positional decoding: both ends are built from this file, so the layout is
// fixed; anything that does not fit is an error, never a crash.
struct Cursor {
  const msgpack::object_array* a;
  uint32_t i = 0;
  const msgpack::object* Next() { return i < a->size ? &a->ptr[i++] : nullptr; }
};

Status GetStr(Cursor& c, std::string* out) {
  const msgpack::object* o = c.Next();
  if (!o || (o->type != msgpack::type::STR && o->type != msgpack::type::BIN))
    return Bad("expected a string");
  if (o->type == msgpack::type::STR) {
    out->assign(o->via.str.ptr, o->via.str.size);
  } else {
    out->assign(o->via.bin.ptr, o->via.bin.size);
  }
  return Status::Ok();
}

Status GetUint(Cursor& c, uint64_t* out) {
  const msgpack::object* o = c.Next();
  if (!o || o->type != msgpack::type::POSITIVE_INTEGER) return Bad("expected an integer");
  *out = o->via.u64;
  return Status::Ok();
}

Status GetArray(Cursor& c, Cursor* inner) {
  const msgpack::object* o = c.Next();
  if (!o || o->type != msgpack::type::ARRAY) return Bad("expected an array");
  inner->a = &o->via.array;
  inner->i = 0;
  return Status::Ok();
}

Status GetStrList(Cursor& c, std::vector<std::string>* out) {
  Cursor l{};
  GPUQ_RETURN_IF_ERROR(GetArray(c, &l));
  out->resize(l.a->size);
  for (auto& s : *out) GPUQ_RETURN_IF_ERROR(GetStr(l, &s));
  return Status::Ok();
}

Status Unpack(std::string_view bytes, msgpack::object_handle* oh, Cursor* top) {
  try {
    size_t off = 0;
    msgpack::unpack_limit lim(1 << 16, 16, 1u << 30, 1u << 30, 0, 6);
    *oh = msgpack::unpack(bytes.data(), bytes.size(), off, nullptr, nullptr, lim);
    if (off != bytes.size()) return Bad("trailing bytes");
  } catch (const std::exception& e) {
    return Bad(e.what());
  }
  if (oh->get().type != msgpack::type::ARRAY) return Bad("expected an array");
  top->a = &oh->get().via.array;
  top->i = 0;
  return Status::Ok();
}

}  // namespace

std::string EncodeSandboxRequest(const CompileRequest& c) {
  msgpack::sbuffer b;
  Packer p(b);
  p.pack_array(6);
  Str(p, c.source);
  Str(p, c.source_name);
  p.pack_array(static_cast<uint32_t>(c.headers.size()));
  for (const auto& h : c.headers) {
    p.pack_array(2);
    Str(p, h.name);
    Str(p, h.content);
  }
  StrList(p, c.options);
  StrList(p, c.name_expressions);
  Str(p, c.arch);
  return std::string(b.data(), b.size());
}

Status DecodeSandboxRequest(std::string_view bytes, CompileRequest* out) {
  msgpack::object_handle oh;
  Cursor c{};
  GPUQ_RETURN_IF_ERROR(Unpack(bytes, &oh, &c));
  CompileRequest& r = *out;
  GPUQ_RETURN_IF_ERROR(GetStr(c, &r.source));
  GPUQ_RETURN_IF_ERROR(GetStr(c, &r.source_name));
  Cursor h{};
  GPUQ_RETURN_IF_ERROR(GetArray(c, &h));
  r.headers.resize(h.a->size);
  for (auto& nh : r.headers) {
    Cursor pair{};
    GPUQ_RETURN_IF_ERROR(GetArray(h, &pair));
    GPUQ_RETURN_IF_ERROR(GetStr(pair, &nh.name));
    GPUQ_RETURN_IF_ERROR(GetStr(pair, &nh.content));
  }
  GPUQ_RETURN_IF_ERROR(GetStrList(c, &r.options));
  GPUQ_RETURN_IF_ERROR(GetStrList(c, &r.name_expressions));
  return GetStr(c, &r.arch);
}

std::string EncodeSandboxReply(const CompileOutput& o) {
  msgpack::sbuffer b;
  const char no_length[4] = {};
  b.write(no_length, sizeof no_length);
  Packer p(b);
  p.pack_array(7);
  o.ok ? p.pack_true() : p.pack_false();
  Str(p, CodeName(o.code));
  Str(p, o.log);
  Bin(p, o.ptx);
  Bin(p, o.cubin);
  p.pack_array(static_cast<uint32_t>(o.lowered.size()));
  for (const auto& l : o.lowered) {
    p.pack_array(2);
    Str(p, l.expression);
    Str(p, l.lowered);
  }
  p.pack_uint64(o.nvrtc_us);
  std::string framed(b.data(), b.size());
  const uint32_t length = static_cast<uint32_t>(framed.size() - 4);
  for (int i = 0; i < 4; ++i) framed[i] = static_cast<char>(length >> (8 * i));
  return framed;
}

Status DecodeSandboxReply(std::string_view bytes, CompileOutput* out, size_t max_bytes) {
  if (bytes.size() < 4) return Error(Code::kUnavailable, "the reply is not whole yet");
  uint32_t length = 0;
  for (int i = 0; i < 4; ++i) length |= uint32_t{static_cast<uint8_t>(bytes[i])} << (8 * i);
  if (length > max_bytes) {
    return Error(Code::kTooLarge,
                 "compile output is over " + std::to_string(max_bytes) + " bytes");
  }
  if (bytes.size() < 4 + size_t{length}) {
    return Error(Code::kUnavailable, "the reply is not whole yet");
  }
  if (bytes.size() > 4 + size_t{length}) return Bad("bytes after the reply");
  msgpack::object_handle oh;
  Cursor c{};
  GPUQ_RETURN_IF_ERROR(Unpack(bytes.substr(4), &oh, &c));
  const msgpack::object* ok = c.Next();
  if (!ok || ok->type != msgpack::type::BOOLEAN) return Bad("expected a boolean");
  out->ok = ok->via.boolean;
  std::string code;
  GPUQ_RETURN_IF_ERROR(GetStr(c, &code));
  auto parsed = CodeFromName(code);
  if (!parsed) return Bad("unknown code");
  out->code = *parsed;
  GPUQ_RETURN_IF_ERROR(GetStr(c, &out->log));
  GPUQ_RETURN_IF_ERROR(GetStr(c, &out->ptx));
  GPUQ_RETURN_IF_ERROR(GetStr(c, &out->cubin));
  Cursor l{};
  GPUQ_RETURN_IF_ERROR(GetArray(c, &l));
  out->lowered.resize(l.a->size);
  for (auto& n : out->lowered) {
    Cursor pair{};
    GPUQ_RETURN_IF_ERROR(GetArray(l, &pair));
    GPUQ_RETURN_IF_ERROR(GetStr(pair, &n.expression));
    GPUQ_RETURN_IF_ERROR(GetStr(pair, &n.lowered));
  }
  return GetUint(c, &out->nvrtc_us);
}

}  // namespace gpuq::compile
