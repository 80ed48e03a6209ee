// Writes the seed corpora of the fuzzers in tests/fuzz/corpus/ (the
// committed files came from here):
//
//   cmake --build build-fuzz --target fuzz_seed_gen
//   build-fuzz/tests/fuzz/fuzz_seed_gen tests/fuzz/corpus
//
// Netlink seeds are messages shaped like the kernel's (a link with its
// stats and inet devconf, addresses, routes, neighbours, a multi-message
// dump) and the project's own encodings; state seeds come from
// StateStore::Encode. Each file stays a few hundred bytes at most.
#include <linux/if.h>
#include <linux/if_addr.h>
#include <linux/if_link.h>
#include <linux/ip.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>
#include <netlink/attr.h>
#include <netlink/msg.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "vmnet/kernel/netlink_codec.h"
#include "vmnet/state/state_store.h"

namespace {

using namespace vmnet;          // NOLINT
using namespace vmnet::kernel;  // NOLINT
using Bytes = std::vector<uint8_t>;

std::string g_root;

void Write(const std::string& target, const std::string& name, const void* data,
           size_t size) {
  std::string dir = g_root + "/" + target;
  mkdir(g_root.c_str(), 0755);
  mkdir(dir.c_str(), 0755);
  std::string path = dir + "/" + name;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr || std::fwrite(data, 1, size, f) != size || std::fclose(f) != 0) {
    std::perror(path.c_str());
    std::exit(1);
  }
  std::printf("%s (%zu bytes)\n", path.c_str(), size);
}

// fuzz_netlink raw mode: a leading even byte, then the buffer.
void Netlink(const std::string& name, const Bytes& buffer) {
  Bytes out{0};
  out.insert(out.end(), buffer.begin(), buffer.end());
  Write("fuzz_netlink", name, out.data(), out.size());
}

Bytes Take(nl_msg* msg) {
  nlmsghdr* h = nlmsg_hdr(msg);
  auto* p = reinterpret_cast<const uint8_t*>(h);
  Bytes b(p, p + h->nlmsg_len);
  nlmsg_free(msg);
  return b;
}

nl_msg* New(int type, int flags, const void* header, size_t len) {
  nl_msg* msg = nlmsg_alloc_simple(type, flags);
  nlmsg_append(msg, const_cast<void*>(header), len, NLMSG_ALIGNTO);
  return msg;
}

Bytes Link() {
  ifinfomsg ifi{};
  ifi.ifi_family = AF_UNSPEC;
  ifi.ifi_index = 7;
  ifi.ifi_flags = IFF_UP | IFF_BROADCAST | IFF_RUNNING;
  nl_msg* msg = New(RTM_NEWLINK, NLM_F_MULTI, &ifi, sizeof(ifi));
  nla_put_string(msg, IFLA_IFNAME, "vme1a2b");
  uint8_t mac[6] = {0xfe, 0x54, 0x00, 0x12, 0x34, 0x56};
  nla_put(msg, IFLA_ADDRESS, 6, mac);
  nla_put_u32(msg, IFLA_MTU, 1500);
  // The whole struct (the parser wants all of it); the first eight counters
  // set: rx/tx packets, bytes, errors, dropped.
  uint64_t stats[sizeof(rtnl_link_stats64) / 8] = {10, 20, 1000, 2000, 0, 1, 2, 3};
  nla_put(msg, IFLA_STATS64, sizeof(stats), stats);
  nlattr* af_spec = nla_nest_start(msg, IFLA_AF_SPEC);
  nlattr* inet = nla_nest_start(msg, AF_INET);
  uint32_t conf[IPV4_DEVCONF_FORWARDING + 2] = {};
  conf[IPV4_DEVCONF_FORWARDING - 1] = 1;
  nla_put(msg, IFLA_INET_CONF, sizeof(conf), conf);
  nla_nest_end(msg, inet);
  nla_nest_end(msg, af_spec);
  return Take(msg);
}

