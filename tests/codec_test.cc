// The wire codec against the golden files, and against every kind of bad
// input a peer can send.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>

#include <msgpack.hpp>

#include "schema/codec.h"
#include "tests/golden_messages.h"

namespace gpuq::schema {
namespace {

using testing::GoldenMessage;
using testing::GoldenMessages;

std::string ReadGolden(const std::string& name) {
  std::ifstream in(std::string(GPUQ_SOURCE_DIR) + "/schema/golden/" + name + ".bin",
                   std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<uint64_t> Sizes(const std::vector<std::string>& frames, size_t first) {
  std::vector<uint64_t> s;
  for (size_t i = first; i < frames.size(); ++i) s.push_back(frames[i].size());
  return s;
}

// Decodes frames as the message type of `like`, re-encodes, and returns the
// decoded message.
template <typename T>
T DecodeAs(const std::vector<std::string>& frames, Status* status) {
  T out;
  Limits limits;
  auto sizes = Sizes(frames, 2);
  if constexpr (std::is_same_v<T, ClientRequest>) {
    *status = DecodeClientRequest(frames[1], sizes, limits, &out);
  } else if constexpr (std::is_same_v<T, ClientReply>) {
    *status = DecodeClientReply(frames[1], sizes, limits, &out);
  } else if constexpr (std::is_same_v<T, WorkerMessage>) {
    *status = DecodeWorkerMessage(frames[1], sizes, limits, &out);
  } else if constexpr (std::is_same_v<T, Batch>) {
    *status = DecodeBatch(frames[1], sizes, limits, &out);
  } else if constexpr (std::is_same_v<T, RegionMessage>) {
    *status = DecodeRegionMessage(frames[1], limits, &out);
  } else if constexpr (std::is_same_v<T, SessionMessage>) {
    *status = DecodeSessionMessage(frames[1], limits, 1u << 20, &out);
  } else {
    *status = DecodeBrokerMessage(frames[1], sizes, limits, &out);
  }
  return out;
}

// Bytes of a string literal, embedded NULs included, without counting by hand.
template <size_t N>
std::string M(const char (&s)[N]) {
  return std::string(s, N - 1);
}

class GoldenTest : public ::testing::TestWithParam<GoldenMessage> {};

TEST_P(GoldenTest, FileMatchesTheEncoderByteForByte) {
  const GoldenMessage& g = GetParam();
  std::string file = ReadGolden(g.name);
  ASSERT_FALSE(file.empty()) << "schema/golden/" << g.name << ".bin is missing";
  EXPECT_EQ(file, testing::PackFrames(testing::EncodeFrames(g)))
      << "the golden file and the encoder disagree; regenerate with gpuq-golden only if "
         "the protocol changed on purpose";
}

TEST_P(GoldenTest, FileDecodesToTheMessageAndReencodesIdentically) {
  const GoldenMessage& g = GetParam();
  std::vector<std::string> frames;
  ASSERT_TRUE(testing::UnpackFrames(ReadGolden(g.name), &frames));
  ASSERT_GE(frames.size(), 2u);
  std::visit(
      [&](const auto& expected) {
        using T = std::decay_t<decltype(expected)>;
        const bool client = std::is_same_v<T, ClientRequest> || std::is_same_v<T, ClientReply>;
        const bool region = std::is_same_v<T, RegionMessage>;
        const bool session = std::is_same_v<T, SessionMessage>;
        EXPECT_TRUE(CheckProtocolFrame(frames[0], client    ? kClientProtocol
                                                  : region  ? kRegionProtocol
                                                  : session ? kSessionProtocol
                                                            : kWorkerProtocol)
                        .ok());
        Status s;
        T decoded = DecodeAs<T>(frames, &s);
        ASSERT_TRUE(s.ok()) << s.ToString();
        EXPECT_TRUE(decoded == expected);
        GoldenMessage again{g.name, decoded, {frames.begin() + 2, frames.end()}};
        EXPECT_EQ(testing::PackFrames(testing::EncodeFrames(again)), ReadGolden(g.name));
      },
      g.message);
}

// A batch's messages decode one by one, as if each were sent alone.
TEST(BatchTest, AGoldenBatchIsItsMessages) {
  for (const char* name : {"worker_batch_results", "broker_batch_jobs"}) {
    std::vector<std::string> frames;
    ASSERT_TRUE(testing::UnpackFrames(ReadGolden(name), &frames));
    ASSERT_TRUE(IsBatch(frames[1])) << name;
    Batch b;
    ASSERT_TRUE(DecodeBatch(frames[1], Sizes(frames, 2), {}, &b).ok()) << name;
    size_t next = 2;
    for (uint32_t n : b.parts) {
      std::vector<std::string> one = {frames[0]};
      one.insert(one.end(), frames.begin() + next, frames.begin() + next + n);
      next += n;
      Status s;
      if (std::string(name).rfind("worker_", 0) == 0) {
        DecodeAs<WorkerMessage>(one, &s);
      } else {
        DecodeAs<BrokerMessage>(one, &s);
      }
      EXPECT_TRUE(s.ok()) << name << ": " << s.ToString();
    }
    EXPECT_EQ(next, frames.size());
  }
}

TEST(BatchTest, PartsMustAddUpToTheFrames) {
  const std::string h = EncodeBatch(Batch{{2, 1}});
  Batch b;
  EXPECT_EQ(DecodeBatch(h, std::vector<uint64_t>{1, 1}, {}, &b).code(), Code::kMalformed);
  EXPECT_EQ(DecodeBatch(h, std::vector<uint64_t>{1, 1, 1, 1}, {}, &b).code(), Code::kMalformed);
  EXPECT_EQ(DecodeBatch(EncodeBatch(Batch{{0, 1}}), std::vector<uint64_t>{1}, {}, &b).code(),
            Code::kMalformed);
  EXPECT_EQ(DecodeBatch(EncodeBatch(Batch{}), {}, {}, &b).code(), Code::kMalformed);
  EXPECT_TRUE(DecodeBatch(h, std::vector<uint64_t>{1, 1, 1}, {}, &b).ok());
  EXPECT_FALSE(IsBatch(EncodeWorkerMessage(WorkerMessage{})));
}

TEST(WorkerMessageTest, AHeartbeatsRunningJobsArePairsAndAnAbsentListIsNotAnEmptyOne) {
  WorkerMessage hb;
  hb.op = WorkerOp::kHeartbeat;
  WorkerMessage out;
  ASSERT_TRUE(DecodeWorkerMessage(EncodeWorkerMessage(hb), {}, {}, &out).ok());
  EXPECT_FALSE(out.running.has_value()) << "a worker that does not say said it runs nothing";
  hb.running.emplace();
  ASSERT_TRUE(DecodeWorkerMessage(EncodeWorkerMessage(hb), {}, {}, &out).ok());
  ASSERT_TRUE(out.running.has_value());
  EXPECT_TRUE(out.running->empty());
  // [[id]] and [[id, attempt, x]] and [id] are malformed.
  for (const char* bad : {"\x91\x91\x07", "\x91\x93\x07\x01\x01", "\x91\x07"}) {
    const std::string h =
        M("\x84\xa2op\xa9heartbeat\xaa" "free_bytes\x00\xa8inflight\x00\xa7running") + bad;
    EXPECT_EQ(DecodeWorkerMessage(h, {}, {}, &out).code(), Code::kMalformed) << bad;
  }
  const std::string good =
      M("\x84\xa2op\xa9heartbeat\xaa" "free_bytes\x00\xa8inflight\x00\xa7running") +
      "\x91\x92\x07\x01";
  ASSERT_TRUE(DecodeWorkerMessage(good, {}, {}, &out).ok());
  ASSERT_EQ(out.running->size(), 1u);
  EXPECT_EQ((*out.running)[0], (WorkerMessage::Running{7, 1}));
}

INSTANTIATE_TEST_SUITE_P(Schema, GoldenTest, ::testing::ValuesIn(GoldenMessages()),
                         [](const auto& info) { return info.param.name; });

// ------------------------------------------------------------ bad input

class BadInputTest : public ::testing::Test {
 protected:
  // The saxpy submit, as frames, to be spoiled by each test.
  std::vector<std::string> Saxpy() {
    for (const auto& g : GoldenMessages()) {
      if (g.name == "client_submit_saxpy") return testing::EncodeFrames(g);
    }
    return {};
  }
  Status Decode(const std::string& header, std::vector<uint64_t> sizes = {4096, 4096}) {
    ClientRequest r;
    r.rid = 777;  // must stay untouched on failure
    Status s = DecodeClientRequest(header, sizes, limits_, &r);
    if (!s.ok()) {
      EXPECT_EQ(r.rid, 777u) << "a failed decode changed its output";
    }
    return s;
  }
  Limits limits_;
};

TEST_F(BadInputTest, TruncatedHeadersAreMalformed) {
  std::string h = Saxpy()[1];
  for (size_t n : {size_t{0}, size_t{1}, h.size() / 2, h.size() - 1}) {
    Status s = Decode(h.substr(0, n));
    EXPECT_EQ(s.code(), Code::kMalformed) << "length " << n << ": " << s.ToString();
  }
}

TEST_F(BadInputTest, TrailingBytesAreMalformed) {
  EXPECT_EQ(Decode(Saxpy()[1] + '\xc0').code(), Code::kMalformed);
}

TEST_F(BadInputTest, EveryTruncationAndByteFlipFailsCleanly) {
  // Not a fuzzer (that is tests/fuzz), but every single-byte change of a real
  // message must decode or fail with a code: never crash, never hang.
  std::string h = Saxpy()[1];
  for (size_t i = 0; i < h.size(); ++i) {
    for (uint8_t x : {0x01, 0x80, 0xff}) {
      std::string m = h;
      m[i] = static_cast<char>(m[i] ^ x);
      ClientRequest r;
      Status s = DecodeClientRequest(m, std::vector<uint64_t>{4096, 4096}, limits_, &r);
      EXPECT_TRUE(s.ok() || s.code() != Code::kOk);
    }
  }
}

TEST_F(BadInputTest, UnknownCommandIsReportedAsSuch) {
  // {"op": "explode", "rid": 5}
  std::string h("\x82\xa2op\xa7" "explode" "\xa3rid\x05", 17);
  EXPECT_EQ(Decode(h, {}).code(), Code::kUnknownCommand);
  EXPECT_EQ(PeekRequestId(h), 5u);
}

TEST_F(BadInputTest, HeaderThatIsNotAMapIsMalformed) {
  EXPECT_EQ(Decode(M("\x93\x01\x02\x03"), {}).code(), Code::kMalformed);
}

TEST_F(BadInputTest, MissingRequiredFieldIsMalformed) {
  // {"op": "status", "rid": 1} without "id"
  std::string h("\x82\xa2op\xa6status\xa3rid\x01", 16);
  Status s = Decode(h, {});
  EXPECT_EQ(s.code(), Code::kMalformed);
  EXPECT_NE(s.message().find("'id'"), std::string::npos) << s.message();
}

TEST_F(BadInputTest, UnknownAndDuplicateFieldsAreMalformed) {
  // {"op": "stats", "rid": 1, "bogus": 1}
  std::string unknown("\x83\xa2op\xa5stats\xa3rid\x01\xa5" "bogus\x01", 22);
  EXPECT_EQ(Decode(unknown, {}).code(), Code::kMalformed);
  // {"op": "stats", "rid": 1, "rid": 2}
  std::string dup("\x83\xa2op\xa5stats\xa3rid\x01\xa3rid\x02", 20);
  EXPECT_EQ(Decode(dup, {}).code(), Code::kMalformed);
}

TEST_F(BadInputTest, WrongTypeIsMalformed) {
  // {"op": "status", "rid": 1, "id": "x"}
  std::string h("\x83\xa2op\xa6status\xa3rid\x01\xa2id\xa1x", 21);
  EXPECT_EQ(Decode(h, {}).code(), Code::kMalformed);
}

TEST_F(BadInputTest, OversizedSourceIsTooLarge) {
  ClientRequest r;
  r.op = ClientOp::kSubmit;
  r.job.kernel.source = std::string(limits_.max_source_bytes + 1, 'x');
  r.job.kernel.entry = "k";
  EXPECT_EQ(Decode(EncodeClientRequest(r), {}).code(), Code::kTooLarge);
}

TEST_F(BadInputTest, OversizedHeaderFrameIsTooLarge) {
  limits_.max_header_bytes = 64;
  EXPECT_EQ(Decode(Saxpy()[1]).code(), Code::kTooLarge);
}

TEST_F(BadInputTest, DeepNestingIsRejected) {
  std::string h("\x82\xa2op\xa5stats\xa3rid", 12);
  h += std::string(100, '\x91') + '\x01';
  EXPECT_NE(Decode(h, {}).code(), Code::kOk);
}

TEST_F(BadInputTest, HugeDeclaredArrayIsRejectedWithoutAllocatingIt) {
  // {"op": "stats", "rid": [array32 of 2^32-1 elements, a few present]}
  std::string h("\x82\xa2op\xa5stats\xa3rid\xdd\xff\xff\xff\xff", 16);
  h += std::string(64, '\x01');
  EXPECT_EQ(Decode(h, {}).code(), Code::kTooLarge);
}

TEST_F(BadInputTest, PayloadFramesMustMatchTheBufferArguments) {
  std::string h = Saxpy()[1];
  EXPECT_EQ(Decode(h, {4096}).code(), Code::kInvalid) << "a frame is missing";
  EXPECT_EQ(Decode(h, {4096, 4096, 1}).code(), Code::kInvalid) << "a frame is unused";
  EXPECT_TRUE(Decode(h, {4096, 4096}).ok());
}

TEST_F(BadInputTest, TwoArgumentsCannotShareAFrame) {
  ClientRequest r;
  r.op = ClientOp::kSubmit;
  r.rid = 1;
  r.job.kernel.source = "x";
  r.job.kernel.entry = "k";
  r.job.args = {Arg::In(0), Arg::InOut(0)};
  EXPECT_EQ(Decode(EncodeClientRequest(r), {16}).code(), Code::kInvalid);
}

TEST_F(BadInputTest, LaunchDimensionsOutsideCudaLimitsAreInvalid) {
  for (auto [grid, block] : {std::pair{Dim3{0, 1, 1}, Dim3{1, 1, 1}},
                             std::pair{Dim3{1, 1, 1}, Dim3{2048, 1, 1}},
                             std::pair{Dim3{1, 1, 1}, Dim3{32, 32, 2}},
                             std::pair{Dim3{1, 70000, 1}, Dim3{1, 1, 1}}}) {
    ClientRequest r;
    r.op = ClientOp::kSubmit;
    r.rid = 1;
    r.job.kernel.source = "x";
    r.job.kernel.entry = "k";
    r.job.launch.grid = grid;
    r.job.launch.block = block;
    EXPECT_EQ(Decode(EncodeClientRequest(r), {}).code(), Code::kInvalid);
  }
}

TEST_F(BadInputTest, ScalarOutOfRangeForItsTypeIsInvalid) {
  // {"op":"submit","rid":1,"job":{"src":"x","entry":"k","grid":[1,1,1],
  //  "block":[1,1,1],"args":[["u8", 256]]}}
  auto submit_with_arg = [](const std::string& arg) {
    std::string h("\x83\xa2op\xa6submit\xa3rid\x01\xa3job\x85", 21);
    h += M("\xa3src\xa1x\xa5" "entry\xa1k");
    h += M("\xa4grid\x93\x01\x01\x01\xa5" "block\x93\x01\x01\x01");
    h += M("\xa4" "args\x91") + arg;
    return h;
  };
  EXPECT_TRUE(Decode(submit_with_arg(M("\x92\xa2u8\xcc\xff")), {}).ok());
  EXPECT_EQ(Decode(submit_with_arg(M("\x92\xa2u8\xcd\x01\x00")), {}).code(),
            Code::kInvalid);
  EXPECT_EQ(Decode(submit_with_arg(M("\x92\xa3u32\xff")), {}).code(),
            Code::kInvalid)
      << "negative value for an unsigned type";
  EXPECT_EQ(Decode(submit_with_arg(M("\x92\xa3i99\x01")), {}).code(),
            Code::kMalformed)
      << "unknown type name";
  EXPECT_EQ(Decode(submit_with_arg(M("\x92\xa2i8\xd0\x80")), {}).ok(), true)
      << "-128 fits i8";
  EXPECT_EQ(Decode(submit_with_arg(M("\x92\xa4u128\x01")), {}).code(),
            Code::kMalformed);
}

TEST_F(BadInputTest, TheRidIsReadWheneverItCanBe) {
  const std::string status = M("\x83\xa2op\xa6status\xa3rid\x4d\xa2id\x01");
  EXPECT_EQ(PeekRequestId(status), 77u);
  EXPECT_EQ(PeekRequestId(status + "\x01\x02"), 77u) << "trailing bytes";
  // {"id": [5000 zeros], "rid": 77}: an array over the limit before the rid.
  std::string big = M("\x82\xa2id\xdc\x13\x88") + std::string(5000, '\x00');
  EXPECT_EQ(PeekRequestId(big + M("\xa3rid\x4d")), 77u);
  EXPECT_EQ(PeekRequestId(M("\x82\xa1x\xc4\x01z\xa3rid\x4d")), 77u) << "a bin before it";
  EXPECT_EQ(PeekRequestId(M("\x81\xa1x\x81\xa3rid\x4d")), 0u) << "a nested rid is not it";
  EXPECT_EQ(PeekRequestId(M("\x91\x4d")), 0u) << "not a map";
  EXPECT_EQ(PeekRequestId(""), 0u);
  EXPECT_EQ(PeekRequestId(M("\x81\xa3rid")), 0u) << "truncated";
}

TEST_F(BadInputTest, APeekLooksAtABoundedNumberOfElements) {
  // {"x": [100,000 nils], "rid": 77} and the rid first: a look that may see
  // 65,536 elements finds the rid before the nils, not after them; the
  // default bound sees past them.
  std::string nils = M("\xa1x\xdd") + std::string("\x00\x01\x86\xa0", 4) +
                     std::string(100000, '\xc0');
  const std::string after = M("\x82") + nils + M("\xa3rid\x4d");
  const std::string before = M("\x82\xa3rid\x4d") + nils;
  EXPECT_EQ(PeekRequestId(after, 1 << 16), 0u);
  EXPECT_EQ(PeekRequestId(before, 1 << 16), 77u);
  EXPECT_EQ(PeekRequestId(after), 77u);
  EXPECT_EQ(PeekString(M("\x82") + nils + M("\xa2op\xa4" "call"), "op", 1 << 16), std::nullopt);
  EXPECT_EQ(PeekString(M("\x82") + nils + M("\xa2op\xa4" "call"), "op"),
            std::optional<std::string_view>("call"));
  // Nested elements count too: [[nil x 40,000] x 2] before the rid.
  std::string nested = M("\x82\xa1x\x92");
  for (int i = 0; i < 2; ++i) {
    nested += M("\xdc\x9c\x40") + std::string(40000, '\xc0');
  }
  EXPECT_EQ(PeekRequestId(nested + M("\xa3rid\x4d"), 1 << 16), 0u);
  EXPECT_EQ(PeekRequestId(nested + M("\xa3rid\x4d"), 1 << 17), 77u);
}

TEST_F(BadInputTest, RidZeroIsReservedForPushes) {
  EXPECT_EQ(Decode(M("\x82\xa2op\xa5stats\xa3rid\x00"), {}).code(), Code::kMalformed);
  EXPECT_TRUE(Decode(M("\x82\xa2op\xa5stats\xa3rid\x01"), {}).ok());
}

TEST_F(BadInputTest, BinExtAndMisshapenTuplesAreMalformedNotTooLarge) {
  EXPECT_EQ(Decode(M("\x83\xa2op\xa6status\xa3rid\x01\xa2id\xc4\x01x"), {}).code(),
            Code::kMalformed);
  EXPECT_EQ(Decode(M("\x83\xa2op\xa6status\xa3rid\x01\xa2id\xd4\x01x"), {}).code(),
            Code::kMalformed);
  ClientRequest r;
  r.op = ClientOp::kSubmit;
  r.rid = 1;
  r.job.kernel.source = "x";
  r.job.kernel.entry = "k";
  r.job.args = {Arg::U32(1)};
  std::string h = EncodeClientRequest(r);
  // The argument ["u32", 1] with a third element.
  const std::string arg = M("\x92\xa3u32\x01");
  const size_t at = h.find(arg);
  ASSERT_NE(at, std::string::npos);
  EXPECT_EQ(Decode(h.replace(at, arg.size(), M("\x93\xa3u32\x01\x01")), {}).code(),
            Code::kMalformed);
}

TEST_F(BadInputTest, RangesOfSizesDeadlinesAndLimits) {
  ClientRequest r;
  r.op = ClientOp::kSubmit;
  r.rid = 1;
  r.job.kernel.source = "x";
  r.job.kernel.entry = "k";
  r.job.args = {Arg::Out(limits_.max_buffer_bytes + 1)};
  EXPECT_EQ(Decode(EncodeClientRequest(r), {}).code(), Code::kTooLarge);
  r.job.args = {Arg::Out(16)};
  r.job.deadline_ms = kMaxDeadlineMs;
  EXPECT_TRUE(Decode(EncodeClientRequest(r), {}).ok());
  r.job.deadline_ms = ~uint64_t{0} - 5;
  EXPECT_EQ(Decode(EncodeClientRequest(r), {}).code(), Code::kInvalid);
  r.job.deadline_ms = 0;
  r.job.time_limit_ms = kMaxTimeLimitMs + 1;
  EXPECT_EQ(Decode(EncodeClientRequest(r), {}).code(), Code::kInvalid);
}

TEST_F(BadInputTest, ARefusedSubmitStillNamesItsLocalFiles) {
  ClientRequest r;
  r.op = ClientOp::kSubmit;
  r.rid = 1;
  r.job.kernel.source = "x";
  r.job.kernel.entry = "k";
  r.job.launch.block = {2048, 1, 1};
  r.job.args = {Arg::In(0)};
  r.job.files = {{"c-input", 4}};
  ClientRequest out;
  EXPECT_EQ(DecodeClientRequest(EncodeClientRequest(r), {}, limits_, &out).code(),
            Code::kInvalid);
  EXPECT_EQ(out.op, ClientOp::kSubmit);
  EXPECT_EQ(out.job.files, r.job.files);
}

TEST(ReplyFieldsTest, EachReplyCarriesExactlyItsOwnFields) {
  Limits limits;
  ClientReply r;
  // {"op": "stats", "rid": 11} lacks "stats" (found by the fuzzer).
  EXPECT_EQ(DecodeClientReply(M("\x82\xa2op\xa5stats\xa3rid\x0b"), {}, limits, &r)
                .code(),
            Code::kMalformed);
  // {"op": "accepted", "rid": 1, "id": 2, "stats": {}}: a field of another reply.
  EXPECT_EQ(DecodeClientReply(
                M("\x84\xa2op\xa8" "accepted\xa3rid\x01\xa2id\x02\xa5stats\x80"),
                {}, limits, &r)
                .code(),
            Code::kMalformed);
  // {"op": "error", "rid": 1, "code": "ok", "error": ""}: "ok" is no failure.
  EXPECT_EQ(DecodeClientReply(
                M("\x84\xa2op\xa5" "error\xa3rid\x01\xa4" "code\xa2ok\xa5" "error\xa0"),
                {}, limits, &r)
                .code(),
            Code::kMalformed);
}

TEST(ProtocolFrameTest, OtherVersionIsBadVersionAndGarbageIsMalformed) {
  EXPECT_TRUE(CheckProtocolFrame("GPUQ/1", kClientProtocol).ok());
  EXPECT_EQ(CheckProtocolFrame("GPUQ/2", kClientProtocol).code(), Code::kBadVersion);
  EXPECT_EQ(CheckProtocolFrame("GPUQW/1", kClientProtocol).code(), Code::kMalformed);
  EXPECT_EQ(CheckProtocolFrame("", kWorkerProtocol).code(), Code::kMalformed);
}

TEST(ArgTest, ScalarValuesRoundTripAtTheEdgesOfTheirTypes) {
  ClientRequest r;
  r.op = ClientOp::kSubmit;
  r.rid = 1;
  r.job.kernel.source = "x";
  r.job.kernel.entry = "k";
  r.job.args = {Arg::Scalar(ScalarType::kI8, 0x80),     Arg::Scalar(ScalarType::kI16, 0x7fff),
                Arg::Scalar(ScalarType::kI64, 1ull << 63), Arg::Scalar(ScalarType::kU64, ~0ull),
                Arg::F32(-0.0f),                         Arg::F64(1e-308)};
  ClientRequest back;
  ASSERT_TRUE(DecodeClientRequest(EncodeClientRequest(r), {}, Limits{}, &back).ok());
  EXPECT_TRUE(back.job.args == r.job.args);
}


// ------------------------------------------------------------ several launches

class SeveralLaunchesTest : public ::testing::Test {
 protected:
  // Two launches over an input, a scratch buffer and an output.
  static JobSpec Job() {
    JobSpec j;
    j.kernel.source = "extern \"C\" __global__ void a(float*, float*) {}";
    j.buffers = {Arg::In(0), Arg::Scratch(64), Arg::Out(16)};
    KernelLaunch l;
    l.entry = "a";
    l.launch.grid = {1, 1, 1};
    l.launch.block = {32, 1, 1};
    l.args = {Arg::Ref(0), Arg::Ref(1)};
    j.launches = {l, l};
    j.launches[1].args = {Arg::Ref(1, 32), Arg::Ref(2)};
    return j;
  }
  Status Decode(const JobSpec& j, std::vector<uint64_t> sizes = {128}) {
    ClientRequest r;
    r.op = ClientOp::kSubmit;
    r.rid = 5;
    r.job = j;
    ClientRequest out;
    out.rid = 777;
    Status s = DecodeClientRequest(EncodeClientRequest(r), sizes, limits_, &out);
    if (s.ok()) {
      EXPECT_EQ(out.job, j) << "a job of several launches round-trips";
    } else {
      EXPECT_EQ(out.rid, 777u) << "a failed decode changed its output";
    }
    return s;
  }
  Limits limits_;
};

TEST_F(SeveralLaunchesTest, AValidJobRoundTrips) {
  EXPECT_TRUE(Decode(Job()).ok());
  JobSpec j = Job();
  j.sources.emplace_back().source = "extern \"C\" __global__ void b() {}";
  j.launches[1].source = 1;
  j.launches[1].entry = "b";
  j.launches[1].args = {};
  j.graph = true;
  EXPECT_TRUE(Decode(j).ok());
}

TEST_F(SeveralLaunchesTest, BuffersAndTheirReferencesAreChecked) {
  JobSpec j = Job();
  j.launches[0].args[1] = Arg::Ref(3);
  Status s = Decode(j);
  EXPECT_EQ(s.code(), Code::kInvalid) << "a buffer the job lacks";
  EXPECT_NE(s.message().find("launch 0, argument 1 names buffer 3 of 3"), std::string::npos)
      << s.message();

  j = Job();
  j.launches[1].args[0] = Arg::Ref(1, 65);
  s = Decode(j);
  EXPECT_EQ(s.code(), Code::kInvalid) << "an offset past the end of a scratch buffer";
  EXPECT_NE(s.message().find("past the end of buffer 1 (64 bytes)"), std::string::npos)
      << s.message();
  j.launches[1].args[0] = Arg::Ref(1, 64);
  EXPECT_TRUE(Decode(j).ok()) << "an offset at the end is the end";
  j.launches[1].args[0] = Arg::Ref(0, 129);
  EXPECT_EQ(Decode(j).code(), Code::kInvalid) << "past the end of an input frame";

  j = Job();
  j.launches[0].args.push_back(Arg::In(0));
  EXPECT_EQ(Decode(j).code(), Code::kInvalid) << "a launch declares no buffers";
  j = Job();
  j.buffers.push_back(Arg::U32(1));
  EXPECT_EQ(Decode(j).code(), Code::kInvalid) << "a scalar is not a buffer";
  j = Job();
  j.buffers.push_back(Arg::Ref(0));
  EXPECT_EQ(Decode(j).code(), Code::kInvalid) << "a buffer is not a reference";
  j = Job();
  j.buffers.push_back(Arg::In(1));
  EXPECT_EQ(Decode(j, {128}).code(), Code::kInvalid) << "a frame the message lacks";
  EXPECT_EQ(Decode(Job(), {128, 4}).code(), Code::kInvalid) << "a frame no buffer uses";
}

TEST_F(SeveralLaunchesTest, SourcesEntriesAndDimensionsAreChecked) {
  JobSpec j = Job();
  j.launches[1].source = 1;
  Status s = Decode(j);
  EXPECT_EQ(s.code(), Code::kInvalid);
  EXPECT_NE(s.message().find("launch 1 names source 1 of 1"), std::string::npos) << s.message();
  j = Job();
  j.launches[0].entry = "";
  EXPECT_EQ(Decode(j).code(), Code::kInvalid);
  j = Job();
  j.launches[1].launch.block = {2048, 1, 1};
  s = Decode(j);
  EXPECT_EQ(s.code(), Code::kInvalid);
  EXPECT_NE(s.message().find("launch 1"), std::string::npos) << s.message();
  j = Job();
  j.sources.emplace_back().source = "";
  EXPECT_EQ(Decode(j).code(), Code::kInvalid) << "an empty source";
}

TEST_F(SeveralLaunchesTest, OneLaunchAndSeveralDoNotMix) {
  JobSpec j = Job();
  j.kernel.entry = "a";
  Status s = ValidateJob(j, std::vector<uint64_t>{128}, limits_);
  EXPECT_EQ(s.code(), Code::kInvalid) << "an entry beside launches";
  // On the wire, a job map with both forms: {"src", "entry", "buffers",
  // "launches"}.
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> p(buf);
  p.pack_map(3);
  p.pack("op"), p.pack("submit"), p.pack("rid"), p.pack(1), p.pack("job");
  p.pack_map(4);
  p.pack("src"), p.pack("x"), p.pack("entry"), p.pack("a"), p.pack("buffers");
  p.pack_array(0);
  p.pack("launches");
  p.pack_array(1);
  p.pack_map(4);
  p.pack("entry"), p.pack("a"), p.pack("grid"), p.pack(std::vector<int>{1, 1, 1});
  p.pack("block"), p.pack(std::vector<int>{1, 1, 1}), p.pack("args");
  p.pack_array(0);
  ClientRequest out;
  s = DecodeClientRequest(std::string_view(buf.data(), buf.size()), {}, limits_, &out);
  EXPECT_EQ(s.code(), Code::kMalformed) << s.message();
  EXPECT_NE(s.message().find("entry"), std::string::npos) << s.message();

  JobSpec one;
  one.kernel.source = "x";
  one.kernel.entry = "k";
  one.args = {Arg::Scratch(16)};
  EXPECT_EQ(Decode(one, {}).code(), Code::kInvalid) << "scratch in a job of one launch";
  one.args = {Arg::Ref(0)};
  EXPECT_EQ(Decode(one, {}).code(), Code::kInvalid) << "buf in a job of one launch";
  one.args = {};
  one.graph = true;
  EXPECT_EQ(Decode(one, {}).code(), Code::kMalformed) << "graph without launches";
  EXPECT_EQ(Decode(Job(), {}).code(), Code::kInvalid) << "its input frame is missing";
}

TEST_F(SeveralLaunchesTest, LimitsAreTooLargeAndNameTheLimit) {
  const Limits wide;
  limits_.max_launches = 1;
  Status s = Decode(Job());
  EXPECT_EQ(s.code(), Code::kTooLarge);
  EXPECT_NE(s.message().find("'launches' is over its limit of 1"), std::string::npos)
      << s.message();
  limits_ = wide;
  limits_.max_job_buffers = 2;
  s = Decode(Job());
  EXPECT_EQ(s.code(), Code::kTooLarge);
  EXPECT_NE(s.message().find("'buffers' is over its limit of 2"), std::string::npos)
      << s.message();
  limits_ = wide;
  limits_.max_scratch_bytes = 63;
  s = Decode(Job());
  EXPECT_EQ(s.code(), Code::kTooLarge);
  EXPECT_NE(s.message().find("scratch buffers of 64 bytes are over the limit of 63"),
            std::string::npos)
      << s.message();
  limits_.max_scratch_bytes = 64;
  EXPECT_TRUE(Decode(Job()).ok());
  limits_ = wide;
  limits_.max_sources = 1;
  JobSpec j = Job();
  j.sources.emplace_back().source = "y";
  EXPECT_EQ(Decode(j).code(), Code::kTooLarge) << "a second source over max_sources 1";
}

TEST_F(SeveralLaunchesTest, WorkerJobsAreCheckedToo) {
  for (const auto& g : GoldenMessages()) {
    if (g.name != "broker_job_launches") continue;
    BrokerMessage m = std::get<BrokerMessage>(g.message);
    auto decode = [&](const BrokerMessage& bm, std::vector<uint64_t> sizes) {
      BrokerMessage out;
      return DecodeBrokerMessage(EncodeBrokerMessage(bm), sizes, Limits{}, &out);
    };
    EXPECT_TRUE(decode(m, {64, 1024}).ok());
    EXPECT_EQ(decode(m, {1024}).code(), Code::kInvalid) << "the image frame is missing";
    BrokerMessage bad = m;
    bad.launches[1].source = 2;
    EXPECT_EQ(decode(bad, {64, 1024}).code(), Code::kInvalid) << "a module it lacks";
    bad = m;
    bad.modules[0].key = "abc";
    EXPECT_EQ(decode(bad, {64, 1024}).code(), Code::kMalformed) << "a short module key";
    return;
  }
  FAIL() << "no broker_job_launches golden message";
}

}  // namespace
}  // namespace gpuq::schema

namespace gpuq::schema {
namespace {

// A session frame is its message with the message's length in front.
TEST(SessionFrameTest, AFrameIsItsLengthThenItsMessage) {
  SessionMessage m;
  m.op = SessionOp::kWrite;
  m.rid = 7;
  m.buffer = 3;
  m.data = std::string(70000, 'x');
  const std::string body = EncodeSessionMessage(m), frame = EncodeSessionFrame(m);
  ASSERT_EQ(frame.size(), body.size() + 4);
  EXPECT_EQ(frame.substr(4), body);
  const auto* b = reinterpret_cast<const unsigned char*>(frame.data());
  EXPECT_EQ(b[0] | (b[1] << 8) | (b[2] << 16) | (size_t{b[3]} << 24), body.size());
}

TEST(SessionMessageTest, WhatDecodesEncodesToItself) {
  // A detach of region 0 decoded, and its encoding (which writes no region
  // 0) did not: region 0 names no region, so a detach of it is refused.
  const std::string detach_zero("\x83\xa2op\xa6" "detach\xa3rid\x09\xa6region\x00", 24);
  SessionMessage m;
  const Status s = DecodeSessionMessage(detach_zero, Limits{}, 1u << 20, &m);
  EXPECT_EQ(s.code(), Code::kInvalid) << s.ToString();
  // A launch's own buffers and its outputs go and come back as they were.
  SessionMessage launch;
  launch.op = SessionOp::kLaunch;
  launch.rid = 4;
  launch.kernel_ref = 2;
  launch.launch.grid = launch.launch.block = {1, 1, 1};
  launch.args = {Arg::InOut(1), Arg::In(0), Arg::Out(16), Arg::Scratch(8), Arg::Ref(5, 4)};
  launch.inputs = {"abc", std::string(3, '\0')};
  SessionMessage done;
  done.op = SessionOp::kDone;
  done.rid = 4;
  done.outputs = {"xyz", std::string(16, 'q')};
  for (const SessionMessage& want : {launch, done}) {
    SessionMessage got;
    ASSERT_TRUE(DecodeSessionMessage(EncodeSessionMessage(want), Limits{}, 1u << 20, &got).ok());
    EXPECT_EQ(got, want);
  }
  // Inputs each named by exactly one argument; no region's range.
  SessionMessage bad = launch;
  bad.inputs.push_back("unnamed");
  EXPECT_EQ(DecodeSessionMessage(EncodeSessionMessage(bad), Limits{}, 1u << 20, &m).code(),
            Code::kInvalid);
  bad = launch;
  bad.args[1] = Arg::In(1);
  EXPECT_EQ(DecodeSessionMessage(EncodeSessionMessage(bad), Limits{}, 1u << 20, &m).code(),
            Code::kInvalid);
  bad = launch;
  bad.args[2].region = 3;
  EXPECT_EQ(DecodeSessionMessage(EncodeSessionMessage(bad), Limits{}, 1u << 20, &m).code(),
            Code::kInvalid);
  // Inputs are bounded by the data limit, in all.
  bad = launch;
  bad.inputs = {std::string(600 << 10, 'a'), std::string(600 << 10, 'b')};
  EXPECT_EQ(DecodeSessionMessage(EncodeSessionMessage(bad), Limits{}, 1u << 20, &m).code(),
            Code::kTooLarge);
}

}  // namespace
}  // namespace gpuq::schema

namespace gpuq::schema {
namespace {

// DecodeSessionMessage reads a launch that names its kernel by handle
// straight from the bytes; for every input, its answer must be the general
// decoder's: the same status, and the same message when it is ok.
class SessionFastPathTest : public ::testing::Test {
 protected:
  void Same(const std::string& bytes, const std::string& what) {
    // What a decoder leaves of a message it refuses must be the same too:
    // the rid and op it could read, and nothing else changed.
    SessionMessage fast;
    fast.op = SessionOp::kWrite;
    fast.data = "before";
    fast.args = {Arg::U32(7), Arg::Ref(3, 9)};
    SessionMessage slow = fast;
    const Status f = DecodeSessionMessage(bytes, Limits{}, 1u << 20, &fast);
    const Status s = DecodeSessionMessageSlowly(bytes, Limits{}, 1u << 20, &slow);
    ++compared_;
    if (s.ok()) ++accepted_;
    ASSERT_EQ(f.code(), s.code()) << what << ": " << f.ToString() << " / " << s.ToString();
    ASSERT_EQ(f.message(), s.message()) << what;
    ASSERT_TRUE(fast == slow) << what;
  }

