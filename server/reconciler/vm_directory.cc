#include "vmnet/reconciler/vm_directory.h"

namespace vmnet {

void VmDirectory::Update(const std::string& vm_id, const VmRecord* record) {
  vmnet::MutexLock lock(&mu_);
  if (auto old = vms_.find(absl::string_view(vm_id)); old != vms_.end()) {
    const VmSpec* spec = old->spec.get();
    // Only the entries that still point at this VM: another VM may have
    // taken an address or the interface in the same pass.
    for (const IpAddress& a : spec->addresses) {
      if (auto it = vm_of_address_.find(a);
          it != vm_of_address_.end() && it->spec == spec)
        vm_of_address_.erase(it);
    }
    if (auto it = vm_of_interface_.find(absl::string_view(spec->interface));
        it != vm_of_interface_.end() && *it == spec) {
      vm_of_interface_.erase(it);
    }
    vms_.erase(old);
  }
  if (record == nullptr) return;
  const VmSpec* spec = record->spec.get();
  // An entry is replaced, not kept: it points into the spec it names.
  for (const IpAddress& a : spec->addresses) {
    vm_of_address_.erase(a);
    vm_of_address_.insert(SpecAddress{&a, spec});
  }
  vm_of_interface_.erase(absl::string_view(spec->interface));
  vm_of_interface_.insert(spec);
  vms_.insert(Entry{record->spec, record->message, record->revision, record->state});
}

std::vector<VmView> VmDirectory::All() const {
  vmnet::ReaderMutexLock lock(&mu_);
  std::vector<VmView> out;
  out.reserve(vms_.size());
  for (const Entry& e : vms_) out.push_back(e.View());
  return out;
}

std::optional<VmView> VmDirectory::Find(const std::string& vm_id) const {
  vmnet::ReaderMutexLock lock(&mu_);
  auto it = vms_.find(absl::string_view(vm_id));
  if (it == vms_.end()) return std::nullopt;
  return it->View();
}

std::string VmDirectory::VmOfAddress(const IpAddress& address) const {
  vmnet::ReaderMutexLock lock(&mu_);
  auto it = vm_of_address_.find(address);
  return it == vm_of_address_.end() ? "" : it->spec->vm_id;
}

std::string VmDirectory::VmOfInterface(const std::string& interface) const {
  vmnet::ReaderMutexLock lock(&mu_);
  auto it = vm_of_interface_.find(absl::string_view(interface));
  return it == vm_of_interface_.end() ? "" : (*it)->vm_id;
}

}  // namespace vmnet
