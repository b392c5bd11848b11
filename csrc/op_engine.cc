// OpEngine: the ordered issue of operations; their progress by the engine thread or a waiter;
// timeouts that name the missing rank (peer_probe.*).
#include "op_engine.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <cstdio>
#include <set>

#include "common/backoff.h"
#include "common/error.h"
#include "common/mpi_lifecycle.h"

namespace dpsgs {

namespace {
constexpr auto kIdleProbeCheck = std::chrono::milliseconds(50);  // an idle engine still answers probes
std::mutex g_engines_mu;
std::set<OpEngine*> g_engines;
Clock::time_point after(double s) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}
}  // namespace

// OpWork::wait lives here: it drives the engine.
void OpWork::wait(double timeout_s) {
  if (auto engine = engine_.lock()) engine->drive(*this, timeout_s);
  else StateWork::wait(timeout_s);
}

// ---- OpEngine

OpEngine::OpEngine(std::shared_ptr<Communicator> comm, EngineOptions opt)
    : comm_(std::move(comm)), opt_(opt), completions_(std::make_shared<CompletionThread>()) {
  DPSGS_CHECK_ARG(comm_ != nullptr, "OpEngine: communicator is None");
  const int r = comm_->rank();
  // Arrival has a deadline (MPI_Comm_dup has none): the Communicator's barrier.
  comm_->barrier();
  for (MPI_Comm* c : {&coll_, &p2p_}) {
    DPSGS_CHECK_MPI(MPI_Comm_dup(comm_->p2p(), c), r, kNoPeer);
    DPSGS_CHECK_MPI(MPI_Comm_set_errhandler(*c, MPI_ERRORS_RETURN), r, kNoPeer);
  }
  probe_ = std::make_unique<PeerProbe>(comm_->p2p(), r, [this] {
    std::lock_guard<std::mutex> lock(mu_);
    return std::make_pair(int64_t(completed_seq_), collective_active_ ? active_seq_ : int64_t(-1));
  });
  int* ub = nullptr;
  int flag = 0;
  DPSGS_CHECK_MPI(MPI_Comm_get_attr(p2p_, MPI_TAG_UB, &ub, &flag), r, kNoPeer);
  if (flag && ub) tag_ub_ = *ub;
  timeout_s_ = comm_->timeout();
  probe_window_s_ = std::min(opt_.probe_s, timeout_s_ / 4);
  // The ring reads its deadline from the Communicator (this engine's own): it gives up a probe
  // window early, so that its error, probe included, comes at the group's deadline.
  if (timeout_s_ > 0) comm_->set_timeout(timeout_s_ - probe_window_s_);
  thread_ = std::thread([this] { loop(); });
  std::lock_guard<std::mutex> lock(g_engines_mu);
  g_engines.insert(this);
}

OpEngine::~OpEngine() {
  {
    std::lock_guard<std::mutex> lock(g_engines_mu);
    g_engines.erase(this);
  }
  shutdown();
  if (!mpi_alive()) return;
  probe_.reset();
  for (MPI_Comm* c : {&coll_, &p2p_})
    if (*c != MPI_COMM_NULL) MPI_Comm_free(c);
}

uint64_t OpEngine::issued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return next_seq_ + p2p_count_;
}

