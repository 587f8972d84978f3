#include "client/connection.h"

#include "schema/filename.h"

#include "util/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <random>

namespace gpuq::client_internal {

Status SendRequest(zmq::socket_t& socket, std::string_view header,
                   const std::vector<std::string_view>& payload) {
  const size_t n = 2 + payload.size();
  for (size_t i = 0; i < n; ++i) {
    const std::string_view part =
        i == 0 ? std::string_view(schema::kClientProtocol) : i == 1 ? header : payload[i - 2];
    const auto flags = i + 1 < n ? zmq::send_flags::sndmore : zmq::send_flags::none;
    for (;;) {
      try {
        (void)socket.send(zmq::buffer(part.data(), part.size()), flags);
        break;
      } catch (const zmq::error_t& e) {
        if (e.num() == EINTR) continue;
        return Error(Code::kUnavailable, std::string("send: ") + e.what());
      }
    }
  }
  return Status::Ok();
}

void PollOnce(zmq::pollitem_t* items, size_t count, std::chrono::milliseconds timeout) {
  try {
    zmq::poll(items, count, timeout);
  } catch (const zmq::error_t& e) {
    if (e.num() != EINTR) throw;
    for (size_t i = 0; i < count; ++i) items[i].revents = 0;
  }
}

StatusOr<zmq::socket_t> ConnectDealer(zmq::context_t& ctx, const std::string& endpoint,
                                      const ClientOptions& options, char tag) {
  try {
    zmq::socket_t s(ctx, zmq::socket_type::dealer);
    std::random_device rd;
    std::string id(16, '\0');
    for (char& c : id) c = static_cast<char>(rd());
    id[0] = tag;
    s.set(zmq::sockopt::routing_id, zmq::buffer(id));
    s.set(zmq::sockopt::linger, 0);
    s.set(zmq::sockopt::sndhwm, 1000000);
    s.set(zmq::sockopt::rcvhwm, 1000000);
    if (!options.server_key.empty()) {
      s.set(zmq::sockopt::curve_serverkey, options.server_key);
      s.set(zmq::sockopt::curve_publickey, options.public_key);
      s.set(zmq::sockopt::curve_secretkey, options.secret_key);
    }
    s.connect(endpoint);
    return s;
  } catch (const zmq::error_t& e) {
    return Error(Code::kUnavailable, "connect " + endpoint + ": " + e.what());
  }
}

JobResult ToResult(schema::ClientReply& r, std::vector<zmq::message_t>& frames) {
  JobResult out;
  out.id = r.id;
  out.state = r.state;
  out.code = r.code;
  out.error = std::move(r.error);
  out.device = std::move(r.device);
  out.attempts = r.attempts;
  out.timing = r.timing;
  out.output_args = std::move(r.outputs);
  for (size_t i = 2; i < frames.size(); ++i) {
    // The frame itself, moved to the heap: its bytes are not copied.
    auto frame = std::make_shared<zmq::message_t>(std::move(frames[i]));
    const char* data = static_cast<const char*>(frame->data());
    const size_t size = frame->size();
    out.outputs.emplace_back(std::move(frame), data, size);
  }
  for (const schema::LocalFile& f : r.files) {
    // Mapped, not read: the output's pages are the file's in the page cache.
    const int fd = open(f.name.c_str(), O_RDONLY | O_CLOEXEC);
    struct stat st {};
    void* p = MAP_FAILED;
    if (fd >= 0 && fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_size) == f.size) {
      p = f.size == 0 ? nullptr
                      : mmap(nullptr, f.size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
    }
    const int err = errno;
    if (fd >= 0) close(fd);
    if (p == MAP_FAILED) {
      out.state = schema::JobState::kFailed;
      out.code = Code::kIoError;
      out.error = "cannot map the output file " + f.name + ": " + std::strerror(err);
      out.outputs.clear();
      out.output_args.clear();
      return out;
    }
    const size_t size = f.size;
    std::shared_ptr<const void> mapping(p, [size](const void* q) {
      if (q) munmap(const_cast<void*>(q), size);
    });
    out.outputs.emplace_back(std::move(mapping), static_cast<const char*>(p), size);
  }
  return out;
}

StatusOr<std::vector<std::string>> UseLocalFiles(const std::string& dir, size_t min_bytes,
                                                 const std::vector<std::string_view>& inputs,
                                                 schema::JobSpec* spec,
                                                 std::vector<std::string_view>* frames,
                                                 LocalBuffers* buffers) {
  std::vector<std::string> made;
  auto undo = [&](Status s) {
    for (const std::string& p : made) (void)unlink(p.c_str());
    return s;
  };
  std::vector<size_t> small, large;
  for (size_t i = 0; i < inputs.size(); ++i) {
    (inputs[i].size() >= min_bytes ? large : small).push_back(i);
  }
  std::vector<uint32_t> index(inputs.size());
  for (size_t k = 0; k < small.size(); ++k) index[small[k]] = static_cast<uint32_t>(k);
  for (size_t k = 0; k < large.size(); ++k) {
    index[large[k]] = static_cast<uint32_t>(small.size() + k);
  }
  for (size_t i : large) {
    if (buffers) {
      auto it = buffers->live.find(inputs[i].data());
      if (it != buffers->live.end() && it->second.size == inputs[i].size()) {
        spec->files.push_back({it->second.name, inputs[i].size()});
        // The broker takes the file once it accepts the job; until then it
        // is among those made, which a submit not sent or refused removes
        // (the buffer no longer does: it may be gone by then).
        made.push_back(dir + "/" + it->second.name);
        buffers->live.erase(it);
        continue;
      }
    }
    const std::string name = schema::ClientFileName();
    const std::string path = dir + "/" + name;
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return undo(Error(Code::kIoError, path + ": " + std::strerror(errno)));
    made.push_back(path);
    const Status written = WriteAll(fd, inputs[i], path);
    close(fd);
    if (!written.ok()) return undo(written);
    spec->files.push_back({name, inputs[i].size()});
  }
  for (size_t i : small) frames->push_back(inputs[i]);
  for (schema::Arg& a : spec->buffer_list()) {
    if (a.in_region()) continue;  // its bytes stay where they are
    if ((a.kind == schema::ArgKind::kIn || a.kind == schema::ArgKind::kInOut) &&
        a.frame < index.size()) {
      if (a.kind == schema::ArgKind::kInOut && inputs[a.frame].size() >= min_bytes) {
        spec->local_out = true;
      }
      a.frame = index[a.frame];
    } else if (a.kind == schema::ArgKind::kOut && a.size >= min_bytes) {
      spec->local_out = true;
    }
  }
  return made;
}

}  // namespace gpuq::client_internal
