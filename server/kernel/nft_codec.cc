// The ruleset vmnetd installs, as bytecode built with libnftnl. Reading it
// as `nft list ruleset` prints it: docs/port-security.md.
//
// Registers: NFT_REG_1 and NFT_REG_2 are 16 bytes each and adjacent, so a
// concatenation `iifname . address` is the name in REG_1 and the address
// in REG_2 (for an IPv4 address only its first 4 bytes), looked up as one
// key. That is how the ND target check looks up `iifname . <16 bytes of
// ICMPv6 payload>`, which nft's syntax cannot say.
#include "vmnet/kernel/nft_codec.h"

#include <arpa/inet.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter_arp.h>
#include <net/if.h>
// libnftnl's headers are C with C++ guards.
#include <libnftnl/chain.h>
#include <libnftnl/common.h>
#include <libnftnl/expr.h>
#include <libnftnl/gen.h>
#include <libnftnl/object.h>
#include <libnftnl/rule.h>
#include <libnftnl/set.h>
#include <libnftnl/table.h>
#include <libnftnl/udata.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <functional>
#include <memory>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace vmnet::kernel {
namespace {

// Linux 6.3's "destroy" messages: a delete that is OK when the object is
// absent, so that deleting what is gone does not roll back the batch.
// (Debian bookworm's linux-libc-dev predates them; the numbers are ABI.)
constexpr uint16_t kNftMsgDestroyTable = 26;
constexpr uint16_t kNftMsgDestroySetElem = 30;
constexpr uint16_t kNftMsgDestroyObj = 31;

constexpr size_t kMessageBuffer = 64 << 10;

// nft's datatype numbers, so that `nft list` prints the sets' keys readably.
constexpr uint32_t kTypeIpAddr = 7, kTypeIp6Addr = 8, kTypeInetProto = 12,
                   kTypeInetService = 13, kTypeIcmpType = 14, kTypeIcmp6Type = 29,
                   kTypeIfname = 41;
constexpr uint32_t Concat(uint32_t a, uint32_t b) { return (a << 6) | b; }

// ICMP that a VM may send to the host: echo reply and request, and the
// errors (unreachable, time exceeded, parameter problem).
constexpr uint8_t kIcmpToHost[] = {0, 3, 8, 11, 12};
// ICMPv6: the errors, echo, MLD, router solicitation and neighbour
// discovery (RA and redirect are dropped before this).
constexpr uint8_t kIcmp6ToHost[] = {1,   2,   3,   4,   128, 129, 130,
                                    131, 132, 133, 135, 136, 143};

template <typename T, void (*Free)(T*)>
struct Deleter {
  void operator()(T* p) const { Free(p); }
};
void FreeTable(nftnl_table* t) { nftnl_table_free(t); }
void FreeChain(nftnl_chain* c) { nftnl_chain_free(c); }
void FreeRule(nftnl_rule* r) { nftnl_rule_free(r); }
void FreeSet(nftnl_set* s) { nftnl_set_free(s); }
void FreeObj(nftnl_obj* o) { nftnl_obj_free(o); }
void FreeGen(nftnl_gen* g) { nftnl_gen_free(g); }
using TablePtr = std::unique_ptr<nftnl_table, Deleter<nftnl_table, FreeTable>>;
using ChainPtr = std::unique_ptr<nftnl_chain, Deleter<nftnl_chain, FreeChain>>;
using RulePtr = std::unique_ptr<nftnl_rule, Deleter<nftnl_rule, FreeRule>>;
using SetPtr = std::unique_ptr<nftnl_set, Deleter<nftnl_set, FreeSet>>;
using ObjPtr = std::unique_ptr<nftnl_obj, Deleter<nftnl_obj, FreeObj>>;
using GenPtr = std::unique_ptr<nftnl_gen, Deleter<nftnl_gen, FreeGen>>;

// Builds one message with libnftnl into a buffer and copies it out.
template <typename Fn>
NftMessage Build(uint16_t type, uint16_t family, uint16_t flags, Fn&& payload) {
  // One scratch buffer per thread: a write of 10,000 VMs builds 130,000
  // messages, and zeroing a fresh buffer for each would cost more than
  // the kernel's work.
  thread_local std::vector<char> buf(kMessageBuffer);
  nlmsghdr* nlh = nftnl_nlmsg_build_hdr(
      buf.data(), static_cast<uint16_t>((NFNL_SUBSYS_NFTABLES << 8) | type), family,
      flags, 0);
  payload(nlh);
  return NftMessage(buf.data(), buf.data() + nlh->nlmsg_len);
}

std::vector<uint8_t> Comment(uint8_t type, const std::string& text) {
  // nft's userdata TLV: type, length, value (NUL-terminated).
  std::vector<uint8_t> out(text.size() + 3, 0);
  out[0] = type;
  out[1] = static_cast<uint8_t>(text.size() + 1);
  std::memcpy(out.data() + 2, text.data(), text.size());
  return out;
}

std::string ParseComment(const void* data, uint32_t len, uint8_t type) {
  auto* p = static_cast<const uint8_t*>(data);
  uint32_t i = 0;
  while (i + 2 <= len) {
    uint8_t t = p[i], l = p[i + 1];
    if (i + 2 + l > len) break;
    if (t == type && l > 0) {
      return std::string(reinterpret_cast<const char*>(p + i + 2),
                         strnlen(reinterpret_cast<const char*>(p + i + 2), l));
    }
    i += 2 + l;
  }
  return "";
}

// ---- Expressions -------------------------------------------------------

using Rule = nftnl_rule*;

void Add(Rule r, nftnl_expr* e) { nftnl_rule_add_expr(r, e); }

void Meta(Rule r, uint32_t key, uint32_t dreg) {
  nftnl_expr* e = nftnl_expr_alloc("meta");
  nftnl_expr_set_u32(e, NFTNL_EXPR_META_KEY, key);
  nftnl_expr_set_u32(e, NFTNL_EXPR_META_DREG, dreg);
  Add(r, e);
}

void Payload(Rule r, uint32_t base, uint32_t offset, uint32_t len, uint32_t dreg) {
  nftnl_expr* e = nftnl_expr_alloc("payload");
  nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_BASE, base);
  nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_OFFSET, offset);
  nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_LEN, len);
  nftnl_expr_set_u32(e, NFTNL_EXPR_PAYLOAD_DREG, dreg);
  Add(r, e);
}

void Cmp(Rule r, uint32_t op, const std::vector<uint8_t>& data) {
  nftnl_expr* e = nftnl_expr_alloc("cmp");
  nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_SREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_OP, op);
  nftnl_expr_set(e, NFTNL_EXPR_CMP_DATA, data.data(), static_cast<uint32_t>(data.size()));
  Add(r, e);
}

// REG_1 &= mask (as many bytes as the mask has).
void Mask(Rule r, const std::vector<uint8_t>& mask) {
  std::vector<uint8_t> zero(mask.size(), 0);
  nftnl_expr* e = nftnl_expr_alloc("bitwise");
  nftnl_expr_set_u32(e, NFTNL_EXPR_BITWISE_SREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_BITWISE_DREG, NFT_REG_1);
  nftnl_expr_set_u32(e, NFTNL_EXPR_BITWISE_LEN, static_cast<uint32_t>(mask.size()));
  nftnl_expr_set(e, NFTNL_EXPR_BITWISE_MASK, mask.data(),
                 static_cast<uint32_t>(mask.size()));
  nftnl_expr_set(e, NFTNL_EXPR_BITWISE_XOR, zero.data(),
                 static_cast<uint32_t>(zero.size()));
  Add(r, e);
}

void Lookup(Rule r, const char* set, bool invert = false) {
  nftnl_expr* e = nftnl_expr_alloc("lookup");
  nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_SREG, NFT_REG_1);
  nftnl_expr_set_str(e, NFTNL_EXPR_LOOKUP_SET, set);
  if (invert) nftnl_expr_set_u32(e, NFTNL_EXPR_LOOKUP_FLAGS, NFT_LOOKUP_F_INV);
  Add(r, e);
}

// The object (counter or limit) the map holds for REG_1's key; a limit
// object breaks the rule while under its rate, as does a missing key.
void ObjectFromMap(Rule r, const char* map) {
  nftnl_expr* e = nftnl_expr_alloc("objref");
  nftnl_expr_set_u32(e, NFTNL_EXPR_OBJREF_SET_SREG, NFT_REG_1);
  nftnl_expr_set_str(e, NFTNL_EXPR_OBJREF_SET_NAME, map);
  Add(r, e);
}

void Verdict(Rule r, int verdict, const char* chain = nullptr) {
  nftnl_expr* e = nftnl_expr_alloc("immediate");
  nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_DREG, NFT_REG_VERDICT);
  nftnl_expr_set_u32(e, NFTNL_EXPR_IMM_VERDICT, static_cast<uint32_t>(verdict));
  if (chain != nullptr) nftnl_expr_set_str(e, NFTNL_EXPR_IMM_CHAIN, chain);
  Add(r, e);
}
void Accept(Rule r) { Verdict(r, NF_ACCEPT); }
void Drop(Rule r) { Verdict(r, NF_DROP); }
void Goto(Rule r, const char* chain) { Verdict(r, NFT_GOTO, chain); }

