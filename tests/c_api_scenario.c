/* A C program's use of gpuq, compiled as C: proves the header is C and the
 * API does what it says. Returns 0 on success, else writes why into `why`. */
#include <stdio.h>
#include <string.h>

#include "gpuq/gpuq.h"

#define CHECK(cond, ...)                      \
  do {                                        \
    if (!(cond)) {                            \
      snprintf(why, why_size, __VA_ARGS__);   \
      goto out;                               \
    }                                         \
  } while (0)

static const char kKernels[] =
    "extern \"C\" __global__ void k(unsigned char* a, unsigned char* b) {}\n";
/* A second source for a job of several launches: a template, launched by a
 * name expression, and a macro its option defines. */
static const char kSecond[] =
    "template <int N> __global__ void scale(unsigned char* a, unsigned char* b, unsigned n) {}\n"
    "static_assert(STEP == 2, \"the source's option\");\n";

/* A job of several launches, and the calls that do not fit one, refused at
 * submit with their names. */
static int several_launches(gpuq_client* c, char* why, size_t why_size) {
  int rc = 1;
  gpuq_job* job = NULL;
  gpuq_result* r = NULL;
  uint64_t id = 0;
  unsigned char x[16] = {9};
  unsigned char y[4] = {1, 2, 3, 250};
  uint32_t seven = 7, second = 0;
  size_t size = 0;
  const unsigned char* out = NULL;
  gpuq_code code;

  job = gpuq_job_new(kKernels, NULL);
  second = gpuq_job_add_source(job, kSecond);
  CHECK(second == 1, "the first added source is source 1, not %u", (unsigned)second);
  gpuq_job_add_source_option(job, second, "-DSTEP=2");
  gpuq_job_add_in(job, x, sizeof x); /* buffer 0 */
  gpuq_job_add_out(job, 8);          /* buffer 1 */
  gpuq_job_add_scratch(job, 64);     /* buffer 2 */
  gpuq_job_add_launch(job, 0, "k", 1, 1, 1, 32, 1, 1, 0);
  gpuq_job_add_buffer_arg(job, 0, 0);
  gpuq_job_add_buffer_arg(job, 2, 0);
  gpuq_job_add_launch(job, second, "scale<2>", 2, 1, 1, 64, 1, 1, 256);
  gpuq_job_set_launch_name_expression(job, 1);
  gpuq_job_add_buffer_arg(job, 2, 16);
  gpuq_job_add_buffer_arg(job, 1, 0);
  gpuq_job_add_scalar(job, GPUQ_U32, &seven);
  gpuq_job_add_inout(job, y, sizeof y); /* buffer 3: buffers may follow launches */
  gpuq_job_add_launch(job, 0, "k", 1, 1, 1, 32, 1, 1, 0);
  gpuq_job_add_buffer_arg(job, 1, 4);
  gpuq_job_add_buffer_arg(job, 3, 0);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_OK, "submit of several launches: %s: %s", gpuq_code_name(code),
        gpuq_client_error(c));
  code = gpuq_wait(c, id, 0, &r);
  CHECK(code == GPUQ_OK, "wait: %s", gpuq_client_error(c));
  CHECK(gpuq_result_state(r) == GPUQ_DONE, "several launches: state %d: %s",
        (int)gpuq_result_state(r), gpuq_result_error(r));
  CHECK(gpuq_result_launch_count(r) == 3, "%u launch times for 3 launches",
        (unsigned)gpuq_result_launch_count(r));
  CHECK(gpuq_result_launch_us(r, 0) == 1 && gpuq_result_launch_us(r, 2) == 1,
        "launch times");
  CHECK(gpuq_result_launch_us(r, 3) == 0, "a launch the job does not have has a time");
  out = (const unsigned char*)gpuq_result_output(r, 1, &size);
  CHECK(out && size == 8 && out[0] == 2 && out[7] == 2, "out buffer 1 came back wrong");
  out = (const unsigned char*)gpuq_result_output(r, 3, &size);
  CHECK(out && size == 4, "inout buffer 3 did not come back");
  CHECK(gpuq_result_output(r, 0, &size) == NULL, "an in buffer came back");
  CHECK(gpuq_result_output(r, 2, &size) == NULL, "a scratch buffer came back");
  gpuq_result_free(r);
  r = NULL;
  /* As a CUDA graph: the same outputs; the graph's timing is its span alone. */
  gpuq_job_set_graph(job, 1);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_OK, "submit with a graph: %s: %s", gpuq_code_name(code),
        gpuq_client_error(c));
  code = gpuq_wait(c, id, 0, &r);
  CHECK(code == GPUQ_OK, "wait: %s", gpuq_client_error(c));
  CHECK(gpuq_result_state(r) == GPUQ_DONE, "graph: state %d: %s", (int)gpuq_result_state(r),
        gpuq_result_error(r));
  CHECK(gpuq_result_launch_count(r) == 0, "a graph has %u launch times",
        (unsigned)gpuq_result_launch_count(r));
  out = (const unsigned char*)gpuq_result_output(r, 1, &size);
  CHECK(out && size == 8 && out[0] == 2 && out[7] == 2, "graph: out buffer 1 came back wrong");
  gpuq_result_free(r);
  r = NULL;
  gpuq_job_free(job);

  /* An argument before any launch. */
  job = gpuq_job_new(kKernels, NULL);
  gpuq_job_add_out(job, 8);
  gpuq_job_add_buffer_arg(job, 0, 0);
  gpuq_job_add_launch(job, 0, "k", 1, 1, 1, 1, 1, 1, 0);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_INVALID && strstr(gpuq_client_error(c), "gpuq_job_add_buffer_arg before"),
        "a buffer argument before any launch: %s: %s", gpuq_code_name(code),
        gpuq_client_error(c));
  gpuq_job_free(job);
  /* No launch at all. */
  job = gpuq_job_new(kKernels, NULL);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_INVALID && strstr(gpuq_client_error(c), "gpuq_job_add_launch"),
        "a job of several launches without one: %s: %s", gpuq_code_name(code),
        gpuq_client_error(c));
  gpuq_job_free(job);
  /* A launch on a job of one launch. */
  job = gpuq_job_new(kKernels, "k");
  gpuq_job_add_launch(job, 0, "k", 1, 1, 1, 1, 1, 1, 0);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_INVALID && strstr(gpuq_client_error(c), "gpuq_job_add_launch"),
        "a launch on a job made with an entry: %s: %s", gpuq_code_name(code),
        gpuq_client_error(c));
  gpuq_job_free(job);
  /* A buffer the job does not declare: the broker's refusal. */
  job = gpuq_job_new(kKernels, NULL);
  gpuq_job_add_out(job, 8);
  gpuq_job_add_launch(job, 0, "k", 1, 1, 1, 1, 1, 1, 0);
  gpuq_job_add_buffer_arg(job, 5, 0);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_INVALID && strstr(gpuq_client_error(c), "buffer 5"),
        "a launch naming buffer 5 of 1: %s: %s", gpuq_code_name(code), gpuq_client_error(c));
  rc = 0;
