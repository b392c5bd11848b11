// Channel: wire protocol, receiver slots (pre-posted, double-buffered), sender in-flight bound.
//
// Protocol, per message #seq going to receiver slot s = seq % 2:
//   INLINE   (nbytes <= kInlineBytes): one message on tag_head = header + payload copy.
//   SEPARATE (nbytes <= slot capacity): header on tag_head, payload on tag_data[s] straight
//            into the receiver's pre-posted slot buffer (zero-copy both ends).
//   OVERSIZE (nbytes > slot capacity): header, an empty message on tag_data[s] that consumes the
//            pre-posted payload receive, then the payload on tag_big; the receiver grows slot s
//            to grow_capacity(cap, nbytes) and receives it there after reading the header.
// Both ends apply the same growth rule, so the sender always knows the receiver's capacity.
// Page alignment: MPICH moves large payloads with one kernel copy (CMA), which runs at ~17
// GB/s when source and destination sit at the same offset within a page and ~10 GB/s when
// they do not (bench, 16 MiB). Slots have a page of slack; each payload receive is posted at
// the page offset the sender's last payload had (carried in the header), which a stream of
// tensors from one allocator repeats. A wrong guess costs speed only, never correctness.
// Header receives are posted in sequence order on one tag (MPI's non-overtaking rule keeps
// the matching); each slot's payload receive has its own tag and stays posted until consumed.
#include "channel.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/backoff.h"
#include "common/error.h"
#include "common/host_memory.h"
#include "common/mpi_lifecycle.h"

namespace dpsgs {

namespace {
constexpr uint32_t kMagic = 0x44505347;  // "DPSG"
constexpr uint32_t kInline = 1, kSeparate = 2, kOversize = 4;
constexpr double kPayloadSpinSeconds = 2e-3;
constexpr double kPayloadYieldSeconds = 0.05;
constexpr double kAssumedCopyBytesPerSecond = 2e9;

// How to poll for a message part of `payload_bytes` (0: a header or inline message).
// Large payloads move only while this rank calls into MPI (MPICH copies them piecewise in
// progress calls, on both ends), so a pause mid-copy stalls the transfer: spin for about
// the time the copy should take, then yield, then sleep.
struct Polling {
  double yield_s, spin_s;
};
Polling polling_for(size_t payload_bytes) {
  if (payload_bytes <= kInlineBytes) return {Backoff::kDefaultYieldSeconds, Backoff::kDefaultSpinSeconds};
  return {kPayloadYieldSeconds, kPayloadSpinSeconds + double(payload_bytes) / kAssumedCopyBytesPerSecond};
}

std::shared_ptr<uint8_t> alloc_bytes(size_t n) {
  return std::shared_ptr<uint8_t>(static_cast<uint8_t*>(host_alloc(n)), [](uint8_t* q) { std::free(q); });
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}
}  // namespace

size_t grow_capacity(size_t cap, size_t nbytes) {
  size_t want = (nbytes + 4095) & ~size_t(4095);
  return want > 2 * cap ? want : 2 * cap;
}

// One message's sends. Its requests are tested by the channel and by Work handles, so a mutex
// guards them; the owner is released outside the mutex (its deleter may take the GIL).
struct SendOp {
  std::mutex mu;
  MPI_Request reqs[3] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  bool done = false;
  Owner owner;
  std::shared_ptr<uint8_t> head;
  uint64_t seq = 0;
  size_t bytes = 0;
  int rank = 0, peer = 0;

  bool test() {
    Owner release;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (done) return true;
      int flag = 0;
      DPSGS_CHECK_MPI(MPI_Testall(3, reqs, &flag, MPI_STATUSES_IGNORE), rank, peer);
      if (!flag) return false;
      done = true;
      release = std::move(owner);
      head.reset();
    }
    return true;
  }
};

namespace {
// The description is formatted only when needed (errors, repr): send() stays cheap.
class SendWork : public Work {
 public:
  SendWork(std::shared_ptr<SendOp> op, std::shared_ptr<const std::string> channel, double timeout_s,
           double warn_after_s)
      : Work(timeout_s, warn_after_s), op_(std::move(op)), channel_(std::move(channel)) {}
  bool is_completed() override { return op_->test(); }
  void wait(double timeout_s = -1.0) override {
    Polling p = polling_for(op_->bytes);
    poll_until([this] { return op_->test(); }, timeout_s < 0 ? timeout_s_ : timeout_s, warn_after_s_,
               [this] { return describe(); }, p.yield_s, p.spin_s);
  }
  std::string describe() const override {
    return str_cat("rank ", op_->rank, ": Channel '", *channel_, "' send #", op_->seq, " to rank ", op_->peer);
  }

