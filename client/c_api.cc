// The C API (include/gpuq/gpuq.h) over the C++ client.
#include "gpuq/gpuq.h"

#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "gpuq/client.h"

struct gpuq_client {
  std::unique_ptr<gpuq::Client> client;
  std::string error;
};

struct gpuq_job {
  gpuq::JobRequest request;
  // Made without an entry: a job of several launches, whose buffers are
  // request.spec.buffers and whose arguments go to its latest launch.
  bool several = false;
  // The first call that did not fit the job; gpuq_submit reports it.
  std::string misuse;
};

struct gpuq_result {
  gpuq::JobResult result;
};

struct gpuq_region {
  std::unique_ptr<gpuq::Region> region;
};

struct gpuq_session {
  std::unique_ptr<gpuq::Session> session;
  std::string error;
};

struct gpuq_usage_list {
  std::vector<gpuq::schema::TenantUsage> rows;
};

namespace {

gpuq_code Fail(gpuq_client* c, const gpuq::Status& s) {
  if (c) c->error = s.message();
  return static_cast<gpuq_code>(s.code());
}

// A NULL client, job, session or place for an answer: GPUQ_INVALID, and
// nothing done (a wait with nowhere to put its result took the result and
// then crashed). The client's error says which, where there is a client.
gpuq_code Null(gpuq_client* c, const char* what) {
  if (!c) return GPUQ_INVALID;
  return Fail(c, gpuq::Status(gpuq::Code::kInvalid, std::string(what) + " is NULL"));
}

gpuq_state State(gpuq::schema::JobState s) { return static_cast<gpuq_state>(s); }

// Keeps the first misuse of a job: the calls return nothing, so the text
// waits for gpuq_submit.
void Misuse(gpuq_job* job, std::string text) {
  if (job->misuse.empty()) job->misuse = std::move(text);
}

// The latest launch of a job of several launches, for `call`'s argument;
// nullptr (a misuse kept) when there is none.
gpuq::schema::KernelLaunch* LatestLaunch(gpuq_job* job, const char* call) {
  if (!job->several) {
    Misuse(job, std::string(call) + ": a job of one launch has no launches (a job of several "
                                    "launches is made with gpuq_job_new(source, NULL))");
    return nullptr;
  }
  if (job->request.spec.launches.empty()) {
    Misuse(job, std::string(call) + " before any gpuq_job_add_launch: a launch's arguments "
                                    "follow it");
    return nullptr;
  }
  return &job->request.spec.launches.back();
}

// Source `i` of a job (0: its own), or nullptr (a misuse kept).
gpuq::schema::KernelSpec* Source(gpuq_job* job, uint32_t i, const char* call) {
  gpuq::schema::JobSpec& s = job->request.spec;
  if (i > s.sources.size()) {
    Misuse(job, std::string(call) + ": the job has no source " + std::to_string(i) + " (" +
                    std::to_string(s.sources.size() + 1) + " sources)");
    return nullptr;
  }
  return i == 0 ? &s.kernel : &s.sources[i - 1];
}

std::vector<gpuq::schema::Arg>& Buffers(gpuq_job* job) {
  return job->several ? job->request.spec.buffers : job->request.spec.args;
}

}  // namespace

// The C enums mirror gpuq::Code and schema::JobState value for value.
static_assert(GPUQ_INTERNAL == static_cast<int>(gpuq::Code::kInternal));
static_assert(GPUQ_CODE_EXPIRED == static_cast<int>(gpuq::Code::kExpired));
static_assert(GPUQ_QUOTA_EXCEEDED == static_cast<int>(gpuq::Code::kQuotaExceeded));
static_assert(GPUQ_SESSION_LOST == static_cast<int>(gpuq::Code::kSessionLost));
static_assert(GPUQ_EXPIRED == static_cast<int>(gpuq::schema::JobState::kExpired));
static_assert(GPUQ_F64 == static_cast<int>(gpuq::schema::ScalarType::kF64));

