/* gpuq's C API: submit CUDA kernel jobs to a gpuq broker from C, or from any
 * language that calls C (Rust, Go, Python ctypes).
 *
 * Conventions, for every function:
 * - Functions that can fail return a gpuq_code; GPUQ_OK (0) is success, any
 *   other value is the protocol's error code (PROTOCOL.md, "Error codes"). The text
 *   of the last failure on a client is gpuq_client_error().
 * - Objects are opaque. What a gpuq_*_new or an out-parameter gives you, you
 *   own and must release with the matching gpuq_*_free (NULL is accepted).
 *   A call that gives an object sets its out-parameter to NULL first, so it
 *   is NULL after any failure. A NULL client (but gpuq_region_unregister's),
 *   session, job or out-parameter makes a call that returns a gpuq_code
 *   return GPUQ_INVALID and do nothing.
 * - Threads: a gpuq_client must not be used by two threads at once; use one
 *   per thread. gpuq_job and gpuq_result objects are plain data: any thread,
 *   one at a time. A gpuq_region's calls (unregister, free) belong to the
 *   thread of the client that made it; its memory, to any thread.
 */
#ifndef GPUQ_GPUQ_H_
#define GPUQ_GPUQ_H_

#include <stddef.h>
#include <stdint.h>

#include "gpuq/version.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum gpuq_code {
  GPUQ_OK = 0,
  GPUQ_MALFORMED,
  GPUQ_TOO_LARGE,
  GPUQ_UNKNOWN_COMMAND,
  GPUQ_BAD_VERSION,
  GPUQ_INVALID,
  GPUQ_NOT_FOUND,
  GPUQ_FORBIDDEN,
  GPUQ_QUEUE_FULL,
  GPUQ_COMPILE_ERROR,
  GPUQ_SANDBOX_VIOLATION,
  GPUQ_TIMEOUT,
  GPUQ_RESOURCE_EXHAUSTED,
  GPUQ_LAUNCH_ERROR,
  GPUQ_KERNEL_FAULT,
  GPUQ_UNAVAILABLE,
  GPUQ_IO_ERROR,
  GPUQ_INTERNAL,
  GPUQ_CODE_EXPIRED, /* "expired": not started by its deadline (state GPUQ_EXPIRED) */
  GPUQ_QUOTA_EXCEEDED, /* over a tenant's rate limit: retry later */
  GPUQ_SESSION_LOST /* a session ended under its client */
} gpuq_code;

typedef enum gpuq_state {
  GPUQ_QUEUED = 0,
  GPUQ_DISPATCHED,
  GPUQ_DONE,
  GPUQ_FAILED,
  GPUQ_CANCELED,
  GPUQ_EXPIRED
} gpuq_state;

typedef enum gpuq_type {
  GPUQ_U8 = 0, GPUQ_I8, GPUQ_U16, GPUQ_I16, GPUQ_U32, GPUQ_I32,
  GPUQ_U64, GPUQ_I64, GPUQ_F32, GPUQ_F64
} gpuq_type;

/* Microseconds spent in each phase of a job. */
typedef struct gpuq_timing {
  uint64_t queue_us, compile_us, load_us, h2d_us, kernel_us, d2h_us, total_us;
  int cache_hit;
} gpuq_timing;

typedef struct gpuq_client gpuq_client;
typedef struct gpuq_job gpuq_job;
typedef struct gpuq_result gpuq_result;
typedef struct gpuq_region gpuq_region;
typedef struct gpuq_session gpuq_session;

/* The library's version ("0.1.0"), a static string: GPUQ_VERSION_STRING of
 * the library that runs, which may differ from the header's. */
const char* gpuq_version(void);

/* The name of a code ("queue_full"), a static string. */
const char* gpuq_code_name(gpuq_code code);

/* ------------------------------------------------------------------ client */

/* Connects to `endpoint` (NULL: $GPUQ_BROKER or the local default).
 * `timeout_ms` bounds each wait for a reply (0: 10 s). On success *out is a
 * client to release with gpuq_client_free; on failure it is NULL. */
gpuq_code gpuq_client_new(const char* endpoint, int timeout_ms, gpuq_client** out);
void gpuq_client_free(gpuq_client* client);
/* The text of the client's last failure; valid until its next call. */
const char* gpuq_client_error(const gpuq_client* client);