 private:
  std::shared_ptr<SendOp> op_;
  std::shared_ptr<const std::string> channel_;
};
}  // namespace

Channel::Channel(std::shared_ptr<Communicator> comm, int peer, int tag, bool is_sender, std::string name,
                 size_t capacity)
    : comm_(std::move(comm)), peer_(peer), tag_(tag), is_sender_(is_sender), name_(std::move(name)) {
  DPSGS_CHECK_ARG(comm_ != nullptr, "Channel: communicator is None");
  rank_ = comm_->rank();
  if (name_.empty()) name_ = is_sender ? str_cat(rank_, "->", peer) : str_cat(peer, "->", rank_);
  shared_name_ = std::make_shared<const std::string>(name_);
  DPSGS_CHECK_ARG(peer >= 0 && peer < comm_->size() && peer != rank_, "Channel '", name_, "' on rank ", rank_,
                  ": peer ", peer, " must be another rank in [0, ", comm_->size(), ")");
  int* ub = nullptr;
  int found = 0;
  DPSGS_CHECK_MPI(MPI_Comm_get_attr(comm_->p2p(), MPI_TAG_UB, &ub, &found), rank_, peer);
  long max_tag = found ? (*ub - 3) / 4 : 32767 / 4;
  DPSGS_CHECK_ARG(tag >= 0 && tag <= max_tag, "Channel '", name_, "' on rank ", rank_, ": tag ", tag,
                  " out of range [0, ", max_tag, "]");
  DPSGS_CHECK_ARG(capacity >= kInlineBytes, "Channel '", name_, "': capacity ", capacity, " < ", kInlineBytes);
  tag_head_ = 4 * tag;
  tag_data_[0] = 4 * tag + 1;
  tag_data_[1] = 4 * tag + 2;
  tag_big_ = 4 * tag + 3;
  cap_[0] = cap_[1] = capacity;
  if (!is_sender_) {
    for (int i = 0; i < 2; ++i) {
      slots_[i].head = alloc_bytes(kHeaderBytes + kInlineBytes);
      slots_[i].cap = capacity;
      slots_[i].data = alloc_bytes(capacity + kPageBytes);
      post_head(slots_[i]);
      post_data(slots_[i], i);
    }
  }
}

Channel::~Channel() {
  if (!mpi_alive()) return;
  try {
    if (is_sender_) {
      // Give unfinished sends a short grace (the receiver is normally draining them).
      for (auto& op : inflight_) {
        Backoff b;
        while (!op->test() && b.elapsed() < 5.0) b.pause();
        if (!op->test()) {
          std::fprintf(stderr, "[dpsgs] rank %d: ERROR: %s destroyed with send #%llu still in flight "
                       "(receiver rank %d never received it); its buffer is leaked to keep MPI safe\n",
                       rank_, describe_end().c_str(), (unsigned long long)op->seq, peer_);
          new std::shared_ptr<SendOp>(op);  // deliberate leak: MPI may still read the buffer
        }
      }
    } else {
      for (int i = 0; i < 2; ++i) {
        Slot& s = slots_[i];
        for (MPI_Request* r : {&s.hreq, &s.preq}) {
          if (*r == MPI_REQUEST_NULL) continue;
          int flag = 0;
          MPI_Test(r, &flag, MPI_STATUS_IGNORE);
          if (flag && r == &s.hreq) {
            std::fprintf(stderr, "[dpsgs] rank %d: WARNING: %s destroyed with an unread message from rank %d "
                         "(received %llu)\n", rank_, describe_end().c_str(), peer_,
                         (unsigned long long)received_);
          }
          if (!flag) {
            MPI_Cancel(r);
            MPI_Wait(r, MPI_STATUS_IGNORE);
          }
        }
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[dpsgs] rank %d: ERROR while destroying %s: %s\n", rank_, describe_end().c_str(), e.what());
  }
}

std::string Channel::describe_end() const {
  int src = is_sender_ ? rank_ : peer_, dst = is_sender_ ? peer_ : rank_;
  return str_cat("Channel '", name_, "' (", comm_->label(src), " -> ", comm_->label(dst), ", tag ", tag_, ")");
}

std::string Channel::op_name(const char* op, uint64_t seq) const {
  return str_cat(comm_->label(rank_), ": Channel '", name_, "' ", op, " #", seq, is_sender_ ? " to " : " from ",
                 comm_->label(peer_));
}

void Channel::post_head(Slot& s) {
  DPSGS_CHECK_MPI(MPI_Irecv(s.head.get(), int(kHeaderBytes + kInlineBytes), MPI_BYTE, peer_, tag_head_,
                            comm_->p2p(), &s.hreq), rank_, peer_);
  s.need_repost_head = false;
}

void Channel::post_data(Slot& s, int i) {
  s.offset = expect_page_offset_;
  DPSGS_CHECK_MPI(MPI_Irecv(s.data.get() + s.offset, int(s.cap), MPI_BYTE, peer_, tag_data_[i], comm_->p2p(),
                            &s.preq), rank_, peer_);
  s.need_repost_data = false;
}

void Channel::wait_req(MPI_Request* req, const char* part, uint64_t seq, size_t payload_bytes) {
  Polling p = polling_for(payload_bytes);
  wait_request(req, *comm_, [&] { return op_name(part, seq); }, peer_, -1.0, p.yield_s, p.spin_s);
}

void Channel::reap_completed() {
  while (!inflight_.empty() && inflight_.front()->test()) inflight_.pop_front();
}

int Channel::in_flight() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!is_sender_) return 0;
  reap_completed();
  return int(inflight_.size());
}