extern "C" {

const char* gpuq_version(void) { return GPUQ_VERSION_STRING; }

const char* gpuq_code_name(gpuq_code code) {
  // CodeName returns views of string literals: NUL-terminated, static.
  return gpuq::CodeName(static_cast<gpuq::Code>(code)).data();
}

gpuq_code gpuq_client_new(const char* endpoint, int timeout_ms, gpuq_client** out) {
  gpuq::ClientOptions o;
  if (timeout_ms > 0) o.timeout = gpuq::Millis(timeout_ms);
  if (out) *out = nullptr;
  if (!out) return GPUQ_INVALID;
  auto c = gpuq::Client::Connect(endpoint ? endpoint : gpuq::DefaultEndpoint(), o);
  if (!c.ok()) return static_cast<gpuq_code>(c.status().code());
  *out = new gpuq_client{std::move(*c), ""};
  return GPUQ_OK;
}

void gpuq_client_free(gpuq_client* client) { delete client; }

const char* gpuq_client_error(const gpuq_client* client) {
  return client ? client->error.c_str() : "no client (NULL)";
}

gpuq_job* gpuq_job_new(const char* source, const char* entry) {
  auto* j = new gpuq_job;
  j->request.spec.kernel.source = source ? source : "";
  j->request.spec.kernel.entry = entry ? entry : "";
  j->several = j->request.spec.kernel.entry.empty();
  return j;
}

void gpuq_job_free(gpuq_job* job) { delete job; }

void gpuq_job_set_launch(gpuq_job* job, uint32_t gx, uint32_t gy, uint32_t gz, uint32_t bx,
                         uint32_t by, uint32_t bz, uint32_t shared_bytes) {
  if (job->several) {
    return Misuse(job, "gpuq_job_set_launch: a job of several launches gives each launch its "
                       "dimensions (gpuq_job_add_launch)");
  }
  job->request.spec.launch = {{gx, gy, gz}, {bx, by, bz}, shared_bytes};
}
void gpuq_job_set_name_expression(gpuq_job* job, int yes) {
  if (job->several) {
    return Misuse(job, "gpuq_job_set_name_expression: a job of several launches has no entry "
                       "of its own (gpuq_job_set_launch_name_expression)");
  }
  job->request.spec.kernel.name_expression = yes != 0;
}
void gpuq_job_set_key(gpuq_job* job, const char* key) { job->request.spec.key = key ? key : ""; }
void gpuq_job_set_tenant(gpuq_job* job, const char* t) { job->request.spec.tenant = t ? t : ""; }
void gpuq_job_set_priority(gpuq_job* job, uint32_t p) { job->request.spec.priority = p; }
void gpuq_job_set_deadline_ms(gpuq_job* job, uint64_t ms) { job->request.spec.deadline_ms = ms; }
void gpuq_job_set_time_limit_ms(gpuq_job* job, uint64_t ms) {
  job->request.spec.time_limit_ms = ms;
}
void gpuq_job_set_gpu(gpuq_job* job, const char* uuid) {
  job->request.spec.placement.gpu = uuid ? uuid : "";
}
void gpuq_job_add_option(gpuq_job* job, const char* option) {
  job->request.spec.kernel.options.emplace_back(option ? option : "");
}
void gpuq_job_add_header(gpuq_job* job, const char* name, const char* content) {
  job->request.spec.kernel.headers.push_back({name ? name : "", content ? content : ""});
}

void gpuq_job_add_scalar(gpuq_job* job, gpuq_type type, const void* value) {
  if (type < GPUQ_U8 || type > GPUQ_F64) {
    return Misuse(job, "gpuq_job_add_scalar: unknown type " + std::to_string(type));
  }
  if (!value) return Misuse(job, "gpuq_job_add_scalar: no value (NULL)");
  std::vector<gpuq::schema::Arg>* args = &job->request.spec.args;
  if (job->several) {
    gpuq::schema::KernelLaunch* l = LatestLaunch(job, "gpuq_job_add_scalar");
    if (!l) return;
    args = &l->args;
  }
  const auto t = static_cast<gpuq::schema::ScalarType>(type);
  uint64_t bits = 0;
  std::memcpy(&bits, value, gpuq::schema::ScalarSize(t));  // little-endian: low bytes
  args->push_back(gpuq::schema::Arg::Scalar(t, bits));
}

static void AddBuffer(gpuq_job* job, gpuq::schema::ArgKind kind, const void* data, size_t size,
                      const char* call) {
  if (!data && size > 0) {
    return Misuse(job, std::string(call) + ": " + std::to_string(size) + " bytes at NULL");
  }
  const auto frame = static_cast<uint32_t>(job->request.inputs.size());
  job->request.inputs.emplace_back(static_cast<const char*>(data), size);
  Buffers(job).push_back(gpuq::schema::Arg::Buffer(kind, frame, 0));
}
void gpuq_job_add_in(gpuq_job* job, const void* data, size_t size) {
  AddBuffer(job, gpuq::schema::ArgKind::kIn, data, size, "gpuq_job_add_in");
}
void gpuq_job_add_inout(gpuq_job* job, const void* data, size_t size) {
  AddBuffer(job, gpuq::schema::ArgKind::kInOut, data, size, "gpuq_job_add_inout");
}
void gpuq_job_add_out(gpuq_job* job, size_t size) {
  Buffers(job).push_back(gpuq::schema::Arg::Out(size));
}

gpuq_code gpuq_region_new(gpuq_client* client, uint64_t size, const char* tenant,
                          gpuq_region** out) {
  if (out) *out = nullptr;
  if (!client || !out) return Null(client, "the region's place (out)");
  auto r = client->client->NewRegion(size, tenant ? tenant : "");
  if (!r.ok()) return Fail(client, r.status());
  *out = new gpuq_region{std::move(*r)};
  return GPUQ_OK;
}
void gpuq_region_free(gpuq_region* region) { delete region; }
void* gpuq_region_data(gpuq_region* region) { return region->region->data(); }
uint64_t gpuq_region_size(const gpuq_region* region) { return region->region->size(); }
uint64_t gpuq_region_id(const gpuq_region* region) { return region->region->id(); }
gpuq_code gpuq_region_unregister(gpuq_client* client, gpuq_region* region) {
  // `client` only takes the error's text, and may be NULL (the region may
  // outlive it).
  if (!region) return Null(client, "the region");
  gpuq::Status s = region->region->Unregister();
  if (!s.ok()) return Fail(client, s);
  return GPUQ_OK;
}

static void AddRange(gpuq_job* job, gpuq::schema::ArgKind kind, const gpuq_region* region,
                     uint64_t offset, uint64_t size, const char* call) {
  if (!region) return Misuse(job, std::string(call) + ": no region (NULL)");
  const gpuq::Region& r = *region->region;
  using gpuq::schema::ArgKind;
  Buffers(job).push_back(kind == ArgKind::kIn      ? r.In(offset, size)
                         : kind == ArgKind::kInOut ? r.InOut(offset, size)
                                                   : r.Out(offset, size));
}
void gpuq_job_add_region_in(gpuq_job* job, const gpuq_region* region, uint64_t offset,
                            uint64_t size) {
  AddRange(job, gpuq::schema::ArgKind::kIn, region, offset, size, "gpuq_job_add_region_in");
}
void gpuq_job_add_region_inout(gpuq_job* job, const gpuq_region* region, uint64_t offset,
                               uint64_t size) {
  AddRange(job, gpuq::schema::ArgKind::kInOut, region, offset, size,
           "gpuq_job_add_region_inout");
}
void gpuq_job_add_region_out(gpuq_job* job, const gpuq_region* region, uint64_t offset,
                             uint64_t size) {
  AddRange(job, gpuq::schema::ArgKind::kOut, region, offset, size, "gpuq_job_add_region_out");
}

uint32_t gpuq_job_add_source(gpuq_job* job, const char* source) {
  if (!job->several) {
    Misuse(job, "gpuq_job_add_source: sources belong to jobs of several launches "
                "(gpuq_job_new(source, NULL))");
  }
  gpuq::schema::KernelSpec k;
  k.source = source ? source : "";
  job->request.spec.sources.push_back(std::move(k));
  return static_cast<uint32_t>(job->request.spec.sources.size());
}
void gpuq_job_add_source_option(gpuq_job* job, uint32_t source, const char* option) {
  if (gpuq::schema::KernelSpec* k = Source(job, source, "gpuq_job_add_source_option")) {
    k->options.emplace_back(option ? option : "");
  }
}
void gpuq_job_add_source_header(gpuq_job* job, uint32_t source, const char* name,
                                const char* content) {
  if (gpuq::schema::KernelSpec* k = Source(job, source, "gpuq_job_add_source_header")) {
    k->headers.push_back({name ? name : "", content ? content : ""});
  }
}
void gpuq_job_add_scratch(gpuq_job* job, size_t size) {
  if (!job->several) {
    return Misuse(job, "gpuq_job_add_scratch: scratch buffers belong to jobs of several "
                       "launches (gpuq_job_new(source, NULL))");
  }
  job->request.spec.buffers.push_back(gpuq::schema::Arg::Scratch(size));
}
void gpuq_job_add_launch(gpuq_job* job, uint32_t source, const char* entry, uint32_t gx,
                         uint32_t gy, uint32_t gz, uint32_t bx, uint32_t by, uint32_t bz,
                         uint32_t shared_bytes) {
  if (!job->several) {
    return Misuse(job, "gpuq_job_add_launch: the job was made with an entry, as a job of one "
                       "launch (a job of several launches is made with "
                       "gpuq_job_new(source, NULL))");
  }
  gpuq::schema::KernelLaunch l;
  l.source = source;
  l.entry = entry ? entry : "";
  l.launch = {{gx, gy, gz}, {bx, by, bz}, shared_bytes};
  job->request.spec.launches.push_back(std::move(l));
}
void gpuq_job_set_launch_name_expression(gpuq_job* job, int yes) {
  if (gpuq::schema::KernelLaunch* l = LatestLaunch(job, "gpuq_job_set_launch_name_expression")) {
    l->name_expression = yes != 0;
  }
}
void gpuq_job_add_buffer_arg(gpuq_job* job, uint32_t buffer, uint64_t offset) {
  if (gpuq::schema::KernelLaunch* l = LatestLaunch(job, "gpuq_job_add_buffer_arg")) {
    l->args.push_back(gpuq::schema::Arg::Ref(buffer, offset));
  }
}
void gpuq_job_set_graph(gpuq_job* job, int yes) {
  if (!job->several && yes) {
    return Misuse(job, "gpuq_job_set_graph: graphs belong to jobs of several launches "
                       "(gpuq_job_new(source, NULL))");
  }
  job->request.spec.graph = yes != 0;
}

gpuq_code gpuq_submit(gpuq_client* client, const gpuq_job* job, uint64_t* id) {
  if (!client || !job || !id) return Null(client, !job ? "the job" : "the id's place (id)");
  if (!job->misuse.empty()) return Fail(client, gpuq::Error(gpuq::Code::kInvalid, job->misuse));
  if (job->several && job->request.spec.launches.empty()) {
    return Fail(client, gpuq::Error(gpuq::Code::kInvalid,
                                    "a job made without an entry is a job of several launches, "
                                    "and this one has none (gpuq_job_add_launch)"));
  }
  auto r = client->client->Submit(job->request);
  if (!r.ok()) return Fail(client, r.status());
  *id = *r;
  return GPUQ_OK;
}

gpuq_code gpuq_wait(gpuq_client* client, uint64_t id, int timeout_ms, gpuq_result** out) {
  if (out) *out = nullptr;
  if (!client || !out) return Null(client, "the result's place (out)");
  std::optional<gpuq::Millis> t;
  if (timeout_ms > 0) t = gpuq::Millis(timeout_ms);
  auto r = client->client->Wait(id, t);
  if (!r.ok()) return Fail(client, r.status());
  *out = new gpuq_result{std::move(*r)};
  return GPUQ_OK;
}

gpuq_code gpuq_status(gpuq_client* client, uint64_t id, gpuq_result** out) {
  if (out) *out = nullptr;
  if (!client || !out) return Null(client, "the result's place (out)");
  auto r = client->client->GetStatus(id);
  if (!r.ok()) return Fail(client, r.status());
  *out = new gpuq_result{std::move(*r)};
  return GPUQ_OK;
}

gpuq_code gpuq_cancel(gpuq_client* client, uint64_t id, gpuq_state* state) {
  if (!client || !state) return Null(client, "the state's place (state)");
  auto r = client->client->Cancel(id);
  if (!r.ok()) return Fail(client, r.status());
  *state = State(*r);
  return GPUQ_OK;
}

void gpuq_result_free(gpuq_result* result) { delete result; }
gpuq_state gpuq_result_state(const gpuq_result* r) { return State(r->result.state); }
gpuq_code gpuq_result_code(const gpuq_result* r) {
  return static_cast<gpuq_code>(r->result.code);
}
const char* gpuq_result_error(const gpuq_result* r) { return r->result.error.c_str(); }
const char* gpuq_result_device(const gpuq_result* r) { return r->result.device.c_str(); }
uint32_t gpuq_result_attempts(const gpuq_result* r) { return r->result.attempts; }
gpuq_timing gpuq_result_timing(const gpuq_result* r) {
  const auto& t = r->result.timing;
  return {t.queue_us, t.compile_us, t.load_us, t.h2d_us,
          t.kernel_us, t.d2h_us, t.total_us, t.cache_hit ? 1 : 0};
}
const void* gpuq_result_output(const gpuq_result* r, uint32_t arg, size_t* size) {
  const gpuq::Bytes* out = r->result.Output(arg);
  if (size) *size = out ? out->size() : 0;
  return out ? out->data() : nullptr;
}
size_t gpuq_result_launch_count(const gpuq_result* r) {
  return r->result.timing.launch_us.size();
}
uint64_t gpuq_result_launch_us(const gpuq_result* r, size_t i) {
  const auto& us = r->result.timing.launch_us;
  return i < us.size() ? us[i] : 0;
}

gpuq_code gpuq_usage(gpuq_client* client, const char* tenant, uint64_t since_ms,
                     uint64_t until_ms, gpuq_usage_list** out) {
  if (out) *out = nullptr;
  if (!client || !out) return Null(client, "the list's place (out)");
  auto rows = client->client->Usage(tenant ? tenant : "", since_ms, until_ms);
  if (!rows.ok()) return Fail(client, rows.status());
  *out = new gpuq_usage_list{std::move(*rows)};
  return GPUQ_OK;
}
void gpuq_usage_free(gpuq_usage_list* list) { delete list; }
size_t gpuq_usage_count(const gpuq_usage_list* list) { return list->rows.size(); }
gpuq_tenant_usage gpuq_usage_at(const gpuq_usage_list* list, size_t i) {
  gpuq_tenant_usage u = {};
  u.tenant = "";
  if (i >= list->rows.size()) return u;
  const gpuq::schema::TenantUsage& r = list->rows[i];
  u.tenant = r.tenant.c_str();
  u.done = r.done;
  u.failed = r.failed;
  u.canceled = r.canceled;
  u.expired = r.expired;
  u.gpu_us = r.gpu_us;
  u.kernel_us = r.kernel_us;
  u.bytes_in = r.bytes_in;
  u.bytes_out = r.bytes_out;
  return u;
}

}  // extern "C"

