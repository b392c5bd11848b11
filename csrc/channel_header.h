// The MPI Channel's wire header: its layout, which tensors of a message ride inside the header
// message, writing it (sender) and validating it (receiver). Protocol: channel.cc.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/buffer.h"
#include "common/message.h"

namespace dpsgs {

constexpr uint32_t kChannelMagic = 0x44505347;  // "DPSG"
constexpr uint32_t kFirstOversize = 1;          // MsgHeader::flags: the first separate tensor exceeds the slot
constexpr size_t kInlineBytes = 8192;           // a message's small tensors travel inside its header message
constexpr size_t kHeaderAlign = 64;             // inline payloads start 64-byte aligned
constexpr size_t kPageBytes = 4096;

// MsgHeader, then one TensorHeader per tensor, padded to kHeaderAlign; the inline payloads
// follow. One tensor: 128 bytes, as before messages had several.
struct MsgHeader {
  uint32_t magic;
  uint32_t flags;
  uint64_t seq;
  uint32_t count;          // tensors in the message, 1..kMaxMessageTensors
  uint32_t inline_bytes;   // bytes after the padded header
};
struct TensorHeader {
  int32_t dtype;
  int32_t ndim;
  uint64_t nbytes;
  uint64_t offset;           // inline: where it starts in the inline bytes
  uint32_t separate;         // 1: its own MPI message
  uint32_t src_page_offset;  // address mod kPageBytes on the sender
  int64_t shape[kMaxDims];
};
constexpr size_t header_bytes(size_t count) {
  return (sizeof(MsgHeader) + count * sizeof(TensorHeader) + kHeaderAlign - 1) / kHeaderAlign * kHeaderAlign;
}
constexpr size_t kMaxHeaderBytes = header_bytes(kMaxMessageTensors);
static_assert(header_bytes(1) == 128, "a one-tensor header stays 128 bytes");

inline TensorHeader* tensor_headers(void* head) {
  return reinterpret_cast<TensorHeader*>(static_cast<uint8_t*>(head) + sizeof(MsgHeader));
}

// Where a message's tensors go: taken in order, a tensor rides inline while it still fits in
// kInlineBytes (64-byte aligned; empty tensors always); the others are `separate`, in order.
// Fixed arrays: send() is on the latency path.
struct MessageLayout {
  size_t header = 0, inline_bytes = 0;
  size_t offset[kMaxMessageTensors] = {};
  size_t separate[kMaxMessageTensors] = {};
  size_t nsep = 0;
  size_t total() const { return header + inline_bytes; }
};
MessageLayout layout_message(const std::vector<Buffer>& bufs);

// Writes the header and the inline payloads into `head` (layout.total() bytes).
void write_header(uint8_t* head, const std::vector<Buffer>& bufs, uint64_t seq, const MessageLayout& layout);

// Receiver: whether a header of the right magic is well-formed (count, dims, dtypes, bounds).
bool header_valid(const MsgHeader* h);

}  // namespace dpsgs