std::string OpEngine::describe(const OpSpec& s, uint64_t seq) const {
  using K = OpSpec::Kind;
  const int me = comm_->rank();
  std::string head = str_cat(comm_->label(me), ": dpsgs ", kind_name(s.kind));
  if (s.is_p2p()) {
    const Buffer& b = s.kind == K::Send ? s.send : s.recv;
    return str_cat(head, s.kind == K::Send ? " to " : " from ", comm_->label(s.peer), " (tag ", s.tag, ", ",
                   b.bytes, " bytes)");
  }
  head = str_cat(head, " #", seq);
  switch (s.kind) {
    case K::Allreduce:
      head = str_cat(head, " (", red_op_name(s.red), ", ", s.recv.bytes, " bytes ", dtype_name(s.recv.dtype),
                     s.ring ? ", ring" : "", ")");
      break;
    case K::ReduceScatter:
      head = str_cat(head, " (", red_op_name(s.red), ", ", s.send.bytes, " bytes ", dtype_name(s.send.dtype), ")");
      break;
    case K::Broadcast: head = str_cat(head, " (", s.recv.bytes, " bytes from ", comm_->label(s.peer), ")"); break;
    case K::Reduce:
      head = str_cat(head, " (", red_op_name(s.red), ", ", s.recv.bytes, " bytes ", dtype_name(s.recv.dtype), " to ",
                     comm_->label(s.peer), ")");
      break;
    case K::Gather: head = str_cat(head, " (", s.send.bytes, " bytes to ", comm_->label(s.peer), ")"); break;
    case K::Scatter: head = str_cat(head, " (", s.recv.bytes, " bytes from ", comm_->label(s.peer), ")"); break;
    case K::Allgather:
    case K::Alltoall: head = str_cat(head, " (", s.send.bytes, " bytes in, ", s.recv.bytes, " out)"); break;
    default: break;
  }
  return str_cat(head, " over ", comm_->size(), " ranks");
}

std::string OpEngine::waited_for(const OpSpec& s) const {
  if (s.is_p2p()) return comm_->label(s.peer);
  std::string out;
  for (int r = 0; r < comm_->size(); ++r)
    if (r != comm_->rank()) out += (out.empty() ? "" : ", ") + comm_->label(r);
  return out;
}

void OpEngine::retire(Owner owner) {
  if (!owner) return;
  std::lock_guard<std::mutex> lock(retired_mu_);
  retired_.push_back(std::move(owner));
}

std::shared_ptr<OpWork> OpEngine::submit(OpSpec spec, Owner owner, bool wake) {
  const bool p2p = spec.is_p2p();
  std::vector<Owner> ended;  // released when this call returns, on the caller's thread
  {
    std::lock_guard<std::mutex> lock(retired_mu_);
    ended.swap(retired_);
  }
  if (!p2p && spec.kind == OpSpec::Kind::Allreduce && spec.red == RedOp::Sum && spec.recv.dtype != DType::Bool &&
      spec.recv.bytes >= opt_.ring_from_bytes)
    spec.ring = true;
  std::unique_lock<std::mutex> lock(mu_);
  uint64_t seq = p2p ? p2p_count_ : next_seq_;
  const std::string what = describe(spec, seq);
  check_op(spec, comm_->rank(), comm_->size(), what);  // before numbering: a refused call is no operation
  owner = unalias(spec, comm_->rank(), std::move(owner));
  DPSGS_CHECK_ARG(!p2p || spec.tag <= tag_ub_, what, ": tag above MPI_TAG_UB (", tag_ub_, ")");
  ++(p2p ? p2p_count_ : next_seq_);
  auto work = std::make_shared<OpWork>(what, timeout_s_, comm_->warn_after(), completions_, weak_from_this());
  Pending p;
  p.work = work;
  p.spec = std::move(spec);
  p.owner = std::move(owner);
  p.seq = seq;
  if (stop_) {
    lock.unlock();
    work->finish(std::make_exception_ptr(CommError(what + ": cancelled (the backend was shut down)")));
    return work;
  }
  if (!p2p && !broken_.empty()) {
    ++completed_seq_;
    lock.unlock();
    work->finish(std::make_exception_ptr(
        CommError(what + ": not run because an earlier collective of this group failed: " + broken_)));
    return work;
  }
  // Size 1: nothing moves (a collective's result is its input; a send to oneself is matched
  // by MPI like any other, so p2p still goes through MPI).
  if (!p2p && comm_->size() == 1 && p.spec.kind != OpSpec::Kind::Allgather &&
      p.spec.kind != OpSpec::Kind::ReduceScatter && p.spec.kind != OpSpec::Kind::Alltoall &&
      p.spec.kind != OpSpec::Kind::Gather && p.spec.kind != OpSpec::Kind::Scatter) {
    ++completed_seq_;
    lock.unlock();
    work->finish(nullptr);
    return work;
  }
  if (p2p || (!collective_active_ && queued_.empty() && !p.spec.ring)) {
    // Started here, at once, in call order; whoever drives the engine tests it from now on.
    if (!p2p) {
      collective_active_ = true;
      active_seq_ = int64_t(seq);
    }
    try {
      start(p);
    } catch (...) {
      if (!p2p) {
        collective_active_ = false;
        ++completed_seq_;
        broken_ = "it failed to start";
      }
      lock.unlock();
      work->finish(std::current_exception());
      return work;
    }
    incoming_.push_back(std::move(p));
  } else {
    queued_.push_back(std::move(p));
  }
  lock.unlock();
  if (wake) cv_.notify_one();
  return work;
}

