// rtnetlink messages to and from the value types of objects.h. Pure
// functions with no socket: the parsers take untrusted bytes (what the
// kernel sent, or a fuzzer) and never read past the message.
#pragma once

#include <linux/netlink.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "vmnet/kernel/objects.h"

namespace vmnet::kernel {

// Each parser returns nullopt for a message of another type or family, or
// one whose attributes fail validation.
std::optional<Link> ParseLink(const nlmsghdr* msg);
std::optional<Address> ParseAddress(const nlmsghdr* msg);
std::optional<Route> ParseRoute(const nlmsghdr* msg);
std::optional<Neighbor> ParseNeighbor(const nlmsghdr* msg);
// Any of the above, as an event (RTM_NEW* or RTM_DEL*).
std::optional<Event> ParseEvent(const nlmsghdr* msg);

// Walks a buffer of netlink messages (as one recv returns them) and calls
// `fn` on each well-formed message; stops at the first malformed header.
template <typename Fn>
void ForEachMessage(const void* data, size_t length, Fn&& fn) {
  auto* msg = static_cast<const nlmsghdr*>(data);
  size_t remaining = length;
  // NLMSG_OK, spelled out with unsigned arithmetic.
  while (remaining >= sizeof(nlmsghdr) && msg->nlmsg_len >= sizeof(nlmsghdr) &&
         msg->nlmsg_len <= remaining) {
    fn(msg);
    size_t step = NLMSG_ALIGN(msg->nlmsg_len);
    if (step >= remaining) break;
    remaining -= step;
    msg = reinterpret_cast<const nlmsghdr*>(reinterpret_cast<const char*>(msg) + step);
  }
}

// One encoded request (flags include NLM_F_REQUEST | NLM_F_ACK; the caller
// sets nlmsg_seq). Empty for SetIpv6Conf, which is no netlink message.
std::vector<uint8_t> EncodeWrite(const Write& write);

// iproute2's names, or the number as text.
std::string RouteProtocolName(uint8_t protocol);
std::string RouteScopeName(uint8_t scope);
std::string RouteTableName(uint32_t table);
std::string RouteTypeName(uint8_t type);

}  // namespace vmnet::kernel
