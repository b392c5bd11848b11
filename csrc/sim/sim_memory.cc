// Simulated device and pinned host memory (see sim_memory.h).
#include "sim/sim_memory.h"

#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>

#include "sim/sim_settings.h"
#include "sim/sim_stream.h"

namespace dpsgs::sim {

namespace {
constexpr size_t kAlign = 256;                      // cudaMalloc's alignment
constexpr size_t kQuarantineBytes = 64u << 20;      // freed bytes held back before reuse

struct Block {
  size_t bytes;
  int device;  // -1: pinned host memory
};

struct Memory {
  std::mutex mu;
  std::map<const char*, Block> blocks;  // by start address
  std::deque<std::pair<void*, size_t>> quarantine;
  size_t quarantined = 0;
};

Memory& memory() {
  static auto* m = new Memory();
  return *m;
}

void* alloc(size_t bytes, int device) {
  size_t rounded = (std::max<size_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, rounded);
  if (p == nullptr) return nullptr;
  poison(p, rounded);
  auto& m = memory();
  std::lock_guard<std::mutex> lock(m.mu);
  m.blocks[static_cast<const char*>(p)] = Block{rounded, device};
  return p;
}

bool release(void* ptr, bool want_device) {
  auto& m = memory();
  std::lock_guard<std::mutex> lock(m.mu);
  auto it = m.blocks.find(static_cast<const char*>(ptr));
  if (it == m.blocks.end() || (it->second.device >= 0) != want_device) return false;
  size_t bytes = it->second.bytes;
  m.blocks.erase(it);
  poison(ptr, bytes);
  m.quarantine.emplace_back(ptr, bytes);
  m.quarantined += bytes;
  while (m.quarantined > kQuarantineBytes) {
    auto [old, n] = m.quarantine.front();
    m.quarantine.pop_front();
    m.quarantined -= n;
    std::free(old);
  }
  return true;
}
}  // namespace

void poison(void* ptr, size_t bytes) {
  if (bytes > 0) std::memset(ptr, settings().poison, bytes);
}

void* device_alloc(size_t bytes, int device) { return alloc(bytes, device); }
bool device_free(void* ptr) { return release(ptr, true); }
void* host_alloc(size_t bytes) { return alloc(bytes, -1); }
bool host_free(void* ptr) { return release(ptr, false); }

cudaPointerAttributes attributes(const void* ptr) {
  cudaPointerAttributes a{};
  a.type = cudaMemoryTypeDevice;
  a.device = current_device();
  a.devicePointer = const_cast<void*>(ptr);
  a.hostPointer = nullptr;
  auto& m = memory();
  std::lock_guard<std::mutex> lock(m.mu);
  auto it = m.blocks.upper_bound(static_cast<const char*>(ptr));
  if (it != m.blocks.begin()) {
    --it;
    if (static_cast<const char*>(ptr) < it->first + it->second.bytes) {
      if (it->second.device < 0) {
        a.type = cudaMemoryTypeHost;
        a.hostPointer = a.devicePointer;
      } else {
        a.device = it->second.device;
      }
    }
  }
  return a;
}

}  // namespace dpsgs::sim
