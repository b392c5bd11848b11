// The MPI Channel's wire header (see channel_header.h).
#include "channel_header.h"

#include <cstring>

namespace dpsgs {

namespace {
size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }
}  // namespace

MessageLayout layout_message(const std::vector<Buffer>& bufs) {
  MessageLayout l;
  l.header = header_bytes(bufs.size());
  for (size_t i = 0; i < bufs.size(); ++i) {
    size_t at = bufs[i].bytes ? round_up(l.inline_bytes, kHeaderAlign) : l.inline_bytes;
    if (at + bufs[i].bytes <= kInlineBytes) {
      l.offset[i] = at;
      l.inline_bytes = at + bufs[i].bytes;
    } else {
      l.separate[l.nsep++] = i;
    }
  }
  return l;
}

void write_header(uint8_t* head, const std::vector<Buffer>& bufs, uint64_t seq, const MessageLayout& l) {
  std::memset(head, 0, l.header);
  auto* h = reinterpret_cast<MsgHeader*>(head);
  h->magic = kChannelMagic;
  h->seq = seq;
  h->count = uint32_t(bufs.size());
  h->inline_bytes = uint32_t(l.inline_bytes);
  TensorHeader* th = tensor_headers(head);
  for (size_t i = 0; i < bufs.size(); ++i) {
    const Buffer& b = bufs[i];
    th[i].dtype = int32_t(b.dtype);
    th[i].ndim = int32_t(b.shape.size());
    th[i].nbytes = b.bytes;
    th[i].offset = l.offset[i];
    th[i].src_page_offset = uint32_t(reinterpret_cast<uintptr_t>(b.ptr) % kPageBytes);
    for (size_t d = 0; d < b.shape.size(); ++d) th[i].shape[d] = b.shape[d];
  }
  for (size_t j = 0; j < l.nsep; ++j) th[l.separate[j]].separate = 1;
  for (size_t i = 0; i < bufs.size(); ++i)
    if (!th[i].separate && bufs[i].bytes) std::memcpy(head + l.header + l.offset[i], bufs[i].ptr, bufs[i].bytes);
}

bool header_valid(const MsgHeader* h) {
  if (h->count < 1 || h->count > uint32_t(kMaxMessageTensors) || h->inline_bytes > kInlineBytes) return false;
  const TensorHeader* th = tensor_headers(const_cast<MsgHeader*>(h));
  for (uint32_t i = 0; i < h->count; ++i) {
    if (th[i].ndim < 0 || th[i].ndim > kMaxDims || !valid_dtype_code(th[i].dtype)) return false;
    if (!th[i].separate && th[i].offset + th[i].nbytes > h->inline_bytes) return false;
  }
  return true;
}

}  // namespace dpsgs
