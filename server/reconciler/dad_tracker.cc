#include "vmnet/reconciler/dad_tracker.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace vmnet {

DadTracker::Publishable DadTracker::Split(const VmSpec& spec) {
  Publishable out;
  out.spec = spec;
  out.spec.addresses.clear();
  auto it = vms_.find(spec.vm_id);
  if (it != vms_.end() && !it->second.failure.empty()) return out;
  for (const IpAddress& a : spec.addresses) {
    bool verified = it != vms_.end() && std::binary_search(it->second.verified.begin(),
                                                           it->second.verified.end(), a);
    (verified ? out.spec.addresses : out.unverified).push_back(a);
  }
  out.start_probe = !out.unverified.empty() && (it == vms_.end() || !it->second.probing);
  return out;
}

void DadTracker::ProbeStarted(const std::string& vm_id) { vms_[vm_id].probing = true; }

size_t DadTracker::ProbeDone(const VmSpec& spec, const std::vector<IpAddress>& probed,
                             const std::vector<Conflict>& conflicts) {
  Entry& e = vms_[spec.vm_id];
  e.probing = false;
  auto wanted = [&](const IpAddress& a) {
    return std::binary_search(spec.addresses.begin(), spec.addresses.end(), a);
  };
  std::vector<std::string> answers;
  for (const Conflict& c : conflicts) {
    if (!wanted(c.address)) continue;
    answers.push_back(absl::StrCat(c.address.ToString(), " is answered on ", c.interface,
                                   " by ", c.answered_by.ToString()));
  }
  if (!answers.empty()) {
    e.failure =
        absl::StrCat("another machine holds the address: ", absl::StrJoin(answers, "; "),
                     "; nothing was published (--dad). Attach again to retry");
    return answers.size();
  }
  for (const IpAddress& a : probed) {
    if (wanted(a)) e.verified.push_back(a);
  }
  std::sort(e.verified.begin(), e.verified.end());
  e.verified.erase(std::unique(e.verified.begin(), e.verified.end()), e.verified.end());
  return 0;
}

std::string DadTracker::Failure(const std::string& vm_id) const {
  auto it = vms_.find(vm_id);
  return it == vms_.end() ? "" : it->second.failure;
}

bool DadTracker::ClearFailure(const std::string& vm_id) {
  auto it = vms_.find(vm_id);
  if (it == vms_.end() || it->second.failure.empty()) return false;
  it->second.failure.clear();
  return true;
}

void DadTracker::MarkVerified(const std::string& vm_id, const IpAddress& address) {
  Entry& e = vms_[vm_id];
  auto at = std::lower_bound(e.verified.begin(), e.verified.end(), address);
  if (at == e.verified.end() || *at != address) e.verified.insert(at, address);
}

}  // namespace vmnet