Bytes Addr(int type, int family, const void* addr, int prefixlen) {
  ifaddrmsg ifa{};
  ifa.ifa_family = static_cast<uint8_t>(family);
  ifa.ifa_prefixlen = static_cast<uint8_t>(prefixlen);
  ifa.ifa_scope = RT_SCOPE_LINK;
  ifa.ifa_index = 7;
  nl_msg* msg = New(type, 0, &ifa, sizeof(ifa));
  int len = family == AF_INET ? 4 : 16;
  nla_put(msg, IFA_ADDRESS, len, addr);
  nla_put(msg, IFA_LOCAL, len, addr);
  nla_put_u32(msg, IFA_FLAGS, IFA_F_PERMANENT | IFA_F_NOPREFIXROUTE);
  nla_put_u8(msg, IFA_PROTO, 237);
  return Take(msg);
}

Bytes RouteMsg(int type, int family, const void* dst, int dst_len, const void* gw,
               const void* src) {
  rtmsg rtm{};
  rtm.rtm_family = static_cast<uint8_t>(family);
  rtm.rtm_dst_len = static_cast<uint8_t>(dst_len);
  rtm.rtm_table = RT_TABLE_MAIN;
  rtm.rtm_protocol = 237;
  rtm.rtm_scope = gw ? RT_SCOPE_UNIVERSE : RT_SCOPE_LINK;
  rtm.rtm_type = RTN_UNICAST;
  nl_msg* msg = New(type, 0, &rtm, sizeof(rtm));
  int len = family == AF_INET ? 4 : 16;
  nla_put_u32(msg, RTA_TABLE, RT_TABLE_MAIN);
  if (dst) nla_put(msg, RTA_DST, len, dst);
  nla_put_u32(msg, RTA_OIF, 7);
  if (gw) nla_put(msg, RTA_GATEWAY, len, gw);
  if (src) nla_put(msg, RTA_PREFSRC, len, src);
  nla_put_u32(msg, RTA_PRIORITY, 100);
  return Take(msg);
}

Bytes Neigh(int type, const void* dst, bool proxy, const uint8_t* lladdr) {
  ndmsg ndm{};
  ndm.ndm_family = AF_INET;
  ndm.ndm_ifindex = 7;
  ndm.ndm_state = proxy ? NUD_NONE : NUD_REACHABLE;
  ndm.ndm_flags = proxy ? NTF_PROXY : 0;
  nl_msg* msg = New(type, 0, &ndm, sizeof(ndm));
  nla_put(msg, NDA_DST, 4, dst);
  if (lladdr) nla_put(msg, NDA_LLADDR, 6, lladdr);
  nla_put_u8(msg, NDA_PROTOCOL, 237);
  return Take(msg);
}

Bytes Done() {
  int error = 0;
  return Take(New(NLMSG_DONE, NLM_F_MULTI, &error, sizeof(error)));
}