// ---------------------------------------------------------------- sessions

static gpuq_code SessionFail(gpuq_session* s, const gpuq::Status& st) {
  s->error = st.message();
  return static_cast<gpuq_code>(st.code());
}

gpuq_code gpuq_session_open(gpuq_client* client, const char* tenant, uint64_t memory,
                            uint64_t idle_ms, gpuq_session** out) {
  return gpuq_session_open_limited(client, tenant, memory, idle_ms, 0, out);
}
gpuq_code gpuq_session_open_limited(gpuq_client* client, const char* tenant, uint64_t memory,
                                    uint64_t idle_ms, uint64_t limit_ms, gpuq_session** out) {
  if (out) *out = nullptr;
  if (!client || !out) return Null(client, "the session's place (out)");
  gpuq::SessionOptions o;
  o.tenant = tenant ? tenant : "";
  o.memory = memory;
  o.idle = std::chrono::milliseconds(idle_ms);
  o.time_limit = std::chrono::milliseconds(limit_ms);
  auto s = client->client->OpenSession(o);
  if (!s.ok()) return Fail(client, s.status());
  *out = new gpuq_session{std::move(*s), ""};
  return GPUQ_OK;
}
void gpuq_session_free(gpuq_session* session) { delete session; }
uint64_t gpuq_session_id(const gpuq_session* session) { return session->session->id(); }
const char* gpuq_session_error(const gpuq_session* session) { return session->error.c_str(); }

