// MpiStore: the key-value store torch.distributed rendezvouses through, carried by MPI messages.
#pragma once

#include <mpi.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace dpsgs {

// Rank 0 of the communicator serves the keys from a thread; every rank (rank 0 too) is a
// client that sends one request at a time and waits for its answer. No socket, no port: the
// messages travel on a duplicate of the caller's communicator. Semantics are torch's Store
// (HashStore/TCPStore): get and wait block until the keys exist; add keeps a decimal integer;
// compare_set sets `desired` when the key holds `expected` (or is missing and `expected` is
// empty) and returns the value it now holds. Every client call has a deadline and throws
// CommTimeout naming the call, the key(s) and rank 0. Construction is collective; calls are
// thread-safe. The server polls politely: fast after a request, at most every 2 ms when idle.
class MpiStore {
 public:
  MpiStore(MPI_Comm parent, double timeout_s);
  ~MpiStore();  // never throws
  MpiStore(const MpiStore&) = delete;
  MpiStore& operator=(const MpiStore&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  double timeout() const { return timeout_s_; }
  void set_timeout(double t) { timeout_s_ = t; }

  void set(const std::string& key, const std::string& value);
  std::string get(const std::string& key, double timeout_s);
  int64_t add(const std::string& key, int64_t delta);
  std::string compare_set(const std::string& key, const std::string& expected, const std::string& desired);
  bool check(const std::vector<std::string>& keys);
  void wait(const std::vector<std::string>& keys, double timeout_s);
  bool delete_key(const std::string& key);
  int64_t num_keys();
  void append(const std::string& key, const std::string& value);
  // Stops the server (rank 0); later calls on any rank time out. Idempotent.
  void shutdown() noexcept;

  enum class Op : int64_t { Set, Get, Add, CompareSet, Check, Wait, Delete, NumKeys, Append };

 private:
  struct Reply {
    int64_t status = 0;  // 0 ok, 1 false (check, delete), 2 error (text in value)
    int64_t number = 0;
    std::string value;
  };
  struct Waiter {
    int source;
    int64_t id;
    Op op;
    std::vector<std::string> keys;
  };
  Reply call(Op op, const std::vector<std::string>& strings, int64_t number, double timeout_s,
             const std::string& what);
  void serve();
  bool handle(int source, int64_t id, Op op, std::vector<std::string>& s, int64_t number);
  void reply(int source, int64_t id, const Reply& r);
  void answer_waiters();
  bool ready(const Waiter& w) const;

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  std::atomic<double> timeout_s_;
  std::mutex client_mu_;
  int64_t next_id_ = 0;
  // server (rank 0): touched only by its thread
  std::map<std::string, std::string> data_;
  std::vector<Waiter> waiters_;
  std::vector<std::pair<MPI_Request, std::vector<char>>> sends_;
  std::atomic<bool> stop_{false};
  std::thread server_;
};

// Stops every store's server (the bindings' atexit hook, before mpi4py finalizes MPI).
void shutdown_all_stores() noexcept;

}  // namespace dpsgs