void NetlinkSeeds() {
  uint8_t v4[4] = {198, 51, 100, 7};
  uint8_t v4net[4] = {203, 0, 113, 0};
  uint8_t gw4[4] = {203, 0, 113, 1};
  uint8_t src4[4] = {169, 255, 30, 1};
  uint8_t v6[16] = {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  uint8_t gw6[16] = {0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  uint8_t mac[6] = {0x52, 0x54, 0x00, 0xab, 0xcd, 0xef};

  Netlink("link", Link());
  Netlink("addr_v4", Addr(RTM_NEWADDR, AF_INET, v4, 32));
  Netlink("addr_v6_del", Addr(RTM_DELADDR, AF_INET6, v6, 64));
  Netlink("route_v4_host", RouteMsg(RTM_NEWROUTE, AF_INET, v4, 32, nullptr, src4));
  Netlink("route_v4_gw", RouteMsg(RTM_NEWROUTE, AF_INET, v4net, 24, gw4, nullptr));
  Netlink("route_v4_default_del",
          RouteMsg(RTM_DELROUTE, AF_INET, nullptr, 0, gw4, nullptr));
  Netlink("route_v6_gw", RouteMsg(RTM_NEWROUTE, AF_INET6, v6, 64, gw6, nullptr));
  Netlink("neigh", Neigh(RTM_NEWNEIGH, v4, false, mac));
  Netlink("neigh_proxy_del", Neigh(RTM_DELNEIGH, v4, true, nullptr));

  Bytes dump;
  for (const Bytes& m : {Addr(RTM_NEWADDR, AF_INET, src4, 32),
                         RouteMsg(RTM_NEWROUTE, AF_INET, v4, 32, nullptr, nullptr),
                         Neigh(RTM_NEWNEIGH, v4, true, nullptr), Done()}) {
    dump.insert(dump.end(), m.begin(), m.end());
  }
  Netlink("dump", dump);

  // The project's own encodings (what vmnetd writes).
  Route r;
  r.destination = IpPrefix::Host(IpAddress::FromBytes(IpAddress::Family::kV4, v4));
  r.ifindex = 7;
  r.protocol = 237;
  r.scope = RT_SCOPE_LINK;
  Netlink("write_add_route", EncodeWrite(AddRoute{r}));
  Neighbor n;
  n.ifindex = 7;
  n.address = IpAddress::FromBytes(IpAddress::Family::kV4, v4);
  n.proxy = true;
  n.protocol = 237;
  Netlink("write_set_proxy_neighbor", EncodeWrite(SetNeighbor{n}));
  Netlink("write_set_forwarding", EncodeWrite(SetIpv4Forwarding{7, "vme1a2b", true}));

  // Structured mode: an odd first byte, then FuzzedDataProvider's bytes.
  const uint8_t structured[][24] = {
      {1, 0xc6, 0x33, 0x64, 0x07, 0x20, 0, 0, 0, 7, 0xfd, 0,
       0, 0,    0x80, 0,    0,    0,    0, 0, 0, 0, 0,    0},
      {1, 0xc6, 0x33, 0x64, 0x00, 0x18, 0, 0, 0, 7, 1,    0xcb,
       0, 0x71, 1,    0,    0xed, 0,    1, 0, 0, 0, 0xfe, 1},
      {3, 0xc6, 0x33, 0x64, 0x07, 0, 0, 0,    7, 1, 0x52, 0x54,
       0, 1,    2,    3,    1,    0, 2, 0xed, 0, 0, 0,    2},
  };
  for (size_t i = 0; i < sizeof(structured) / sizeof(structured[0]); ++i) {
    Write("fuzz_netlink", "structured_" + std::to_string(i), structured[i],
          sizeof(structured[i]));
  }
}

void VmSpecSeeds() {
  auto seed = [](const std::string& name, std::vector<std::string> fields) {
    std::string s;
    for (size_t i = 0; i < fields.size(); ++i) {
      if (i > 0) s.push_back('\xff');
      s += fields[i];
    }
    Write("fuzz_vm_spec", name, s.data(), s.size());
  };
  seed("one_address", {"vm-1", "vme1a2b", "", "198.51.100.7"});
  seed("with_mac",
       {"web_01.prod", "vme0", "52:54:00:12:34:56", "198.51.100.7", "203.0.113.9"});
  seed("mac_dashes",
       {"a", "vmeffffffffffff", "52-54-00-AB-CD-EF", "10.0.0.1", "10.0.0.2", "10.0.0.3"});
  seed("refused", {"bad id", "eth0", "01:00:5e:00:00:01", "169.255.30.1", "2001:db8::1",
                   "224.0.0.1", "198.51.100.7/24"});
}

void StateSeeds() {
  auto seed = [](const std::string& name, const StoredState& state) {
    std::string bytes = StateStore::Encode(state);
    Write("fuzz_state_file", name, bytes.data(), bytes.size());
  };
  seed("empty", StoredState{});
  StoredState one;
  one.revision_lease = 1000;
  VmSpec a{"vm-1", "vme1a2b", {*IpAddress::Parse("198.51.100.7")}, std::nullopt};
  one.vms.push_back({a, 17});
  seed("one_vm", one);
  StoredState two = one;
  VmSpec b{"web_01.prod",
           "vme0",
           {*IpAddress::Parse("198.51.100.8"), *IpAddress::Parse("203.0.113.9")},
           MacAddress::Parse("52:54:00:12:34:56")};
  two.vms.push_back({b, 42});
  two.revision_lease = 2000;
  seed("two_vms", two);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_ROOT (e.g. tests/fuzz/corpus)\n", argv[0]);
    return 2;
  }
  g_root = argv[1];
  NetlinkSeeds();
  VmSpecSeeds();
  StateSeeds();
  return 0;
}
