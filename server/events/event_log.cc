#include "vmnet/events/event_log.h"

#include "absl/strings/str_cat.h"
#include "grpc/slice.h"

namespace vmnet {
namespace {

v1::VmState ToProto(VmState state) {
  switch (state) {
    case VmState::kPending:
      return v1::VM_STATE_PENDING;
    case VmState::kProgrammed:
      return v1::VM_STATE_PROGRAMMED;
    case VmState::kFailed:
      return v1::VM_STATE_FAILED;
  }
  return v1::VM_STATE_UNSPECIFIED;
}

v1::EventType ToProto(VmEventType type) {
  switch (type) {
    case VmEventType::kAdded:
      return v1::EVENT_TYPE_VM_ADDED;
    case VmEventType::kChanged:
      return v1::EVENT_TYPE_VM_CHANGED;
    case VmEventType::kRemoved:
      return v1::EVENT_TYPE_VM_REMOVED;
    case VmEventType::kDriftRepaired:
      return v1::EVENT_TYPE_DRIFT_REPAIRED;
  }
  return v1::EVENT_TYPE_UNSPECIFIED;
}

}  // namespace

v1::Vm ToProto(const VmView& vm) {
  v1::Vm out;
  out.set_vm_id(vm.spec.vm_id);
  out.set_interface(vm.spec.interface);
  for (const IpAddress& a : vm.spec.addresses) out.add_ip_addresses(a.ToString());
  if (vm.spec.mac) out.set_mac_address(vm.spec.mac->ToString());
  for (const IpPrefix& p : vm.spec.allowed_source_prefixes) {
    out.add_allowed_source_prefixes(p.ToString());
  }
  if (vm.spec.bandwidth.limited()) {
    v1::Bandwidth* b = out.mutable_bandwidth();
    b->set_ingress_bits_per_second(vm.spec.bandwidth.ingress_bits_per_second);
    b->set_egress_bits_per_second(vm.spec.bandwidth.egress_bits_per_second);
    b->set_burst_bytes(vm.spec.bandwidth.burst_bytes);
    b->set_egress_packets_per_second(vm.spec.bandwidth.egress_packets_per_second);
  }
  out.set_state(ToProto(vm.state));
  out.set_message(vm.message);
  out.set_revision(vm.revision);
  return out;
}

Event::Event(const v1::WatchEvent& event)
    : revision_(event.revision()), type_(event.type()), vm_id_(event.vm().vm_id()) {
  size_t size = event.ByteSizeLong();
  grpc_slice slice = grpc_slice_malloc(size);
  event.SerializeWithCachedSizesToArray(GRPC_SLICE_START_PTR(slice));
  bytes_ = grpc::Slice(slice, grpc::Slice::STEAL_REF);
}

v1::WatchEvent Event::Parse() const {
  v1::WatchEvent event;
  event.ParseFromArray(bytes_.begin(), static_cast<int>(bytes_.size()));
  return event;
}

EventLog::EventLog(std::string epoch, size_t history)
    : epoch_(std::move(epoch)), history_limit_(history) {}

void EventLog::StartRevisionsAt(uint64_t first) {
  vmnet::MutexLock lock(&mu_);
  if (first > revision_ + 1) revision_ = first - 1;
}

void EventLog::Publish(VmEventType type, const VmView& vm, const std::string& detail) {
  vmnet::MutexLock lock(&mu_);
  revision_ = vm.revision;
  v1::WatchEvent event;
  event.set_revision(revision_);
  event.set_epoch(epoch_);
  event.set_type(ToProto(type));
  *event.mutable_vm() = ToProto(vm);
  event.mutable_vm()->set_revision(revision_);
  event.set_detail(detail);
  auto shared = std::make_shared<const Event>(event);
  history_.push_back(shared);
  if (history_.size() > history_limit_) history_.pop_front();
  if (type == VmEventType::kRemoved) {
    current_.erase(vm.spec.vm_id);
  } else {
    current_[vm.spec.vm_id] = shared;
  }
  for (auto it = watchers_.begin(); it != watchers_.end();) {
    if (Deliver(it->first, it->second, shared)) {
      ++it;
    } else {
      Watcher* slow = it->first;
      it = watchers_.erase(it);
      slow->Close(absl::ResourceExhaustedError(absl::StrCat(
          "this watcher fell behind by more than its queue holds; resume with "
          "from_revision set to the last revision received")));
    }
  }
}

void EventLog::Seed(const VmView& vm) {
  vmnet::MutexLock lock(&mu_);
  v1::WatchEvent event;
  event.set_revision(vm.revision);
  event.set_epoch(epoch_);
  event.set_type(v1::EVENT_TYPE_SNAPSHOT);
  *event.mutable_vm() = ToProto(vm);
  current_[vm.spec.vm_id] = std::make_shared<const Event>(event);
}

bool EventLog::Deliver(Watcher* watcher, const Subscription& sub, const EventPtr& event) {
  if (!sub.vm_id.empty() && event->vm_id() != sub.vm_id) return true;
  return watcher->Push(event);
}

absl::Status EventLog::Subscribe(Watcher* watcher, const std::string& vm_id,
                                 uint64_t from_revision, bool initial_snapshot) {
  vmnet::MutexLock lock(&mu_);
  if (closed_) return absl::UnavailableError("vmnetd is shutting down; retry");
  Subscription sub{vm_id};
  if (from_revision != 0) {
    uint64_t oldest = history_.empty() ? revision_ + 1 : history_.front()->revision();
    if (from_revision > revision_) {
      return absl::OutOfRangeError(absl::StrCat(
          "from_revision: ", from_revision, " is ahead of the current revision ",
          revision_, " (epoch ", epoch_, "); re-list with initial_snapshot"));
    }
    if (from_revision + 1 < oldest) {
      return absl::OutOfRangeError(absl::StrCat(
          "from_revision: ", from_revision, " is older than the retained history (",
          "oldest ", oldest, "); re-list with initial_snapshot"));
    }
  }
  if (initial_snapshot) {
    for (const auto& [id, last] : current_) {
      if (!vm_id.empty() && id != vm_id) continue;
      v1::WatchEvent event;
      event.set_revision(last->revision());
      event.set_epoch(epoch_);
      event.set_type(v1::EVENT_TYPE_SNAPSHOT);
      *event.mutable_vm() = std::move(*last->Parse().mutable_vm());
      watcher->PushBacklog(std::make_shared<const Event>(event));
    }
    v1::WatchEvent end;
    end.set_revision(revision_);
    end.set_epoch(epoch_);
    end.set_type(v1::EVENT_TYPE_SNAPSHOT_END);
    watcher->PushBacklog(std::make_shared<const Event>(end));
  }
  if (from_revision != 0) {
    for (const EventPtr& e : history_) {
      if (e->revision() <= from_revision) continue;
      if (!sub.vm_id.empty() && e->vm_id() != sub.vm_id) continue;
      watcher->PushBacklog(e);
    }
  }
  watchers_[watcher] = std::move(sub);
  return absl::OkStatus();
}

void EventLog::Unsubscribe(Watcher* watcher) {
  vmnet::MutexLock lock(&mu_);
  watchers_.erase(watcher);
}

void EventLog::CloseAll() {
  vmnet::MutexLock lock(&mu_);
  closed_ = true;
  for (auto& [watcher, sub] : watchers_) watcher->Close(absl::OkStatus());
  watchers_.clear();
}

size_t EventLog::watcher_count() const {
  vmnet::MutexLock lock(&mu_);
  return watchers_.size();
}

uint64_t EventLog::revision() const {
  vmnet::MutexLock lock(&mu_);
  return revision_;
}

}  // namespace vmnet