out:
  gpuq_result_free(r);
  gpuq_job_free(job);
  return rc;
}

int gpuq_c_api_scenario(const char* endpoint, char* why, size_t why_size) {
  int rc = 1;
  gpuq_client* c = NULL;
  gpuq_job* job = NULL;
  gpuq_result* r = NULL;
  uint64_t id = 0, again = 0;
  unsigned char y[4] = {1, 2, 3, 250};
  uint32_t seven = 7;
  size_t size = 0;
  const unsigned char* out = NULL;
  gpuq_code code;
  gpuq_state state;

  code = gpuq_client_new(endpoint, 10000, &c);
  CHECK(code == GPUQ_OK, "connect: %s", gpuq_code_name(code));

  job = gpuq_job_new(kKernels, "k");
  gpuq_job_set_launch(job, 1, 1, 1, 32, 1, 1, 0);
  gpuq_job_add_inout(job, y, sizeof y);
  gpuq_job_add_scalar(job, GPUQ_U32, &seven);
  gpuq_job_add_out(job, 8);
  gpuq_job_set_key(job, "c-api-1");
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_OK, "submit: %s: %s", gpuq_code_name(code), gpuq_client_error(c));
  code = gpuq_submit(c, job, &again);
  CHECK(code == GPUQ_OK && again == id, "the same key gave another job");

  code = gpuq_wait(c, id, 0, &r);
  CHECK(code == GPUQ_OK, "wait: %s", gpuq_client_error(c));
  CHECK(gpuq_result_state(r) == GPUQ_DONE, "state %d: %s", (int)gpuq_result_state(r),
        gpuq_result_error(r));
  CHECK(gpuq_result_attempts(r) == 1, "attempts");
  CHECK(strlen(gpuq_result_device(r)) > 0, "no device");
  out = (const unsigned char*)gpuq_result_output(r, 0, &size);
  CHECK(out && size == 4 && out[0] == 2 && out[3] == 251, "inout came back wrong");
  out = (const unsigned char*)gpuq_result_output(r, 2, &size);
  CHECK(out && size == 8 && out[0] == 3 && out[7] == 3, "out came back wrong");
  CHECK(gpuq_result_output(r, 1, &size) == NULL && size == 0, "a scalar has no output");
  CHECK(gpuq_result_timing(r).total_us >= gpuq_result_timing(r).queue_us, "timing");
  gpuq_result_free(r);
  r = NULL;

  /* A refusal carries its code and text. */
  gpuq_job_free(job);
  job = gpuq_job_new(kKernels, "k");
  gpuq_job_set_launch(job, 1, 1, 1, 4096, 1, 1, 0);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_INVALID, "a 4096-thread block should be invalid, got %s",
        gpuq_code_name(code));
  CHECK(strstr(gpuq_client_error(c), "block") != NULL, "error text: %s", gpuq_client_error(c));
  CHECK(strcmp(gpuq_code_name(GPUQ_QUEUE_FULL), "queue_full") == 0, "code names");

  code = gpuq_status(c, 987654321, &r);
  CHECK(code == GPUQ_NOT_FOUND, "status of an unknown job: %s", gpuq_code_name(code));
  code = gpuq_cancel(c, again, &state);
  CHECK(code == GPUQ_OK && state == GPUQ_DONE, "cancel of an ended job keeps its state");

  if (several_launches(c, why, why_size) != 0) goto out;

  /* Usage: the default tenant's ended jobs (at least the first job, done),
   * and a row past the end reads as zeros. */
  {
    gpuq_usage_list* usage = NULL;
    gpuq_tenant_usage u;
    code = gpuq_usage(c, NULL, 0, 0, &usage);
    CHECK(code == GPUQ_OK, "usage: %s: %s", gpuq_code_name(code), gpuq_client_error(c));
    CHECK(gpuq_usage_count(usage) == 1, "usage rows: %zu", gpuq_usage_count(usage));
    u = gpuq_usage_at(usage, 0);
    CHECK(strcmp(u.tenant, "default") == 0 && u.done >= 1 && u.bytes_in >= sizeof y,
          "usage of %s: done %llu, bytes in %llu", u.tenant, (unsigned long long)u.done,
          (unsigned long long)u.bytes_in);
    u = gpuq_usage_at(usage, 1);
    CHECK(strcmp(u.tenant, "") == 0 && u.done == 0, "a row past the end");
    gpuq_usage_free(usage);
  }
  rc = 0;
