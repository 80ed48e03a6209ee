// Traffic control (per-VM bandwidth limits) as value types: the qdiscs and
// the filter vmnetd puts on a VM's link, the ifb device that shapes what the
// VM sends, and the writes and events about them.
//
// What a limited VM gets (`tc` equivalents):
//   towards the VM (ingress_bits_per_second): the VM link's root qdisc
//     tc qdisc replace dev vmeX root handle ed: tbf rate R burst B limit L
//   from the VM (egress_bits_per_second): an ingress qdisc on the VM link
//   whose match-all u32 filter redirects every packet to the VM's ifb
//   device, whose root qdisc shapes it
//     ip link add vmbX type ifb; ip link set vmbX up
//     tc qdisc replace dev vmbX root handle ed: tbf rate R burst B limit L
//     tc qdisc add dev vmeX ingress
//     tc filter add dev vmeX parent ffff: prio 237 protocol all u32 match u32 0 0
//        action mirred egress redirect dev vmbX     (one command)
//
// Ownership (never touch what is not ours):
//   - a root qdisc with handle ed: (kQdiscHandle) is vmnetd's; a root qdisc
//     with handle 0: is the kernel's default, which vmnetd may replace; any
//     other root qdisc is someone else's, and the VM is failed naming it;
//   - the filter at prio 237 (kFilterPrio) of a VM link's ingress qdisc is
//     vmnetd's, and so is that ingress qdisc while it holds no other filter;
//   - an ifb link named vmb… (IfbName) is vmnetd's.
#pragma once

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace vmnet::kernel {

// Handles (major:minor in 16+16 bits).
constexpr uint32_t kQdiscHandle = 0x00ED0000;    // "ed:" (237)
constexpr uint32_t kIngressHandle = 0xFFFF0000;  // "ffff:", every ingress qdisc's
constexpr uint32_t kRootParent = 0xFFFFFFFF;     // TC_H_ROOT
constexpr uint32_t kIngressParent = 0xFFFFFFF1;  // TC_H_INGRESS
// ffff:fff2: the ingress block as `tc filter ... ingress` names it.
constexpr uint32_t kClsactIngressParent = 0xFFFFFFF2;
constexpr uint16_t kFilterPrio = 237;
constexpr absl::string_view kIfbPrefix = "vmb";

// The ifb device that shapes what the VM on `vm_link` sends: "vmb" and the
// link's name after its first three characters when that fits IFNAMSIZ
// (vme7b9a73a1 -> vmb7b9a73a1), otherwise "vmb" and 12 hex digits of a hash
// of the name. Deterministic: the same link always gets the same ifb.
std::string IfbName(absl::string_view vm_link);
// Whether a link name is one IfbName can give (the vmb prefix).
bool IsIfbName(absl::string_view name);

// A qdisc at the root or ingress of a link. For tbf, the shaping
// parameters as the kernel reports them (burst is derived from the
// kernel's buffer time, so it may differ from what was asked by rounding).
struct Qdisc {
  int ifindex = 0;
  uint32_t parent = kRootParent;  // kRootParent or kIngressParent
  uint32_t handle = 0;
  std::string kind;                    // "tbf", "ingress", "noqueue", "fq_codel", ...
  uint64_t rate_bytes_per_second = 0;  // tbf
  uint32_t burst_bytes = 0;            // tbf
  uint32_t limit_bytes = 0;            // tbf: bytes queued at most
  // Statistics (dumps only; not part of equality).
  uint64_t drops = 0;
  uint64_t overlimits = 0;
  uint64_t packets = 0;

  bool operator==(const Qdisc& o) const {
    return ifindex == o.ifindex && parent == o.parent && handle == o.handle &&
           kind == o.kind && rate_bytes_per_second == o.rate_bytes_per_second &&
           burst_bytes == o.burst_bytes && limit_bytes == o.limit_bytes;
  }
  bool is_root() const { return parent == kRootParent; }
  std::string ToString() const;
};

// A filter of a link's ingress qdisc, as much of it as vmnetd looks at.
struct TcFilter {
  int ifindex = 0;
  uint32_t parent = kIngressHandle;
  uint16_t prio = kFilterPrio;
  uint16_t protocol = 0x0003;  // ETH_P_ALL, host order
  std::string kind = "u32";
  uint32_t handle = 0;  // 0 in writes: the kernel chooses (u32: 800::800)
  // A u32 node that matches every packet (one key, mask 0).
  bool match_all = true;
  // The ifindex a mirred egress redirect sends to; 0 when the filter has
  // none (a u32 hash table node, or a redirect to a device that is gone).
  int redirect_ifindex = 0;

  bool operator==(const TcFilter&) const = default;
  std::string ToString() const;
};

// Creates the qdisc or replaces the one at its parent in place
// (RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE): a limit that changes never
// passes through a moment unlimited.
struct SetQdisc {
  Qdisc qdisc;
  bool operator==(const SetQdisc&) const = default;
};
// Deletes the qdisc at (ifindex, parent) only if its handle is the one
// named (the kernel refuses otherwise).
struct DeleteQdisc {
  Qdisc qdisc;
  bool operator==(const DeleteQdisc&) const = default;
};
struct AddTcFilter {
  TcFilter filter;
  bool operator==(const AddTcFilter&) const = default;
};
// Deletes every filter at the prio (the whole u32 at prio 237).
struct DeleteTcFilter {
  TcFilter filter;
  bool operator==(const DeleteTcFilter&) const = default;
};
// Creates an ifb device, up, with no IPv6 address generation (an ifb needs
// no link-local address; see EncodeIfbBringUp), and then its root `tbf` and
// the VM link's `redirect` to it: the VM's egress limit in one write, so the
// VM is whole after one pass. The ifb's ifindex is known only once the kernel
// made it: the kernel layer reads it and fills in `tbf.ifindex` and
// `redirect.redirect_ifindex` (0 here). The VM link's ingress qdisc must be
// there before (an earlier write of the same batch). `vm_link` names the VM
// link it serves, so that the ifb's events plan that VM again.
struct CreateIfb {
  std::string name;
  std::string vm_link;
  Qdisc tbf;
  TcFilter redirect;
  bool operator==(const CreateIfb&) const = default;
};
// Deletes a link vmnetd created (an ifb device).
struct DeleteLink {
  int ifindex = 0;
  std::string name;
  bool operator==(const DeleteLink&) const = default;
};

struct QdiscEvent {
  bool deleted = false;
  Qdisc qdisc;
};
struct TcFilterEvent {
  bool deleted = false;
  TcFilter filter;
};

// What this kernel's traffic control offers beyond what vmnetd needs
// (tbf, ingress, u32, mirred, ifb), found at start.
struct TcCapabilities {
  bool police = false;    // the police action (act_police)
  bool matchall = false;  // the matchall classifier (cls_matchall)
  std::string ToString() const;
};

}  // namespace vmnet::kernel
