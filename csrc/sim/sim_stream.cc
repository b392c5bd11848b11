// Simulated streams and events (see sim_stream.h).
#include "sim/sim_stream.h"

#include <cstdio>
#include <map>
#include <thread>
#include <vector>

#include <cuda_runtime.h>

#include "sim/sim.h"

struct CUstream_st {
  uint64_t id;
};
struct CUevent_st {
  uint64_t id;
};

namespace dpsgs::sim {

uint64_t EventState::record() {
  std::lock_guard<std::mutex> lock(mu_);
  return ++recorded_;
}

void EventState::complete(uint64_t generation) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (generation > completed_) {
      completed_ = generation;
      at_ = Clock::now();
    }
  }
  cv_.notify_all();
}

bool EventState::done(uint64_t generation) const {
  std::lock_guard<std::mutex> lock(mu_);
  return completed_ >= generation;
}

bool EventState::done_all() const {
  std::lock_guard<std::mutex> lock(mu_);
  return completed_ >= recorded_;
}

uint64_t EventState::last() const {
  std::lock_guard<std::mutex> lock(mu_);
  return recorded_;
}

bool EventState::completed_at(Clock::time_point* at) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (completed_ < recorded_ || recorded_ == 0) return false;
  *at = at_;
  return true;
}

void EventState::wait(uint64_t generation, const std::function<bool()>& stop) {
  std::unique_lock<std::mutex> lock(mu_);
  while (completed_ < generation) {
    if (stop && stop()) return;
    cv_.wait_for(lock, std::chrono::milliseconds(1));
  }
}

Stream::Stream(int device, uint64_t id) : device_(device), id_(id), rng_(0x5eed0000ULL + id) {}

void Stream::start() {
  std::thread(&Stream::loop, shared_from_this()).detach();  // lives until retired and drained
}

std::string Stream::name() const {
  return "sim stream " + std::to_string(id_) + " (cuda:" + std::to_string(device_) + ")";
}

uint64_t Stream::enqueue(StreamOp op) {
  uint64_t pos;
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(op));
    pos = ++enqueued_;
  }
  cv_.notify_all();
  return pos;
}

uint64_t Stream::enqueued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return enqueued_;
}

bool Stream::idle() const {
  std::lock_guard<std::mutex> lock(mu_);
  return completed_ == enqueued_;
}

std::string Stream::running() const {
  std::lock_guard<std::mutex> lock(mu_);
  return running_;
}

void Stream::synchronize() {
  std::unique_lock<std::mutex> lock(mu_);
  uint64_t target = enqueued_;
  done_cv_.wait(lock, [&] { return completed_ >= target; });
}

void Stream::retire() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    retired_ = true;
  }
  cv_.notify_all();
}

void Stream::loop(std::shared_ptr<Stream> self) {
  for (;;) {
    StreamOp op;
    {
      std::unique_lock<std::mutex> lock(self->mu_);
      self->cv_.wait(lock, [&] { return self->retired_ || !self->queue_.empty(); });
      if (self->queue_.empty()) return;  // retired and drained
      op = std::move(self->queue_.front());
      self->queue_.pop_front();
      self->running_ = op.what;
    }
    if (op.delay) sleep_for(self->rng_.delay_s());
    try {
      op.run();
    } catch (const std::exception& e) {  // ops report their own errors; a bug net only
      std::fprintf(stderr, "[dpsgs-sim] %s: '%s' escaped with: %s\n", self->name().c_str(), op.what.c_str(),
                   e.what());
    }
    {
      std::lock_guard<std::mutex> lock(self->mu_);
      ++self->completed_;
      self->running_.clear();
    }
    self->done_cv_.notify_all();
  }
}

namespace {

struct Registry {
  std::mutex mu;
  uint64_t next_id = 1;
  std::map<const void*, std::shared_ptr<Stream>> streams;
  std::map<int, CUstream_st*> default_streams;
  std::map<const void*, std::shared_ptr<EventState>> events;
};

Registry& registry() {
  static auto* r = new Registry();  // never destroyed: workers and exit handlers use it
  return *r;
}

thread_local int tls_device = 0;

void* make_stream_locked(Registry& r, int device) {
  auto* token = new CUstream_st{r.next_id++};  // never freed: handles are never reused
  auto stream = std::make_shared<Stream>(device, token->id);
  stream->start();
  r.streams[token] = stream;
  return token;
}

}  // namespace

int current_device() { return tls_device; }
void set_current_device(int device) { tls_device = device; }

std::shared_ptr<Stream> find_stream(const void* handle) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (handle == nullptr || handle == cudaStreamLegacy || handle == cudaStreamPerThread) {
    auto& slot = r.default_streams[tls_device];
    if (slot == nullptr) slot = static_cast<CUstream_st*>(make_stream_locked(r, tls_device));
    handle = slot;
  }
  auto it = r.streams.find(handle);
  return it == r.streams.end() ? nullptr : it->second;
}

void* new_stream(int device) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return make_stream_locked(r, device);
}

bool destroy_stream(const void* handle) {
  std::shared_ptr<Stream> stream;
  {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.streams.find(handle);
    if (it == r.streams.end()) return false;
    for (auto& [device, token] : r.default_streams)
      if (token == handle) return false;  // the default streams are not the user's to destroy
    stream = it->second;
    r.streams.erase(it);
  }
  stream->retire();
  return true;
}

void for_each_stream(int device, const std::function<void(Stream&)>& fn) {
  std::vector<std::shared_ptr<Stream>> all;
  {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    for (auto& [h, s] : r.streams)
      if (s->device() == device) all.push_back(s);
  }
  for (auto& s : all) fn(*s);
}

std::shared_ptr<EventState> find_event(const void* handle) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.events.find(handle);
  return it == r.events.end() ? nullptr : it->second;
}

void* new_event(bool timing) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto* token = new CUevent_st{r.next_id++};
  r.events[token] = std::make_shared<EventState>(timing);
  return token;
}

bool destroy_event(const void* handle) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  return r.events.erase(handle) > 0;  // a pending record still completes: its op holds the state
}

}  // namespace dpsgs::sim
