/* Runs the C API scenario (tests/c_api_scenario.c) against the broker at
 * argv[1], and checks that the library is the version of its header. */
#include <stdio.h>
#include <string.h>

#include "gpuq/gpuq.h"

int gpuq_c_api_scenario(const char* endpoint, char* why, size_t why_size);

int main(int argc, char** argv) {
  char why[512] = "";
  if (argc != 2) {
    fprintf(stderr, "usage: %s ENDPOINT\n", argv[0]);
    return 2;
  }
  if (strcmp(gpuq_version(), GPUQ_VERSION_STRING) != 0) {
    fprintf(stderr, "library %s, header %s\n", gpuq_version(), GPUQ_VERSION_STRING);
    return 1;
  }
  if (gpuq_c_api_scenario(argv[1], why, sizeof why) != 0) {
    fprintf(stderr, "C API scenario: %s\n", why);
    return 1;
  }
  printf("c consumer: gpuq %s, scenario passed\n", gpuq_version());
  return 0;
}
