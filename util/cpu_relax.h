// A hint inside a loop that polls memory another core writes: the core
// waits a few dozen cycles, leaves its sibling hyperthread the execution
// units, and does not flush its pipeline when the value changes (the way
// Linux's cpu_relax and DPDK's rte_pause spin).
#pragma once

namespace gpuq {

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace gpuq
