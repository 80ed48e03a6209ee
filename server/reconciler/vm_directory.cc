#include "vmnet/reconciler/vm_directory.h"

namespace vmnet {

void VmDirectory::Update(const std::string& vm_id, std::optional<VmView> vm) {
  vmnet::MutexLock lock(&mu_);
  if (auto old = vms_.find(vm_id); old != vms_.end()) {
    for (const IpAddress& a : old->second.spec.addresses) {
      if (auto it = vm_of_address_.find(a);
          it != vm_of_address_.end() && it->second == vm_id)
        vm_of_address_.erase(it);
    }
    if (auto it = vm_of_interface_.find(old->second.spec.interface);
        it != vm_of_interface_.end() && it->second == vm_id) {
      vm_of_interface_.erase(it);
    }
    vms_.erase(old);
  }
  if (!vm) return;
  for (const IpAddress& a : vm->spec.addresses) vm_of_address_[a] = vm_id;
  vm_of_interface_[vm->spec.interface] = vm_id;
  vms_.emplace(vm_id, std::move(*vm));
}

std::vector<VmView> VmDirectory::All() const {
  vmnet::ReaderMutexLock lock(&mu_);
  std::vector<VmView> out;
  out.reserve(vms_.size());
  for (const auto& [id, vm] : vms_) out.push_back(vm);
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
  return it == vm_of_address_.end() ? "" : it->second;
}

std::string VmDirectory::VmOfInterface(const std::string& interface) const {
  vmnet::ReaderMutexLock lock(&mu_);
  auto it = vm_of_interface_.find(interface);
  return it == vm_of_interface_.end() ? "" : it->second;
}

}  // namespace vmnet
