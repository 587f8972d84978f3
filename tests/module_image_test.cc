// Reading what a module takes of the GPU's memory from its CUBIN, before it
// loads: CUBINs from real NVRTC compiles (the compile service), and images
// broken in every byte.
#include "worker/module_image.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>

#include "broker/compile/compile_service.h"
#include "tests/test_util.h"

namespace gpuq::worker {
namespace {

using compile::CompileRequest;
using compile::CompileService;

class ModuleImageTest : public ::testing::Test {
 protected:
  void SetUp() override {
    compile::CompileServiceOptions o;
    o.cache_path = dir_.File("kernels.db");
    auto s = CompileService::Create(o);
    ASSERT_TRUE(s.ok()) << s.status().ToString();
    service_ = std::move(*s);
  }

  std::string Cubin(const std::string& source) {
    CompileRequest r;
    r.source = source;
    r.arch = "sm_90";
    auto e = service_->Compile(r, nullptr);
    EXPECT_TRUE(e.ok()) << e.status().ToString();
    if (!e.ok()) return {};
    EXPECT_TRUE((*e)->ok) << (*e)->log;
    return (*e)->cubin;
  }

  testing::TempDir dir_;
  std::unique_ptr<CompileService> service_;
};

constexpr char kPlain[] = "extern \"C\" __global__ void k(int* x) { x[threadIdx.x] += 1; }\n";

TEST_F(ModuleImageTest, AKernelWithoutVariablesTakesItsCodeAndConstantsOnly) {
  const std::string cubin = Cubin(kPlain);
  ASSERT_TRUE(IsElfImage(cubin));
  auto bytes = ModuleDeviceBytes(cubin);
  ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
  EXPECT_GT(*bytes, 0u);
  EXPECT_LT(*bytes, 64u << 10);
}

// The section header of `.nv.global` says 16 KiB here (its size field keeps
// the low 32 bits): the array's symbol says where it ends.
TEST_F(ModuleImageTest, AHugeDeviceArrayCountsWholeThoughItsSectionHeaderSaysLess) {
  const std::string cubin = Cubin(
      "__device__ char big[1ull << 34];\n"
      "__managed__ int counted[4096];\n"
      "extern \"C\" __global__ void k(int* x) { x[0] = big[x[1]] + counted[x[2]]; }\n");
  auto bytes = ModuleDeviceBytes(cubin);
  ASSERT_TRUE(bytes.ok()) << bytes.status().ToString();
  EXPECT_GE(*bytes, (1ull << 34) + 4096 * 4);
  EXPECT_LT(*bytes, (1ull << 34) + (1u << 20));
}

TEST_F(ModuleImageTest, InitializedAndUninitializedVariablesAddUp) {
  const std::string plain = Cubin(kPlain);
  const std::string with = Cubin(
      "__device__ int table[1000] = {1, 2, 3};\n"
      "__device__ float scratch[1 << 20];\n"
      "extern \"C\" __global__ void k(int* x) { x[threadIdx.x] += table[x[1]] + scratch[x[2]]; }\n");
  auto a = ModuleDeviceBytes(plain);
  auto b = ModuleDeviceBytes(with);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_GE(*b, *a + 4000 + (4u << 20));
  EXPECT_LT(*b, *a + 4000 + (4u << 20) + (64u << 10));
}

TEST_F(ModuleImageTest, WhatIsNotAWellFormedElfImageIsRefused) {
  EXPECT_FALSE(IsElfImage(".version 8.0\n.target sm_90\n"));
  EXPECT_EQ(ModuleDeviceBytes(".version 8.0\n").status().code(), Code::kInvalid);
  EXPECT_EQ(ModuleDeviceBytes("").status().code(), Code::kInvalid);
  const std::string cubin = Cubin(kPlain);
  ASSERT_FALSE(cubin.empty());
  // Cut short: the section headers are outside the image (or partly).
  uint64_t shoff = 0;
  std::memcpy(&shoff, cubin.data() + 0x28, sizeof shoff);
  ASSERT_LT(shoff, cubin.size());
  for (size_t keep : {size_t{4}, size_t{64}, size_t{shoff}, size_t{shoff + 65}}) {
    auto r = ModuleDeviceBytes(std::string_view(cubin).substr(0, keep));
    EXPECT_EQ(r.status().code(), Code::kInvalid) << keep;
  }
  std::string other = cubin;
  other[4] = 1;  // ELFCLASS32
  EXPECT_EQ(ModuleDeviceBytes(other).status().code(), Code::kInvalid);
}

// Every byte of a real image changed, one at a time, and many at once: an
// answer or kInvalid, never a read outside the image (the sanitizer builds
// run this too).
TEST_F(ModuleImageTest, ImagesBrokenAnywhereAreReadSafely) {
  const std::string cubin = Cubin(
      "__device__ int table[1000] = {1, 2, 3};\n"
      "extern \"C\" __global__ void k(int* x) { x[threadIdx.x] += table[x[1]]; }\n");
  ASSERT_FALSE(cubin.empty());
  std::mt19937_64 rng(7);
  size_t answered = 0;
  for (size_t i = 0; i < cubin.size(); ++i) {
    std::string broken = cubin;
    broken[i] = static_cast<char>(broken[i] ^ (1 + rng() % 255));
    if (ModuleDeviceBytes(broken).ok()) ++answered;
  }
  for (int round = 0; round < 2000; ++round) {
    std::string broken = cubin;
    for (int k = 0; k < 8; ++k) broken[rng() % broken.size()] = static_cast<char>(rng());
    (void)ModuleDeviceBytes(broken);
  }
  // Most bytes are code and data that the reading never looks at.
  EXPECT_GT(answered, cubin.size() / 2);
}

}  // namespace
}  // namespace gpuq::worker