void NotFromVmLink(Rule r) {
  Meta(r, NFT_META_IIFNAME, NFT_REG_1);
  Lookup(r, "vm_links", /*invert=*/true);
  Accept(r);
}
void Family(Rule r, uint8_t nfproto) {
  Meta(r, NFT_META_NFPROTO, NFT_REG_1);
  Cmp(r, NFT_CMP_EQ, {nfproto});
}
void L4(Rule r, uint8_t proto) {
  Meta(r, NFT_META_L4PROTO, NFT_REG_1);
  Cmp(r, NFT_CMP_EQ, {proto});
}
void Icmp6Type(Rule r, uint8_t type) {
  Family(r, NFPROTO_IPV6);
  L4(r, IPPROTO_ICMPV6);
  Payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1, NFT_REG_1);
  Cmp(r, NFT_CMP_EQ, {type});
}
// REG_1 = the first 2 bytes at `offset` of `base`, compared under `mask`.
void Prefix16(Rule r, uint32_t base, uint32_t offset, uint8_t b0, uint8_t b1,
              uint8_t mask1, uint32_t op = NFT_CMP_EQ) {
  Payload(r, base, offset, 2, NFT_REG_1);
  Mask(r, {0xff, mask1});
  Cmp(r, op, {b0, b1});
}

// ---- The base ---------------------------------------------------------

constexpr char kEgressPpsMap[] = "egress_pps";
constexpr char kEgressPpsChain[] = "drop_egress_pps";
constexpr char kEgressPpsPrefix[] = "egress_pps.";

struct RuleSpec {
  const char* chain;
  const char* comment;
  std::function<void(Rule)> build;
};
struct ChainSpec {
  const char* name;
  std::optional<uint32_t> hook;  // base chains only
  int32_t priority = 0;
};
struct SetSpec {
  const char* name;
  uint32_t flags = 0;
  uint32_t key_type = 0;
  uint32_t key_len = 0;
  std::vector<uint8_t> concat;  // field lengths, for concatenated ranges
  uint32_t obj_type = 0;        // object maps: NFT_OBJECT_COUNTER or NFT_OBJECT_LIMIT
  std::vector<std::vector<uint8_t>> constant_elements;
};
struct TableSpec {
  uint8_t family;
  std::vector<SetSpec> sets;
  std::vector<ChainSpec> chains;
  std::vector<RuleSpec> rules;
};

std::string DropChain(DropReason reason) {
  return absl::StrCat("drop_", DropReasonName(reason));
}

std::vector<TableSpec> BaseSpec(const PortSecurityConfig& config) {
  const uint32_t kIfnameLen = IFNAMSIZ;
  TableSpec inet{NFPROTO_INET, {}, {}, {}};
  inet.sets = {
      {"vm_links", 0, kTypeIfname, kIfnameLen, {}, 0, {}},
      // The VMs' own addresses: exact matches in hash sets (O(1) per
      // packet at any number of VMs). Allowed prefixes: concatenated-range
      // sets, reached only by packets the hash sets did not accept (the
      // kernel's range lookup costs grow with the number of elements).
      {"src4", 0, Concat(kTypeIfname, kTypeIpAddr), kIfnameLen + 4, {}, 0, {}},
      {"src6", 0, Concat(kTypeIfname, kTypeIp6Addr), kIfnameLen + 16, {}, 0, {}},
      {"src4_ranges",
       NFT_SET_INTERVAL | NFT_SET_CONCAT,
       Concat(kTypeIfname, kTypeIpAddr),
       kIfnameLen + 4,
       {16, 4},
       0,
       {}},
      {"src6_ranges",
       NFT_SET_INTERVAL | NFT_SET_CONCAT,
       Concat(kTypeIfname, kTypeIp6Addr),
       kIfnameLen + 16,
       {16, 16},
       0,
       {}},
      {"vm_to_host_allow", 0, Concat(kTypeInetProto, kTypeInetService), 8, {}, 0, {}},
      {"icmp_to_host", 0, kTypeIcmpType, 1, {}, 0, {}},
      {"icmpv6_to_host", 0, kTypeIcmp6Type, 1, {}, 0, {}},
  };
  for (const VmToHostPort& p : config.vm_to_host_allow) {
    inet.sets[5].constant_elements.push_back({static_cast<uint8_t>(p.protocol), 0, 0, 0,
                                              static_cast<uint8_t>(p.port >> 8),
                                              static_cast<uint8_t>(p.port & 0xff), 0, 0});
  }
  for (uint8_t t : kIcmpToHost) inet.sets[6].constant_elements.push_back({t});
  for (uint8_t t : kIcmp6ToHost) inet.sets[7].constant_elements.push_back({t});
  for (DropReason reason :
       {DropReason::kSpoofedSource, DropReason::kSpoofedArpNd, DropReason::kToHost}) {
    inet.sets.push_back({DropReasonName(reason),
                         NFT_SET_OBJECT,
                         kTypeIfname,
                         kIfnameLen,
                         {},
                         NFT_OBJECT_COUNTER,
                         {}});
  }
  // Packet-rate limits: the limit objects and their drop counters.
  inet.sets.push_back(
      {kEgressPpsMap, NFT_SET_OBJECT, kTypeIfname, kIfnameLen, {}, NFT_OBJECT_LIMIT, {}});
  inet.sets.push_back({DropReasonName(DropReason::kEgressPacketRate),
                       NFT_SET_OBJECT,
                       kTypeIfname,
                       kIfnameLen,
                       {},
                       NFT_OBJECT_COUNTER,
                       {}});
  inet.chains = {
      {"prerouting", NF_INET_PRE_ROUTING, -300}, {"input", NF_INET_LOCAL_IN, 0},
      {"drop_spoofed_source", std::nullopt, 0},  {"drop_spoofed_arp_nd", std::nullopt, 0},
      {"drop_to_host", std::nullopt, 0},         {kEgressPpsChain, std::nullopt, 0}};
  inet.rules = {
      {"prerouting", "vmnetd: not from a VM link: not checked", NotFromVmLink},
      {"prerouting",
       "vmnetd: over the VM's packet-rate limit (a link without one is not limited)",
       [](Rule r) {
         Meta(r, NFT_META_IIFNAME, NFT_REG_1);
         ObjectFromMap(r, kEgressPpsMap);
         Goto(r, kEgressPpsChain);
       }},
      {"prerouting", "vmnetd: IPv4 from the VM's addresses",
       [](Rule r) {
         Family(r, NFPROTO_IPV4);
         Meta(r, NFT_META_IIFNAME, NFT_REG_1);
         Payload(r, NFT_PAYLOAD_NETWORK_HEADER, 12, 4, NFT_REG_2);
         Lookup(r, "src4");
         Accept(r);
       }},
      {"prerouting", "vmnetd: IPv4 from the VM's allowed prefixes",
       [](Rule r) {
         Family(r, NFPROTO_IPV4);
         Meta(r, NFT_META_IIFNAME, NFT_REG_1);
         Payload(r, NFT_PAYLOAD_NETWORK_HEADER, 12, 4, NFT_REG_2);
         Lookup(r, "src4_ranges");
         Accept(r);
       }},
      {"prerouting", "vmnetd: a VM sends no router advertisement",
       [](Rule r) {
         Icmp6Type(r, 134);
         Goto(r, "drop_spoofed_arp_nd");
       }},
      {"prerouting", "vmnetd: a VM sends no redirect",
       [](Rule r) {
         Icmp6Type(r, 137);
         Goto(r, "drop_spoofed_arp_nd");
       }},
      {"prerouting", "vmnetd: NA targets only the VM's addresses or link-local ones",
       [](Rule r) {
         Icmp6Type(r, 136);
         Prefix16(r, NFT_PAYLOAD_TRANSPORT_HEADER, 8, 0xfe, 0x80, 0xc0, NFT_CMP_NEQ);
         Meta(r, NFT_META_IIFNAME, NFT_REG_1);
         Payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 8, 16, NFT_REG_2);
         Lookup(r, "src6", /*invert=*/true);
         Goto(r, "drop_spoofed_arp_nd");
       }},
      {"prerouting", "vmnetd: IPv6 from the VM's addresses",
       [](Rule r) {
         Family(r, NFPROTO_IPV6);
         Meta(r, NFT_META_IIFNAME, NFT_REG_1);
         Payload(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 16, NFT_REG_2);
         Lookup(r, "src6");
         Accept(r);
       }},
      {"prerouting", "vmnetd: IPv6 from the VM's allowed prefixes",
       [](Rule r) {
         Family(r, NFPROTO_IPV6);
         Meta(r, NFT_META_IIFNAME, NFT_REG_1);
         Payload(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 16, NFT_REG_2);
         Lookup(r, "src6_ranges");
         Accept(r);
       }},
      {"prerouting", "vmnetd: link-local to link-local (never forwarded)",
       [](Rule r) {
         Family(r, NFPROTO_IPV6);
         Prefix16(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 0xfe, 0x80, 0xc0);
         Prefix16(r, NFT_PAYLOAD_NETWORK_HEADER, 24, 0xfe, 0x80, 0xc0);
         Accept(r);
       }},
      {"prerouting", "vmnetd: link-local to link-scope multicast (never forwarded)",
       [](Rule r) {
         Family(r, NFPROTO_IPV6);
         Prefix16(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 0xfe, 0x80, 0xc0);
         Prefix16(r, NFT_PAYLOAD_NETWORK_HEADER, 24, 0xff, 0x02, 0xff);
         Accept(r);
       }},
      {"prerouting", "vmnetd: unspecified to link-scope multicast (DAD, MLD)",
       [](Rule r) {
         Family(r, NFPROTO_IPV6);
         Payload(r, NFT_PAYLOAD_NETWORK_HEADER, 8, 16, NFT_REG_1);
         Cmp(r, NFT_CMP_EQ, std::vector<uint8_t>(16, 0));
         Prefix16(r, NFT_PAYLOAD_NETWORK_HEADER, 24, 0xff, 0x02, 0xff);
         Accept(r);
       }},
      {"prerouting", "vmnetd: any other source is spoofed",
       [](Rule r) { Goto(r, "drop_spoofed_source"); }},

      {"input", "vmnetd: not from a VM link: not checked", NotFromVmLink},
      {"input", "vmnetd: ICMP echo and errors",
       [](Rule r) {
         Family(r, NFPROTO_IPV4);
         L4(r, IPPROTO_ICMP);
         Payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1, NFT_REG_1);
         Lookup(r, "icmp_to_host");
         Accept(r);
       }},
      {"input", "vmnetd: ICMPv6 echo, errors, MLD and neighbour discovery",
       [](Rule r) {
         Family(r, NFPROTO_IPV6);
         L4(r, IPPROTO_ICMPV6);
         Payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 0, 1, NFT_REG_1);
         Lookup(r, "icmpv6_to_host");
         Accept(r);
       }},
      {"input", "vmnetd: TCP that opens no connection (replies to the host's own)",
       [](Rule r) {
         L4(r, IPPROTO_TCP);
         Payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 13, 1, NFT_REG_1);
         Mask(r, {0x12});  // SYN|ACK
         Cmp(r, NFT_CMP_NEQ, {0x02});
         Accept(r);
       }},
      {"input", "vmnetd: --vm-to-host-allow",
       [](Rule r) {
         Meta(r, NFT_META_L4PROTO, NFT_REG_1);
         Payload(r, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, NFT_REG32_01);
         Lookup(r, "vm_to_host_allow");
         Accept(r);
       }},
      {"input", "vmnetd: anything else to the host",
       [](Rule r) { Goto(r, "drop_to_host"); }},
  };
  for (DropReason reason :
       {DropReason::kSpoofedSource, DropReason::kSpoofedArpNd, DropReason::kToHost}) {
    static const std::string chains[] = {DropChain(DropReason::kSpoofedSource),
                                         DropChain(DropReason::kSpoofedArpNd),
                                         DropChain(DropReason::kToHost)};
    const char* chain = chains[static_cast<int>(reason)].c_str();
    const char* map = DropReasonName(reason);
    inet.rules.push_back({chain, "vmnetd: count per VM link and drop", [map](Rule r) {
                            Meta(r, NFT_META_IIFNAME, NFT_REG_1);
                            ObjectFromMap(r, map);
                            Drop(r);
                          }});
    inet.rules.push_back({chain, "vmnetd: drop (a link without counters)", Drop});
  }
  inet.rules.push_back(
      {kEgressPpsChain, "vmnetd: count per VM link and drop", [](Rule r) {
         Meta(r, NFT_META_IIFNAME, NFT_REG_1);
         ObjectFromMap(r, DropReasonName(DropReason::kEgressPacketRate));
         Drop(r);
       }});
  inet.rules.push_back({kEgressPpsChain, "vmnetd: drop (a link without counters)", Drop});

  TableSpec arp{NFPROTO_ARP, {}, {}, {}};
  arp.sets = {
      {"vm_links", 0, kTypeIfname, kIfnameLen, {}, 0, {}},
      {"arp_src4", 0, Concat(kTypeIfname, kTypeIpAddr), kIfnameLen + 4, {}, 0, {}},
      {DropReasonName(DropReason::kSpoofedArpNd),
       NFT_SET_OBJECT,
       kTypeIfname,
       kIfnameLen,
       {},
       NFT_OBJECT_COUNTER,
       {}},
  };
  arp.chains = {{"input", NF_ARP_IN, 0}, {"drop_spoofed_arp_nd", std::nullopt, 0}};
  arp.rules = {
      {"input", "vmnetd: not from a VM link: not checked", NotFromVmLink},
      {"input", "vmnetd: ARP probes (sender 0.0.0.0)",
       [](Rule r) {
         Payload(r, NFT_PAYLOAD_NETWORK_HEADER, 14, 4, NFT_REG_1);
         Cmp(r, NFT_CMP_EQ, {0, 0, 0, 0});
         Accept(r);
       }},
      {"input", "vmnetd: ARP from the VM's own addresses",
       [](Rule r) {
         Meta(r, NFT_META_IIFNAME, NFT_REG_1);
         Payload(r, NFT_PAYLOAD_NETWORK_HEADER, 14, 4, NFT_REG_2);
         Lookup(r, "arp_src4");
         Accept(r);
       }},
      {"input", "vmnetd: any other ARP sender is spoofed",
       [](Rule r) { Goto(r, "drop_spoofed_arp_nd"); }},
      {"drop_spoofed_arp_nd", "vmnetd: count per VM link and drop",
       [](Rule r) {
         Meta(r, NFT_META_IIFNAME, NFT_REG_1);
         ObjectFromMap(r, DropReasonName(DropReason::kSpoofedArpNd));
         Drop(r);
       }},
      {"drop_spoofed_arp_nd", "vmnetd: drop (a link without counters)", Drop},
  };
  return {std::move(inet), std::move(arp)};
}