void OpEngine::start(Pending& p) {
  p.deadline = timeout_s_ > 0 ? after(timeout_s_) : Clock::time_point::max();
  p.probe_at = timeout_s_ > 0 ? after(timeout_s_ - probe_window_s_) : Clock::time_point::max();
  if (!p.spec.ring) {
    MPI_Comm c = p.spec.is_p2p() ? p2p_ : coll_;
    p.req = start_op(p.spec, c, comm_->rank());
  }
}

void OpEngine::fail(Pending& p, std::exception_ptr e, bool stream_broken) {
  if (stream_broken) {
    std::lock_guard<std::mutex> lock(mu_);
    if (broken_.empty()) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& ex) {
        broken_ = ex.what();
      }
    }
  }
  if (p.req != MPI_REQUEST_NULL && p.spec.kind == OpSpec::Kind::Recv) {
    MPI_Cancel(&p.req);  // a receive can be withdrawn; its buffer is free again
    MPI_Wait(&p.req, MPI_STATUS_IGNORE);
  } else if (p.req != MPI_REQUEST_NULL || p.spec.ring) {
    // MPI may still read or write the buffer (a ring leaves its sends running): keep it for good
    if (p.req != MPI_REQUEST_NULL) MPI_Request_free(&p.req);
    new Owner(std::move(p.owner));  // deliberate leak: the memory must outlive the request
  }
  retire(std::move(p.owner));
  p.work->finish(e);
}

bool OpEngine::test(Pending& p) {
  const int me = comm_->rank();
  const int peer = p.spec.is_p2p() ? p.spec.peer : kNoPeer;
  try {
    int flag = 0;
    MPI_Status status;
    DPSGS_CHECK_MPI(MPI_Test(&p.req, &flag, &status), me, peer);
    if (flag) {
      if (p.spec.kind == OpSpec::Kind::Recv) {
        int got = 0;
        MPI_Get_count(&status, MPI_BYTE, &got);
        if (size_t(got) != p.spec.recv.bytes)
          throw ValueError(str_cat(p.work->describe(), ": the message holds ", got, " bytes, the tensor ",
                                   p.spec.recv.bytes, " (a send and a recv of different sizes)"));
      }
      retire(std::move(p.owner));
      p.work->finish(nullptr);
      return true;
    }
    auto now = Clock::now();
    if (now >= p.probe_at && p.probed.empty()) {
      p.probed = probe_peers(p);  // then tested again: it may still complete before the deadline
      return false;
    }
    if (now < p.deadline) return false;
    throw CommTimeout(timed_out(p.work->describe(), p.probed));
  } catch (...) {
    fail(p, std::current_exception(), !p.spec.is_p2p());
    return true;
  }
}

