#include <nvrtc.h>

#include <algorithm>
#include <cctype>

#include "broker/compile/compile_request.h"

namespace gpuq::compile {

const std::vector<int>& SupportedArchs() {
  // Asked once: the list is fixed for the NVRTC library this process loaded.
  static const std::vector<int> archs = [] {
    std::vector<int> out;
    int n = 0;
    if (nvrtcGetNumSupportedArchs(&n) != NVRTC_SUCCESS || n <= 0) return out;
    out.resize(static_cast<size_t>(n));
    if (nvrtcGetSupportedArchs(out.data()) != NVRTC_SUCCESS) out.clear();
    std::sort(out.begin(), out.end());
    return out;
  }();
  return archs;
}

bool CanTarget(const std::string& arch) {
  if (!ValidateArch(arch).ok()) return false;
  // Valid means sm_ or compute_, then 2-3 digits, then perhaps 'a' or 'f'.
  int number = 0;
  for (char c : arch.substr(arch.find('_') + 1)) {
    if (!std::isdigit(static_cast<unsigned char>(c))) break;
    number = number * 10 + (c - '0');
  }
  const auto& archs = SupportedArchs();
  return std::binary_search(archs.begin(), archs.end(), number);
}

}  // namespace gpuq::compile