NftMessage TableMessage(uint16_t type, uint8_t family, uint16_t flags,
                        const std::string& comment) {
  return Build(type, family, flags, [&](nlmsghdr* nlh) {
    TablePtr t(nftnl_table_alloc());
    nftnl_table_set_str(t.get(), NFTNL_TABLE_NAME, kNftTableName);
    if (!comment.empty()) {
      auto ud = Comment(NFTNL_UDATA_TABLE_COMMENT, comment);
      nftnl_table_set_data(t.get(), NFTNL_TABLE_USERDATA, ud.data(),
                           static_cast<uint32_t>(ud.size()));
    }
    nftnl_table_nlmsg_build_payload(nlh, t.get());
  });
}

// One element message for `set`: keys (and key ends, for ranges) and, for
// object maps, the object's name.
struct ElementSpec {
  std::vector<uint8_t> key;
  std::vector<uint8_t> key_end;
  std::string objref;
};
NftMessage ElementsMessage(uint16_t type, uint8_t family, uint16_t flags, const char* set,
                           const std::vector<ElementSpec>& elements) {
  return Build(type, family, flags, [&](nlmsghdr* nlh) {
    SetPtr s(nftnl_set_alloc());
    nftnl_set_set_str(s.get(), NFTNL_SET_TABLE, kNftTableName);
    nftnl_set_set_str(s.get(), NFTNL_SET_NAME, set);
    for (const ElementSpec& spec : elements) {
      nftnl_set_elem* e = nftnl_set_elem_alloc();
      nftnl_set_elem_set(e, NFTNL_SET_ELEM_KEY, spec.key.data(),
                         static_cast<uint32_t>(spec.key.size()));
      if (!spec.key_end.empty()) {
        nftnl_set_elem_set(e, NFTNL_SET_ELEM_KEY_END, spec.key_end.data(),
                           static_cast<uint32_t>(spec.key_end.size()));
      }
      if (!spec.objref.empty())
        nftnl_set_elem_set_str(e, NFTNL_SET_ELEM_OBJREF, spec.objref.c_str());
      nftnl_set_elem_add(s.get(), e);
    }
    nftnl_set_elems_nlmsg_build_payload(nlh, s.get());
  });
}

NftMessage CounterMessage(uint16_t type, uint8_t family, uint16_t flags,
                          const std::string& name) {
  return Build(type, family, flags, [&](nlmsghdr* nlh) {
    ObjPtr o(nftnl_obj_alloc());
    nftnl_obj_set_str(o.get(), NFTNL_OBJ_TABLE, kNftTableName);
    nftnl_obj_set_str(o.get(), NFTNL_OBJ_NAME, name.c_str());
    nftnl_obj_set_u32(o.get(), NFTNL_OBJ_TYPE, NFT_OBJECT_COUNTER);
    nftnl_obj_nlmsg_build_payload(nlh, o.get());
  });
}