/* ------------------------------------------------------------------ jobs */

/* A job to submit. `source` and `entry` are copied. With `entry` NULL or ""
 * the job is a job of several launches (below). */
gpuq_job* gpuq_job_new(const char* source, const char* entry);
void gpuq_job_free(gpuq_job* job);
void gpuq_job_set_launch(gpuq_job* job, uint32_t grid_x, uint32_t grid_y, uint32_t grid_z,
                         uint32_t block_x, uint32_t block_y, uint32_t block_z,
                         uint32_t shared_bytes);
/* `entry` is a C++ name expression ("scale<float>") rather than an extern "C" name. */
void gpuq_job_set_name_expression(gpuq_job* job, int yes);
void gpuq_job_set_key(gpuq_job* job, const char* key);      /* idempotency key, copied */
void gpuq_job_set_tenant(gpuq_job* job, const char* tenant);
void gpuq_job_set_priority(gpuq_job* job, uint32_t priority);  /* 0..9 */
void gpuq_job_set_deadline_ms(gpuq_job* job, uint64_t ms);
void gpuq_job_set_time_limit_ms(gpuq_job* job, uint64_t ms);
void gpuq_job_set_gpu(gpuq_job* job, const char* uuid);
void gpuq_job_add_option(gpuq_job* job, const char* option);
void gpuq_job_add_header(gpuq_job* job, const char* name, const char* content);
/* Arguments, in the kernel's order. `value` points to a value of `type`.
 * In a job of several launches: an argument of the latest launch. */
void gpuq_job_add_scalar(gpuq_job* job, gpuq_type type, const void* value);
/* Buffers. `data` is NOT copied: it must stay valid until gpuq_submit returns.
 * In a job of several launches these declare the job's buffers, numbered
 * 0, 1, ... in the order declared (gpuq_job_add_scratch included), which its
 * launches name with gpuq_job_add_buffer_arg. */
void gpuq_job_add_in(gpuq_job* job, const void* data, size_t size);
void gpuq_job_add_inout(gpuq_job* job, const void* data, size_t size);
void gpuq_job_add_out(gpuq_job* job, size_t size);

/* A job of several launches (PROTOCOL.md, "Jobs of several launches"): a
 * sequence of kernel launches that run in order on one stream over buffers
 * the job declares once; each launch sees what the ones before it wrote.
 * Made with gpuq_job_new(source, NULL); then, in any order, buffers
 * (gpuq_job_add_in, _inout, _out, _scratch) and launches, each launch
 * followed by its arguments (gpuq_job_add_scalar, gpuq_job_add_buffer_arg).
 * gpuq_job_set_launch and gpuq_job_set_name_expression belong to jobs of one
 * launch. A call that does not fit the job (an argument before any launch, a
 * launch on a job made with an entry, ...) makes gpuq_submit fail with
 * GPUQ_INVALID and a text naming the call; nothing is sent. Outputs come back
 * by buffer index: gpuq_result_output(result, buffer, &size). */

/* Adds another source, copied; returns its index for gpuq_job_add_launch:
 * 1, 2, ... (0 is the job's own source, from gpuq_job_new). */
uint32_t gpuq_job_add_source(gpuq_job* job, const char* source);
/* An NVRTC option or a named header of source `source` (0: the job's own,
 * as gpuq_job_add_option and gpuq_job_add_header). */
void gpuq_job_add_source_option(gpuq_job* job, uint32_t source, const char* option);
void gpuq_job_add_source_header(gpuq_job* job, uint32_t source, const char* name,
                                const char* content);
/* A buffer of `size` bytes, zero-filled on the device, that never leaves it:
 * room for what one launch leaves to the next. */
void gpuq_job_add_scratch(gpuq_job* job, size_t size);
/* Appends a launch of kernel `entry` (copied; an extern "C" name) of source
 * `source` with these dimensions and dynamic shared memory. The arguments
 * added after it are its arguments. */
void gpuq_job_add_launch(gpuq_job* job, uint32_t source, const char* entry, uint32_t grid_x,
                         uint32_t grid_y, uint32_t grid_z, uint32_t block_x, uint32_t block_y,
                         uint32_t block_z, uint32_t shared_bytes);
