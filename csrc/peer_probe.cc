// PeerProbe: the posted question, the answers, and one round of asking. Past construction its
// MPI calls are best effort, deliberately unchecked: a probe explains a timeout and must not
// replace it with another error (a failed call reads as "did not answer").
#include "peer_probe.h"

#include "common/backoff.h"
#include "common/error.h"
#include "common/mpi_lifecycle.h"

namespace dpsgs {

namespace {
constexpr int kQuestionTag = 1;
constexpr int kAnswerTagBase = 100;  // + round % kRounds: a late answer cannot match a later round
constexpr int kRounds = 10000;
}  // namespace

PeerProbe::PeerProbe(MPI_Comm parent, int rank, State state) : rank_(rank), state_(std::move(state)) {
  DPSGS_CHECK_MPI(MPI_Comm_dup(parent, &comm_), rank_, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), rank_, kNoPeer);
  DPSGS_CHECK_MPI(MPI_Irecv(question_, 2, MPI_INT64_T, MPI_ANY_SOURCE, kQuestionTag, comm_, &recv_), rank_,
                  kNoPeer);
}

PeerProbe::~PeerProbe() {
  if (!mpi_alive()) return;
  release();
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void PeerProbe::release() noexcept {
  if (!mpi_alive()) return;
  if (recv_ != MPI_REQUEST_NULL) {
    MPI_Cancel(&recv_);
    MPI_Wait(&recv_, MPI_STATUS_IGNORE);
  }
  for (auto& a : answers_) MPI_Request_free(&a.first);
  answers_.clear();
}

void PeerProbe::answer() {
  for (size_t i = 0; i < answers_.size();) {  // answers delivered
    int done = 0;
    MPI_Test(&answers_[i].first, &done, MPI_STATUS_IGNORE);
    if (done) {
      answers_[i] = std::move(answers_.back());
      answers_.pop_back();
    } else {
      ++i;
    }
  }
  for (;;) {
    int flag = 0;
    MPI_Status st;
    if (recv_ == MPI_REQUEST_NULL || MPI_Test(&recv_, &flag, &st) != MPI_SUCCESS || !flag) return;
    auto [completed, in_flight] = state_();
    answers_.emplace_back(MPI_REQUEST_NULL, std::vector<int64_t>{question_[0], completed, in_flight});
    auto& a = answers_.back();
    MPI_Isend(a.second.data(), 3, MPI_INT64_T, st.MPI_SOURCE, kAnswerTagBase + int(question_[0] % kRounds), comm_,
              &a.first);
    MPI_Irecv(question_, 2, MPI_INT64_T, MPI_ANY_SOURCE, kQuestionTag, comm_, &recv_);
  }
}

std::string PeerProbe::ask(const std::vector<int>& peers, int64_t seq, double window_s, const Label& label) {
  const int64_t round = ++round_;
  const int tag = kAnswerTagBase + int(round % kRounds);
  int64_t question[2] = {round, int64_t(rank_)};
  std::vector<std::vector<int64_t>> got(peers.size(), std::vector<int64_t>(3, -2));
  std::vector<MPI_Request> recvs(peers.size(), MPI_REQUEST_NULL), sends(peers.size(), MPI_REQUEST_NULL);
  for (size_t i = 0; i < peers.size(); ++i) {
    MPI_Irecv(got[i].data(), 3, MPI_INT64_T, peers[i], tag, comm_, &recvs[i]);
    MPI_Isend(question, 2, MPI_INT64_T, peers[i], kQuestionTag, comm_, &sends[i]);
  }
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(window_s));
  Backoff backoff;
  for (;;) {
    bool all = true;
    for (auto& r : recvs) {
      if (r == MPI_REQUEST_NULL) continue;
      int flag = 0;
      MPI_Test(&r, &flag, MPI_STATUS_IGNORE);
      all = all && flag;
    }
    answer();  // the peers ask us at the same time
    if (all || Clock::now() >= until) break;
    backoff.pause();
  }
  for (auto& r : recvs)
    if (r != MPI_REQUEST_NULL) {
      MPI_Cancel(&r);
      MPI_Wait(&r, MPI_STATUS_IGNORE);
    }
  for (auto& s : sends)
    if (s != MPI_REQUEST_NULL) MPI_Request_free(&s);  // a question to a stopped rank stays queued for it
  std::string missing, elsewhere, with_us;
  for (size_t i = 0; i < peers.size(); ++i) {
    const auto& a = got[i];
    const std::string who = label(peers[i]);
    if (a[0] != round) {
      missing += (missing.empty() ? "" : ", ") + who;
    } else if (seq >= 0 && a[2] == seq) {
      with_us += (with_us.empty() ? "" : ", ") + who;
    } else {
      elsewhere += str_cat(elsewhere.empty() ? "" : "; ", who, " is alive but ",
                           a[2] >= 0 ? str_cat("in collective #", a[2]) : std::string("in no collective"), " (",
                           a[1], " collectives completed)");
    }
  }
  std::string out;
  if (!missing.empty()) out = str_cat(missing, " did not answer a probe within ", window_s, " s (stopped, hung or dead)");
  if (!elsewhere.empty()) out += (out.empty() ? "" : "; ") + elsewhere;
  if (!with_us.empty()) out += str_cat(out.empty() ? "" : "; ", with_us, " waiting in it too");
  return out;
}

}  // namespace dpsgs