// A limit object: `rate over <pps>/second burst <burst> packets`. For a
// delete (destroy) only the name counts.
NftMessage LimitMessage(uint16_t type, uint16_t flags, const std::string& name,
                        const NftPacketRateLimit& limit) {
  return Build(type, NFPROTO_INET, flags, [&](nlmsghdr* nlh) {
    ObjPtr o(nftnl_obj_alloc());
    nftnl_obj_set_str(o.get(), NFTNL_OBJ_TABLE, kNftTableName);
    nftnl_obj_set_str(o.get(), NFTNL_OBJ_NAME, name.c_str());
    nftnl_obj_set_u32(o.get(), NFTNL_OBJ_TYPE, NFT_OBJECT_LIMIT);
    if (type == NFT_MSG_NEWOBJ) {
      nftnl_obj_set_u64(o.get(), NFTNL_OBJ_LIMIT_RATE, limit.packets_per_second);
      nftnl_obj_set_u64(o.get(), NFTNL_OBJ_LIMIT_UNIT, 1);  // per second
      nftnl_obj_set_u32(o.get(), NFTNL_OBJ_LIMIT_BURST, limit.burst_packets);
      nftnl_obj_set_u32(o.get(), NFTNL_OBJ_LIMIT_TYPE, NFT_LIMIT_PKTS);
      nftnl_obj_set_u32(o.get(), NFTNL_OBJ_LIMIT_FLAGS, NFT_LIMIT_F_INV);  // "over"
    }
    nftnl_obj_nlmsg_build_payload(nlh, o.get());
  });
}

void EncodeBase(const PortSecurityConfig& config, std::vector<NftMessage>* out) {
  const uint16_t create = NLM_F_CREATE;
  std::string tag = config.Fingerprint();
  uint32_t set_id = 0;
  for (const TableSpec& table : BaseSpec(config)) {
    out->push_back(TableMessage(kNftMsgDestroyTable, table.family, 0, ""));
    out->push_back(TableMessage(NFT_MSG_NEWTABLE, table.family, create, tag));
    for (const SetSpec& spec : table.sets) {
      out->push_back(Build(NFT_MSG_NEWSET, table.family, create, [&](nlmsghdr* nlh) {
        SetPtr s(nftnl_set_alloc());
        nftnl_set_set_str(s.get(), NFTNL_SET_TABLE, kNftTableName);
        nftnl_set_set_str(s.get(), NFTNL_SET_NAME, spec.name);
        nftnl_set_set_u32(s.get(), NFTNL_SET_ID, ++set_id);  // the kernel requires one
        nftnl_set_set_u32(s.get(), NFTNL_SET_FLAGS, spec.flags);
        nftnl_set_set_u32(s.get(), NFTNL_SET_KEY_TYPE, spec.key_type);
        nftnl_set_set_u32(s.get(), NFTNL_SET_KEY_LEN, spec.key_len);
        if (!spec.concat.empty()) {
          nftnl_set_set_data(s.get(), NFTNL_SET_DESC_CONCAT, spec.concat.data(),
                             static_cast<uint32_t>(spec.concat.size()));
        }
        if (spec.obj_type != 0)
          nftnl_set_set_u32(s.get(), NFTNL_SET_OBJ_TYPE, spec.obj_type);
        if (spec.key_type == kTypeIfname) {
          // Tells nft the key is a string in host order, so that `nft list`
          // prints the names (the kernel does not look at userdata).
          const uint8_t udata[] = {NFTNL_UDATA_SET_KEYBYTEORDER, 4, 1, 0, 0, 0};
          nftnl_set_set_data(s.get(), NFTNL_SET_USERDATA, udata, sizeof(udata));
        }
        nftnl_set_nlmsg_build_payload(nlh, s.get());
      }));
      if (!spec.constant_elements.empty()) {
        std::vector<ElementSpec> elements;
        for (const auto& key : spec.constant_elements) elements.push_back({key, {}, ""});
        out->push_back(ElementsMessage(NFT_MSG_NEWSETELEM, table.family, create,
                                       spec.name, elements));
      }
    }
    for (const ChainSpec& spec : table.chains) {
      out->push_back(Build(NFT_MSG_NEWCHAIN, table.family, create, [&](nlmsghdr* nlh) {
        ChainPtr c(nftnl_chain_alloc());
        nftnl_chain_set_str(c.get(), NFTNL_CHAIN_TABLE, kNftTableName);
        nftnl_chain_set_str(c.get(), NFTNL_CHAIN_NAME, spec.name);
        if (spec.hook) {
          nftnl_chain_set_u32(c.get(), NFTNL_CHAIN_HOOKNUM, *spec.hook);
          nftnl_chain_set_s32(c.get(), NFTNL_CHAIN_PRIO, spec.priority);
          nftnl_chain_set_str(c.get(), NFTNL_CHAIN_TYPE, "filter");
          nftnl_chain_set_u32(c.get(), NFTNL_CHAIN_POLICY, NF_ACCEPT);
        }
        nftnl_chain_nlmsg_build_payload(nlh, c.get());
      }));
    }
    for (const RuleSpec& spec : table.rules) {
      out->push_back(
          Build(NFT_MSG_NEWRULE, table.family, create | NLM_F_APPEND, [&](nlmsghdr* nlh) {
            RulePtr r(nftnl_rule_alloc());
            nftnl_rule_set_str(r.get(), NFTNL_RULE_TABLE, kNftTableName);
            nftnl_rule_set_str(r.get(), NFTNL_RULE_CHAIN, spec.chain);
            auto ud = Comment(NFTNL_UDATA_RULE_COMMENT, spec.comment);
            nftnl_rule_set_data(r.get(), NFTNL_RULE_USERDATA, ud.data(),
                                static_cast<uint32_t>(ud.size()));
            spec.build(r.get());
            nftnl_rule_nlmsg_build_payload(nlh, r.get());
          }));
    }
  }
}

// ---- Elements ---------------------------------------------------------

bool HasHostBits(const IpPrefix& p) {
  for (int bit = p.length; bit < p.address.bit_length(); ++bit) {
    if (p.address.bytes()[bit / 8] & (0x80 >> (bit % 8))) return true;
  }
  return false;
}

std::string CounterName(DropReason reason, const std::string& ifname) {
  return absl::StrCat(DropReasonName(reason), ".", ifname);
}

std::vector<uint8_t> IfnameKey(const std::string& ifname) {
  std::vector<uint8_t> key(IFNAMSIZ, 0);
  std::memcpy(key.data(), ifname.data(), ifname.size());
  return key;
}

std::vector<uint8_t> AddressKey(const std::string& ifname, const IpAddress& a) {
  std::vector<uint8_t> key = IfnameKey(ifname);
  key.insert(key.end(), a.bytes(), a.bytes() + a.size());
  return key;
}

absl::Status CheckIfname(const std::string& ifname, const NftElement& element) {
  if (ifname.empty() || ifname.size() >= IFNAMSIZ ||
      ifname.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(ToString(element), ": not an interface name"));
  }
  return absl::OkStatus();
}

absl::Status EncodeElement(const NftElement& element, bool add,
                           std::vector<NftMessage>* out) {
  const uint16_t elem_type = add ? uint16_t{NFT_MSG_NEWSETELEM} : kNftMsgDestroySetElem;
  const uint16_t flags = add ? NLM_F_CREATE : 0;
  if (const auto* link = std::get_if<NftVmLink>(&element)) {
    if (auto s = CheckIfname(link->ifname, element); !s.ok()) return s;
    const std::vector<uint8_t> key = IfnameKey(link->ifname);
    struct Part {
      uint8_t family;
      DropReason reason;
    };
    const Part parts[] = {{NFPROTO_INET, DropReason::kSpoofedSource},
                          {NFPROTO_INET, DropReason::kSpoofedArpNd},
                          {NFPROTO_INET, DropReason::kToHost},
                          {NFPROTO_ARP, DropReason::kSpoofedArpNd}};
    std::vector<NftMessage> counters, maps, links;
    for (const Part& p : parts) {
      std::string name = CounterName(p.reason, link->ifname);
      counters.push_back(CounterMessage(
          add ? uint16_t{NFT_MSG_NEWOBJ} : kNftMsgDestroyObj, p.family, flags, name));
      maps.push_back(ElementsMessage(elem_type, p.family, flags, DropReasonName(p.reason),
                                     {{key, {}, add ? name : ""}}));
    }
    for (uint8_t family : {NFPROTO_INET, NFPROTO_ARP}) {
      links.push_back(
          ElementsMessage(elem_type, family, flags, "vm_links", {{key, {}, ""}}));
    }
    // Added: counters before the map elements that name them, the link
    // last. Deleted: the other way round (a counter in use cannot go).
    auto append = [out](std::vector<NftMessage>& v) {
      for (auto& m : v) out->push_back(std::move(m));
    };
    if (add) {
      append(counters), append(maps), append(links);
    } else {
      append(links), append(maps), append(counters);
    }
    return absl::OkStatus();
  }
  if (const auto* src = std::get_if<NftSourcePrefix>(&element)) {
    if (auto s = CheckIfname(src->ifname, element); !s.ok()) return s;
    const IpPrefix& p = src->prefix;
    if (p.address.family() == IpAddress::Family::kNone || p.length < 0 ||
        p.length > p.address.bit_length() || HasHostBits(p)) {
      return absl::InvalidArgumentError(
          absl::StrCat(ToString(element), ": not a prefix (or host bits set)"));
    }
    if (p.length == p.address.bit_length()) {
      out->push_back(ElementsMessage(elem_type, NFPROTO_INET, flags,
                                     p.address.is_v4() ? "src4" : "src6",
                                     {{AddressKey(src->ifname, p.address), {}, ""}}));
    } else {
      out->push_back(ElementsMessage(
          elem_type, NFPROTO_INET, flags,
          p.address.is_v4() ? "src4_ranges" : "src6_ranges",
          {{AddressKey(src->ifname, p.address), AddressKey(src->ifname, p.Last()), ""}}));
    }
    return absl::OkStatus();
  }
  if (const auto* limit = std::get_if<NftPacketRateLimit>(&element)) {
    if (auto s = CheckIfname(limit->ifname, element); !s.ok()) return s;
    if (add && (limit->packets_per_second == 0 || limit->burst_packets == 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(ToString(element), ": a rate and a burst of at least 1"));
    }
    const std::vector<uint8_t> key = IfnameKey(limit->ifname);
    const std::string name = absl::StrCat(kEgressPpsPrefix, limit->ifname);
    const std::string counter = CounterName(DropReason::kEgressPacketRate, limit->ifname);
    const char* counter_map = DropReasonName(DropReason::kEgressPacketRate);
    // The limit is destroyed and re-created either way: the kernel has no
    // update for limit objects (NEWOBJ on an existing one is a silent no-op),
    // and one transaction makes the replacement atomic for packets.
    out->push_back(ElementsMessage(kNftMsgDestroySetElem, NFPROTO_INET, 0, kEgressPpsMap,
                                   {{key, {}, ""}}));
    out->push_back(LimitMessage(kNftMsgDestroyObj, 0, name, *limit));
    if (add) {
      out->push_back(LimitMessage(NFT_MSG_NEWOBJ, NLM_F_CREATE, name, *limit));
      // The counter and its element stay (adding what exists is OK): a rate
      // change keeps the count.
      out->push_back(CounterMessage(NFT_MSG_NEWOBJ, NFPROTO_INET, NLM_F_CREATE, counter));
      out->push_back(ElementsMessage(NFT_MSG_NEWSETELEM, NFPROTO_INET, NLM_F_CREATE,
                                     counter_map, {{key, {}, counter}}));
      out->push_back(ElementsMessage(NFT_MSG_NEWSETELEM, NFPROTO_INET, NLM_F_CREATE,
                                     kEgressPpsMap, {{key, {}, name}}));
    } else {
      out->push_back(ElementsMessage(kNftMsgDestroySetElem, NFPROTO_INET, 0, counter_map,
                                     {{key, {}, ""}}));
      out->push_back(CounterMessage(kNftMsgDestroyObj, NFPROTO_INET, 0, counter));
    }
    return absl::OkStatus();
  }
  const auto& arp = std::get<NftArpSender>(element);
  if (auto s = CheckIfname(arp.ifname, element); !s.ok()) return s;
  if (!arp.address.is_v4()) {
    return absl::InvalidArgumentError(absl::StrCat(ToString(element), ": not IPv4"));
  }
  out->push_back(ElementsMessage(elem_type, NFPROTO_ARP, flags, "arp_src4",
                                 {{AddressKey(arp.ifname, arp.address), {}, ""}}));
  return absl::OkStatus();
}