// What the probe found about the ranks `p` waits for (named in full if it found nothing).
std::string OpEngine::probe_peers(const Pending& p) {
  std::vector<int> peers;
  if (p.spec.is_p2p()) peers.push_back(p.spec.peer);
  else
    for (int r = 0; r < comm_->size(); ++r)
      if (r != comm_->rank()) peers.push_back(r);
  std::string found = probe_->ask(peers, p.spec.is_p2p() ? -1 : int64_t(p.seq), probe_window_s_,
                                  [this](int r) { return comm_->label(r); });
  return found.empty() ? "waiting for " + waited_for(p.spec) : found;
}

// Timeouts read "<operation> did not complete within T s: <what the probe found>".
std::string OpEngine::timed_out(const std::string& what, const std::string& probed) const {
  return str_cat(what, " did not complete within ", timeout_s_, " s: ", probed);
}

// One pass of the progress engine; the caller holds drive_mu_ (the engine thread or a waiter).
bool OpEngine::iterate() {
  bool progressed = false;
  Pending ring;
  bool run_ring = false;
  {
    std::unique_lock<std::mutex> lock(mu_);
    for (auto& p : incoming_) active_.push_back(std::move(p));
    incoming_.clear();
    while (!collective_active_ && !queued_.empty()) {
      Pending next = std::move(queued_.front());
      queued_.pop_front();
      progressed = true;
      if (!broken_.empty()) {  // queued before the stream broke: not run either
        ++completed_seq_;
        auto e = std::make_exception_ptr(CommError(
            next.work->describe() + ": not run because an earlier collective of this group failed: " + broken_));
        retire(std::move(next.owner));
        lock.unlock();
        next.work->finish(e);
        lock.lock();
        continue;
      }
      collective_active_ = true;
      active_seq_ = int64_t(next.seq);
      if (next.spec.ring) {
        ring = std::move(next);
        run_ring = true;
        break;
      }
      try {
        start(next);
        active_.push_back(std::move(next));
      } catch (...) {
        collective_active_ = false;
        ++completed_seq_;
        if (broken_.empty()) broken_ = "a collective failed to start";
        lock.unlock();
        next.work->finish(std::current_exception());
        lock.lock();
      }
    }
  }
  if (run_ring) {
    start(ring);
    std::exception_ptr error;
    try {
      ring_allreduce(*comm_, coll_, ring.spec.recv, 1, opt_.ring, [&] { return ring.work->describe(); });
    } catch (const CommTimeout&) {
      std::string who = probe_peers(ring);
      error = std::make_exception_ptr(CommTimeout(timed_out(ring.work->describe(), who)));
    } catch (...) {
      error = std::current_exception();
    }
    if (error) {
      fail(ring, error, true);
    } else {
      retire(std::move(ring.owner));
      ring.work->finish(nullptr);
    }
    std::lock_guard<std::mutex> lock(mu_);
    collective_active_ = false;
    ++completed_seq_;
  }
  for (size_t i = 0; i < active_.size();) {
    if (!test(active_[i])) {
      ++i;
      continue;
    }
    if (!active_[i].spec.is_p2p()) {
      std::lock_guard<std::mutex> lock(mu_);
      collective_active_ = false;
      ++completed_seq_;
    }
    active_.erase(active_.begin() + long(i));
    progressed = true;
  }
  probe_->answer();
  active_count_.store(active_.size(), std::memory_order_release);
  return progressed;
}

void OpEngine::loop() {
  sched_param batch{};  // as the Communicator's progress thread: never preempt the Python thread
  pthread_setschedparam(pthread_self(), SCHED_BATCH, &batch);
  Backoff backoff(Backoff::kTransferYieldSeconds, Backoff::kTransferSpinSeconds);
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      auto work_to_do = [&] {
        return drivers_ == 0 && (active_count_.load(std::memory_order_acquire) > 0 || !incoming_.empty() ||
                                 (!collective_active_ && !queued_.empty()));
      };
      while (!stop_ && !work_to_do()) {
        if (cv_.wait_for(lock, kIdleProbeCheck, [&] { return stop_ || work_to_do(); })) break;
        if (drivers_ > 0) continue;  // a waiter drives, and answers probes meanwhile
        lock.unlock();
        {
          std::lock_guard<std::mutex> drive(drive_mu_);
          probe_->answer();
        }
        lock.lock();
      }
      if (stop_) return;
    }
    bool progressed;
    {
      std::lock_guard<std::mutex> drive(drive_mu_);
      progressed = iterate();
    }
    if (progressed) backoff = Backoff(Backoff::kTransferYieldSeconds, Backoff::kTransferSpinSeconds);
    else backoff.pause();
  }
}