out:
  gpuq_result_free(r);
  gpuq_job_free(job);
  gpuq_client_free(c);
  return rc;
}

/* Regions: a job reads and writes ranges of a registered region in place,
 * as the arguments of a job of one launch and as the buffers of a job of
 * several launches; bad ranges, another tenant's region and an ended one
 * are refused. Needs a worker of the broker's host (one with its local
 * directory). Returns 0 on success, else writes why into `why`. */
int gpuq_c_api_region_scenario(const char* endpoint, char* why, size_t why_size) {
  int rc = 1;
  gpuq_client* c = NULL;
  gpuq_client* remote = NULL;
  gpuq_region* region = NULL;
  gpuq_region* theirs = NULL;
  gpuq_job* job = NULL;
  gpuq_result* r = NULL;
  unsigned char* bytes = NULL;
  uint64_t id = 0, region_id = 0;
  uint32_t seven = 7;
  size_t size = 0, i = 0;
  const unsigned char* out = NULL;
  gpuq_code code;

  code = gpuq_client_new(endpoint, 10000, &c);
  CHECK(code == GPUQ_OK, "connect: %s", gpuq_code_name(code));
  code = gpuq_region_new(c, 1 << 16, NULL, &region);
  CHECK(code == GPUQ_OK, "region: %s: %s", gpuq_code_name(code), gpuq_client_error(c));
  CHECK(gpuq_region_size(region) == 1 << 16, "region size %llu",
        (unsigned long long)gpuq_region_size(region));
  region_id = gpuq_region_id(region);
  CHECK(region_id != 0, "a region's id is never 0");
  bytes = (unsigned char*)gpuq_region_data(region);
  CHECK(bytes != NULL && bytes[0] == 0 && bytes[(1 << 16) - 1] == 0, "a new region is zeros");
  for (i = 0; i < 4096; ++i) bytes[i] = (unsigned char)i;
  memset(bytes + 4096, 0x55, 4096); /* an out range, then bytes outside every range */

  /* A job of one launch: an inout and an out range, a scalar, and an out
   * buffer that travels. */
  job = gpuq_job_new(kKernels, "k");
  gpuq_job_set_launch(job, 1, 1, 1, 32, 1, 1, 0);
  gpuq_job_add_region_inout(job, region, 0, 4096); /* argument 0 */
  gpuq_job_add_scalar(job, GPUQ_U32, &seven);       /* argument 1 */
  gpuq_job_add_region_out(job, region, 4096, 1024); /* argument 2 */
  gpuq_job_add_out(job, 8);                         /* argument 3 */
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_OK, "submit with ranges: %s: %s", gpuq_code_name(code),
        gpuq_client_error(c));
  code = gpuq_wait(c, id, 0, &r);
  CHECK(code == GPUQ_OK, "wait: %s", gpuq_client_error(c));
  CHECK(gpuq_result_state(r) == GPUQ_DONE, "ranges: state %d: %s", (int)gpuq_result_state(r),
        gpuq_result_error(r));
  for (i = 0; i < 4096; ++i) {
    CHECK(bytes[i] == (unsigned char)(i + 1), "inout range: byte %u is %u, not %u",
          (unsigned)i, (unsigned)bytes[i], (unsigned)(unsigned char)(i + 1));
  }
  for (i = 4096; i < 4096 + 1024; ++i) {
    CHECK(bytes[i] == 3, "out range: byte %u is %u, not 3", (unsigned)i, (unsigned)bytes[i]);
  }
  CHECK(bytes[4096 + 1024] == 0x55 && bytes[8191] == 0x55, "bytes outside every range changed");
  CHECK(gpuq_result_output(r, 0, &size) == NULL && size == 0, "an inout range came back");
  CHECK(gpuq_result_output(r, 2, &size) == NULL && size == 0, "an out range came back");
  out = (const unsigned char*)gpuq_result_output(r, 3, &size);
  CHECK(out && size == 8 && out[0] == 4 && out[7] == 4, "the sent out buffer came back wrong");
  gpuq_result_free(r);
  r = NULL;
  gpuq_job_free(job);
  job = NULL;

  /* A job of several launches whose buffers 0 and 2 are ranges. */
  job = gpuq_job_new(kKernels, NULL);
  gpuq_job_add_region_inout(job, region, 8192, 16); /* buffer 0 */
  gpuq_job_add_scratch(job, 64);                     /* buffer 1 */
  gpuq_job_add_region_out(job, region, 8208, 16);   /* buffer 2 */
  gpuq_job_add_launch(job, 0, "k", 1, 1, 1, 32, 1, 1, 0);
  gpuq_job_add_buffer_arg(job, 0, 0);
  gpuq_job_add_buffer_arg(job, 1, 0);
  gpuq_job_add_launch(job, 0, "k", 1, 1, 1, 32, 1, 1, 0);
  gpuq_job_add_buffer_arg(job, 2, 8);
  gpuq_job_add_buffer_arg(job, 0, 0);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_OK, "several launches on ranges: %s: %s", gpuq_code_name(code),
        gpuq_client_error(c));
  code = gpuq_wait(c, id, 0, &r);
  CHECK(code == GPUQ_OK, "wait: %s", gpuq_client_error(c));
  CHECK(gpuq_result_state(r) == GPUQ_DONE, "several launches on ranges: state %d: %s",
        (int)gpuq_result_state(r), gpuq_result_error(r));
  CHECK(bytes[8192] == 1 && bytes[8207] == 1, "inout buffer 0: %u, not 1", (unsigned)bytes[8192]);
  CHECK(bytes[8208] == 3 && bytes[8223] == 3, "out buffer 2: %u, not 3", (unsigned)bytes[8208]);
  CHECK(bytes[8224] == 0, "a byte after buffer 2 changed");
  CHECK(gpuq_result_output(r, 2, &size) == NULL, "an out range came back");
  gpuq_result_free(r);
  r = NULL;
  gpuq_job_free(job);
  job = NULL;

  /* Refusals: a range past the region's end, no region, an overlap of two
   * ranges the job writes, another tenant's region. Nothing runs. */
  job = gpuq_job_new(kKernels, "k");
  gpuq_job_add_region_in(job, region, (1 << 16) - 8, 16);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_INVALID && strstr(gpuq_client_error(c), "outside"),
        "a range past the end: %s: %s", gpuq_code_name(code), gpuq_client_error(c));
  gpuq_job_free(job);
  job = gpuq_job_new(kKernels, "k");
  gpuq_job_add_region_out(job, NULL, 0, 16);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_INVALID && strstr(gpuq_client_error(c), "gpuq_job_add_region_out: no region"),
        "a NULL region: %s: %s", gpuq_code_name(code), gpuq_client_error(c));
  gpuq_job_free(job);
  job = gpuq_job_new(kKernels, "k");
  gpuq_job_add_region_out(job, region, 0, 100);
  gpuq_job_add_region_inout(job, region, 50, 0); /* size 0: to the region's end */
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_INVALID && strstr(gpuq_client_error(c), "overlap"),
        "two of a job's ranges that overlap: %s: %s", gpuq_code_name(code),
        gpuq_client_error(c));
  gpuq_job_free(job);
  job = NULL;
  code = gpuq_region_new(c, 4096, "alice", &theirs);
  CHECK(code == GPUQ_OK, "alice's region: %s: %s", gpuq_code_name(code), gpuq_client_error(c));
  job = gpuq_job_new(kKernels, "k");
  gpuq_job_add_region_in(job, theirs, 0, 16);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_NOT_FOUND, "another tenant's region: %s: %s", gpuq_code_name(code),
        gpuq_client_error(c));
  gpuq_job_set_tenant(job, "alice");
  gpuq_job_set_launch(job, 1, 1, 1, 32, 1, 1, 0);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_OK, "alice's job on alice's region: %s: %s", gpuq_code_name(code),
        gpuq_client_error(c));
  code = gpuq_wait(c, id, 0, &r);
  CHECK(code == GPUQ_OK && gpuq_result_state(r) == GPUQ_DONE, "alice's job did not run");
  gpuq_result_free(r);
  r = NULL;
  gpuq_job_free(job);
  job = NULL;

  /* Unregistered: no job may name it; its memory is still this process's. */
  code = gpuq_region_unregister(c, region);
  CHECK(code == GPUQ_OK, "unregister: %s: %s", gpuq_code_name(code), gpuq_client_error(c));
  code = gpuq_region_unregister(c, region);
  CHECK(code == GPUQ_OK, "unregistering again: %s", gpuq_code_name(code));
  CHECK(bytes[0] == 1 && gpuq_region_id(region) == region_id, "an unregistered region's memory");
  job = gpuq_job_new(kKernels, "k");
  gpuq_job_add_region_in(job, region, 0, 16);
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_NOT_FOUND, "a job on an ended region: %s: %s", gpuq_code_name(code),
        gpuq_client_error(c));
  gpuq_job_free(job);
  job = NULL;

  /* Regions are memory of the broker's host: not on tcp. */
  code = gpuq_client_new("tcp://127.0.0.1:1", 1000, &remote);
  CHECK(code == GPUQ_OK, "a tcp client: %s", gpuq_code_name(code));
  {
    gpuq_region* none = NULL;
    code = gpuq_region_new(remote, 4096, NULL, &none);
    CHECK(code == GPUQ_INVALID && none == NULL && strstr(gpuq_client_error(remote), "ipc"),
          "a region on tcp: %s: %s", gpuq_code_name(code), gpuq_client_error(remote));
  }
  rc = 0;
