// The CUDA toolkit's C++ libraries in kernels, end to end on a real GPU
// through gpuqd and one gpuq-worker: a CUB block reduction and
// cooperative-groups warp reductions (the headers come from the toolkit's
// include/cccl, in the compile sandbox), each checked against a CPU
// reference on fresh random inputs. Where there is no GPU (CI), every test
// reports itself skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "gpuq/client.h"
#include "tests/gpu/gpu_fixture.h"

namespace gpuq {
namespace {

using schema::Arg;
using schema::JobState;

class KernelLibraryTest : public testing::GpuFixture {
 protected:
  static void SetUpTestSuite() { StartBroker("1"); }
  static void TearDownTestSuite() { StopBroker(); }

  std::vector<int> RandomInts(unsigned n) {
    std::uniform_int_distribution<int> d(-1000, 1000);
    std::vector<int> v(n);
    for (int& x : v) x = d(rng_);
    return v;
  }
};

constexpr char kCubBlockSum[] = R"(
#include <cub/block/block_reduce.cuh>
extern "C" __global__ void block_sum(const int* in, int* out, unsigned n) {
  using Reduce = cub::BlockReduce<int, 256>;
  __shared__ typename Reduce::TempStorage tmp;
  unsigned i = blockIdx.x * 256 + threadIdx.x;
  int s = Reduce(tmp).Sum(i < n ? in[i] : 0);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}
)";

TEST_F(KernelLibraryTest, CubBlockReductionMatchesTheCpu) {
  const unsigned n = 100003;  // the last block is partial
  const unsigned blocks = (n + 255) / 256;
  const std::vector<int> in = RandomInts(n);
  JobRequest j = Kernel(kCubBlockSum, "block_sum", {blocks, 1, 1}, {256, 1, 1});
  j.spec.args = {Arg::In(0), Arg::Out(uint64_t{blocks} * 4), Arg::U32(n)};
  j.inputs = {Keep(in)};
  JobResult r = Run(j);
  ASSERT_EQ(r.state, JobState::kDone) << CodeName(r.code) << ": " << r.error;
  ASSERT_NE(r.Output(1), nullptr);
  const std::vector<int> out = As<int>(*r.Output(1));
  ASSERT_EQ(out.size(), blocks);
  for (unsigned b = 0; b < blocks; ++b) {
    int want = 0;
    for (unsigned i = b * 256; i < std::min(n, (b + 1) * 256); ++i) want += in[i];
    ASSERT_EQ(out[b], want) << "block " << b;
  }
}

constexpr char kCooperativeGroups[] = R"(
#include <cooperative_groups.h>
#include <cooperative_groups/reduce.h>
namespace cg = cooperative_groups;
extern "C" __global__ void warp_sums(const int* in, int* out) {
  auto tile = cg::tiled_partition<32>(cg::this_thread_block());
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  int s = cg::reduce(tile, in[i], cg::plus<int>());
  if (tile.thread_rank() == 0) out[i / 32] = s;
}
extern "C" __global__ void warp_max_by_shuffle(const int* in, int* out) {
  auto tile = cg::tiled_partition<32>(cg::this_thread_block());
  unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  int m = in[i];
  for (unsigned d = tile.size() / 2; d > 0; d /= 2) m = max(m, tile.shfl_xor(m, d));
  if (tile.thread_rank() == 0) out[i / 32] = m;
}
)";

TEST_F(KernelLibraryTest, CooperativeGroupsWarpReductionsMatchTheCpu) {
  const unsigned warps = 4096, n = warps * 32;
  const std::vector<int> in = RandomInts(n);
  JobRequest sums = Kernel(kCooperativeGroups, "warp_sums", {n / 256, 1, 1}, {256, 1, 1});
  sums.spec.args = {Arg::In(0), Arg::Out(uint64_t{warps} * 4)};
  sums.inputs = {Keep(in)};
  JobRequest maxima = sums;
  maxima.spec.kernel.entry = "warp_max_by_shuffle";
  JobResult rs = Run(sums), rm = Run(maxima);
  ASSERT_EQ(rs.state, JobState::kDone) << CodeName(rs.code) << ": " << rs.error;
  ASSERT_EQ(rm.state, JobState::kDone) << CodeName(rm.code) << ": " << rm.error;
  const std::vector<int> got_sums = As<int>(*rs.Output(1));
  const std::vector<int> got_maxima = As<int>(*rm.Output(1));
  ASSERT_EQ(got_sums.size(), warps);
  ASSERT_EQ(got_maxima.size(), warps);
  for (unsigned w = 0; w < warps; ++w) {
    int sum = 0, most = in[w * 32];
    for (unsigned i = w * 32; i < (w + 1) * 32; ++i) {
      sum += in[i];
      most = std::max(most, in[i]);
    }
    ASSERT_EQ(got_sums[w], sum) << "warp " << w;
    ASSERT_EQ(got_maxima[w], most) << "warp " << w;
  }
}

}  // namespace
}  // namespace gpuq