NftMessage DumpRequest(uint16_t type, uint8_t family) {
  return Build(type, family, NLM_F_DUMP, [&](nlmsghdr*) {});
}

std::string IfnameOf(const uint8_t* key) {
  return std::string(reinterpret_cast<const char*>(key),
                     strnlen(reinterpret_cast<const char*>(key), IFNAMSIZ));
}

// The prefix whose first and last addresses these are; nullopt when the
// range is not one CIDR prefix.
std::optional<IpPrefix> RangeToPrefix(const IpAddress& first, const IpAddress& last) {
  for (int length = 0; length <= first.bit_length(); ++length) {
    IpPrefix p{first, length};
    if (!HasHostBits(p) && p.Last() == last) return p;
  }
  return std::nullopt;
}

bool ParseCounterName(const std::string& name, DropReason* reason, std::string* ifname) {
  for (DropReason r :
       {DropReason::kSpoofedSource, DropReason::kSpoofedArpNd, DropReason::kToHost}) {
    std::string prefix = absl::StrCat(DropReasonName(r), ".");
    if (name.size() > prefix.size() && name.compare(0, prefix.size(), prefix) == 0) {
      *reason = r;
      *ifname = name.substr(prefix.size());
      return true;
    }
  }
  return false;
}

// The link of a packet-rate limit's drop counter, "egress_pps_dropped.<ifname>".
bool LimitCounterIfname(const std::string& name, std::string* ifname) {
  std::string prefix = absl::StrCat(DropReasonName(DropReason::kEgressPacketRate), ".");
  if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0)
    return false;
  *ifname = name.substr(prefix.size());
  return true;
}

std::string FamilyName(uint8_t family) {
  switch (family) {
    case NFPROTO_INET:
      return "inet";
    case NFPROTO_ARP:
      return "arp";
    case NFPROTO_IPV4:
      return "ip";
    case NFPROTO_IPV6:
      return "ip6";
    case NFPROTO_BRIDGE:
      return "bridge";
    case NFPROTO_NETDEV:
      return "netdev";
  }
  return absl::StrCat("family ", static_cast<int>(family));
}

uint8_t FamilyOf(const nlmsghdr* msg) {
  return static_cast<const nfgenmsg*>(NLMSG_DATA(msg))->nfgen_family;
}

bool Ours(uint8_t family, const char* table) {
  return (family == NFPROTO_INET || family == NFPROTO_ARP) && table != nullptr &&
         std::strcmp(table, kNftTableName) == 0;
}

}  // namespace

absl::Status EncodeNftWrite(const NftWrite& write, std::vector<NftMessage>* out) {
  if (const auto* base = std::get_if<EnsurePortSecurityBase>(&write)) {
    EncodeBase(base->config, out);
    return absl::OkStatus();
  }
  if (std::holds_alternative<DeletePortSecurityBase>(write)) {
    for (uint8_t family : {NFPROTO_INET, NFPROTO_ARP}) {
      out->push_back(TableMessage(kNftMsgDestroyTable, family, 0, ""));
    }
    return absl::OkStatus();
  }
  if (const auto* add = std::get_if<AddNftElement>(&write)) {
    return EncodeElement(add->element, true, out);
  }
  return EncodeElement(std::get<DeleteNftElement>(write).element, false, out);
}

NftMessage EncodeGetGeneration() {
  return Build(NFT_MSG_GETGEN, AF_UNSPEC, 0, [](nlmsghdr*) {});
}
NftMessage EncodeDumpTables() { return DumpRequest(NFT_MSG_GETTABLE, NFPROTO_UNSPEC); }
NftMessage EncodeDumpChains(uint8_t family) {
  return Build(NFT_MSG_GETCHAIN, family, NLM_F_DUMP, [](nlmsghdr* nlh) {
    ChainPtr c(nftnl_chain_alloc());
    nftnl_chain_set_str(c.get(), NFTNL_CHAIN_TABLE, kNftTableName);
    nftnl_chain_nlmsg_build_payload(nlh, c.get());
  });
}
NftMessage EncodeDumpRules(uint8_t family) {
  return Build(NFT_MSG_GETRULE, family, NLM_F_DUMP, [](nlmsghdr* nlh) {
    RulePtr r(nftnl_rule_alloc());
    nftnl_rule_set_str(r.get(), NFTNL_RULE_TABLE, kNftTableName);
    nftnl_rule_nlmsg_build_payload(nlh, r.get());
  });
}
NftMessage EncodeDumpSets(uint8_t family) {
  return Build(NFT_MSG_GETSET, family, NLM_F_DUMP, [](nlmsghdr* nlh) {
    SetPtr s(nftnl_set_alloc());
    nftnl_set_set_str(s.get(), NFTNL_SET_TABLE, kNftTableName);
    nftnl_set_nlmsg_build_payload(nlh, s.get());
  });
}
NftMessage EncodeDumpElements(uint8_t family, const std::string& set) {
  return ElementsMessage(NFT_MSG_GETSETELEM, family, NLM_F_DUMP, set.c_str(), {});
}
NftMessage EncodeDumpCounters(uint8_t family) {
  // Every object of the table: the counters and the packet-rate limits.
  return Build(NFT_MSG_GETOBJ, family, NLM_F_DUMP, [](nlmsghdr* nlh) {
    ObjPtr o(nftnl_obj_alloc());
    nftnl_obj_set_str(o.get(), NFTNL_OBJ_TABLE, kNftTableName);
    nftnl_obj_nlmsg_build_payload(nlh, o.get());
  });
}

std::optional<uint32_t> ParseGeneration(const nlmsghdr* msg) {
  if ((msg->nlmsg_type & 0xff) != NFT_MSG_NEWGEN) return std::nullopt;
  GenPtr g(nftnl_gen_alloc());
  if (nftnl_gen_nlmsg_parse(msg, g.get()) < 0) return std::nullopt;
  return nftnl_gen_get_u32(g.get(), NFTNL_GEN_ID);
}

// ---- Dump -------------------------------------------------------------

NftDumpParser::Table* NftDumpParser::TableOf(uint8_t family, const char* table) {
  if (!Ours(family, table)) return nullptr;
  auto it = tables_.find(family);
  return it == tables_.end() ? nullptr : &it->second;
}