/* The latest launch's entry is a C++ name expression ("scale<float>"). */
void gpuq_job_set_launch_name_expression(gpuq_job* job, int yes);
/* An argument of the latest launch: a pointer `offset` bytes into the job's
 * buffer `buffer` (at most its size). */
void gpuq_job_add_buffer_arg(gpuq_job* job, uint32_t buffer, uint64_t offset);
/* Asks the worker to capture the launches into a CUDA graph and replay it
 * for later jobs of the same shape; outputs are the same either way, and
 * the timing has no launch times (gpuq_result_launch_count is 0). */
void gpuq_job_set_graph(gpuq_job* job, int yes);

/* ------------------------------------------------------------------ regions */

/* A region (PROTOCOL.md, "Regions"): memory of this process shared once with
 * the broker's workers on this host, which jobs name as ranges. A job's in
 * and inout ranges are copied from it to the GPU, its out and inout ranges
 * copied back into it after the kernel, and nothing else moves: the bytes
 * never travel in messages and never come back in a result. Write inputs
 * before gpuq_submit and read outputs after the job ended; two unfinished
 * jobs may not write overlapping bytes (gpuq_submit fails with GPUQ_INVALID).
 * A region ends when it is unregistered or freed, or when this process
 * exits: jobs that name it and have not started fail with GPUQ_UNAVAILABLE,
 * running ones finish first. Regions do not survive a broker restart. */

/* Registers a new region of `size` bytes (zero-filled) for `tenant` (NULL
 * or "": "default"; a job names the region only with the same tenant).
 * Needs the broker's ipc endpoint (GPUQ_INVALID otherwise) and a broker with
 * a local directory (GPUQ_UNAVAILABLE otherwise); GPUQ_RESOURCE_EXHAUSTED
 * past the tenant's bounds (the text names the bound). On success *out is a
 * region to release with gpuq_region_free; it may outlive its client. */
gpuq_code gpuq_region_new(gpuq_client* client, uint64_t size, const char* tenant,
                          gpuq_region** out);
/* Ends the region (as gpuq_region_unregister, ignoring a failure) and unmaps
 * its memory. */
void gpuq_region_free(gpuq_region* region);
/* The region's memory: gpuq_region_size bytes, valid until gpuq_region_free
 * (after gpuq_region_unregister too). */
void* gpuq_region_data(gpuq_region* region);
uint64_t gpuq_region_size(const gpuq_region* region);
/* The broker's id of the region (never 0), as `gpuq regions` lists it. */
uint64_t gpuq_region_id(const gpuq_region* region);
/* Ends the region now; its memory stays this process's until gpuq_region_free.
 * `client` is the client that made it, whose gpuq_client_error() then says
 * why a failure failed, or NULL (a region may outlive its client). Unregistering
 * again does nothing (GPUQ_OK). */
gpuq_code gpuq_region_unregister(gpuq_client* client, gpuq_region* region);

/* Buffers in a region: bytes [offset, offset + size) of `region` (size 0:
 * from offset to the region's end), read and written in place. They take
 * the place of gpuq_job_add_in, _inout and _out: an argument of a job of one
 * launch, or in a job of several launches the next of its buffers (named by
 * gpuq_job_add_buffer_arg); gpuq_result_output has nothing for them. The
 * region must stay registered until the job ended. A range outside the
 * region fails gpuq_submit with GPUQ_INVALID, a region that is not the job's
 * tenant's or has ended with GPUQ_NOT_FOUND. */
void gpuq_job_add_region_in(gpuq_job* job, const gpuq_region* region, uint64_t offset,
                            uint64_t size);
void gpuq_job_add_region_inout(gpuq_job* job, const gpuq_region* region, uint64_t offset,
                               uint64_t size);
void gpuq_job_add_region_out(gpuq_job* job, const gpuq_region* region, uint64_t offset,
                             uint64_t size);

/* Submits; on GPUQ_OK the job is stored durably and *id names it. */
gpuq_code gpuq_submit(gpuq_client* client, const gpuq_job* job, uint64_t* id);

/* ------------------------------------------------------------------ results */

