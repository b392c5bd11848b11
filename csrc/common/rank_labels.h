// How error messages name the ranks of one communicator: "rank r" until labels are set, one
// per rank. The trainer sets "rank W (replica q, stage k)" (W: the rank in the job) on the
// world and on every stage group, so a message from any group names ranks as the job does.
// Shared by the MPI Communicator and the NcclCommunicator.
#pragma once

#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common/error.h"

namespace dpsgs {

class RankLabels {
 public:
  // `who` names the caller in the error for a wrong count ("Communicator.set_labels on rank 2").
  void set(std::vector<std::string> labels, int size, const std::string& who) {
    DPSGS_CHECK_ARG(labels.size() == size_t(size), who, ": ", labels.size(), " labels for ", size, " ranks");
    std::lock_guard<std::mutex> lock(mu_);
    labels_ = std::move(labels);
  }
  std::string operator()(int r) const {
    std::lock_guard<std::mutex> lock(mu_);
    if (r >= 0 && size_t(r) < labels_.size()) return labels_[size_t(r)];
    return "rank " + std::to_string(r);
  }
  bool empty() const {
    std::lock_guard<std::mutex> lock(mu_);
    return labels_.empty();
  }

 private:
  mutable std::mutex mu_;
  std::vector<std::string> labels_;
};

}  // namespace dpsgs
