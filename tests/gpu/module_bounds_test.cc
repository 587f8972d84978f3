// What a module takes of the GPU's memory when it loads, on the real driver:
// a 16 GiB __device__ array is allocated by the load (free memory falls by
// as much), and LoadModule refuses it, as CUBIN and as PTX (compiled by the
// driver first), before anything is allocated.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>

#include "worker/cuda_driver.h"

namespace gpuq::worker {
namespace {

constexpr uint64_t kBig = 1ull << 34;

// Hand-written PTX: an array of kBig bytes and a kernel that names it.
std::string Ptx(uint64_t bytes) {
  return ".version 8.0\n.target sm_90\n.address_size 64\n"
         ".visible .global .align 1 .b8 big[" + std::to_string(bytes) + "];\n"
         ".visible .entry touch(.param .u64 out)\n{\n"
         "  .reg .b64 %rd<3>;\n  .reg .b16 %rs<2>;\n"
         "  ld.param.u64 %rd1, [out];\n  cvta.to.global.u64 %rd2, %rd1;\n"
         "  ld.global.u8 %rs1, [big];\n  st.global.u8 [%rd2], %rs1;\n  ret;\n}\n";
}

class ModuleBoundsGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto cu = LoadCudaDriver();
    if (!cu.ok()) GTEST_SKIP() << "no GPU on this machine: " << cu.status().ToString();
    cu_ = *cu;
    ASSERT_EQ(cu_->cuDeviceGet(&dev_, 0), CUDA_SUCCESS);
    int major = 0;
    ASSERT_EQ(cu_->cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev_),
              CUDA_SUCCESS);
    if (major < 9) GTEST_SKIP() << "the PTX here targets sm_90";
    ASSERT_EQ(cu_->cuDevicePrimaryCtxRetain(&ctx_, dev_), CUDA_SUCCESS);
    ASSERT_EQ(cu_->cuCtxSetCurrent(ctx_), CUDA_SUCCESS);
  }
  void TearDown() override {
    if (ctx_) (void)cu_->cuDevicePrimaryCtxRelease(dev_);
  }
  uint64_t Free() {
    size_t free = 0, total = 0;
    EXPECT_EQ(cu_->cuMemGetInfo(&free, &total), CUDA_SUCCESS);
    return free;
  }

  std::shared_ptr<const CudaDriver> cu_;
  CUdevice dev_ = 0;
  CUcontext ctx_ = nullptr;
};

TEST_F(ModuleBoundsGpuTest, AHugeDeviceArrayIsAllocatedByTheLoadAndRefusedBeforeIt) {
  const std::string ptx = Ptx(kBig);
  // Unbounded, the driver allocates the array when the module loads.
  const uint64_t before = Free();
  LoadedModule open = LoadModule(*cu_, ptx, {.module_bytes = 0});
  ASSERT_EQ(open.error, CUDA_SUCCESS) << cu_->Describe(open.error);
  ASSERT_TRUE(open.refused.ok());
  const uint64_t loaded = Free();
  ASSERT_EQ(cu_->cuModuleUnload(open.module), CUDA_SUCCESS);
  std::printf("a module with a %llu GiB __device__ array: free device memory %.2f -> %.2f GiB\n",
              (unsigned long long)(kBig >> 30), before / 1073741824.0, loaded / 1073741824.0);
  EXPECT_GE(before - loaded, kBig);

  // Bounded (the worker's default): refused, and nothing allocated.
  const uint64_t again = Free();
  LoadedModule refused = LoadModule(*cu_, ptx, ModuleBounds{});
  EXPECT_EQ(refused.module, nullptr);
  EXPECT_EQ(refused.refused.code(), Code::kResourceExhausted) << refused.refused.ToString();
  EXPECT_NE(refused.refused.message().find("over the limit of 64 MiB per module"),
            std::string::npos)
      << refused.refused.ToString();
  EXPECT_LT(again - std::min(again, Free()), 1ull << 30);

  // Within the bound: loaded.
  LoadedModule small = LoadModule(*cu_, Ptx(1 << 20), ModuleBounds{});
  ASSERT_EQ(small.error, CUDA_SUCCESS) << cu_->Describe(small.error);
  ASSERT_TRUE(small.refused.ok()) << small.refused.ToString();
  ASSERT_NE(small.module, nullptr);
  EXPECT_EQ(cu_->cuModuleUnload(small.module), CUDA_SUCCESS);
}

}  // namespace
}  // namespace gpuq::worker
