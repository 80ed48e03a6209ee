// The bandwidth limits' part of the plan (plan.h): pure functions of a
// VM's spec and the kernel model to the traffic-control writes that
// install, change or remove its shapers. Ownership rules: tc_objects.h.
#pragma once

#include <vector>

#include "vmnet/kernel/objects.h"
#include "vmnet/reconciler/kernel_model.h"
#include "vmnet/reconciler/plan.h"
#include "vmnet/state/vm_spec.h"

namespace vmnet {

// What the VM's link (present) must hold for spec.bandwidth, and what of
// ours it must no longer hold: a tbf as root qdisc for the ingress limit;
// an ifb device, up, with a tbf, and the ingress qdisc with our match-all
// redirect filter for the egress limit. A changed limit is a SetQdisc,
// which the kernel applies in place. An ifb device is created in one pass
// and given its tbf and filter in the next (its ifindex is known once its
// RTM_NEWLINK arrives). A root qdisc or an ingress-side qdisc that is not
// ours fails the VM, naming it.
void PlanBandwidth(const VmSpec& spec, const kernel::LinkInfo& link, const KernelModel& model,
                   VmPlan* plan);

// Removes the traffic-control objects of `old_spec`'s link when the VM is
// detached or moves to another link (a kept link is PlanBandwidth's).
void PlanBandwidthRemoval(const VmSpec& old_spec, const VmSpec* new_spec,
                          const KernelModel& model, std::vector<kernel::Write>* writes);

// Our objects that no desired VM wants: ifb devices (vmb…, kind ifb), root
// qdiscs with our handle and filters at our prio on links of no limited VM.
void PlanBandwidthOrphans(const KernelModel& model,
                          const std::vector<const VmSpec*>& desired,
                          std::vector<kernel::Write>* writes);

}  // namespace vmnet
