// A C++ program built against an installed gpuq (gpuq/client.h only):
// submits a job with an inout and an out buffer to the broker at argv[1] and
// checks the bytes that come back from the worker test double (inout: each
// byte + 1; out: filled with its argument index + 1).
#include <cstdio>
#include <string>

#include "gpuq/client.h"
#include "gpuq/version.h"

namespace {

int Fail(const std::string& what, const gpuq::Status& s) {
  std::fprintf(stderr, "%s: %s\n", what.c_str(), s.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s ENDPOINT\n", argv[0]);
    return 2;
  }
  auto client = gpuq::Client::Connect(argv[1]);
  if (!client.ok()) return Fail("connect", client.status());

  const std::string in = {1, 2, 3, 4};
  gpuq::JobRequest job;
  job.spec.kernel.source = "extern \"C\" __global__ void k(unsigned char* a, unsigned char* b) {}";
  job.spec.kernel.entry = "k";
  job.spec.launch.block = {32, 1, 1};
  job.spec.args = {gpuq::schema::Arg::InOut(0), gpuq::schema::Arg::Out(8)};
  job.inputs = {in};
  auto id = (*client)->Submit(job);
  if (!id.ok()) return Fail("submit", id.status());
  auto r = (*client)->Wait(*id, gpuq::Millis(20000));
  if (!r.ok()) return Fail("wait", r.status());
  if (!r->ok()) {
    std::fprintf(stderr, "job %llu ended %s: %s\n", static_cast<unsigned long long>(*id),
                 std::string(gpuq::schema::JobStateName(r->state)).c_str(), r->error.c_str());
    return 1;
  }
  const gpuq::Bytes* inout = r->Output(0);
  const gpuq::Bytes* out = r->Output(1);
  if (!inout || *inout != std::string({2, 3, 4, 5}) || !out || *out != std::string(8, '\2')) {
    std::fprintf(stderr, "the outputs came back wrong\n");
    return 1;
  }
  auto unknown = (*client)->GetStatus(*id + 1000);
  if (unknown.ok() || unknown.status().code() != gpuq::Code::kNotFound) {
    std::fprintf(stderr, "an unknown job was not not_found\n");
    return 1;
  }
  std::printf("c++ consumer: gpuq %s, job %llu done on %s\n", GPUQ_VERSION_STRING,
              static_cast<unsigned long long>(*id), r->device.c_str());
  return 0;
}