  // A launch by handle: `fields` packs the map's values after their keys.
  template <typename F>
  static std::string Launch(uint32_t n, F&& fields) {
    msgpack::sbuffer b;
    msgpack::packer<msgpack::sbuffer> p(b);
    p.pack_map(n);
    fields(p);
    return std::string(b.data(), b.size());
  }

  size_t compared_ = 0, accepted_ = 0;
};

using Packer = msgpack::packer<msgpack::sbuffer>;

void Key(Packer& p, std::string_view k) {
  p.pack_str(static_cast<uint32_t>(k.size()));
  p.pack_str_body(k.data(), static_cast<uint32_t>(k.size()));
}

void Dims(Packer& p, uint32_t x, uint32_t y, uint32_t z) {
  p.pack_array(3);
  p.pack(x);
  p.pack(y);
  p.pack(z);
}

// Op, rid, kernel, grid, block: the fields every launch by handle has.
void Common(Packer& p, uint64_t rid = 9) {
  Key(p, "op");
  Key(p, "launch");
  Key(p, "rid");
  p.pack(rid);
  Key(p, "kernel");
  p.pack(3);
  Key(p, "grid");
  Dims(p, 4, 1, 1);
  Key(p, "block");
  Dims(p, 256, 1, 1);
}

// A launch by handle whose one argument is [type, what `value` packs].
std::string WithArg(std::string_view type, const std::function<void(Packer&)>& value) {
  msgpack::sbuffer b;
  Packer p(b);
  p.pack_map(6);
  Common(p);
  Key(p, "args");
  p.pack_array(1);
  p.pack_array(2);
  Key(p, type);
  value(p);
  return std::string(b.data(), b.size());
}

TEST_F(SessionFastPathTest, EveryGoldenSessionMessageAndItsMutationsDecodeAlike) {
  std::mt19937 rng(20261130);
  for (const GoldenMessage& g : GoldenMessages()) {
    if (g.name.rfind("session_", 0) != 0) continue;
    std::vector<std::string> frames;
    ASSERT_TRUE(testing::UnpackFrames(ReadGolden(g.name), &frames));
    const std::string header = frames[1];
    Same(header, g.name);
    const bool launch = g.name.rfind("session_launch", 0) == 0;
    for (int i = 0; i < (launch ? 20000 : 500); ++i) {
      std::string m = header;
      switch (rng() % 4) {
        case 0:
          m[rng() % m.size()] = static_cast<char>(rng());
          break;
        case 1:
          m.resize(rng() % m.size());
          break;
        case 2:
          m.insert(m.begin() + static_cast<long>(rng() % (m.size() + 1)), static_cast<char>(rng()));
          break;
        default:
          m[rng() % m.size()] ^= static_cast<char>(1u << (rng() % 8));
          m[rng() % m.size()] ^= static_cast<char>(1u << (rng() % 8));
          break;
      }
      Same(m, g.name + " mutated");
      if (HasFailure()) return;
    }
  }
  std::printf("compared %zu messages, %zu of them accepted\n", compared_, accepted_);
}

// Launches by handle and plain answers are encoded by paths of their own
// too: the same bytes as the general encoder's, read back as the same launch.
TEST_F(SessionFastPathTest, LaunchesByHandleAndTheirAnswersEncodeAsTheGeneralEncoderDoes) {
  std::mt19937_64 rng(7);
  for (int i = 0; i < 5000; ++i) {
    SessionMessage m;
    m.op = SessionOp::kLaunch;
    m.rid = rng() >> (rng() % 64);
    m.kernel_ref = 1 + static_cast<uint32_t>(rng() % 1024);
    m.launch.grid = {1 + static_cast<uint32_t>(rng() % 70000), 1 + static_cast<uint32_t>(rng() % 9), 1};
    m.launch.block = {1 + static_cast<uint32_t>(rng() % 1024), 1, 1};
    m.launch.shared_bytes = rng() % 2 ? 0 : static_cast<uint32_t>(rng() % (1 << 20));
    m.untimed = rng() % 2;
    const size_t n = rng() % 12;
    for (size_t a = 0; a < n; ++a) {
      switch (rng() % 4) {
        case 0:
          m.args.push_back(Arg::Ref(static_cast<uint32_t>(rng()), rng() % 2 ? 0 : rng()));
          break;
        case 1:
          m.args.push_back(Arg::F32(static_cast<float>(static_cast<int64_t>(rng())) / 7.0f));
          break;
        case 2:
          m.args.push_back(Arg::F64(static_cast<double>(static_cast<int64_t>(rng())) / 3.0));
          break;
        default: {
          const auto t = static_cast<ScalarType>(rng() % 8);
          const size_t bytes = ScalarSize(t);
          const uint64_t mask = bytes == 8 ? ~uint64_t{0} : (uint64_t{1} << (8 * bytes)) - 1;
          m.args.push_back(Arg::Scalar(t, rng() & mask));
          break;
        }
      }
    }
    for (bool framed : {false, true}) {
      const std::string bytes = framed ? EncodeSessionFrame(m).substr(4) : EncodeSessionMessage(m);
      SessionMessage back;
      const Status s = DecodeSessionMessageSlowly(bytes, Limits{}, 1u << 20, &back);
      ASSERT_TRUE(s.ok()) << i << ": " << s.ToString();
      ASSERT_TRUE(back == m) << i;
      Same(bytes, "launch " + std::to_string(i));
    }
    ASSERT_EQ(EncodeSessionMessage(m), EncodeSessionMessageSlowly(m)) << i;
    // Its answer: a done with the launch's time and kernel handle, or not.
    SessionMessage done;
    done.op = SessionOp::kDone;
    done.rid = m.rid;
    done.kernel_ns = rng() % 2 ? 0 : rng() >> (rng() % 64);
    done.kernel_ref = rng() % 2 ? 0 : m.kernel_ref;
    if (rng() % 8 == 0) done.buffer = 1 + rng() % 9;
    if (rng() % 8 == 0) done.data = "bytes";
    if (rng() % 8 == 0) done.region = 1 + rng() % 9;
    ASSERT_EQ(EncodeSessionMessage(done), EncodeSessionMessageSlowly(done)) << i;
    ASSERT_EQ(EncodeSessionFrame(done).substr(4), EncodeSessionMessageSlowly(done)) << i;
  }
}

TEST_F(SessionFastPathTest, ALaunchByHandleWithAnyKeyOfASourceIsMalformed) {
  // Present at all, even empty or false: the source keys were taken when
  // empty, against PROTOCOL.md ("Sessions": with none of them).
  const std::vector<std::pair<std::string, std::function<void(Packer&)>>> keys = {
      {"src", [](Packer& p) { p.pack_str(0); }},
      {"entry", [](Packer& p) { p.pack_str(0); }},
      {"expr", [](Packer& p) { p.pack_false(); }},
      {"opts", [](Packer& p) { p.pack_array(0); }},
      {"headers", [](Packer& p) { p.pack_array(0); }},
  };
  for (const auto& kv : keys) {
    const std::string& key = kv.first;
    const std::function<void(Packer&)>& value = kv.second;
    const std::string m = Launch(7, [&](Packer& p) {
      Common(p);
      Key(p, "args");
      p.pack_array(0);
      Key(p, key);
      value(p);
    });
    SessionMessage out;
    EXPECT_EQ(DecodeSessionMessage(m, Limits{}, 1u << 20, &out).code(), Code::kMalformed) << key;
    Same(m, key);
  }
}

TEST_F(SessionFastPathTest, EdgesOfEachFieldDecodeAlike) {
  // Each scalar type at and past its edges, in every encoding the packer
  // picks for those values.
  const std::vector<std::pair<std::string, std::vector<int64_t>>> ints = {
      {"u8", {0, 255, 256, -1}},
      {"i8", {-128, -129, 127, 128}},
      {"u16", {65535, 65536, -1}},
      {"i16", {-32768, -32769, 32767, 32768}},
      {"u32", {0, 4294967295LL, 4294967296LL, -5}},
      {"i32", {-2147483648LL, -2147483649LL, 2147483647, 2147483648LL}},
      {"u64", {0, INT64_MAX, -1}},
      {"i64", {INT64_MIN, INT64_MAX, -1}},
      {"f32", {0, -7, 1 << 30}},
      {"f64", {0, -7, INT64_MIN}},
      {"x32", {1}},
      {"buf", {0, 4294967295LL, 4294967296LL, -1}},
  };
  for (const auto& entry : ints) {
    const std::string& type = entry.first;
    for (int64_t v : entry.second) {
      Same(WithArg(type, [&](Packer& p) { p.pack(v); }), type + " " + std::to_string(v));
    }
  }
  for (double d : {0.5, -1e300, 1e300, 3.25}) {
    for (const char* type : {"f32", "f64", "u32", "i64"}) {
      for (bool as_float : {true, false}) {
        Same(WithArg(type,
                     [&](Packer& p) {
                       if (as_float) {
                         p.pack_float(static_cast<float>(d));
                       } else {
                         p.pack_double(d);
                       }
                     }),
             std::string(type) + " " + std::to_string(d));
      }
    }
  }
  // A buffer at an offset, and misshapen ones.
  for (int shape = 0; shape < 5; ++shape) {
    Same(Launch(6,
                [&](Packer& p) {
                  Common(p);
                  Key(p, "args");
                  p.pack_array(1);
                  p.pack_array(2);
                  Key(p, "buf");
                  const int n = shape == 0 ? 2 : shape == 1 ? 1 : shape == 2 ? 3 : 2;
                  p.pack_array(n);
                  for (int i = 0; i < n; ++i) {
                    if (shape == 3 && i == 1) {
                      p.pack(-4);
                    } else if (shape == 4 && i == 0) {
                      p.pack(uint64_t{1} << 40);
                    } else {
                      p.pack(7 + i);
                    }
                  }
                }),
         "buf shape " + std::to_string(shape));
  }
  // Fields: the optional ones, unknown, twice, missing, of the wrong type.
  using Extra = std::function<void(Packer&)>;
  const std::vector<std::pair<std::string, std::pair<uint32_t, Extra>>> forms = {
      {"shared and untimed", {8, [](Packer& p) { Key(p, "shared"); p.pack(1024); Key(p, "untimed"); p.pack(true); }}},
      {"shared over 1 MiB", {7, [](Packer& p) { Key(p, "shared"); p.pack((1 << 20) + 1); }}},
      {"untimed nil", {7, [](Packer& p) { Key(p, "untimed"); p.pack_nil(); }}},
      {"rid twice", {7, [](Packer& p) { Key(p, "rid"); p.pack(3); }}},
      {"unknown field", {7, [](Packer& p) { Key(p, "colour"); p.pack(3); }}},
      {"source too", {7, [](Packer& p) { Key(p, "src"); Key(p, "x"); }}},
      {"entry too", {7, [](Packer& p) { Key(p, "entry"); Key(p, "k"); }}},
      {"a key that is not a string", {7, [](Packer& p) { p.pack(1); p.pack(3); }}},
      {"a map that says more fields than it has", {8, [](Packer& p) { Key(p, "untimed"); p.pack(false); }}},
  };
  for (const auto& entry : forms) {
    const std::string& what = entry.first;
    const auto& form = entry.second;
    Same(Launch(form.first,
                [&](Packer& p) {
                  Common(p);
                  Key(p, "args");
                  p.pack_array(0);
                  form.second(p);
                }),
         what);
  }
  // Without each of the common fields, with a kernel of 0, a bad block, a
  // grid of two, another op, and a byte after the map.
  for (int variant = 0; variant < 9; ++variant) {
    std::string m = Launch(variant < 5 ? 5 : 6, [&](Packer& p) {
      const char* keys[] = {"op", "rid", "kernel", "grid", "block"};
      for (int k = 0; k < 5; ++k) {
        if (variant == k) continue;
        Key(p, keys[k]);
        if (k == 0) Key(p, variant == 8 ? "free" : "launch");
        if (k == 1) p.pack(5);
        if (k == 2) p.pack(variant == 5 ? 0 : 2);
        if (k == 3) {
          if (variant == 7) {
            p.pack_array(2);
            p.pack(1);
            p.pack(1);
          } else {
            Dims(p, 1, 1, 1);
          }
        }
        if (k == 4) Dims(p, variant == 6 ? 2048 : 32, 1, 1);
      }
      Key(p, "args");
      p.pack_array(0);
    });
    Same(m, "variant " + std::to_string(variant));
    Same(m + '\0', "variant " + std::to_string(variant) + " and a byte after");
  }
  // Numbers in wider formats than they need, and positive numbers in signed
  // formats: what the packer would not choose, but another client might.
  const std::string base = Launch(6, [](Packer& p) {
    Common(p, 0x11);
    Key(p, "args");
    p.pack_array(0);
  });
  const size_t at = base.find('\x11');
  ASSERT_NE(at, std::string::npos);
  for (const std::string& wide :
       {std::string("\xcc\x11", 2), std::string("\xcd\x00\x11", 3),
        std::string("\xce\x00\x00\x00\x11", 5), std::string("\xcf\0\0\0\0\0\0\0\x11", 9),
        std::string("\xd0\x11", 2), std::string("\xd3\0\0\0\0\0\0\0\x11", 9),
        std::string("\xd0\xef", 2), std::string("\xd0\x00", 2), std::string("\xd1\0\0", 3),
        std::string("\xca\x41\x88\x00\x00", 5)}) {
    Same(base.substr(0, at) + wide + base.substr(at + 1), "rid as " + wide);
  }
  // Maps and arrays in their 16-bit formats.
  std::string map16 = base;
  map16.replace(0, 1, std::string("\xde\x00\x06", 3));
  Same(map16, "map16");
  std::printf("compared %zu messages, %zu of them accepted\n", compared_, accepted_);
}

}  // namespace
}  // namespace gpuq::schema
