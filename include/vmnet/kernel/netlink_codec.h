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

// What an event says changed without saying what it is now: a link whose
// settings must be read again (`ifindex`), or net.ipv6.conf.all.forwarding.
//  - RTM_NEWNETCONF/RTM_DELNETCONF of a link: a sysctl written
//    (forwarding, proxy_ndp), or the link's IPv6 appearing or going away
//    (an MTU below 1280 and back). The message carries only some settings.
//  - RTM_NEWLINK of family AF_INET6 (RTNLGRP_IPV6_IFINFO): the link's IPv6
//    state changed; it carries no IFLA_AF_SPEC, so ParseLink would read it as
//    "no IPv6".
struct SettingsChanged {
  int ifindex = 0;                          // 0: none
  std::optional<bool> ipv6_forwarding_all;  // the "all" netconf, when it says
};
std::optional<SettingsChanged> ParseSettingsChanged(const nlmsghdr* msg);

// A request for one link (RTM_GETLINK by index) and for one proxy entry
// (RTM_GETNEIGH with NTF_PROXY), with NLM_F_ACK: the kernel answers with the
// object, then the acknowledgement (or only an error, ENOENT when absent).
std::vector<uint8_t> EncodeGetLink(int ifindex);
std::vector<uint8_t> EncodeGetProxy(const Neighbor& proxy);

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