/* Waits up to `timeout_ms` (0: the client's timeout) for job `id` to end. */
gpuq_code gpuq_wait(gpuq_client* client, uint64_t id, int timeout_ms, gpuq_result** out);
/* The job's state now (a result without outputs while it runs). */
gpuq_code gpuq_status(gpuq_client* client, uint64_t id, gpuq_result** out);
/* Cancels; *state is the job's state afterwards. */
gpuq_code gpuq_cancel(gpuq_client* client, uint64_t id, gpuq_state* state);

void gpuq_result_free(gpuq_result* result);
gpuq_state gpuq_result_state(const gpuq_result* result);
/* The failure reason when the state is failed or expired; GPUQ_OK otherwise. */
gpuq_code gpuq_result_code(const gpuq_result* result);
/* Error text (for compile errors, NVRTC's log); "" when none. Owned by the result. */
const char* gpuq_result_error(const gpuq_result* result);
const char* gpuq_result_device(const gpuq_result* result);
uint32_t gpuq_result_attempts(const gpuq_result* result);
gpuq_timing gpuq_result_timing(const gpuq_result* result);
/* The bytes of the out/inout buffer of argument `arg` (in a job of several
 * launches: of buffer `arg`), owned by the result; NULL (and *size 0) when
 * the job has no such output (a region's range is in the region). */
const void* gpuq_result_output(const gpuq_result* result, uint32_t arg, size_t* size);
/* A job of several launches: how many launch times its timing holds (one
 * per launch once it ran; 0 for a job of one launch, and for one run as a
 * CUDA graph, which times only the span of its launches), and launch i's
 * time on the GPU in microseconds (0 when there is no launch i). The
 * timing's kernel_us spans them all. */
size_t gpuq_result_launch_count(const gpuq_result* result);
uint64_t gpuq_result_launch_us(const gpuq_result* result, size_t i);

/* ----------------------------------------------------------------- sessions */

/* A session (PROTOCOL.md, "Sessions"): device memory that stays on the GPU
 * between launches, in a process that serves this tenant only, reached
 * directly on the GPU's host. Buffers are handles of the session; each call
 * waits for its answer, and calls run in the order made. A call's failure
 * is its own (the session goes on) unless it is GPUQ_SESSION_LOST: the
 * session ended (a kernel fault or a kill in its process, its idle timeout,
 * a close through the broker), and every later call fails the same way. A
 * failure's text is gpuq_session_error(). One thread at a time. */

/* Opens a session for `tenant` (NULL or "": off CURVE, the default tenant;
 * on a CURVE key, the key's) that may hold `memory` bytes of device memory
 * and ends after `idle_ms` unused (0: the broker's defaults). On GPUQ_OK
 * *out is a session to release with gpuq_session_free; it may outlive its
 * client. A client whose endpoint is not ipc:// reaches the session through
 * the broker (PROTOCOL.md, "Sessions through the broker"): the same calls,
 * without attached regions. A failure's text is the client's
 * gpuq_client_error(). */
gpuq_code gpuq_session_open(gpuq_client* client, const char* tenant, uint64_t memory,
                            uint64_t idle_ms, gpuq_session** out);
/* The same, with a run-time limit of `limit_ms` for each of its launches (0:
 * the broker's default, a job's). A launch past it ends the tenant's
 * sessions on that GPU: GPUQ_SESSION_LOST, saying so. */
gpuq_code gpuq_session_open_limited(gpuq_client* client, const char* tenant, uint64_t memory,
                                    uint64_t idle_ms, uint64_t limit_ms, gpuq_session** out);
/* Closes the session (ignoring a failure) and releases it. */
void gpuq_session_free(gpuq_session* session);
uint64_t gpuq_session_id(const gpuq_session* session);
/* The text of the session's latest failure ("" when none); owned by it. */
const char* gpuq_session_error(const gpuq_session* session);
/* A buffer of `size` bytes, zero-filled: *buffer is its handle. */
gpuq_code gpuq_session_alloc(gpuq_session* session, uint64_t size, uint32_t* buffer);
gpuq_code gpuq_session_release(gpuq_session* session, uint32_t buffer);
gpuq_code gpuq_session_write(gpuq_session* session, uint32_t buffer, uint64_t offset,
                             const void* data, size_t size);
gpuq_code gpuq_session_read(gpuq_session* session, uint32_t buffer, uint64_t offset, void* out,
                            size_t size);
