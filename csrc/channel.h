// Channel: directed, ordered, double-buffered point-to-point queue of messages (tuples of arrays)
// with header checks.
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
#include "channel_header.h"
#include "common/message.h"
#include "communicator.h"
#include "common/work.h"

namespace dpsgs {

constexpr size_t kDefaultSlotCapacity = 65536;

// Deterministic growth shared by both ends: the sender mirrors the receiver's slot capacity.
size_t grow_capacity(size_t cap, size_t nbytes);

struct SendOp;

// One direction between two ranks of a Communicator, identified by (peer, tag). Exactly one
// sender and one receiver construct it with the same tag (and slot capacity); each tag uses
// MPI tags 4*tag..4*tag+3 on the communicator's p2p duplicate. A message is 1..kMaxMessageTensors
// buffers; sent/received/in_flight count messages. Not thread-safe across threads calling
// send/recv on the same end concurrently (one caller thread per end, as in a pipeline).
class Channel {
 public:
  Channel(std::shared_ptr<Communicator> comm, int peer, int tag, bool is_sender, std::string name,
          size_t capacity = kDefaultSlotCapacity);
  ~Channel();  // never throws; reports unfinished sends / unread messages on stderr
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Sender: Isends of the message's buffers (zero-copy for those that do not travel inline);
  // `owners` (one per buffer) are kept until complete. Blocks (politely, deadline) while two
  // messages are in flight.
  std::shared_ptr<Work> send(const std::vector<Buffer>& bufs, std::vector<Owner> owners);

  struct Received {
    void* ptr;
    size_t bytes;
    DType dtype;
    std::vector<int64_t> shape;
    std::shared_ptr<void> storage;  // keeps the slot memory alive (a later message may overwrite it)
  };
  // Receiver: the next message in order, one entry per tensor. With `expect`, checks the count
  // and each tensor's dtype and shape (HeaderMismatch naming the tensor index), after the
  // whole message has arrived, so the channel stays usable.
  std::vector<Received> recv(const std::optional<std::vector<TensorSpec>>& expect);

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
    std::shared_ptr<uint8_t> head;   // header + inline payloads
    std::shared_ptr<uint8_t> data;   // the first separate payload (pre-posted)
    size_t cap = 0;
    size_t offset = 0;               // the payload receive was posted at data + offset
    std::shared_ptr<uint8_t> extra;  // the other separate payloads, each at its sender's page offset
    size_t extra_cap = 0;
    MPI_Request hreq = MPI_REQUEST_NULL;
    MPI_Request preq = MPI_REQUEST_NULL;
    std::vector<MPI_Request> big;    // receives on tag_big posted after the header
    bool need_repost_head = false;
    bool need_repost_data = false;
  };
  void post_head(Slot& s);
  void post_data(Slot& s, int slot_index);
  // After the header of message #seq: the payloads of its separate tensors into `out`.
  void receive_separate(Slot& s, uint64_t seq, const MsgHeader* h, const std::vector<size_t>& separate,
                        std::vector<Received>& out);
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
