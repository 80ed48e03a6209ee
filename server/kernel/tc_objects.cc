#include "vmnet/kernel/tc_objects.h"

#include <linux/if.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace vmnet::kernel {
namespace {

std::string Handle(uint32_t h) {
  if (h == kRootParent) return "root";
  if (h == kIngressParent) return "ingress";
  if ((h & 0xFFFF) == 0) return absl::StrFormat("%x:", h >> 16);  // as tc shows it
  return absl::StrFormat("%x:%x", h >> 16, h & 0xFFFF);
}

}  // namespace

std::string IfbName(absl::string_view vm_link) {
  if (vm_link.size() > 3 && vm_link.size() < IFNAMSIZ) {
    std::string name = absl::StrCat(kIfbPrefix, vm_link.substr(3));
    // Never the VM link's own name (a link that is called vmb… already).
    if (name != vm_link) return name;
  }
  // FNV-1a, 48 bits: 12 hex digits.
  uint64_t h = 1469598103934665603ull;
  for (char c : vm_link) {
    h ^= static_cast<uint8_t>(c);
    h *= 1099511628211ull;
  }
  return absl::StrFormat("%s%012x", kIfbPrefix, h & 0xFFFFFFFFFFFFull);
}

bool IsIfbName(absl::string_view name) {
  return name.size() > kIfbPrefix.size() && absl::StartsWith(name, kIfbPrefix);
}

std::string Qdisc::ToString() const {
  std::string s = absl::StrCat("qdisc ", kind.empty() ? "?" : kind, " ", Handle(handle),
                               " dev #", ifindex, " ", Handle(parent));
  if (kind == "tbf") {
    absl::StrAppend(&s, " rate ", rate_bytes_per_second * 8, "bit burst ", burst_bytes,
                    "b limit ", limit_bytes, "b");
  }
  return s;
}

std::string TcFilter::ToString() const {
  std::string s = absl::StrCat("filter dev #", ifindex, " parent ", Handle(parent),
                               " prio ", prio, " ", kind);
  if (handle != 0) absl::StrAppend(&s, " handle ", Handle(handle));
  if (match_all) absl::StrAppend(&s, " match all");
  if (redirect_ifindex != 0) {
    absl::StrAppend(&s, " action mirred egress redirect dev #", redirect_ifindex);
  }
  return s;
}

std::string TcCapabilities::ToString() const {
  return absl::StrCat("police=", police ? "yes" : "no",
                      " matchall=", matchall ? "yes" : "no");
}

}  // namespace vmnet::kernel