gpuq_code gpuq_session_copy(gpuq_session* session, uint32_t dst, uint64_t dst_offset,
                            uint32_t src, uint64_t src_offset, uint64_t size);
gpuq_code gpuq_session_fill(gpuq_session* session, uint32_t buffer, uint64_t offset,
                            uint64_t size, uint8_t value);
/* Runs the kernel `launch` describes (a job of one launch: gpuq_job_new with
 * an entry, its dimensions, gpuq_job_add_scalar and
 * gpuq_job_add_session_buffer arguments) and waits for it; *kernel_ns (if
 * not NULL) is its time on the GPU. */
gpuq_code gpuq_session_launch(gpuq_session* session, const gpuq_job* launch,
                              uint64_t* kernel_ns);
/* The same untimed: the GPU records no CUDA events for it (cheaper), and no
 * time comes back. */
gpuq_code gpuq_session_launch_untimed(gpuq_session* session, const gpuq_job* launch);
/* Runs a launch whose arguments may include buffers of its own
 * (gpuq_job_add_in, _inout, _out, beside scalars and session buffers):
 * device memory for it alone, zero-filled, inputs copied in before it,
 * freed after it. On GPUQ_OK *result (release with gpuq_result_free) holds
 * its out and inout buffers' bytes by argument index (gpuq_result_output)
 * and its time on the GPU (timing's kernel_us). */
gpuq_code gpuq_session_run(gpuq_session* session, const gpuq_job* launch, gpuq_result** result);
/* Attaches `region` to the session (PROTOCOL.md, "Attached regions"): the
 * session's process page-locks its memory once; *handle names it in
 * gpuq_session_write_from and gpuq_session_read_into. The region must
 * outlive the session. */
gpuq_code gpuq_session_attach(gpuq_session* session, const gpuq_region* region,
                              uint32_t* handle);
/* Ends attached region `handle`'s attachment, once the copies sent before
 * this that use it have run. */
gpuq_code gpuq_session_detach(gpuq_session* session, uint32_t handle);
/* Bytes [region_offset, +size) of attached region `handle` into the buffer
 * at `offset`, copied by the GPU; and the reverse. */
gpuq_code gpuq_session_write_from(gpuq_session* session, uint32_t buffer, uint64_t offset,
                                  uint32_t handle, uint64_t region_offset, uint64_t size);
gpuq_code gpuq_session_read_into(gpuq_session* session, uint32_t buffer, uint64_t offset,
                                 uint64_t size, uint32_t handle, uint64_t region_offset);
/* An argument naming the session's buffer `buffer` at `offset` bytes. */
void gpuq_job_add_session_buffer(gpuq_job* job, uint32_t buffer, uint64_t offset);
/* Ends the session: its buffers are freed. */
gpuq_code gpuq_session_close(gpuq_session* session);

/* -------------------------------------------------------------------- usage */

/* What a tenant used over a time window (PROTOCOL.md, "usage"): its jobs
 * that ended by outcome, the time they held GPUs and their kernels' time,
 * and their input and output bytes. `tenant` is owned by the list. */
typedef struct gpuq_tenant_usage {
  const char* tenant;
  uint64_t done, failed, canceled, expired;
  uint64_t gpu_us, kernel_us;
  uint64_t bytes_in, bytes_out;
} gpuq_tenant_usage;
typedef struct gpuq_usage_list gpuq_usage_list;

/* Usage by tenant of the jobs that ended in [since_ms, until_ms) (Unix ms,
 * to the hour; until_ms 0: now), sorted by tenant. `tenant` NULL or "": the
 * caller's own on a CURVE key, every tenant's for an operator key or on ipc;
 * another tenant's on a tenant's key is GPUQ_FORBIDDEN. On GPUQ_OK, *out is
 * a list to release with gpuq_usage_free. */
gpuq_code gpuq_usage(gpuq_client* client, const char* tenant, uint64_t since_ms,
                     uint64_t until_ms, gpuq_usage_list** out);
void gpuq_usage_free(gpuq_usage_list* list);
size_t gpuq_usage_count(const gpuq_usage_list* list);
/* Row i (a row of zeros, tenant "", past the end). */
gpuq_tenant_usage gpuq_usage_at(const gpuq_usage_list* list, size_t i);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* GPUQ_GPUQ_H_ */
