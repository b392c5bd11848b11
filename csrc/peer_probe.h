// PeerProbe: asks the ranks an operation waits for whether they are alive and where they are.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace dpsgs {

// On its own duplicate of a communicator, every rank keeps a receive posted for questions and
// answers them from whatever drives its engine, busy or idle (answer()): [round, collectives
// completed, collective in flight or -1]. A rank about to time out asks (ask()): a rank that
// does not answer within the window is stopped, hung or dead; one that answers is alive, in
// the same collective or elsewhere. Only the thread that drives the engine calls answer/ask.
class PeerProbe {
 public:
  // (collectives completed, collective in flight or -1): this rank's answer.
  using State = std::function<std::pair<int64_t, int64_t>()>;
  using Label = std::function<std::string(int)>;
  PeerProbe(MPI_Comm parent, int rank, State state);  // collective over `parent`
  ~PeerProbe();  // frees the duplicate (after release()); never throws
  PeerProbe(const PeerProbe&) = delete;
  PeerProbe& operator=(const PeerProbe&) = delete;

  void answer();
  // Asks `peers` and waits up to window_s for them, answering the others' questions meanwhile.
  // seq: the collective this rank waits in (-1: a send or receive). Returns what was found,
  // e.g. "rank 2 did not answer a probe within 1 s (stopped, hung or dead); rank 1 waiting
  // in it too"; "" when every peer answered as waiting in the same collective.
  std::string ask(const std::vector<int>& peers, int64_t seq, double window_s, const Label& label);
  void release() noexcept;  // withdraws the posted receive and frees answers in flight

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_;
  State state_;
  MPI_Request recv_ = MPI_REQUEST_NULL;
  int64_t question_[2] = {0, 0};
  std::vector<std::pair<MPI_Request, std::vector<int64_t>>> answers_;  // sends in flight
  int64_t round_ = 0;
};

}  // namespace dpsgs