out:
  gpuq_result_free(r);
  gpuq_job_free(job);
  gpuq_client_free(remote);
  gpuq_client_free(c);
  gpuq_region_free(region); /* a region may outlive its client */
  gpuq_region_free(theirs);
  return rc;
}

/* Sessions through the C API (PROTOCOL.md, "Sessions"), against the test
 * double's session device: `inc(buf, n, v)` adds v to n bytes. */
int gpuq_c_api_session_scenario(const char* endpoint, char* why, size_t why_size) {
  static const char kInc[] =
      "extern \"C\" __global__ void inc(unsigned char* p, unsigned n, unsigned v) {\n"
      "  unsigned i = threadIdx.x; if (i < n) p[i] += (unsigned char)v;\n}\n";
  int rc = 1;
  gpuq_client* c = NULL;
  gpuq_session* s = NULL;
  gpuq_job* launch = NULL;
  gpuq_region* region = NULL;
  unsigned char* mem = NULL;
  uint32_t buf = 0, n = 16, v = 5, handle = 0;
  uint64_t ns = 0;
  unsigned char bytes[16];
  size_t i = 0, out_size = 0;
  gpuq_job* own = NULL;
  gpuq_result* result = NULL;
  const unsigned char* got = NULL;
  gpuq_code code;

  code = gpuq_client_new(endpoint, 10000, &c);
  CHECK(code == GPUQ_OK, "connect: %s", gpuq_code_name(code));
  code = gpuq_session_open_limited(c, "c-tenant", 1 << 20, 0, 60000, &s);
  CHECK(code == GPUQ_OK, "open: %s: %s", gpuq_code_name(code), gpuq_client_error(c));
  CHECK(gpuq_session_id(s) != 0, "a session's id is never 0");
  code = gpuq_session_alloc(s, 16, &buf);
  CHECK(code == GPUQ_OK, "alloc: %s", gpuq_session_error(s));
  for (i = 0; i < 16; ++i) bytes[i] = (unsigned char)i;
  code = gpuq_session_write(s, buf, 0, bytes, 16);
  CHECK(code == GPUQ_OK, "write: %s", gpuq_session_error(s));
  launch = gpuq_job_new(kInc, "inc");
  gpuq_job_set_launch(launch, 1, 1, 1, 16, 1, 1, 0);
  gpuq_job_add_session_buffer(launch, buf, 0);
  gpuq_job_add_scalar(launch, GPUQ_U32, &n);
  gpuq_job_add_scalar(launch, GPUQ_U32, &v);
  code = gpuq_session_launch(s, launch, &ns);
  CHECK(code == GPUQ_OK, "launch: %s", gpuq_session_error(s));
  CHECK(ns > 0, "a launch is timed");
  code = gpuq_session_launch_untimed(s, launch);
  CHECK(code == GPUQ_OK, "untimed launch: %s", gpuq_session_error(s));
  memset(bytes, 0, sizeof bytes);
  code = gpuq_session_read(s, buf, 0, bytes, 16);
  CHECK(code == GPUQ_OK, "read: %s", gpuq_session_error(s));
  for (i = 0; i < 16; ++i) CHECK(bytes[i] == i + 10, "byte %u is %u", (unsigned)i, bytes[i]);
  /* A launch with a buffer of its own: in and out again, in the result. */
  own = gpuq_job_new(kInc, "inc");
  gpuq_job_set_launch(own, 1, 1, 1, 16, 1, 1, 0);
  gpuq_job_add_inout(own, bytes, 16);
  gpuq_job_add_scalar(own, GPUQ_U32, &n);
  gpuq_job_add_scalar(own, GPUQ_U32, &v);
  code = gpuq_session_run(s, own, &result);
  CHECK(code == GPUQ_OK, "run: %s", gpuq_session_error(s));
  got = (const unsigned char*)gpuq_result_output(result, 0, &out_size);
  CHECK(got != NULL && out_size == 16, "run's output: %u bytes", (unsigned)out_size);
  for (i = 0; i < 16; ++i) CHECK(got[i] == i + 15, "run's byte %u is %u", (unsigned)i, got[i]);
  /* An attached region: the buffer's bytes into it, and back from it (on
   * the broker's host: through the broker a session attaches none). */
  if (strncmp(endpoint, "tcp://", 6) == 0) goto regions_done;
  code = gpuq_region_new(c, 4096, "c-tenant", &region);
  CHECK(code == GPUQ_OK, "region: %s", gpuq_client_error(c));
  code = gpuq_session_attach(s, region, &handle);
  CHECK(code == GPUQ_OK, "attach: %s", gpuq_session_error(s));
  mem = (unsigned char*)gpuq_region_data(region);
  code = gpuq_session_read_into(s, buf, 0, 16, handle, 100);
  CHECK(code == GPUQ_OK, "read into: %s", gpuq_session_error(s));
  for (i = 0; i < 16; ++i) CHECK(mem[100 + i] == i + 10, "region byte %u", (unsigned)i);
  for (i = 0; i < 16; ++i) mem[200 + i] = (unsigned char)(3 * i);
  code = gpuq_session_write_from(s, buf, 0, handle, 200, 16);
  CHECK(code == GPUQ_OK, "write from: %s", gpuq_session_error(s));
  code = gpuq_session_read(s, buf, 0, bytes, 16);
  CHECK(code == GPUQ_OK, "read: %s", gpuq_session_error(s));
  for (i = 0; i < 16; ++i) CHECK(bytes[i] == 3 * i, "byte %u after write_from", (unsigned)i);
  code = gpuq_session_write_from(s, buf, 0, handle, 4090, 16);
  CHECK(code == GPUQ_INVALID, "past the region: %s", gpuq_code_name(code));
  code = gpuq_session_detach(s, handle);
  CHECK(code == GPUQ_OK, "detach: %s", gpuq_session_error(s));
  code = gpuq_session_write_from(s, buf, 0, handle, 200, 16);
  CHECK(code == GPUQ_NOT_FOUND, "after detach: %s", gpuq_code_name(code));
regions_done:
  code = gpuq_session_read(s, buf, 8, bytes, 16);
  CHECK(code == GPUQ_INVALID, "a read past the end: %s", gpuq_code_name(code));
  CHECK(strstr(gpuq_session_error(s), "outside buffer") != NULL, "its text: %s",
        gpuq_session_error(s));
  code = gpuq_session_release(s, buf);
  CHECK(code == GPUQ_OK, "release: %s", gpuq_session_error(s));
  code = gpuq_session_fill(s, buf, 0, 1, 0);
  CHECK(code == GPUQ_NOT_FOUND, "use after release: %s", gpuq_code_name(code));
  code = gpuq_session_close(s);
  CHECK(code == GPUQ_OK, "close: %s", gpuq_session_error(s));
  code = gpuq_session_alloc(s, 1, &buf);
  CHECK(code == GPUQ_SESSION_LOST, "after close: %s", gpuq_code_name(code));
  rc = 0;
out:
  gpuq_job_free(launch);
  gpuq_job_free(own);
  if (result) gpuq_result_free(result);
  gpuq_session_free(s);
  if (region) gpuq_region_free(region);
  gpuq_client_free(c);
  return rc;
}

