// Ring all-reduce: every chunk flows independently through 2(n-1) steps, so the next chunk's
// transfer overlaps this chunk's reduction and the all-gather starts before the reduce-scatter
// has finished. See docs/errors.md for what a timeout leaves behind.
//
// Rank r, left = r-1, right = r+1 (mod n). The buffer is cut into n segments, each into C chunks.
// Step s < n-1 (reduce-scatter): send segment (r-s), receive segment (r-s-1) into scratch and add.
// Step s = n-1+t (all-gather): send segment (r+1-t), receive segment (r-t) straight into place.
// Op q = s*C + j. Sends and receives are issued in q order on one tag (so MPI's
// non-overtaking rule matches them); send q waits for receive q-C (the data it forwards);
// an all-gather receive into segment (r-t) waits until the reduce-scatter send of that
// region (op t*C+j) has completed.
#include "ring_allreduce.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "common/backoff.h"
#include "common/error.h"
#include "common/host_memory.h"
#include "communicator.h"
#include "reduce_kernels.h"

namespace dpsgs {

namespace {
constexpr int kRingTag = 7;
constexpr size_t kPage = 4096;

// Scratch for incoming reduce-scatter chunks, kept per progress thread across calls so its
// pages stay mapped and warm (a fresh allocation would page-fault on every all-reduce).
void* scratch_for_this_thread(size_t n) {
  struct Scratch {
    void* p = nullptr;
    size_t size = 0;
    ~Scratch() { std::free(p); }
  };
  thread_local Scratch s;
  if (s.size < n) {
    std::free(s.p);
    s.p = nullptr;
    s.size = 0;
    s.p = host_alloc(n);
    s.size = n;
  }
  return s.p;
}

inline int mod(int a, int n) { return ((a % n) + n) % n; }

// Cleans up on error: cancels posted receives and frees (detaches) sends still active.
struct Requests {
  std::vector<MPI_Request> send, recv;
  ~Requests() {
    for (auto& r : recv)
      if (r != MPI_REQUEST_NULL) {
        MPI_Cancel(&r);
        MPI_Request_free(&r);
      }
    for (auto& r : send)
      if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
  }
};
}  // namespace

void ring_allreduce(const Communicator& c, MPI_Comm comm, const Buffer& buf, int divisor,
                    const RingOptions& opt, const std::function<std::string()>& what) {
  const int n = c.size(), r = c.rank();
  const size_t count = buf.numel(), es = dtype_size(buf.dtype);
  if (count == 0) return;
  if (n == 1) {
    scale_div(buf.dtype, buf.ptr, count, divisor);
    return;
  }
  const int left = mod(r - 1, n), right = mod(r + 1, n);
  auto* base = static_cast<uint8_t*>(buf.ptr);
  std::vector<size_t> seg_off(n + 1, 0);
  for (int k = 0; k < n; ++k) seg_off[k + 1] = seg_off[k] + count / n + (size_t(k) < count % n ? 1 : 0);
  const size_t max_seg = seg_off[1] - seg_off[0];
  // At least ~4 chunks per segment so transfers pipeline with reductions even for mid-size
  // buffers, but not below 64 KiB (per-message costs) unless the caller asks for smaller.
  size_t chunk_bytes = std::min(opt.chunk_bytes, std::max<size_t>(max_seg * es / 4, 64 * 1024));
  if (chunk_bytes >= kPage) chunk_bytes -= chunk_bytes % kPage;  // chunks keep their page offset
  size_t chunk = chunk_bytes / es;
  if (chunk == 0) chunk = 1;
  const size_t C = (max_seg + chunk - 1) / chunk;
  const int steps = 2 * (n - 1);
  const size_t Q = size_t(steps) * C;
  const int W = opt.window > 0 ? opt.window : 1;
  // A scratch slot per window entry, with a page of slack: each chunk lands at the page
  // offset it has in the sender's buffer (assumed to be this buffer's: same allocator), so
  // MPICH's single kernel copy runs page-aligned (~1.7x faster; see channel.cc).
  const size_t slot_stride = chunk * es + kPage;
  uint8_t* scratch = static_cast<uint8_t*>(scratch_for_this_thread(size_t(W) * slot_stride));
  const uintptr_t base_addr = reinterpret_cast<uintptr_t>(buf.ptr);
  auto scratch_at = [&](size_t w, size_t elem_off) {
    return scratch + w * slot_stride + (base_addr + elem_off * es) % kPage;
  };

  auto send_seg = [&](int s) { return s < n - 1 ? mod(r - s, n) : mod(r + 1 - (s - (n - 1)), n); };
  auto recv_seg = [&](int s) { return s < n - 1 ? mod(r - s - 1, n) : mod(r - (s - (n - 1)), n); };
  // Chunk j of segment k: element offset and length (0 past the segment's end).
  auto chunk_of = [&](int k, size_t j, size_t* off) {
    size_t len = seg_off[k + 1] - seg_off[k], start = j * chunk;
    *off = seg_off[k] + start;
    return start >= len ? size_t(0) : (len - start < chunk ? len - start : chunk);
  };

  Requests reqs;
  reqs.send.assign(Q, MPI_REQUEST_NULL);
  reqs.recv.assign(W, MPI_REQUEST_NULL);
  std::vector<size_t> recv_len(W, 0);
  size_t next_post = 0, next_proc = 0, next_send = 0;
  int rank_for_err = r;

  auto send_done = [&](size_t q) {
    if (reqs.send[q] == MPI_REQUEST_NULL) return true;
    int flag = 0;
    DPSGS_CHECK_MPI(MPI_Test(&reqs.send[q], &flag, MPI_STATUS_IGNORE), rank_for_err, right);
    return flag != 0;
  };

  // While chunks flow (progress within the last ~200 us) re-test at full speed: this thread's
  // MPI_Test performs the copies. A late peer gets yields, then sleeps.
  auto fresh_backoff = [] { return Backoff(Backoff::kTransferYieldSeconds, Backoff::kTransferSpinSeconds); };
  Backoff backoff = fresh_backoff();
  bool warned = false;
  unsigned idle = 0;
  double next_check = kInterruptCheckSeconds;  // of this idle spell
  size_t waiting_on = 0;  // for messages: what we are stuck on
  for (;;) {
    bool progressed = false;
    // 1. Post receives in q order, at most W ahead of processing.
    while (next_post < Q && next_post - next_proc < size_t(W)) {
      int s = int(next_post / C);
      size_t j = next_post % C, off;
      size_t len = chunk_of(recv_seg(s), j, &off);
      size_t w = next_post % W;
      recv_len[w] = len;
      if (len > 0) {
        void* dst;
        if (s < n - 1) {
          dst = scratch_at(w, off);
        } else {
          if (!send_done(size_t(s - (n - 1)) * C + j)) break;  // region still being sent
          dst = base + off * es;
        }
        DPSGS_CHECK_MPI(MPI_Irecv(dst, int(len * es), MPI_BYTE, left, kRingTag, comm, &reqs.recv[w]),
                        rank_for_err, left);
      }
      ++next_post;
      progressed = true;
    }
    // 2. Issue sends in q order once the data they forward is in place.
    while (next_send < Q) {
      int s = int(next_send / C);
      size_t j = next_send % C;
      if (s > 0 && next_proc <= size_t(s - 1) * C + j) break;
      size_t off, len = chunk_of(send_seg(s), j, &off);
      if (len > 0) {
        DPSGS_CHECK_MPI(MPI_Isend(base + off * es, int(len * es), MPI_BYTE, right, kRingTag, comm,
                                  &reqs.send[next_send]), rank_for_err, right);
      }
      ++next_send;
      progressed = true;
    }
    // 3. Complete receives in order; reduce-scatter chunks are added (and averaged at the last step).
    while (next_proc < next_post) {
      size_t w = next_proc % W;
      if (reqs.recv[w] != MPI_REQUEST_NULL) {
        int flag = 0;
        DPSGS_CHECK_MPI(MPI_Test(&reqs.recv[w], &flag, MPI_STATUS_IGNORE), rank_for_err, left);
        if (!flag) break;
      }
      int s = int(next_proc / C);
      if (s < n - 1 && recv_len[w] > 0) {
        size_t off;
        chunk_of(recv_seg(s), next_proc % C, &off);
        reduce_add(buf.dtype, base + off * es, scratch_at(w, off), recv_len[w],
                   s == n - 2 ? divisor : 1);
      }
      ++next_proc;
      progressed = true;
    }
    if (next_proc == Q && next_send == Q) {
      bool all = true;
      for (size_t q = 0; q < Q && all; ++q) all = send_done(q);
      if (all) break;
      waiting_on = Q;
    } else {
      waiting_on = next_proc;
    }
    if (progressed) {
      backoff = fresh_backoff();
      idle = 0;
      next_check = kInterruptCheckSeconds;
      continue;
    }
    backoff.pause();
    if ((++idle & 63) != 0) continue;
    if (c.cancelled()) throw CommError(what() + ": cancelled (communicator shut down)");
    double t = backoff.elapsed();
    if (t >= next_check) {
      check_interrupt();
      next_check = t + kInterruptCheckSeconds;
    }
    auto detail = [&] {
      if (waiting_on >= Q) return str_cat(what(), " waiting for ", c.label(right), " (right neighbour) to receive");
      return str_cat(what(), " waiting for ", c.label(left), " (left neighbour), step ", waiting_on / C + 1, "/", steps,
                     " chunk ", waiting_on % C + 1, "/", C);
    };
    if (!warned && c.warn_after() > 0 && t >= c.warn_after()) {
      warned = true;
      std::fprintf(stderr, "[dpsgs] STALL: %s: still waiting after %.1f s\n", detail().c_str(), t);
      std::fflush(stderr);
    }
    if (c.timeout() > 0 && t >= c.timeout()) throw CommTimeout(timeout_message(detail(), c.timeout()));
  }
}

}  // namespace dpsgs
