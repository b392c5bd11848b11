// Channel: wire protocol, receiver slots (pre-posted, double-buffered), sender in-flight bound.
//
// Protocol, per message #seq of tensors t_0..t_{n-1} going to receiver slot s = seq % 2:
//   The header message on tag_head: the header (count, each tensor's dtype, shape, bytes and
//   placement; channel_header.h), then the INLINE tensors copied in: taken in order, a tensor
//   is inline when it still fits in kInlineBytes (64-byte aligned; empty tensors always). A
//   message whose tensors all fit is this one MPI message.
//   The SEPARATE tensors, zero-copy from the caller's memory, each its own MPI message, in order:
//   - the first on tag_data[s], straight into the receiver's pre-posted slot buffer if it fits
//     the slot capacity; else (OVERSIZE, kFirstOversize) an empty message on tag_data[s]
//     consumes the pre-posted receive and the tensor follows on tag_big; the receiver grows
//     slot s to grow_capacity(cap, nbytes) after reading the header and receives it there.
//     Both ends apply the same growth rule, so the sender always knows the receiver's capacity.
//   - the others on tag_big, received (after the header) into the slot's `extra` buffer.
// So a one-tensor message travels exactly as before messages had several: inline up to
// kInlineBytes, else one zero-copy payload into the pre-posted slot. Why not pack several
// tensors into one payload: the pack is a copy of every byte on the sender (and the page
// offsets below are lost), while a further MPI message costs a rendezvous handshake of a few
// microseconds; docs/architecture.md has the measurements.
// Page alignment: MPICH moves large payloads with one kernel copy (CMA), which runs at ~17
// GB/s when source and destination sit at the same offset within a page and ~10 GB/s when
// they do not (bench, 16 MiB). Slots have a page of slack; the pre-posted payload receive is
// posted at the page offset the sender's last first-separate payload had (carried in the
// header), which a stream of tensors from one allocator repeats; the other separate tensors
// are received after the header, each at its own sender's page offset. A wrong guess costs
// speed only, never correctness.
// Header receives are posted in sequence order on one tag (MPI's non-overtaking rule keeps
// the matching); each slot's payload receive has its own tag and stays posted until consumed;
// tag_big is received in send order, one message at a time.
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

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }
}  // namespace

size_t grow_capacity(size_t cap, size_t nbytes) {
  size_t want = (nbytes + 4095) & ~size_t(4095);
  return want > 2 * cap ? want : 2 * cap;
}

// One message's sends. Its requests are tested by the channel and by Work handles, so a mutex
// guards them; the owner is released outside the mutex (its deleter may take the GIL).
struct SendOp {
  std::mutex mu;
  MPI_Request reqs[kMaxMessageTensors + 2];  // the header message, then the separate tensors' messages
  int nreqs = 0;
  bool done = false;
  std::vector<Owner> owners;       // of the separate tensors' buffers
  std::shared_ptr<uint8_t> head;
  uint64_t seq = 0;
  size_t bytes = 0;
  int rank = 0, peer = 0;

