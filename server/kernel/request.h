// Building one rtnetlink request with libnl, for the codecs of this folder
// (netlink_codec.cc, tc_codec.cc). Internal to server/kernel.
#pragma once

#include <netlink/msg.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace vmnet::kernel::request {

struct MsgDeleter {
  void operator()(nl_msg* m) const { nlmsg_free(m); }
};
using Msg = std::unique_ptr<nl_msg, MsgDeleter>;

// A request of `type` with NLM_F_REQUEST | NLM_F_ACK | `flags`, its family
// header copied in; room for 1 KiB of attributes and header.
inline Msg NewMessage(int type, int flags, const void* header, size_t header_len) {
  Msg msg(nlmsg_alloc_size(1024));
  nlmsg_hdr(msg.get())->nlmsg_type = static_cast<uint16_t>(type);
  nlmsg_hdr(msg.get())->nlmsg_flags =
      static_cast<uint16_t>(flags | NLM_F_REQUEST | NLM_F_ACK);
  nlmsg_append(msg.get(), const_cast<void*>(header), header_len, NLMSG_ALIGNTO);
  return msg;
}

inline std::vector<uint8_t> Bytes(const Msg& msg) {
  nlmsghdr* hdr = nlmsg_hdr(msg.get());
  auto* p = reinterpret_cast<const uint8_t*>(hdr);
  return std::vector<uint8_t>(p, p + hdr->nlmsg_len);
}

}  // namespace vmnet::kernel::request
