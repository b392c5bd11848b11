// MpiStore: request/reply encoding, the client's call with a deadline, rank 0's server loop.
#include "mpi_store.h"

#include <sched.h>
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <set>

#include "common/backoff.h"
#include "common/error.h"
#include "common/mpi_lifecycle.h"
#include "common/mpi_wait.h"

namespace dpsgs {

namespace {
constexpr int kRequestTag = 11;
constexpr int kReplyTag = 12;
constexpr long kMaxIdleSleepNs = 2000000;  // the idle server looks every 2 ms at most

std::mutex g_stores_mu;
std::set<MpiStore*> g_stores;

void put_i64(std::vector<char>& b, int64_t v) {
  const char* p = reinterpret_cast<const char*>(&v);
  b.insert(b.end(), p, p + sizeof v);
}

void put_str(std::vector<char>& b, const std::string& s) {
  put_i64(b, int64_t(s.size()));
  b.insert(b.end(), s.begin(), s.end());
}

struct Reader {
  const char* p;
  const char* end;
  int64_t i64() {
    DPSGS_CHECK_ARG(end - p >= 8, "MpiStore: truncated message");
    int64_t v;
    std::memcpy(&v, p, 8);
    p += 8;
    return v;
  }
  std::string str() {
    int64_t n = i64();
    DPSGS_CHECK_ARG(n >= 0 && end - p >= n, "MpiStore: truncated message");
    std::string s(p, size_t(n));
    p += n;
    return s;
  }
};

std::vector<char> recv_matched(MPI_Message* msg, MPI_Status* st, int rank) {
  int count = 0;
  MPI_Get_count(st, MPI_BYTE, &count);
  std::vector<char> buf(size_t(std::max(count, 0)));
  DPSGS_CHECK_MPI(MPI_Mrecv(buf.data(), count, MPI_BYTE, msg, MPI_STATUS_IGNORE), rank, st->MPI_SOURCE);
  return buf;
}

std::string quoted(const std::vector<std::string>& keys) {
  std::string out;
  for (const auto& k : keys) out += (out.empty() ? "'" : ", '") + k + "'";
  return out;
}

const char* op_name(MpiStore::Op op) {
  switch (op) {
    case MpiStore::Op::Set: return "set";
    case MpiStore::Op::Get: return "get";
    case MpiStore::Op::Add: return "add";
    case MpiStore::Op::CompareSet: return "compare_set";
    case MpiStore::Op::Check: return "check";
    case MpiStore::Op::Wait: return "wait";
    case MpiStore::Op::Delete: return "delete_key";
    case MpiStore::Op::NumKeys: return "num_keys";
    case MpiStore::Op::Append: return "append";
  }
  return "?";
}
}  // namespace

MpiStore::MpiStore(MPI_Comm parent, double timeout_s) : timeout_s_(timeout_s) {
  DPSGS_CHECK_ARG(parent != MPI_COMM_NULL, "MpiStore: got MPI_COMM_NULL");
  DPSGS_CHECK_MPI(MPI_Comm_rank(parent, &rank_), rank_, kNoPeer);
  // Every rank arrives within the deadline first: MPI_Comm_dup itself would wait forever.
  MPI_Request req;
  DPSGS_CHECK_MPI(MPI_Ibarrier(parent, &req), rank_, kNoPeer);
  wait_mpi_request(&req, rank_, kNoPeer, timeout_s, 0, [this] {
    return str_cat("rank ", rank_, ": MpiStore construction (some rank did not reach the mpi:// rendezvous)");
  });
  DPSGS_CHECK_MPI(MPI_Comm_dup(parent, &comm_), rank_, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), rank_, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Comm_size(comm_, &size_), rank_, kNoPeer);
  if (rank_ == 0) server_ = std::thread([this] { serve(); });
  std::lock_guard<std::mutex> lock(g_stores_mu);
  g_stores.insert(this);
}