  bool test() {
    std::vector<Owner> release;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (done) return true;
      int flag = 0;
      DPSGS_CHECK_MPI(MPI_Testall(nreqs, reqs, &flag, MPI_STATUSES_IGNORE), rank, peer);
      if (!flag) return false;
      done = true;
      release = std::move(owners);
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
      slots_[i].head = alloc_bytes(kMaxHeaderBytes + kInlineBytes);
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
        for (MPI_Request& r : s.big) {  // left posted by a recv that failed (a timeout)
          if (r == MPI_REQUEST_NULL) continue;
          MPI_Cancel(&r);
          MPI_Wait(&r, MPI_STATUS_IGNORE);
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
  DPSGS_CHECK_MPI(MPI_Irecv(s.head.get(), int(kMaxHeaderBytes + kInlineBytes), MPI_BYTE, peer_, tag_head_,
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

std::shared_ptr<Work> Channel::send(const std::vector<Buffer>& bufs, std::vector<Owner> owners) {
  std::lock_guard<std::mutex> lock(mu_);
  DPSGS_CHECK_ARG(is_sender_, describe_end(), ": send() called on the receiving end (rank ", rank_, ")");
  check_message_length(bufs.size(), "got", [&] { return describe_end(); });
  DPSGS_CHECK_ARG(owners.size() == bufs.size(), describe_end(), ": ", owners.size(), " owners for ", bufs.size(),
                  " buffers");
  size_t count = bufs.size();
  for (size_t i = 0; i < count; ++i) {
    const Buffer& b = bufs[i];
    DPSGS_CHECK_ARG(b.device == Device::CPU, describe_end(), ": tensor ", i, " is a CUDA buffer; the MPI channel "
                    "takes host memory (use the NCCL backend)");
    DPSGS_CHECK_ARG(b.shape.size() <= size_t(kMaxDims), describe_end(), ": tensor ", i, " has ", b.shape.size(),
                    " dims; at most ", kMaxDims);
    DPSGS_CHECK_ARG(b.bytes <= size_t(INT32_MAX), describe_end(), ": tensor ", i, " of ", b.bytes,
                    " bytes exceeds 2 GiB - 1");
  }
  reap_completed();
  while (inflight_.size() >= 2) {  // the two-in-flight bound (messages): wait for the oldest
    auto& oldest = inflight_.front();
    Polling p = polling_for(oldest->bytes);
    poll_until([&] { return oldest->test(); }, comm_->timeout(), comm_->warn_after(),
               [&] { return op_name("send", oldest->seq) + " (third send waiting for the oldest)"; }, p.yield_s,
               p.spin_s);
    inflight_.pop_front();
  }
  MessageLayout l = layout_message(bufs);
  uint64_t seq = sent_;
  int s = int(seq % 2);
  auto op = std::make_shared<SendOp>();
  op->seq = seq;
  op->rank = rank_;
  op->peer = peer_;
  op->head = alloc_bytes(l.total());
  write_header(op->head.get(), bufs, seq, l);
  bool oversize = l.nsep > 0 && bufs[l.separate[0]].bytes > cap_[s];
  if (oversize) reinterpret_cast<MsgHeader*>(op->head.get())->flags = kFirstOversize;
  MPI_Comm c = comm_->p2p();
  op->nreqs = int(1 + l.nsep + (oversize ? 1 : 0));
  MPI_Request* r = op->reqs;
  DPSGS_CHECK_MPI(MPI_Isend(op->head.get(), int(l.total()), MPI_BYTE, peer_, tag_head_, c, r++), rank_, peer_);
  for (size_t j = 0; j < l.nsep; ++j) {
    const Buffer& b = bufs[l.separate[j]];
    op->bytes += b.bytes;
    op->owners.push_back(std::move(owners[l.separate[j]]));
    int tag = j == 0 && !oversize ? tag_data_[s] : tag_big_;
    if (j == 0 && oversize) {
      DPSGS_CHECK_MPI(MPI_Isend(nullptr, 0, MPI_BYTE, peer_, tag_data_[s], c, r++), rank_, peer_);
      cap_[s] = grow_capacity(cap_[s], b.bytes);
    }
    DPSGS_CHECK_MPI(MPI_Isend(b.ptr, int(b.bytes), MPI_BYTE, peer_, tag, c, r++), rank_, peer_);
  }
  ++sent_;
  inflight_.push_back(op);
  return std::make_shared<SendWork>(op, shared_name_, comm_->timeout(), comm_->warn_after());
}

std::vector<Channel::Received> Channel::recv(const std::optional<std::vector<TensorSpec>>& expect) {
  std::lock_guard<std::mutex> lock(mu_);
  DPSGS_CHECK_ARG(!is_sender_, describe_end(), ": recv() called on the sending end (rank ", rank_, ")");
  if (expect) check_message_length(expect->size(), "expected", [&] { return describe_end(); });
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
  if (h->magic != kChannelMagic || h->seq != seq) {
    throw CommError(str_cat(op_name("recv", seq), ": corrupt stream: got ",
                            h->magic == kChannelMagic ? str_cat("message #", h->seq) : std::string("a foreign message"),
                            " (is another channel using tag ", tag_, " between these ranks?)"));
  }
  if (!header_valid(h)) throw CommError(str_cat(op_name("recv", seq), ": corrupt stream: a malformed header"));
  size_t count = h->count, hbytes = header_bytes(count);
  const TensorHeader* th = tensor_headers(h);
  std::vector<Received> out(count);
  std::vector<size_t> separate;
  for (size_t i = 0; i < count; ++i) {
    out[i].bytes = size_t(th[i].nbytes);
    out[i].dtype = static_cast<DType>(th[i].dtype);
    out[i].shape.assign(th[i].shape, th[i].shape + th[i].ndim);
    if (th[i].separate) {
      separate.push_back(i);
    } else {
      out[i].ptr = s.head.get() + hbytes + th[i].offset;
      out[i].storage = s.head;
    }
  }
  if (!separate.empty()) receive_separate(s, seq, h, separate, out);
  if (expect) {
    std::vector<TensorSpec> received(count);
    for (size_t i = 0; i < count; ++i) received[i] = {out[i].dtype, out[i].shape};
    std::string diff = message_mismatch(*expect, received);
    if (!diff.empty())
      throw HeaderMismatch(str_cat(describe_end(), " message #", seq, " on ", comm_->label(rank_), " from ",
                                   comm_->label(peer_), ": ", diff));
  }
  return out;
}

void Channel::receive_separate(Slot& s, uint64_t seq, const MsgHeader* h, const std::vector<size_t>& separate,
                               std::vector<Received>& out) {
  const TensorHeader* th = tensor_headers(const_cast<MsgHeader*>(h));
  const TensorHeader& first = th[separate[0]];
  bool oversize = h->flags & kFirstOversize;
  // The header is here, so the first payload is in flight and moves only while this thread
  // drives MPI progress (the receiver copies, single-copy CMA).
  wait_req(&s.preq, "recv payload", seq, oversize ? 1 : size_t(first.nbytes));
  s.need_repost_data = true;
  expect_page_offset_ = first.src_page_offset % kPageBytes;
  if (oversize) {
    s.cap = grow_capacity(s.cap, first.nbytes);
    s.data = alloc_bytes(s.cap + kPageBytes);
    s.offset = first.src_page_offset % kPageBytes;
  }
  out[separate[0]].ptr = s.data.get() + s.offset;
  out[separate[0]].storage = s.data;
  // The rest on tag_big in send order, each at its sender's page offset in `extra`.
  std::vector<size_t> at(separate.size(), 0);
  size_t end = 0;
  for (size_t j = 1; j < separate.size(); ++j) {
    at[j] = round_up(end, kPageBytes) + th[separate[j]].src_page_offset % kPageBytes;
    end = at[j] + th[separate[j]].nbytes;
  }
  if (end > s.extra_cap) {
    s.extra_cap = grow_capacity(s.extra_cap, end);
    s.extra = alloc_bytes(s.extra_cap);
  }
  s.big.assign(separate.size(), MPI_REQUEST_NULL);
  MPI_Comm c = comm_->p2p();
  for (size_t j = 0; j < separate.size(); ++j) {
    if (j == 0 && !oversize) continue;
    const TensorHeader& t = th[separate[j]];
    uint8_t* dst = j == 0 ? s.data.get() + s.offset : s.extra.get() + at[j];
    DPSGS_CHECK_MPI(MPI_Irecv(dst, int(t.nbytes), MPI_BYTE, peer_, tag_big_, c, &s.big[j]), rank_, peer_);
    if (j > 0) {
      out[separate[j]].ptr = dst;
      out[separate[j]].storage = s.extra;
    }
  }
  for (size_t j = 0; j < separate.size(); ++j) {
    if (s.big[j] == MPI_REQUEST_NULL) continue;
    wait_req(&s.big[j], j == 0 ? "recv oversize payload" : "recv payload", seq, size_t(th[separate[j]].nbytes));
  }
}

}  // namespace dpsgs