void OpEngine::drive(OpWork& work, double timeout_s) {
  // Default deadline: a little after the operation's own (the engine fails it at the group's
  // timeout, naming the peer); an explicit one is the caller's.
  const double t = timeout_s < 0 ? (timeout_s_ > 0 ? timeout_s_ * 1.05 + 0.5 : 0.0) : timeout_s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ++drivers_;
  }
  struct Leave {  // the engine thread takes over again when the last waiter leaves
    OpEngine& e;
    ~Leave() {
      {
        std::lock_guard<std::mutex> lock(e.mu_);
        --e.drivers_;
      }
      e.cv_.notify_all();
    }
  } leave{*this};
  const auto start = Clock::now();
  Backoff backoff(Backoff::kTransferYieldSeconds, Backoff::kTransferSpinSeconds);
  double next_check = kInterruptCheckSeconds;
  while (!work.ended()) {
    bool progressed;
    {
      std::lock_guard<std::mutex> drive(drive_mu_);
      progressed = iterate();
    }
    if (work.ended()) break;
    const double waited = std::chrono::duration<double>(Clock::now() - start).count();
    if (t > 0 && waited >= t) throw CommTimeout(timeout_message(work.describe(), t));
    if (waited >= next_check) {
      check_interrupt();  // Ctrl-C on Python's main thread
      next_check = waited + kInterruptCheckSeconds;
    }
    if (progressed) backoff = Backoff(Backoff::kTransferYieldSeconds, Backoff::kTransferSpinSeconds);
    else backoff.pause();
  }
  work.is_completed();  // rethrows the operation's error
}

void OpEngine::shutdown() noexcept {
  std::deque<Pending> dropped;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ && !thread_.joinable()) return;
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) {
    if (thread_.get_id() == std::this_thread::get_id()) thread_.detach();
    else thread_.join();
  }
  std::lock_guard<std::mutex> drive(drive_mu_);  // a waiter may be in an iteration
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& p : active_) dropped.push_back(std::move(p));
    for (auto& p : incoming_) dropped.push_back(std::move(p));
    for (auto& p : queued_) dropped.push_back(std::move(p));
    active_.clear();
    incoming_.clear();
    queued_.clear();
  }
  const bool alive = mpi_alive();
  if (!dropped.empty()) {
    std::fprintf(stderr, "[dpsgs] %s: ERROR: the torch backend shut down with %zu operation(s) pending; "
                 "they fail\n", comm_->label(comm_->rank()).c_str(), dropped.size());
    std::fflush(stderr);
  }
  for (auto& p : dropped) {
    auto e = std::make_exception_ptr(CommError(p.work->describe() + ": cancelled (the backend was shut down)"));
    if (alive) {
      fail(p, e, true);
    } else {
      new Owner(std::move(p.owner));  // MPI is gone with its requests; the memory may stay mapped
      p.work->finish(e);
    }
  }
  if (alive) probe_->release();
  completions_->stop();
  std::lock_guard<std::mutex> lock(retired_mu_);
  retired_.clear();  // the caller's thread (atexit, or the engine's owner)
}

void shutdown_all_engines() noexcept {
  std::set<OpEngine*> live;
  {
    std::lock_guard<std::mutex> lock(g_engines_mu);
    live = g_engines;
  }
  for (auto* e : live) e->shutdown();
}

}  // namespace dpsgs
