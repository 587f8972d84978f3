// gpuq-golden DIR: writes schema/golden/*.bin (and a .json view of each
// header, for readers in other languages) from tests/golden_messages.cc.
// Run it only when the protocol changes on purpose; the codec tests fail
// while the files and the code disagree.
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "tests/golden_messages.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: gpuq-golden DIR\n";
    return 2;
  }
  const std::string dir = argv[1];
  for (const auto& g : gpuq::testing::GoldenMessages()) {
    auto frames = gpuq::testing::EncodeFrames(g);
    std::ofstream(dir + "/" + g.name + ".bin", std::ios::binary)
        << gpuq::testing::PackFrames(frames);
    nlohmann::ordered_json view = {
        {"protocol", frames[0]},
        {"header", nlohmann::ordered_json::from_msgpack(frames[1])},
        {"payload_sizes", nlohmann::ordered_json::array()}};
    for (size_t i = 2; i < frames.size(); ++i) view["payload_sizes"].push_back(frames[i].size());
    std::ofstream(dir + "/" + g.name + ".json") << view.dump(2) << "\n";
  }
  return 0;
}