void NftDumpParser::AddTable(const nlmsghdr* msg) {
  TablePtr t(nftnl_table_alloc());
  if (nftnl_table_nlmsg_parse(msg, t.get()) < 0) return;
  uint8_t family = FamilyOf(msg);
  if (!Ours(family, nftnl_table_get_str(t.get(), NFTNL_TABLE_NAME))) return;
  Table& table = tables_[family];
  uint32_t len = 0;
  if (nftnl_table_is_set(t.get(), NFTNL_TABLE_USERDATA)) {
    const void* data = nftnl_table_get_data(t.get(), NFTNL_TABLE_USERDATA, &len);
    table.comment = ParseComment(data, len, NFTNL_UDATA_TABLE_COMMENT);
  }
}

void NftDumpParser::AddChain(const nlmsghdr* msg) {
  ChainPtr c(nftnl_chain_alloc());
  if (nftnl_chain_nlmsg_parse(msg, c.get()) < 0) return;
  Table* table = TableOf(FamilyOf(msg), nftnl_chain_get_str(c.get(), NFTNL_CHAIN_TABLE));
  if (table == nullptr) return;
  Chain& chain = table->chains[nftnl_chain_get_str(c.get(), NFTNL_CHAIN_NAME)];
  if (nftnl_chain_is_set(c.get(), NFTNL_CHAIN_HOOKNUM)) {
    chain.hook = nftnl_chain_get_u32(c.get(), NFTNL_CHAIN_HOOKNUM);
    chain.priority = nftnl_chain_get_s32(c.get(), NFTNL_CHAIN_PRIO);
    if (nftnl_chain_is_set(c.get(), NFTNL_CHAIN_POLICY))
      chain.policy = nftnl_chain_get_u32(c.get(), NFTNL_CHAIN_POLICY);
    if (nftnl_chain_is_set(c.get(), NFTNL_CHAIN_TYPE))
      chain.type = nftnl_chain_get_str(c.get(), NFTNL_CHAIN_TYPE);
  }
}

void NftDumpParser::AddRule(const nlmsghdr* msg) {
  RulePtr r(nftnl_rule_alloc());
  if (nftnl_rule_nlmsg_parse(msg, r.get()) < 0) return;
  Table* table = TableOf(FamilyOf(msg), nftnl_rule_get_str(r.get(), NFTNL_RULE_TABLE));
  if (table == nullptr) return;
  std::string comment;
  if (nftnl_rule_is_set(r.get(), NFTNL_RULE_USERDATA)) {
    uint32_t len = 0;
    const void* data = nftnl_rule_get_data(r.get(), NFTNL_RULE_USERDATA, &len);
    comment = ParseComment(data, len, NFTNL_UDATA_RULE_COMMENT);
  }
  table->chains[nftnl_rule_get_str(r.get(), NFTNL_RULE_CHAIN)].rule_comments.push_back(
      comment);
}

void NftDumpParser::AddSet(const nlmsghdr* msg) {
  SetPtr s(nftnl_set_alloc());
  if (nftnl_set_nlmsg_parse(msg, s.get()) < 0) return;
  Table* table = TableOf(FamilyOf(msg), nftnl_set_get_str(s.get(), NFTNL_SET_TABLE));
  if (table == nullptr) return;
  Set& set = table->sets[nftnl_set_get_str(s.get(), NFTNL_SET_NAME)];
  set.flags = nftnl_set_get_u32(s.get(), NFTNL_SET_FLAGS);
  set.key_len = nftnl_set_get_u32(s.get(), NFTNL_SET_KEY_LEN);
  if (nftnl_set_is_set(s.get(), NFTNL_SET_OBJ_TYPE))
    set.obj_type = nftnl_set_get_u32(s.get(), NFTNL_SET_OBJ_TYPE);
}

void NftDumpParser::AddElements(const nlmsghdr* msg) {
  SetPtr s(nftnl_set_alloc());
  if (nftnl_set_elems_nlmsg_parse(msg, s.get()) < 0) return;
  Table* table = TableOf(FamilyOf(msg), nftnl_set_get_str(s.get(), NFTNL_SET_TABLE));
  if (table == nullptr) return;
  Set& set = table->sets[nftnl_set_get_str(s.get(), NFTNL_SET_NAME)];
  nftnl_set_elem_foreach(
      s.get(),
      [](nftnl_set_elem* e, void* data) -> int {
        auto* set = static_cast<Set*>(data);
        uint32_t len = 0, end_len = 0;
        auto* key =
            static_cast<const uint8_t*>(nftnl_set_elem_get(e, NFTNL_SET_ELEM_KEY, &len));
        if (key == nullptr) return 0;
        std::vector<uint8_t> bytes(key, key + len);
        if (nftnl_set_elem_is_set(e, NFTNL_SET_ELEM_KEY_END)) {
          auto* end = static_cast<const uint8_t*>(
              nftnl_set_elem_get(e, NFTNL_SET_ELEM_KEY_END, &end_len));
          bytes.insert(bytes.end(), end, end + end_len);
        }
        std::string objref;
        if (nftnl_set_elem_is_set(e, NFTNL_SET_ELEM_OBJREF))
          objref = nftnl_set_elem_get_str(e, NFTNL_SET_ELEM_OBJREF);
        set->elements.emplace_back(std::move(bytes), std::move(objref));
        return 0;
      },
      &set);
}

void NftDumpParser::AddCounter(const nlmsghdr* msg) {
  ObjPtr o(nftnl_obj_alloc());
  if (nftnl_obj_nlmsg_parse(msg, o.get()) < 0) return;
  Table* table = TableOf(FamilyOf(msg), nftnl_obj_get_str(o.get(), NFTNL_OBJ_TABLE));
  if (table == nullptr) return;
  const uint32_t type = nftnl_obj_get_u32(o.get(), NFTNL_OBJ_TYPE);
  if (type == NFT_OBJECT_LIMIT) {
    Limit& l = table->limits[nftnl_obj_get_str(o.get(), NFTNL_OBJ_NAME)];
    l.rate = nftnl_obj_get_u64(o.get(), NFTNL_OBJ_LIMIT_RATE);
    l.unit = nftnl_obj_get_u64(o.get(), NFTNL_OBJ_LIMIT_UNIT);
    l.burst = nftnl_obj_get_u32(o.get(), NFTNL_OBJ_LIMIT_BURST);
    l.type = nftnl_obj_get_u32(o.get(), NFTNL_OBJ_LIMIT_TYPE);
    l.flags = nftnl_obj_get_u32(o.get(), NFTNL_OBJ_LIMIT_FLAGS);
    return;
  }
  if (type != NFT_OBJECT_COUNTER) return;
  table->counters[nftnl_obj_get_str(o.get(), NFTNL_OBJ_NAME)] = {
      nftnl_obj_get_u64(o.get(), NFTNL_OBJ_CTR_PKTS),
      nftnl_obj_get_u64(o.get(), NFTNL_OBJ_CTR_BYTES)};
}

std::vector<std::string> NftDumpParser::Sets(uint8_t family) const {
  std::vector<std::string> names;
  auto it = tables_.find(family);
  if (it == tables_.end()) return names;
  for (const auto& [name, set] : it->second.sets) names.push_back(name);
  return names;
}

namespace {

// The ports in the allow set; nullopt when it is missing or holds what
// vmnetd never writes.
std::optional<PortSecurityConfig> AllowedPorts(const NftDumpParser::Table& table) {
  auto it = table.sets.find("vm_to_host_allow");
  if (it == table.sets.end()) return std::nullopt;
  PortSecurityConfig config;
  for (const auto& [key, obj] : it->second.elements) {
    if (key.size() != 8 || (key[0] != IPPROTO_TCP && key[0] != IPPROTO_UDP))
      return std::nullopt;
    config.vm_to_host_allow.push_back({static_cast<VmToHostPort::Protocol>(key[0]),
                                       static_cast<uint16_t>(key[4] << 8 | key[5])});
  }
  return config;
}

// Why `table` is not the base `spec` describes; empty when it is.
std::string CompareTable(const TableSpec& spec, const NftDumpParser::Table& table,
                         const std::string& tag) {
  std::string family = FamilyName(spec.family);
  if (table.comment != tag)
    return absl::StrCat(family, " table: tag \"", table.comment, "\"");
  std::map<std::string, std::vector<std::string>> rules;
  for (const RuleSpec& r : spec.rules) rules[r.chain].push_back(r.comment);
  if (table.chains.size() != spec.chains.size())
    return absl::StrCat(family, ": ", table.chains.size(), " chains, expected ",
                        spec.chains.size());
  for (const ChainSpec& c : spec.chains) {
    auto it = table.chains.find(c.name);
    if (it == table.chains.end())
      return absl::StrCat(family, ": chain ", c.name, " missing");
    const auto& chain = it->second;
    if (chain.hook != c.hook ||
        (c.hook && (chain.priority != c.priority || chain.policy != NF_ACCEPT ||
                    chain.type != "filter"))) {
      return absl::StrCat(family, ": chain ", c.name,
                          " has another hook, priority or policy");
    }
    if (chain.rule_comments != rules[c.name])
      return absl::StrCat(family, ": chain ", c.name, " holds other rules");
  }
  if (table.sets.size() != spec.sets.size())
    return absl::StrCat(family, ": ", table.sets.size(), " sets, expected ",
                        spec.sets.size());
  for (const SetSpec& s : spec.sets) {
    auto it = table.sets.find(s.name);
    if (it == table.sets.end()) return absl::StrCat(family, ": set ", s.name, " missing");
    const auto& set = it->second;
    if (set.key_len != s.key_len || (set.flags & (NFT_SET_INTERVAL | NFT_SET_OBJECT)) !=
                                        (s.flags & (NFT_SET_INTERVAL | NFT_SET_OBJECT)))
      return absl::StrCat(family, ": set ", s.name, " has another type");
    bool constant = std::string(s.name) == "vm_to_host_allow" ||
                    std::string(s.name).find("icmp") == 0;
    if (constant) {
      std::set<std::vector<uint8_t>> want(s.constant_elements.begin(),
                                          s.constant_elements.end());
      std::set<std::vector<uint8_t>> have;
      for (const auto& [key, obj] : set.elements) have.insert(key);
      if (want != have)
        return absl::StrCat(family, ": set ", s.name, " holds other elements");
    }
  }
  return "";
}

}  // namespace