MpiStore::~MpiStore() {
  {
    std::lock_guard<std::mutex> lock(g_stores_mu);
    g_stores.erase(this);
  }
  shutdown();
  if (mpi_alive() && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void MpiStore::shutdown() noexcept {
  stop_ = true;
  if (server_.joinable()) server_.join();
  if (!mpi_alive()) return;
  for (auto& s : sends_) MPI_Request_free(&s.first);
  sends_.clear();
}

MpiStore::Reply MpiStore::call(Op op, const std::vector<std::string>& strings, int64_t number, double timeout_s,
                               const std::string& what) {
  std::lock_guard<std::mutex> lock(client_mu_);
  const int64_t id = ++next_id_;
  auto request = std::make_unique<std::vector<char>>();
  put_i64(*request, int64_t(op));
  put_i64(*request, id);
  put_i64(*request, number);
  put_i64(*request, int64_t(strings.size()));
  for (const auto& s : strings) put_str(*request, s);
  DPSGS_CHECK_ARG(request->size() <= size_t(INT32_MAX), what, ": request of ", request->size(), " bytes too large");
  MPI_Request sreq = MPI_REQUEST_NULL;
  DPSGS_CHECK_MPI(MPI_Isend(request->data(), int(request->size()), MPI_BYTE, 0, kRequestTag, comm_, &sreq),
                  rank_, 0);
  Reply reply;
  try {
    poll_until([&] {
      if (stop_) throw CommError(what + ": the store was shut down");
      if (sreq != MPI_REQUEST_NULL) {
        int done = 0;
        DPSGS_CHECK_MPI(MPI_Test(&sreq, &done, MPI_STATUS_IGNORE), rank_, 0);
      }
      int flag = 0;
      MPI_Message msg;
      MPI_Status st;
      DPSGS_CHECK_MPI(MPI_Improbe(0, kReplyTag, comm_, &flag, &msg, &st), rank_, 0);
      if (!flag) return false;
      std::vector<char> buf = recv_matched(&msg, &st, rank_);
      Reader r{buf.data(), buf.data() + buf.size()};
      if (r.i64() != id) return false;  // the late answer to a call that timed out
      reply.status = r.i64();
      reply.number = r.i64();
      reply.value = r.str();
      return true;
    }, timeout_s, 0, [&] { return what; });
    while (sreq != MPI_REQUEST_NULL) {  // answered, so rank 0 has the request: completes at once
      int done = 0;
      DPSGS_CHECK_MPI(MPI_Test(&sreq, &done, MPI_STATUS_IGNORE), rank_, 0);
    }
  } catch (...) {
    if (sreq != MPI_REQUEST_NULL && mpi_alive()) {
      MPI_Request_free(&sreq);
      request.release();  // MPI may still read it: leak rather than free under it
    }
    throw;
  }
  if (reply.status == 2) throw CommError(what + ": " + reply.value);
  return reply;
}

namespace {
std::string describe(int rank, MpiStore::Op op, const std::vector<std::string>& keys) {
  return str_cat("rank ", rank, ": MPI store ", op_name(op), "(", quoted(keys),
                 ") (rank 0 serves the store: the key was never set, or rank 0 has stopped)");
}
}  // namespace

void MpiStore::set(const std::string& key, const std::string& value) {
  call(Op::Set, {key, value}, 0, timeout_s_, describe(rank_, Op::Set, {key}));
}

std::string MpiStore::get(const std::string& key, double timeout_s) {
  return call(Op::Get, {key}, 0, timeout_s, describe(rank_, Op::Get, {key})).value;
}

int64_t MpiStore::add(const std::string& key, int64_t delta) {
  return call(Op::Add, {key}, delta, timeout_s_, describe(rank_, Op::Add, {key})).number;
}

std::string MpiStore::compare_set(const std::string& key, const std::string& expected, const std::string& desired) {
  return call(Op::CompareSet, {key, expected, desired}, 0, timeout_s_, describe(rank_, Op::CompareSet, {key})).value;
}

bool MpiStore::check(const std::vector<std::string>& keys) {
  return call(Op::Check, keys, 0, timeout_s_, describe(rank_, Op::Check, keys)).status == 0;
}

void MpiStore::wait(const std::vector<std::string>& keys, double timeout_s) {
  call(Op::Wait, keys, 0, timeout_s, describe(rank_, Op::Wait, keys));
}

bool MpiStore::delete_key(const std::string& key) {
  return call(Op::Delete, {key}, 0, timeout_s_, describe(rank_, Op::Delete, {key})).status == 0;
}

int64_t MpiStore::num_keys() { return call(Op::NumKeys, {}, 0, timeout_s_, describe(rank_, Op::NumKeys, {})).number; }

void MpiStore::append(const std::string& key, const std::string& value) {
  call(Op::Append, {key, value}, 0, timeout_s_, describe(rank_, Op::Append, {key}));
}

// ---- server (rank 0)

void MpiStore::reply(int source, int64_t id, const Reply& r) {
  std::vector<char> b;
  put_i64(b, id);
  put_i64(b, r.status);
  put_i64(b, r.number);
  put_str(b, r.value);
  sends_.emplace_back(MPI_REQUEST_NULL, std::move(b));
  auto& s = sends_.back();
  DPSGS_CHECK_MPI(MPI_Isend(s.second.data(), int(s.second.size()), MPI_BYTE, source, kReplyTag, comm_, &s.first),
                  rank_, source);
}

bool MpiStore::ready(const Waiter& w) const {
  return std::all_of(w.keys.begin(), w.keys.end(), [this](const std::string& k) { return data_.count(k) > 0; });
}

void MpiStore::answer_waiters() {
  for (size_t i = 0; i < waiters_.size();) {
    if (!ready(waiters_[i])) {
      ++i;
      continue;
    }
    Reply r;
    if (waiters_[i].op == Op::Get) r.value = data_[waiters_[i].keys[0]];
    reply(waiters_[i].source, waiters_[i].id, r);
    waiters_.erase(waiters_.begin() + long(i));
  }
}

bool MpiStore::handle(int source, int64_t id, Op op, std::vector<std::string>& s, int64_t number) {
  Reply r;
  bool changed = false;
  switch (op) {
    case Op::Set:
      data_[s.at(0)] = s.at(1);
      changed = true;
      break;
    case Op::Append:
      data_[s.at(0)] += s.at(1);
      changed = true;
      break;
    case Op::Add: {
      auto it = data_.find(s.at(0));
      int64_t v = 0;
      if (it != data_.end()) {
        try {
          v = std::stoll(it->second);
        } catch (...) {
          r.status = 2;
          r.value = "add on a key that does not hold an integer";
          break;
        }
      }
      v += number;
      data_[s.at(0)] = std::to_string(v);
      r.number = v;
      changed = true;
      break;
    }
    case Op::CompareSet: {
      auto it = data_.find(s.at(0));
      if ((it == data_.end() && s.at(1).empty()) || (it != data_.end() && it->second == s.at(1))) {
        data_[s.at(0)] = s.at(2);
        r.value = s.at(2);
        changed = true;
      } else {
        r.value = it == data_.end() ? s.at(1) : it->second;
      }
      break;
    }
    case Op::Check:
      r.status = std::all_of(s.begin(), s.end(), [this](const std::string& k) { return data_.count(k) > 0; }) ? 0 : 1;
      break;
    case Op::Delete:
      r.status = data_.erase(s.at(0)) ? 0 : 1;
      break;
    case Op::NumKeys:
      r.number = int64_t(data_.size());
      break;
    case Op::Get:
    case Op::Wait: {
      Waiter w{source, id, op, s};
      if (!ready(w)) {
        waiters_.push_back(std::move(w));
        return false;
      }
      if (op == Op::Get) r.value = data_[s.at(0)];
      break;
    }
  }
  reply(source, id, r);
  return changed;
}

void MpiStore::serve() {
  long idle_ns = 0;
  Clock::time_point last = Clock::now();
  while (!stop_) {
    bool progressed = false;
    try {
      int flag = 0;
      MPI_Message msg;
      MPI_Status st;
      DPSGS_CHECK_MPI(MPI_Improbe(MPI_ANY_SOURCE, kRequestTag, comm_, &flag, &msg, &st), rank_, kNoPeer);
      if (flag) {
        std::vector<char> buf = recv_matched(&msg, &st, rank_);
        Reader r{buf.data(), buf.data() + buf.size()};
        Op op = Op(r.i64());
        int64_t id = r.i64(), number = r.i64(), n = r.i64();
        std::vector<std::string> strings;
        for (int64_t i = 0; i < n; ++i) strings.push_back(r.str());
        if (handle(st.MPI_SOURCE, id, op, strings, number)) answer_waiters();
        progressed = true;
      }
      for (size_t i = 0; i < sends_.size();) {
        int done = 0;
        DPSGS_CHECK_MPI(MPI_Test(&sends_[i].first, &done, MPI_STATUS_IGNORE), rank_, kNoPeer);
        if (done) {
          sends_[i] = std::move(sends_.back());
          sends_.pop_back();
        } else {
          ++i;
        }
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "[dpsgs] rank 0: MPI store server: %s\n", e.what());
      std::fflush(stderr);
    }
    if (progressed) {
      idle_ns = 0;
      last = Clock::now();
      continue;
    }
    // Just after a request more usually follow (a rendezvous is a burst): yield for 1 ms,
    // then sleep in growing steps up to 2 ms, so an idle job costs rank 0 nothing.
    if (std::chrono::duration<double>(Clock::now() - last).count() < 1e-3) {
      sched_yield();
      continue;
    }
    idle_ns = idle_ns == 0 ? 20000 : std::min(idle_ns * 2, kMaxIdleSleepNs);
    timespec ts{0, idle_ns};
    nanosleep(&ts, nullptr);
  }
}

void shutdown_all_stores() noexcept {
  std::set<MpiStore*> live;
  {
    std::lock_guard<std::mutex> lock(g_stores_mu);
    live = g_stores;
  }
  for (auto* s : live) s->shutdown();
}

}  // namespace dpsgs