/* NULL where the API takes a client or a place for an answer: GPUQ_INVALID
 * and nothing done (each crashed; a wait with no place for its result took
 * the result first). */
int gpuq_c_api_nulls(const char* endpoint, char* why, size_t why_size) {
  int rc = 1;
  gpuq_client* c = NULL;
  gpuq_job* job = NULL;
  gpuq_result* r = NULL;
  /* Not NULL: the failing calls below set them to NULL (never freed). */
  gpuq_result* probe = (gpuq_result*)&rc;
  gpuq_region* region = (gpuq_region*)&rc;
  uint64_t id = 0;
  unsigned char x[2] = {1, 2};
  gpuq_code code;

  CHECK(gpuq_client_new(endpoint, 10000, &c) == GPUQ_OK, "connect");
  CHECK(gpuq_client_error(NULL) != NULL, "gpuq_client_error(NULL) gives a text");
  job = gpuq_job_new(kKernels, "k");
  gpuq_job_set_launch(job, 1, 1, 1, 32, 1, 1, 0);
  gpuq_job_add_inout(job, x, sizeof x);
  gpuq_job_add_out(job, 4);
  CHECK(gpuq_submit(c, job, NULL) == GPUQ_INVALID, "submit with no place for the id");
  CHECK(gpuq_submit(c, NULL, &id) == GPUQ_INVALID, "submit of no job");
  CHECK(gpuq_submit(NULL, job, &id) == GPUQ_INVALID, "submit on no client");
  code = gpuq_submit(c, job, &id);
  CHECK(code == GPUQ_OK, "submit: %s: %s", gpuq_code_name(code), gpuq_client_error(c));
  CHECK(gpuq_wait(c, id, 0, NULL) == GPUQ_INVALID, "wait with no place for the result");
  CHECK(gpuq_status(c, id, NULL) == GPUQ_INVALID, "status with no place for the result");
  CHECK(gpuq_cancel(c, id, NULL) == GPUQ_INVALID, "cancel with no place for the state");
  CHECK(gpuq_status(NULL, id, &probe) == GPUQ_INVALID && probe == NULL, "status on no client");
  CHECK(gpuq_region_new(c, 4096, NULL, NULL) == GPUQ_INVALID, "a region with no place");
  CHECK(gpuq_region_new(NULL, 4096, NULL, &region) == GPUQ_INVALID && region == NULL,
        "a region on no client");
  code = gpuq_wait(c, id, 0, &r);
  CHECK(code == GPUQ_OK && gpuq_result_state(r) == GPUQ_DONE,
        "the job is still there to wait for: %s: %s", gpuq_code_name(code), gpuq_client_error(c));
  rc = 0;
out:
  gpuq_result_free(r);
  gpuq_job_free(job);
  gpuq_client_free(c);
  return rc;
}