std::shared_ptr<Work> Channel::send(const Buffer& buf, Owner owner) {
  std::lock_guard<std::mutex> lock(mu_);
  DPSGS_CHECK_ARG(is_sender_, describe_end(), ": send() called on the receiving end (rank ", rank_, ")");
  DPSGS_CHECK_ARG(buf.device == Device::CPU, describe_end(), ": send of a CUDA buffer over the MPI channel; "
                  "use the NCCL backend");
  DPSGS_CHECK_ARG(buf.shape.size() <= size_t(kMaxDims), describe_end(), ": ", buf.shape.size(),
                  " dims exceed the maximum of ", kMaxDims);
  DPSGS_CHECK_ARG(buf.bytes <= size_t(INT32_MAX), describe_end(), ": message of ", buf.bytes,
                  " bytes exceeds 2 GiB - 1");
  reap_completed();
  while (inflight_.size() >= 2) {  // the two-in-flight bound: wait for the oldest
    auto& oldest = inflight_.front();
    Polling p = polling_for(oldest->bytes);
    poll_until([&] { return oldest->test(); }, comm_->timeout(), comm_->warn_after(),
               [&] { return op_name("send", oldest->seq) + " (third send waiting for the oldest)"; }, p.yield_s,
               p.spin_s);
    inflight_.pop_front();
  }
  uint64_t seq = sent_;
  int s = int(seq % 2);
  auto op = std::make_shared<SendOp>();
  op->seq = seq;
  op->bytes = buf.bytes;
  op->rank = rank_;
  op->peer = peer_;
  bool inl = buf.bytes <= kInlineBytes;
  op->head = alloc_bytes(kHeaderBytes + (inl ? buf.bytes : 0));
  auto* h = reinterpret_cast<MsgHeader*>(op->head.get());
  std::memset(h, 0, kHeaderBytes);
  h->magic = kMagic;
  h->seq = seq;
  h->dtype = int32_t(buf.dtype);
  h->ndim = int32_t(buf.shape.size());
  h->nbytes = buf.bytes;
  h->src_page_offset = uint32_t(reinterpret_cast<uintptr_t>(buf.ptr) % kPageBytes);
  for (size_t i = 0; i < buf.shape.size(); ++i) h->shape[i] = buf.shape[i];
  MPI_Comm c = comm_->p2p();
  if (inl) {
    h->flags = kInline;
    if (buf.bytes) std::memcpy(op->head.get() + kHeaderBytes, buf.ptr, buf.bytes);
    DPSGS_CHECK_MPI(MPI_Isend(op->head.get(), int(kHeaderBytes + buf.bytes), MPI_BYTE, peer_, tag_head_, c,
                              &op->reqs[0]), rank_, peer_);
  } else if (buf.bytes <= cap_[s]) {
    h->flags = kSeparate;
    op->owner = std::move(owner);
    DPSGS_CHECK_MPI(MPI_Isend(op->head.get(), int(kHeaderBytes), MPI_BYTE, peer_, tag_head_, c, &op->reqs[0]),
                    rank_, peer_);
    DPSGS_CHECK_MPI(MPI_Isend(buf.ptr, int(buf.bytes), MPI_BYTE, peer_, tag_data_[s], c, &op->reqs[1]),
                    rank_, peer_);
  } else {
    h->flags = kOversize;
    op->owner = std::move(owner);
    DPSGS_CHECK_MPI(MPI_Isend(op->head.get(), int(kHeaderBytes), MPI_BYTE, peer_, tag_head_, c, &op->reqs[0]),
                    rank_, peer_);
    DPSGS_CHECK_MPI(MPI_Isend(nullptr, 0, MPI_BYTE, peer_, tag_data_[s], c, &op->reqs[1]), rank_, peer_);
    DPSGS_CHECK_MPI(MPI_Isend(buf.ptr, int(buf.bytes), MPI_BYTE, peer_, tag_big_, c, &op->reqs[2]), rank_, peer_);
    cap_[s] = grow_capacity(cap_[s], buf.bytes);
  }
  ++sent_;
  inflight_.push_back(op);
  return std::make_shared<SendWork>(op, shared_name_, comm_->timeout(), comm_->warn_after());
}

