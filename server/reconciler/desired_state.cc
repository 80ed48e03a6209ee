#include "vmnet/reconciler/desired_state.h"

#include <algorithm>

#include "vmnet/log/log.h"

namespace vmnet {

const std::string& StateMessage::str() const {
  static const std::string* const kEmpty = new std::string;
  return text_ ? *text_ : *kEmpty;
}

absl::StatusOr<DesiredState> DesiredState::Load(StateStore* store) {
  auto stored = store->Load();
  if (!stored.ok()) return stored.status();
  DesiredState state(store);
  for (StoredVm& vm : stored->vms) {
    VmRecord record;
    record.revision = vm.revision;
    record.spec = std::make_shared<const VmSpec>(std::move(vm.spec));
    std::string vm_id = record.spec->vm_id;
    state.Set(vm_id, std::move(record));
  }
  state.revision_lease_ = stored->revision_lease;
  state.first_revision_ = std::max<uint64_t>(stored->revision_lease, 1);
  state.last_revision_ = state.first_revision_ - 1;
  return state;
}

const VmRecord* DesiredState::Find(const std::string& vm_id) const {
  auto it = vms_.find(vm_id);
  return it == vms_.end() ? nullptr : &it->second;
}

VmRecord* DesiredState::FindMutable(const std::string& vm_id) {
  auto it = vms_.find(vm_id);
  return it == vms_.end() ? nullptr : &it->second;
}

std::string DesiredState::VmOfAddress(const IpAddress& address) const {
  auto it = vm_of_address_.find(address);
  return it == vm_of_address_.end() ? "" : it->spec->vm_id;
}

std::string DesiredState::VmAllowingAddress(const IpAddress& address) const {
  auto it = vm_allowing_address_.find(address);
  return it == vm_allowing_address_.end() ? "" : it->spec->vm_id;
}

std::string DesiredState::VmOfInterface(const std::string& interface) const {
  auto it = vm_of_interface_.find(absl::string_view(interface));
  return it == vm_of_interface_.end() ? "" : (*it)->vm_id;
}

void DesiredState::Set(const std::string& vm_id, std::optional<VmRecord> record) {
  if (auto old = vms_.find(vm_id); old != vms_.end()) {
    const VmSpec& spec = *old->second.spec;
    if (spec.has_ipv6()) --ipv6_vms_;
    for (const IpAddress& a : spec.addresses) vm_of_address_.erase(a);
    for (const IpPrefix& p : spec.allowed_source_prefixes) {
      if (p.length == p.address.bit_length()) vm_allowing_address_.erase(p.address);
    }
    vm_of_interface_.erase(absl::string_view(spec.interface));
    vms_.erase(old);
  }
  if (!record) return;
  const VmSpec* spec = record->spec.get();
  if (spec->has_ipv6()) ++ipv6_vms_;
  // An entry is replaced, not kept: it points into the spec it names.
  auto index = [spec](SpecAddressIndex& to, const IpAddress& a) {
    to.erase(a);
    to.insert(SpecAddress{&a, spec});
  };
  for (const IpAddress& a : spec->addresses) index(vm_of_address_, a);
  for (const IpPrefix& p : spec->allowed_source_prefixes) {
    if (p.length == p.address.bit_length()) index(vm_allowing_address_, p.address);
  }
  vm_of_interface_.erase(absl::string_view(spec->interface));
  vm_of_interface_.insert(spec);
  vms_.emplace(spec->vm_id, std::move(*record));
}

void DesiredState::Put(const std::string& vm_id, VmSpec spec) {
  std::optional<VmRecord> previous;
  VmRecord record;
  if (const VmRecord* existing = Find(vm_id)) {
    previous = *existing;
    record = *existing;
  }
  undo_.emplace_back(vm_id, std::move(previous));
  record.spec = std::make_shared<const VmSpec>(std::move(spec));
  record.backoff = std::chrono::milliseconds(0);
  Set(vm_id, std::move(record));
}

void DesiredState::Remove(const std::string& vm_id) {
  const VmRecord* existing = Find(vm_id);
  if (existing == nullptr) return;
  undo_.emplace_back(vm_id, *existing);
  Set(vm_id, std::nullopt);
}

absl::Status DesiredState::Commit() {
  if (undo_.empty()) return absl::OkStatus();
  for (const auto& [vm_id, before] : undo_) unsaved_.insert(vm_id);
  absl::Status s = Persist();
  if (!s.ok()) {
    for (auto it = undo_.rbegin(); it != undo_.rend(); ++it) Set(it->first, it->second);
  }
  undo_.clear();
  return s;
}

absl::Status DesiredState::Persist() {
  // The records' own specs, by reference: nothing is copied but a pointer.
  std::vector<StoredVmRef> vms;
  std::vector<std::string> removed;
  bool whole = store_->WantsSave();
  if (whole) {
    vms.reserve(vms_.size());
    for (const auto& [id, r] : vms_) vms.push_back({r.spec.get(), r.revision});
  } else {
    for (const std::string& vm_id : unsaved_) {
      if (const VmRecord* r = Find(vm_id)) {
        vms.push_back({r->spec.get(), r->revision});
      } else {
        removed.push_back(vm_id);
      }
    }
    std::sort(removed.begin(), removed.end());
  }
  std::sort(vms.begin(), vms.end(), [](const StoredVmRef& a, const StoredVmRef& b) {
    return a.spec->vm_id < b.spec->vm_id;
  });
  absl::Status s = whole ? store_->Save(vms, revision_lease_)
                         : store_->Append(vms, removed, revision_lease_);
  if (s.ok()) unsaved_.clear();
  return s;
}

uint64_t DesiredState::IssueRevision(VmRecord* vm) {
  uint64_t revision = ++last_revision_;
  if (vm != nullptr) {
    vm->revision = revision;
    unsaved_.insert(vm->spec->vm_id);
  }
  if (revision + kRevisionLease / 2 >= revision_lease_) {
    revision_lease_ = revision + kRevisionLease;
    if (absl::Status s = Persist(); !s.ok()) {
      VMNET_LOG(Error) << "event=persist_failed what=revision_lease error=\""
                       << s.message() << "\"";
    }
  }
  return revision;
}

}  // namespace vmnet
