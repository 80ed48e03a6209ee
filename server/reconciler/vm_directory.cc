#include "vmnet/reconciler/vm_directory.h"

namespace vmnet {

void VmDirectory::Update(const std::string& vm_id, const VmRecord* record) {
  vmnet::MutexLock lock(&mu_);
  if (auto old = vms_.find(vm_id); old != vms_.end()) {
    const VmSpec* spec = old->second.spec.get();
    // Only the entries that still point at this VM: another VM may have
    // taken an address or the interface in the same pass.
    for (const IpAddress& a : spec->addresses) {
      if (auto it = vm_of_address_.find(a);
          it != vm_of_address_.end() && it->second == spec)
        vm_of_address_.erase(it);
    }
    if (auto it = vm_of_interface_.find(spec->interface);
        it != vm_of_interface_.end() && it->second == spec) {
      vm_of_interface_.erase(it);
    }
    vms_.erase(old);
  }
  if (record == nullptr) return;
  const VmSpec* spec = record->spec.get();
  for (const IpAddress& a : spec->addresses) vm_of_address_[a] = spec;
  // The key views this spec's string: replace the entry, not only its value.
  vm_of_interface_.erase(spec->interface);
  vm_of_interface_.emplace(spec->interface, spec);
  vms_.emplace(vm_id, record->View());
}

std::vector<VmView> VmDirectory::All() const {
  vmnet::ReaderMutexLock lock(&mu_);
  std::vector<VmView> out;
  out.reserve(vms_.size());
  for (const auto& [id, view] : vms_) out.push_back(view);
  return out;
}

std::optional<VmView> VmDirectory::Find(const std::string& vm_id) const {
  vmnet::ReaderMutexLock lock(&mu_);
  auto it = vms_.find(vm_id);
  if (it == vms_.end()) return std::nullopt;
  return it->second;
}

std::string VmDirectory::VmOfAddress(const IpAddress& address) const {
  vmnet::ReaderMutexLock lock(&mu_);
  auto it = vm_of_address_.find(address);
  return it == vm_of_address_.end() ? "" : it->second->vm_id;
}

std::string VmDirectory::VmOfInterface(const std::string& interface) const {
  vmnet::ReaderMutexLock lock(&mu_);
  auto it = vm_of_interface_.find(interface);
  return it == vm_of_interface_.end() ? "" : it->second->vm_id;
}

}  // namespace vmnet