gpuq_code gpuq_session_alloc(gpuq_session* session, uint64_t size, uint32_t* buffer) {
  if (!session) return GPUQ_INVALID;
  if (!buffer) {
    return SessionFail(session, gpuq::Status(gpuq::Code::kInvalid, "the handle's place is NULL"));
  }
  auto h = session->session->Alloc(size);
  if (!h.ok()) return SessionFail(session, h.status());
  *buffer = *h;
  return GPUQ_OK;
}
gpuq_code gpuq_session_release(gpuq_session* session, uint32_t buffer) {
  gpuq::Status s = session->session->Free(buffer);
  return s.ok() ? GPUQ_OK : SessionFail(session, s);
}
gpuq_code gpuq_session_write(gpuq_session* session, uint32_t buffer, uint64_t offset,
                             const void* data, size_t size) {
  if (!data && size > 0) {
    return SessionFail(session, gpuq::Status(gpuq::Code::kInvalid, "no data (NULL)"));
  }
  gpuq::Status s = session->session->Write(buffer, offset, data, size);
  return s.ok() ? GPUQ_OK : SessionFail(session, s);
}
gpuq_code gpuq_session_read(gpuq_session* session, uint32_t buffer, uint64_t offset, void* out,
                            size_t size) {
  if (!out && size > 0) {
    return SessionFail(session, gpuq::Status(gpuq::Code::kInvalid, "nowhere to read to (NULL)"));
  }
  auto r = session->session->Read(buffer, offset, size);
  if (!r.ok()) return SessionFail(session, r.status());
  if (size) std::memcpy(out, r->data(), std::min(size, r->size()));
  return GPUQ_OK;
}
gpuq_code gpuq_session_copy(gpuq_session* session, uint32_t dst, uint64_t dst_offset,
                            uint32_t src, uint64_t src_offset, uint64_t size) {
  gpuq::Status s = session->session->Copy(dst, dst_offset, src, src_offset, size);
  return s.ok() ? GPUQ_OK : SessionFail(session, s);
}
gpuq_code gpuq_session_fill(gpuq_session* session, uint32_t buffer, uint64_t offset,
                            uint64_t size, uint8_t value) {
  gpuq::Status s = session->session->Fill(buffer, offset, size, value);
  return s.ok() ? GPUQ_OK : SessionFail(session, s);
}
gpuq_code gpuq_session_attach(gpuq_session* session, const gpuq_region* region,
                              uint32_t* handle) {
  if (!session) return GPUQ_INVALID;
  if (!region || !handle) {
    return SessionFail(session, gpuq::Status(gpuq::Code::kInvalid, "the region or the handle's "
                                                                   "place is NULL"));
  }
  auto h = session->session->Attach(*region->region);
  if (!h.ok()) return SessionFail(session, h.status());
  *handle = *h;
  return GPUQ_OK;
}
gpuq_code gpuq_session_detach(gpuq_session* session, uint32_t handle) {
  gpuq::Status s = session->session->Detach(handle);
  return s.ok() ? GPUQ_OK : SessionFail(session, s);
}
gpuq_code gpuq_session_write_from(gpuq_session* session, uint32_t buffer, uint64_t offset,
                                  uint32_t handle, uint64_t region_offset, uint64_t size) {
  gpuq::Status s = session->session->WriteFrom(buffer, offset, handle, region_offset, size);
  return s.ok() ? GPUQ_OK : SessionFail(session, s);
}
gpuq_code gpuq_session_read_into(gpuq_session* session, uint32_t buffer, uint64_t offset,
                                 uint64_t size, uint32_t handle, uint64_t region_offset) {
  gpuq::Status s = session->session->ReadInto(buffer, offset, size, handle, region_offset);
  return s.ok() ? GPUQ_OK : SessionFail(session, s);
}
void gpuq_job_add_session_buffer(gpuq_job* job, uint32_t buffer, uint64_t offset) {
  if (job->several) {
    return Misuse(job, "gpuq_job_add_session_buffer: a session's launch is a job of one launch");
  }
  job->request.spec.args.push_back(gpuq::schema::Arg::Ref(buffer, offset));
}
namespace {
gpuq_code SessionLaunch(gpuq_session* session, const gpuq_job* launch, bool timed,
                        uint64_t* kernel_ns, gpuq_result** result = nullptr) {
  if (!session) return GPUQ_INVALID;
  if (!launch) return SessionFail(session, gpuq::Status(gpuq::Code::kInvalid, "the launch is NULL"));
  if (!launch->misuse.empty()) {
    return SessionFail(session, gpuq::Status(gpuq::Code::kInvalid, launch->misuse));
  }
  if (launch->several) {
    return SessionFail(session, gpuq::Status(gpuq::Code::kInvalid,
                                             "a session's launch is a job of one launch"));
  }
  gpuq::SessionLaunch l;
  l.kernel = launch->request.spec.kernel;
  l.launch = launch->request.spec.launch;
  l.args = launch->request.spec.args;
  l.inputs = launch->request.inputs;
  l.timed = timed;
  std::vector<std::string> outputs;
  auto ns = session->session->Launch(l, &outputs);
  if (!ns.ok()) return SessionFail(session, ns.status());
  if (kernel_ns) *kernel_ns = *ns;
  if (result) {
    // As a job's result: outputs by argument index.
    auto r = std::make_unique<gpuq_result>();
    r->result.state = gpuq::schema::JobState::kDone;
    r->result.timing.kernel_us = *ns / 1000;
    size_t k = 0;
    for (uint32_t i = 0; i < l.args.size() && k < outputs.size(); ++i) {
      const auto kind = l.args[i].kind;
      if (kind != gpuq::schema::ArgKind::kOut && kind != gpuq::schema::ArgKind::kInOut) continue;
      r->result.output_args.push_back(i);
      r->result.outputs.emplace_back(std::move(outputs[k++]));
    }
    *result = r.release();
  }
  return GPUQ_OK;
}
}  // namespace
gpuq_code gpuq_session_launch(gpuq_session* session, const gpuq_job* launch,
                              uint64_t* kernel_ns) {
  return SessionLaunch(session, launch, true, kernel_ns);
}
gpuq_code gpuq_session_launch_untimed(gpuq_session* session, const gpuq_job* launch) {
  return SessionLaunch(session, launch, false, nullptr);
}
gpuq_code gpuq_session_run(gpuq_session* session, const gpuq_job* launch, gpuq_result** result) {
  return SessionLaunch(session, launch, true, nullptr, result);
}
gpuq_code gpuq_session_close(gpuq_session* session) {
  gpuq::Status s = session->session->Close();
  return s.ok() ? GPUQ_OK : SessionFail(session, s);
}
