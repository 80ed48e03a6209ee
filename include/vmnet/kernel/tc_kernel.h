// The traffic-control half of NetlinkKernel: dumps of qdiscs and ingress
// filters, and the probe of what the kernel's traffic control offers.
// Any thread (each call opens its own socket).
#pragma once

#include <vector>

#include "absl/status/status.h"
#include "vmnet/kernel/objects.h"

namespace vmnet::kernel {

// The root and ingress qdiscs of every link, with their statistics.
absl::Status DumpQdiscs(std::vector<Qdisc>* out);
// The filters of each ingress qdisc in `qdiscs` (one dump per link: the
// kernel dumps filters only per device), on one socket.
absl::Status DumpIngressFilters(const std::vector<Qdisc>& qdiscs,
                                std::vector<TcFilter>* out);
// Whether the police action and the matchall classifier are there: the
// police action by asking the kernel for one (ENOENT: it knows the kind;
// EINVAL: it does not), then either as a loaded module (/sys/module) or one
// the kernel can load (modules.builtin, modules.dep of the running release).
TcCapabilities ProbeTcCapabilities();

}  // namespace vmnet::kernel
