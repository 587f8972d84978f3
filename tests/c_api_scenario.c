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
  rc = 0;
out:
  gpuq_result_free(r);
  gpuq_job_free(job);
  gpuq_client_free(c);
  return rc;
}
