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
  rc = 0;
out:
  gpuq_result_free(r);
  gpuq_job_free(job);
  gpuq_client_free(c);
  return rc;
}
