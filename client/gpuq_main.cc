// gpuq: the command line client. `gpuq --help` lists the commands.
#include <cstdio>
#include <exception>

#include "client/cli.h"

int main(int argc, char** argv) {
  CLI::App app{"gpuq: run CUDA kernels as queued jobs"};
  app.require_subcommand(1);
  gpuq::cli::Action action;
  gpuq::cli::AddJobCommands(app, &action);
  gpuq::cli::AddCompileCommands(app, &action);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : gpuq::cli::kExitUsage;
  }
  if (!action) return gpuq::cli::kExitUsage;
  try {
    return action();
  } catch (const std::exception& e) {
    // A reply the command could not take (a field of an unexpected type
    // from a broker it does not know), said plainly instead of an abort.
    std::fprintf(stderr, "gpuq: internal: %s\n", e.what());
    return gpuq::cli::kExitInternal;
  }
}
