// Channel: directed, ordered, double-buffered point-to-point queue of arrays with header checks.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/buffer.h"
#include "communicator.h"
#include "common/work.h"

namespace dpsgs {

constexpr int kMaxDims = 8;
constexpr size_t kHeaderBytes = 128;          // header padded so an inline payload is 64-byte aligned
constexpr size_t kInlineBytes = 8192;         // payloads up to this size travel inside the header message
constexpr size_t kDefaultSlotCapacity = 65536;
constexpr size_t kPageBytes = 4096;

// Wire header. flags says how the payload travels (see channel.cc).
struct MsgHeader {
  uint32_t magic;
  uint32_t flags;
  uint64_t seq;
  int32_t dtype;
  int32_t ndim;
  uint64_t nbytes;
  uint32_t src_page_offset;  // payload address mod kPageBytes on the sender (see channel.cc)
  uint32_t reserved;
  int64_t shape[kMaxDims];
};
static_assert(sizeof(MsgHeader) <= kHeaderBytes, "header must fit its padded size");

// Deterministic growth shared by both ends: the sender mirrors the receiver's slot capacity.
size_t grow_capacity(size_t cap, size_t nbytes);

struct SendOp;

// One direction between two ranks of a Communicator, identified by (peer, tag). Exactly one
// sender and one receiver construct it with the same tag (and slot capacity); each tag uses
// MPI tags 4*tag..4*tag+3 on the communicator's p2p duplicate. Not thread-safe across threads
// calling send/recv on the same end concurrently (one caller thread per end, as in a pipeline).
class Channel {
 public:
  Channel(std::shared_ptr<Communicator> comm, int peer, int tag, bool is_sender, std::string name,
          size_t capacity = kDefaultSlotCapacity);
  ~Channel();  // never throws; reports unfinished sends / unread messages on stderr
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Sender: Isend of buf (zero-copy above the inline size); `owner` is kept until complete.
  // Blocks (politely, deadline) while two sends are in flight.
  std::shared_ptr<Work> send(const Buffer& buf, Owner owner);

  struct Received {
    void* ptr;
    size_t bytes;
    DType dtype;
    std::vector<int64_t> shape;
    std::shared_ptr<void> storage;  // keeps the slot memory alive (a later message may overwrite it)
  };
  // Receiver: the next message in order; checks the header against the expectation when given.
  Received recv(std::optional<DType> expect_dtype, const std::optional<std::vector<int64_t>>& expect_shape);

  int in_flight();
  uint64_t sent() const { return sent_; }
  uint64_t received() const { return received_; }
  int peer() const { return peer_; }
  int tag() const { return tag_; }
  bool is_sender() const { return is_sender_; }
  const std::string& name() const { return name_; }
  std::string describe_end() const;  // "Channel 'x' (rank 0 -> rank 1, tag 3)"

 private:
  struct Slot {
    std::shared_ptr<uint8_t> head;   // header + inline payload
    std::shared_ptr<uint8_t> data;   // separate payload
    size_t cap = 0;
    size_t offset = 0;               // the payload receive was posted at data + offset
    MPI_Request hreq = MPI_REQUEST_NULL;
    MPI_Request preq = MPI_REQUEST_NULL;
    bool need_repost_head = false;
    bool need_repost_data = false;
  };
  void post_head(Slot& s);
  void post_data(Slot& s, int slot_index);
  // payload_bytes > 0: a payload known to be in flight (its header arrived); spin longer.
  void wait_req(MPI_Request* req, const char* part, uint64_t seq, size_t payload_bytes = 0);
  void reap_completed();
  std::string op_name(const char* op, uint64_t seq) const;

  std::shared_ptr<Communicator> comm_;
  int peer_, tag_;
  bool is_sender_;
  std::string name_;
  std::shared_ptr<const std::string> shared_name_;  // for Work descriptions
  int rank_;
  int tag_head_, tag_data_[2], tag_big_;
  size_t cap_[2];                        // sender: mirror of the receiver's slot capacities
  std::deque<std::shared_ptr<SendOp>> inflight_;
  Slot slots_[2];
  int held_ = -1;                        // receiver: slot whose view the user holds
  size_t expect_page_offset_ = 0;        // receiver: the sender's last payload page offset
  uint64_t sent_ = 0, received_ = 0;
  std::mutex mu_;
};

}  // namespace dpsgs
