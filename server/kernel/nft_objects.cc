#include "vmnet/kernel/nft_objects.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace vmnet::kernel {

// Bumped whenever the base's rules change: a daemon of a new version
// replaces the base of an old one.
constexpr char kRulesetVersion[] = "vmnetd-portsec-2";  // 2: packet-rate limits

const char* DropReasonName(DropReason reason) {
  switch (reason) {
    case DropReason::kSpoofedSource:
      return "spoofed_source";
    case DropReason::kSpoofedArpNd:
      return "spoofed_arp_nd";
    case DropReason::kToHost:
      return "to_host";
    case DropReason::kEgressPacketRate:
      return "egress_pps_dropped";
  }
  return "unknown";
}

uint32_t PacketRateBurst(uint64_t packets_per_second) {
  uint64_t burst = packets_per_second / 10;
  if (burst < 5) burst = 5;
  return static_cast<uint32_t>(std::min<uint64_t>(burst, UINT32_MAX));
}

std::string VmToHostPort::ToString() const {
  return absl::StrCat(protocol == Protocol::kTcp ? "tcp" : "udp", "/", port);
}

std::string PortSecurityConfig::Fingerprint() const {
  std::vector<VmToHostPort> ports = vm_to_host_allow;
  std::sort(ports.begin(), ports.end());
  ports.erase(std::unique(ports.begin(), ports.end()), ports.end());
  std::string list = absl::StrJoin(
      ports, ",",
      [](std::string* out, const VmToHostPort& p) { out->append(p.ToString()); });
  // The tag is a comment of at most 128 bytes: a long list is hashed
  // (FNV-1a, stable across processes and versions).
  if (list.size() > 96) {
    uint64_t h = 14695981039346656037ull;
    for (unsigned char c : list) h = (h ^ c) * 1099511628211ull;
    list = absl::StrCat(ports.size(), " ports, fnv1a ", absl::Hex(h, absl::kZeroPad16));
  }
  return absl::StrCat(kRulesetVersion, " allow=", list);
}

namespace {

struct ElementNamer {
  std::string operator()(const NftVmLink& e) const {
    return absl::StrCat("port-security link ", e.ifname);
  }
  std::string operator()(const NftSourcePrefix& e) const {
    return absl::StrCat("permitted source ", e.ifname, " . ", e.prefix.ToString());
  }
  std::string operator()(const NftArpSender& e) const {
    return absl::StrCat("permitted ARP sender ", e.ifname, " . ", e.address.ToString());
  }
  std::string operator()(const NftPacketRateLimit& e) const {
    if (e.packets_per_second == 0)
      return absl::StrCat("packet-rate limit ", e.ifname, " (not as vmnetd writes it)");
    return absl::StrCat("packet-rate limit ", e.ifname, " over ", e.packets_per_second,
                        "/second burst ", e.burst_packets, " packets");
  }
};

struct WriteNamer {
  std::string operator()(const EnsurePortSecurityBase& w) const {
    return absl::StrCat("install port-security base (", w.config.Fingerprint(), ")");
  }
  std::string operator()(const DeletePortSecurityBase&) const {
    return "delete port-security base";
  }
  std::string operator()(const AddNftElement& w) const {
    return "add " + kernel::ToString(w.element);
  }
  std::string operator()(const DeleteNftElement& w) const {
    return "delete " + kernel::ToString(w.element);
  }
};

}  // namespace

std::string ToString(const NftElement& element) {
  return std::visit(ElementNamer{}, element);
}

std::string ToString(const NftWrite& write) { return std::visit(WriteNamer{}, write); }

std::vector<IpPrefix> NonOverlappingPrefixes(std::vector<IpPrefix> prefixes) {
  // Shorter prefixes first, so a covering prefix is kept before what it covers.
  std::sort(prefixes.begin(), prefixes.end(), [](const IpPrefix& a, const IpPrefix& b) {
    return a.length != b.length ? a.length < b.length : a < b;
  });
  std::vector<IpPrefix> kept;
  for (const IpPrefix& p : prefixes) {
    bool covered = std::any_of(kept.begin(), kept.end(), [&](const IpPrefix& k) {
      return k.address.family() == p.address.family() && k.length <= p.length &&
             k.Contains(p.address);
    });
    if (!covered) kept.push_back(p);
  }
  std::sort(kept.begin(), kept.end());
  return kept;
}

std::string NftEvent::ToString() const {
  const char* kinds[] = {"element added", "element deleted", "base changed"};
  std::string s =
      absl::StrCat("nftables event: ", kinds[static_cast<int>(kind)], ": ", what);
  if (element) absl::StrAppend(&s, " (", kernel::ToString(*element), ")");
  if (own) absl::StrAppend(&s, " [own write]");
  return s;
}

std::string DropCounter::ToString() const {
  return absl::StrCat("drop counter ", ifname, " ", DropReasonName(reason), ": ", packets,
                      " packets, ", bytes, " bytes");
}

}  // namespace vmnet::kernel
