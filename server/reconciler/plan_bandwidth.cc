#include "vmnet/reconciler/plan_bandwidth.h"

#include <linux/if_ether.h>

#include <algorithm>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "vmnet/kernel/tc_codec.h"

namespace vmnet {

using Link = kernel::LinkInfo;  // a link as the model keeps it
using kernel::Qdisc;
using kernel::TcFilter;

namespace {

void Conflict(VmPlan* plan, std::string what) {
  if (plan->state != VmState::kFailed) {
    plan->state = VmState::kFailed;
    plan->message = std::move(what);
  }
}

uint32_t BurstFor(const Bandwidth& b, uint64_t bits_per_second) {
  return b.burst_bytes != 0 ? b.burst_bytes : kernel::DefaultBurstBytes(bits_per_second);
}

Qdisc IngressQdisc(int ifindex) {
  Qdisc q;
  q.ifindex = ifindex;
  q.parent = kernel::kIngressParent;
  q.handle = kernel::kIngressHandle;
  q.kind = "ingress";
  return q;
}

TcFilter Redirect(int ifindex, int ifb_ifindex) {
  TcFilter f;
  f.ifindex = ifindex;
  f.redirect_ifindex = ifb_ifindex;
  return f;
}

bool IsOurRedirect(const TcFilter& f, int ifb_ifindex) {
  return f.parent == kernel::kIngressHandle && f.prio == kernel::kFilterPrio &&
         f.kind == "u32" && f.protocol == ETH_P_ALL && f.match_all &&
         f.redirect_ifindex == ifb_ifindex;
}

// The root qdisc `want` asks for: nothing when it is there, a replace when
// the root is ours or the kernel's default, a conflict otherwise.
void PlanRootTbf(const Link& link, const Qdisc& want, const KernelModel& model,
                 VmPlan* plan) {
  const Qdisc* root = model.FindQdisc(link.ifindex, kernel::kRootParent);
  if (root != nullptr && kernel::TbfMatches(*root, want)) return;
  if (root != nullptr && root->handle != 0 && root->handle != kernel::kQdiscHandle) {
    Conflict(plan, absl::StrCat(root->ToString(), " on ", link.name,
                                " is not vmnetd's and stands where the VM's bandwidth "
                                "limit must be; remove it"));
    return;
  }
  plan->writes.push_back(kernel::SetQdisc{want});
}

// Our redirect filter off the link, and the ingress qdisc with it when it
// holds no filter of anyone else's.
void RemoveRedirect(const Link& link, const KernelModel& model,
                    std::vector<kernel::Write>* writes) {
  const std::vector<TcFilter>* filters = model.IngressFilters(link.ifindex);
  if (filters == nullptr) return;
  bool ours = false, others = false;
  for (const TcFilter& f : *filters) {
    (f.prio == kernel::kFilterPrio ? ours : others) = true;
  }
  if (!ours) return;
  writes->push_back(kernel::DeleteTcFilter{Redirect(link.ifindex, 0)});
  const Qdisc* ingress = model.FindQdisc(link.ifindex, kernel::kIngressParent);
  if (!others && ingress != nullptr && ingress->kind == "ingress") {
    writes->push_back(kernel::DeleteQdisc{*ingress});
  }
}

void RemoveOurRoot(const Link& link, const KernelModel& model,
                   std::vector<kernel::Write>* writes) {
  const Qdisc* root = model.FindQdisc(link.ifindex, kernel::kRootParent);
  if (root != nullptr && root->handle == kernel::kQdiscHandle) {
    writes->push_back(kernel::DeleteQdisc{*root});
  }
}

void RemoveIfb(const std::string& vm_link, const KernelModel& model,
               std::vector<kernel::Write>* writes) {
  const Link* ifb = model.LinkByName(kernel::IfbName(vm_link));
  if (ifb != nullptr && ifb->kind == "ifb") {
    writes->push_back(kernel::DeleteLink{ifb->ifindex, ifb->name});
  }
}

}  // namespace

void PlanBandwidth(const VmSpec& spec, const Link& link, const KernelModel& model,
                   VmPlan* plan) {
  const Bandwidth& b = spec.bandwidth;
  // Towards the VM: the VM link's root qdisc.
  if (b.ingress_bits_per_second != 0) {
    PlanRootTbf(link,
                kernel::Tbf(link.ifindex, b.ingress_bits_per_second,
                            BurstFor(b, b.ingress_bits_per_second)),
                model, plan);
  } else {
    RemoveOurRoot(link, model, &plan->writes);
  }
  // From the VM: the ifb device and the redirect to it.
  std::string ifb_name = kernel::IfbName(spec.interface);
  const Link* ifb = model.LinkByName(ifb_name);
  if (b.egress_bits_per_second == 0) {
    RemoveRedirect(link, model, &plan->writes);
    RemoveIfb(spec.interface, model, &plan->writes);
    return;
  }
  if (ifb != nullptr && ifb->kind != "ifb") {
    Conflict(plan,
             absl::StrCat("link ", ifb_name, " (", ifb->kind.empty() ? "?" : ifb->kind,
                          ") is not vmnetd's ifb device and has the name the VM's "
                          "must have; remove it"));
    return;
  }
  // Without the ifb, its ifindex is unknown: the create carries the tbf and
  // the redirect, and the kernel layer writes them once it knows it.
  int ifb_ifindex = ifb != nullptr ? ifb->ifindex : 0;
  Qdisc tbf = kernel::Tbf(ifb_ifindex, b.egress_bits_per_second,
                          BurstFor(b, b.egress_bits_per_second));
  if (ifb != nullptr) {
    if (!ifb->up) plan->writes.push_back(kernel::SetLinkUp{ifb->ifindex, ifb->name});
    PlanRootTbf(*ifb, tbf, model, plan);
  }
  const Qdisc* ingress = model.FindQdisc(link.ifindex, kernel::kIngressParent);
  if (ingress != nullptr && ingress->kind != "ingress") {
    Conflict(plan,
             absl::StrCat(ingress->ToString(), " on ", link.name,
                          " is not vmnetd's and stands where the VM's ingress qdisc "
                          "must be; remove it"));
    return;
  }
  if (ingress == nullptr)
    plan->writes.push_back(kernel::SetQdisc{IngressQdisc(link.ifindex)});
  const std::vector<TcFilter>* filters =
      ingress != nullptr ? model.IngressFilters(link.ifindex) : nullptr;
  bool present = false, at_prio = false;
  if (filters != nullptr) {
    for (const TcFilter& f : *filters) {
      if (f.prio != kernel::kFilterPrio) continue;
      at_prio = true;
      if (ifb != nullptr && IsOurRedirect(f, ifb->ifindex)) present = true;
    }
  }
  if (present) return;
  // Ours, but wrong (a redirect to an ifb that was recreated, say): the
  // whole prio goes and comes back.
  if (at_prio) plan->writes.push_back(kernel::DeleteTcFilter{Redirect(link.ifindex, 0)});
  if (ifb == nullptr) {
    plan->writes.push_back(
        kernel::CreateIfb{ifb_name, spec.interface, tbf, Redirect(link.ifindex, 0)});
  } else {
    plan->writes.push_back(kernel::AddTcFilter{Redirect(link.ifindex, ifb->ifindex)});
  }
}

void PlanBandwidthRemoval(const VmSpec& old_spec, const VmSpec* new_spec,
                          const KernelModel& model, std::vector<kernel::Write>* writes) {
  if (new_spec != nullptr && new_spec->interface == old_spec.interface) return;
  if (const Link* link = model.LinkByName(old_spec.interface)) {
    RemoveOurRoot(*link, model, writes);
    RemoveRedirect(*link, model, writes);
  }
  RemoveIfb(old_spec.interface, model, writes);
}

void PlanBandwidthOrphans(const KernelModel& model,
                          const std::vector<const VmSpec*>& desired,
                          std::vector<kernel::Write>* writes) {
  absl::flat_hash_set<std::string> shaped_to, shaped_from, ifbs;
  for (const VmSpec* spec : desired) {
    if (spec->bandwidth.ingress_bits_per_second != 0) shaped_to.insert(spec->interface);
    if (spec->bandwidth.egress_bits_per_second != 0) {
      shaped_from.insert(spec->interface);
      ifbs.insert(kernel::IfbName(spec->interface));
    }
  }
  std::vector<kernel::Write> links_gone;
  model.ForEachLink([&](const Link& link) {
    if (kernel::IsIfbName(link.name) && link.kind == "ifb") {
      if (!ifbs.contains(link.name)) {
        links_gone.push_back(kernel::DeleteLink{link.ifindex, link.name});
      }
      return;
    }
    if (!shaped_to.contains(link.name)) RemoveOurRoot(link, model, writes);
    if (!shaped_from.contains(link.name)) RemoveRedirect(link, model, writes);
  });
  // After the filters that may redirect to them.
  writes->insert(writes->end(), links_gone.begin(), links_gone.end());
}

}  // namespace vmnet