NftSnapshot NftDumpParser::Finish() const {
  NftSnapshot snap;
  auto inet = tables_.find(NFPROTO_INET);
  auto arp = tables_.find(NFPROTO_ARP);
  if (inet != tables_.end()) snap.fingerprint = inet->second.comment;
  // The configuration the allow set holds; the tag says whether it is the
  // one the base was built for.
  std::optional<PortSecurityConfig> config;
  if (inet != tables_.end()) config = AllowedPorts(inet->second);
  if (inet == tables_.end()) {
    snap.damage = "table inet vmnet missing";
  } else if (arp == tables_.end()) {
    snap.damage = "table arp vmnet missing";
  } else if (!config || config->Fingerprint() != *snap.fingerprint) {
    snap.damage = absl::StrCat("table inet vmnet: tag \"", *snap.fingerprint,
                               "\" does not describe its sets (or is another version's)");
  } else {
    std::vector<TableSpec> spec = BaseSpec(*config);
    snap.damage = CompareTable(spec[0], inet->second, *snap.fingerprint);
    if (snap.damage.empty())
      snap.damage = CompareTable(spec[1], arp->second, *snap.fingerprint);
  }
  snap.base_intact = snap.damage.empty();

  // VM links: every part, counted per link name.
  std::map<std::string, int> parts;
  std::set<std::string> names;
  auto set_of = [&](uint8_t family, const char* name) -> const Set* {
    auto t = tables_.find(family);
    if (t == tables_.end()) return nullptr;
    auto s = t->second.sets.find(name);
    return s == t->second.sets.end() ? nullptr : &s->second;
  };
  auto note = [&](const std::string& ifname) {
    ++parts[ifname];
    names.insert(ifname);
  };
  for (uint8_t family : {NFPROTO_INET, NFPROTO_ARP}) {
    if (const Set* s = set_of(family, "vm_links")) {
      for (const auto& [key, obj] : s->elements) {
        if (key.size() == IFNAMSIZ) note(IfnameOf(key.data()));
      }
    }
    std::vector<DropReason> reasons = {DropReason::kSpoofedArpNd};
    if (family == NFPROTO_INET)
      reasons = {DropReason::kSpoofedSource, DropReason::kSpoofedArpNd,
                 DropReason::kToHost};
    for (DropReason reason : reasons) {
      const Set* map = set_of(family, DropReasonName(reason));
      if (map == nullptr) continue;
      for (const auto& [key, obj] : map->elements) {
        if (key.size() != IFNAMSIZ) continue;
        std::string ifname = IfnameOf(key.data());
        if (obj == CounterName(reason, ifname)) {
          note(ifname);
        } else {
          ++snap.foreign_elements;
        }
      }
    }
    auto t = tables_.find(family);
    if (t == tables_.end()) continue;
    for (const auto& [name, value] : t->second.counters) {
      DropReason reason;
      std::string ifname;
      if (ParseCounterName(name, &reason, &ifname) &&
          (family == NFPROTO_INET || reason == DropReason::kSpoofedArpNd)) {
        note(ifname);
      } else if (family == NFPROTO_INET && LimitCounterIfname(name, &ifname)) {
        // A packet-rate limit's part: counted below.
      } else {
        ++snap.foreign_elements;
      }
    }
  }
  // 2 vm_links + 4 map elements + 4 counters.
  constexpr int kVmLinkParts = 10;
  for (const std::string& name : names) {
    if (parts[name] == kVmLinkParts) {
      snap.elements.push_back(NftVmLink{name});
    } else {
      snap.incomplete_vm_links.push_back(name);
    }
  }
  for (const char* name : {"src4", "src6"}) {
    const Set* s = set_of(NFPROTO_INET, name);
    if (s == nullptr) continue;
    size_t alen = std::string(name) == "src4" ? 4 : 16;
    auto fam = alen == 4 ? IpAddress::Family::kV4 : IpAddress::Family::kV6;
    for (const auto& [key, obj] : s->elements) {
      if (key.size() != IFNAMSIZ + alen) {
        ++snap.foreign_elements;
        continue;
      }
      snap.elements.push_back(NftSourcePrefix{
          IfnameOf(key.data()),
          IpPrefix::Host(IpAddress::FromBytes(fam, key.data() + IFNAMSIZ))});
    }
  }
  for (const char* name : {"src4_ranges", "src6_ranges"}) {
    const Set* s = set_of(NFPROTO_INET, name);
    if (s == nullptr) continue;
    size_t alen = std::string(name) == "src4_ranges" ? 4 : 16;
    auto fam = alen == 4 ? IpAddress::Family::kV4 : IpAddress::Family::kV6;
    for (const auto& [key, obj] : s->elements) {
      if (key.size() != 2 * (IFNAMSIZ + alen)) {
        ++snap.foreign_elements;
        continue;
      }
      std::string ifname = IfnameOf(key.data());
      IpAddress first = IpAddress::FromBytes(fam, key.data() + IFNAMSIZ);
      IpAddress last = IpAddress::FromBytes(fam, key.data() + 2 * IFNAMSIZ + alen);
      auto prefix = RangeToPrefix(first, last);
      if (!prefix || IfnameOf(key.data() + IFNAMSIZ + alen) != ifname) {
        ++snap.foreign_elements;
        continue;
      }
      snap.elements.push_back(NftSourcePrefix{ifname, *prefix});
    }
  }
  if (const Set* s = set_of(NFPROTO_ARP, "arp_src4")) {
    for (const auto& [key, obj] : s->elements) {
      if (key.size() != IFNAMSIZ + 4) {
        ++snap.foreign_elements;
        continue;
      }
      snap.elements.push_back(NftArpSender{
          IfnameOf(key.data()),
          IpAddress::FromBytes(IpAddress::Family::kV4, key.data() + IFNAMSIZ)});
    }
  }
  // Packet-rate limits: the limit object, its counter and both map
  // elements. Anything less, or a limit vmnetd does not write, is reported
  // with rate 0 (replaced when desired, deleted otherwise).
  if (inet != tables_.end()) {
    const Table& t = inet->second;
    std::map<std::string, int> limit_parts;
    std::map<std::string, NftPacketRateLimit> limits;
    for (const auto& [name, l] : t.limits) {
      if (!absl::StartsWith(name, kEgressPpsPrefix)) {
        ++snap.foreign_elements;
        continue;
      }
      std::string ifname = name.substr(sizeof(kEgressPpsPrefix) - 1);
      ++limit_parts[ifname];
      if (l.unit == 1 && l.type == NFT_LIMIT_PKTS && l.flags == NFT_LIMIT_F_INV &&
          l.rate != 0 && l.burst != 0) {
        limits[ifname] = {ifname, l.rate, l.burst};
      }
    }
    for (const auto& [name, value] : t.counters) {
      std::string ifname;
      if (LimitCounterIfname(name, &ifname)) ++limit_parts[ifname];
    }
    for (const auto& [map, prefix] :
         {std::pair<const char*, std::string>{kEgressPpsMap, kEgressPpsPrefix},
          {DropReasonName(DropReason::kEgressPacketRate),
           absl::StrCat(DropReasonName(DropReason::kEgressPacketRate), ".")}}) {
      const Set* s = set_of(NFPROTO_INET, map);
      if (s == nullptr) continue;
      for (const auto& [key, obj] : s->elements) {
        if (key.size() != IFNAMSIZ) {
          ++snap.foreign_elements;
          continue;
        }
        std::string ifname = IfnameOf(key.data());
        // An element naming another object counts as a part, never as the
        // right one: the limit is not complete.
        limit_parts[ifname] += obj == prefix + ifname ? 1 : 10;
      }
    }
    // The limit, its counter and their two map elements.
    constexpr int kLimitParts = 4;
    for (const auto& [ifname, n] : limit_parts) {
      auto it = limits.find(ifname);
      if (n == kLimitParts && it != limits.end()) {
        snap.elements.push_back(it->second);
      } else {
        snap.elements.push_back(NftPacketRateLimit{ifname, 0, 0});
      }
    }
  }
  std::sort(snap.elements.begin(), snap.elements.end());
  return snap;
}