Channel::Received Channel::recv(std::optional<DType> expect_dtype,
                                const std::optional<std::vector<int64_t>>& expect_shape) {
  std::lock_guard<std::mutex> lock(mu_);
  DPSGS_CHECK_ARG(!is_sender_, describe_end(), ": recv() called on the sending end (rank ", rank_, ")");
  // Re-post the slot the user was holding: it will take message #received_+1.
  if (held_ >= 0) {
    Slot& old = slots_[held_];
    if (old.need_repost_head) post_head(old);
    if (old.need_repost_data) post_data(old, held_);
    held_ = -1;
  }
  uint64_t seq = received_;
  int si = int(seq % 2);
  Slot& s = slots_[si];
  wait_req(&s.hreq, "recv", seq);
  s.need_repost_head = true;
  held_ = si;
  ++received_;
  auto* h = reinterpret_cast<MsgHeader*>(s.head.get());
  if (h->magic != kMagic || h->seq != seq) {
    throw CommError(str_cat(op_name("recv", seq), ": corrupt stream: got ",
                            h->magic == kMagic ? str_cat("message #", h->seq) : std::string("a foreign message"),
                            " (is another channel using tag ", tag_, " between these ranks?)"));
  }
  if (h->flags != kInline) expect_page_offset_ = h->src_page_offset % kPageBytes;
  DType dt = static_cast<DType>(h->dtype);
  std::vector<int64_t> shape(h->shape, h->shape + (h->ndim > 0 && h->ndim <= kMaxDims ? h->ndim : 0));
  Received out{nullptr, size_t(h->nbytes), dt, shape, nullptr};
  if (h->flags == kInline) {
    out.ptr = s.head.get() + kHeaderBytes;
    out.storage = s.head;
  } else {
    // The header is here, so the payload is in flight and moves only while this thread drives
    // MPI progress (the receiver copies, single-copy CMA).
    wait_req(&s.preq, "recv payload", seq, h->flags == kSeparate ? size_t(h->nbytes) : 1);
    s.need_repost_data = true;
    if (h->flags == kOversize) {
      s.cap = grow_capacity(s.cap, h->nbytes);
      s.data = alloc_bytes(s.cap + kPageBytes);
      s.offset = h->src_page_offset % kPageBytes;
      MPI_Request big;
      DPSGS_CHECK_MPI(MPI_Irecv(s.data.get() + s.offset, int(h->nbytes), MPI_BYTE, peer_, tag_big_, comm_->p2p(), &big),
                      rank_, peer_);
      wait_req(&big, "recv oversize payload", seq, size_t(h->nbytes));
    }
    out.ptr = s.data.get() + s.offset;
    out.storage = s.data;
  }
  if (expect_dtype && *expect_dtype != dt) {
    throw HeaderMismatch(str_cat(describe_end(), " message #", seq, " on ", comm_->label(rank_), " from ", comm_->label(peer_),
                             ": expected dtype ", dtype_name(*expect_dtype), " shape ",
                             expect_shape ? shape_str(*expect_shape) : std::string("(any)"),
                             " but received dtype ", dtype_name(dt), " shape ", shape_str(shape)));
  }
  if (expect_shape && *expect_shape != shape) {
    throw HeaderMismatch(str_cat(describe_end(), " message #", seq, " on ", comm_->label(rank_), " from ", comm_->label(peer_),
                             ": expected shape ", shape_str(*expect_shape), " dtype ",
                             expect_dtype ? dtype_name(*expect_dtype) : "(any)", " but received shape ",
                             shape_str(shape), " dtype ", dtype_name(dt)));
  }
  return out;
}

}  // namespace dpsgs