std::vector<DropCounter> NftDumpParser::Counters() const {
  std::map<std::pair<std::string, DropReason>, DropCounter> sums;
  for (const auto& [family, table] : tables_) {
    for (const auto& [name, value] : table.counters) {
      DropReason reason;
      std::string ifname;
      if (LimitCounterIfname(name, &ifname)) {
        reason = DropReason::kEgressPacketRate;
      } else if (!ParseCounterName(name, &reason, &ifname)) {
        continue;
      }
      DropCounter& c = sums[{ifname, reason}];
      c.ifname = ifname;
      c.reason = reason;
      c.packets += value.first;
      c.bytes += value.second;
    }
  }
  std::vector<DropCounter> out;
  for (auto& [key, c] : sums) out.push_back(c);
  return out;
}

// ---- Events -----------------------------------------------------------

std::vector<NftEvent> ParseNftEvent(const nlmsghdr* msg, uint32_t own_portid) {
  std::vector<NftEvent> out;
  if ((msg->nlmsg_type >> 8) != NFNL_SUBSYS_NFTABLES) return out;
  if (msg->nlmsg_len < NLMSG_LENGTH(sizeof(nfgenmsg))) return out;
  const uint16_t type = msg->nlmsg_type & 0xff;
  const uint8_t family = FamilyOf(msg);
  const bool own = own_portid != 0 && msg->nlmsg_pid == own_portid;
  auto base = [&](const char* verb, const std::string& what) {
    NftEvent e;
    e.kind = NftEvent::Kind::kBaseChanged;
    e.own = own;
    e.what = absl::StrCat(verb, " ", what);
    out.push_back(std::move(e));
  };
  const bool is_new = type == NFT_MSG_NEWTABLE || type == NFT_MSG_NEWCHAIN ||
                      type == NFT_MSG_NEWRULE || type == NFT_MSG_NEWSET ||
                      type == NFT_MSG_NEWSETELEM || type == NFT_MSG_NEWOBJ;
  const char* verb = is_new ? "add" : "delete";
  const std::string table_name = absl::StrCat(FamilyName(family), " ", kNftTableName);
  switch (type) {
    case NFT_MSG_NEWTABLE:
    case NFT_MSG_DELTABLE: {
      TablePtr t(nftnl_table_alloc());
      if (nftnl_table_nlmsg_parse(msg, t.get()) < 0) return out;
      if (!Ours(family, nftnl_table_get_str(t.get(), NFTNL_TABLE_NAME))) return out;
      base(verb, absl::StrCat("table ", table_name));
      return out;
    }
    case NFT_MSG_NEWCHAIN:
    case NFT_MSG_DELCHAIN: {
      ChainPtr c(nftnl_chain_alloc());
      if (nftnl_chain_nlmsg_parse(msg, c.get()) < 0) return out;
      if (!Ours(family, nftnl_chain_get_str(c.get(), NFTNL_CHAIN_TABLE))) return out;
      base(verb, absl::StrCat("chain ", table_name, " ",
                              nftnl_chain_get_str(c.get(), NFTNL_CHAIN_NAME)));
      return out;
    }
    case NFT_MSG_NEWRULE:
    case NFT_MSG_DELRULE: {
      RulePtr r(nftnl_rule_alloc());
      if (nftnl_rule_nlmsg_parse(msg, r.get()) < 0) return out;
      if (!Ours(family, nftnl_rule_get_str(r.get(), NFTNL_RULE_TABLE))) return out;
      base(verb, absl::StrCat("rule in ", table_name, " ",
                              nftnl_rule_get_str(r.get(), NFTNL_RULE_CHAIN)));
      return out;
    }
    case NFT_MSG_NEWSET:
    case NFT_MSG_DELSET: {
      SetPtr s(nftnl_set_alloc());
      if (nftnl_set_nlmsg_parse(msg, s.get()) < 0) return out;
      if (!Ours(family, nftnl_set_get_str(s.get(), NFTNL_SET_TABLE))) return out;
      base(verb, absl::StrCat("set ", table_name, " ",
                              nftnl_set_get_str(s.get(), NFTNL_SET_NAME)));
      return out;
    }
    case NFT_MSG_NEWOBJ:
    case NFT_MSG_DELOBJ: {
      ObjPtr o(nftnl_obj_alloc());
      if (nftnl_obj_nlmsg_parse(msg, o.get()) < 0) return out;
      if (!Ours(family, nftnl_obj_get_str(o.get(), NFTNL_OBJ_TABLE))) return out;
      std::string name = nftnl_obj_get_str(o.get(), NFTNL_OBJ_NAME);
      NftEvent e;
      e.own = own;
      e.what = absl::StrCat(verb, " object ", table_name, " ", name);
      DropReason reason;
      std::string ifname;
      const uint32_t obj_type = nftnl_obj_get_u32(o.get(), NFTNL_OBJ_TYPE);
      if (obj_type == NFT_OBJECT_COUNTER && ParseCounterName(name, &reason, &ifname)) {
        e.kind = is_new ? NftEvent::Kind::kElementAdded : NftEvent::Kind::kElementDeleted;
        e.element = NftVmLink{ifname};
      } else if ((obj_type == NFT_OBJECT_COUNTER && family == NFPROTO_INET &&
                  LimitCounterIfname(name, &ifname)) ||
                 (obj_type == NFT_OBJECT_LIMIT && family == NFPROTO_INET &&
                  absl::StartsWith(name, kEgressPpsPrefix) &&
                  name.size() > sizeof(kEgressPpsPrefix) - 1)) {
        if (obj_type == NFT_OBJECT_LIMIT)
          ifname = name.substr(sizeof(kEgressPpsPrefix) - 1);
        e.kind = is_new ? NftEvent::Kind::kElementAdded : NftEvent::Kind::kElementDeleted;
        e.element = NftPacketRateLimit{ifname, 0, 0};
      }
      out.push_back(std::move(e));
      return out;
    }
    case NFT_MSG_NEWSETELEM:
    case NFT_MSG_DELSETELEM: {
      SetPtr s(nftnl_set_alloc());
      if (nftnl_set_elems_nlmsg_parse(msg, s.get()) < 0) return out;
      if (!Ours(family, nftnl_set_get_str(s.get(), NFTNL_SET_TABLE))) return out;
      std::string set = nftnl_set_get_str(s.get(), NFTNL_SET_NAME);
      std::string what = absl::StrCat(verb, " element of ", table_name, " ", set);
      const auto kind =
          is_new ? NftEvent::Kind::kElementAdded : NftEvent::Kind::kElementDeleted;
      struct Ctx {
        std::vector<NftEvent>* out;
        const std::string* set;
        const std::string* what;
        NftEvent::Kind kind;
        bool own;
        uint8_t family;
      } ctx{&out, &set, &what, kind, own, family};
      nftnl_set_elem_foreach(
          s.get(),
          [](nftnl_set_elem* e, void* data) -> int {
            auto* c = static_cast<Ctx*>(data);
            uint32_t len = 0, end_len = 0;
            auto* key = static_cast<const uint8_t*>(
                nftnl_set_elem_get(e, NFTNL_SET_ELEM_KEY, &len));
            NftEvent ev;
            ev.own = c->own;
            ev.what = *c->what;
            ev.kind = NftEvent::Kind::kBaseChanged;
            const std::string& set = *c->set;
            if (key != nullptr && len >= IFNAMSIZ) {
              std::string ifname = IfnameOf(key);
              if ((set == "vm_links" || set == "spoofed_source" ||
                   set == "spoofed_arp_nd" || set == "to_host") &&
                  len == IFNAMSIZ) {
                ev.kind = c->kind;
                ev.element = NftVmLink{ifname};
              } else if ((set == kEgressPpsMap || set == "egress_pps_dropped") &&
                         len == IFNAMSIZ && c->family == NFPROTO_INET) {
                ev.kind = c->kind;
                ev.element = NftPacketRateLimit{ifname, 0, 0};
              } else if ((set == "src4" || set == "src4_ranges" || set == "src6" ||
                          set == "src6_ranges") &&
                         len == IFNAMSIZ + (set[3] == '4' ? 4 : 16)) {
                auto fam =
                    len == IFNAMSIZ + 4 ? IpAddress::Family::kV4 : IpAddress::Family::kV6;
                IpAddress first = IpAddress::FromBytes(fam, key + IFNAMSIZ);
                IpAddress last = first;
                if (nftnl_set_elem_is_set(e, NFTNL_SET_ELEM_KEY_END)) {
                  auto* end = static_cast<const uint8_t*>(
                      nftnl_set_elem_get(e, NFTNL_SET_ELEM_KEY_END, &end_len));
                  if (end_len == len) last = IpAddress::FromBytes(fam, end + IFNAMSIZ);
                }
                if (auto p = RangeToPrefix(first, last)) {
                  ev.kind = c->kind;
                  ev.element = NftSourcePrefix{ifname, *p};
                }
              } else if (set == "arp_src4" && len == IFNAMSIZ + 4) {
                ev.kind = c->kind;
                ev.element = NftArpSender{
                    ifname, IpAddress::FromBytes(IpAddress::Family::kV4, key + IFNAMSIZ)};
              }
            }
            c->out->push_back(std::move(ev));
            return 0;
          },
          &ctx);
      if (out.empty()) base(verb, absl::StrCat("elements of ", table_name, " ", set));
      return out;
    }
    default:
      return out;
  }
}

}  // namespace vmnet::kernel
