#include "vmnet/events/event_log.h"

#include <algorithm>
#include <cstring>
#include <optional>

#include "absl/strings/str_cat.h"
#include "google/protobuf/io/coded_stream.h"
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

void FillVm(const VmSpec& spec, VmState state, absl::string_view message,
            uint64_t revision, v1::Vm* out) {
  out->set_vm_id(spec.vm_id);
  out->set_interface(spec.interface);
  for (const IpAddress& a : spec.addresses) out->add_ip_addresses(a.ToString());
  if (spec.mac) out->set_mac_address(spec.mac->ToString());
  for (const IpPrefix& p : spec.allowed_source_prefixes) {
    out->add_allowed_source_prefixes(p.ToString());
  }
  if (spec.bandwidth.limited()) {
    v1::Bandwidth* b = out->mutable_bandwidth();
    b->set_ingress_bits_per_second(spec.bandwidth.ingress_bits_per_second);
    b->set_egress_bits_per_second(spec.bandwidth.egress_bits_per_second);
    b->set_burst_bytes(spec.bandwidth.burst_bytes);
    b->set_egress_packets_per_second(spec.bandwidth.egress_packets_per_second);
  }
  out->set_state(ToProto(state));
  out->set_message(message.data(), message.size());
  out->set_revision(revision);
}

}  // namespace

v1::Vm ToProto(const VmView& vm) {
  v1::Vm out;
  FillVm(*vm.spec, vm.state, vm.message, vm.revision, &out);
  return out;
}

// WatchResponse.events is field 1, length-delimited: the event's bytes
// follow this tag and their length, as they would in a WatchResponse
// serialized with that one event.
constexpr uint8_t kEventsTag = (1 << 3) | 2;

namespace {

// `event` serialized as a WatchResponse holding it alone.
grpc::Slice Serialize(const v1::WatchEvent& event) {
  using google::protobuf::io::CodedOutputStream;
  size_t size = event.ByteSizeLong();
  size_t header = 1 + CodedOutputStream::VarintSize32(static_cast<uint32_t>(size));
  grpc_slice slice = grpc_slice_malloc(header + size);
  uint8_t* out = GRPC_SLICE_START_PTR(slice);
  *out++ = kEventsTag;
  out = CodedOutputStream::WriteVarint32ToArray(static_cast<uint32_t>(size), out);
  event.SerializeWithCachedSizesToArray(out);
  return grpc::Slice(slice, grpc::Slice::STEAL_REF);
}

}  // namespace

EventPtr Event::Make(v1::EventType type, const VmView& vm, absl::string_view detail) {
  // One block: the Event, then the message and the detail (see text()).
  void* block = ::operator new(sizeof(Event) + vm.message.size() + detail.size());
  return EventPtr(new (block) Event(type, vm, detail));
}

Event::Event(v1::EventType type, const VmView& vm, absl::string_view detail)
    : message_size_(static_cast<uint32_t>(vm.message.size())),
      detail_size_(static_cast<uint32_t>(detail.size())),
      type_(static_cast<uint8_t>(type)),
      state_(static_cast<uint8_t>(vm.state)),
      revision_(vm.revision),
      spec_(vm.spec) {
  char* out = reinterpret_cast<char*>(this + 1);
  std::memcpy(out, vm.message.data(), vm.message.size());
  std::memcpy(out + vm.message.size(), detail.data(), detail.size());
}

void Event::Unref() const {
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  Event* self = const_cast<Event*>(this);
  self->~Event();
  ::operator delete(self);
}

v1::WatchEvent Event::ToProto(const std::string& epoch) const {
  v1::WatchEvent event;
  event.set_revision(revision_);
  event.set_epoch(epoch);
  event.set_type(type());
  FillVm(*spec_, state(), message(), revision_, event.mutable_vm());
  event.set_detail(detail().data(), detail().size());
  return event;
}

std::vector<v1::WatchEvent> Chunk::Parse() const {
  v1::WatchResponse response;
  response.ParseFromArray(bytes.begin(), static_cast<int>(bytes.size()));
  return {std::make_move_iterator(response.mutable_events()->begin()),
          std::make_move_iterator(response.mutable_events()->end())};
}

namespace {

// Events' bytes joined into Chunks of at most kChunkBytes (at least one
// event each). A Chunk of one event is that event's own bytes, not a copy.
std::vector<Chunk> MakeChunks(const std::vector<grpc::Slice>& events) {
  std::vector<Chunk> chunks;
  size_t i = 0;
  while (i < events.size()) {
    size_t j = i;
    size_t bytes = 0;
    while (j < events.size() && (j == i || bytes + events[j].size() <= kChunkBytes)) {
      bytes += events[j].size();
      ++j;
    }
    if (j - i == 1) {
      chunks.push_back({events[i], 1});
    } else {
      grpc_slice slice = grpc_slice_malloc(bytes);
      uint8_t* out = GRPC_SLICE_START_PTR(slice);
      for (size_t k = i; k < j; ++k) {
        std::memcpy(out, events[k].begin(), events[k].size());
        out += events[k].size();
      }
      chunks.push_back(
          {grpc::Slice(slice, grpc::Slice::STEAL_REF), static_cast<uint32_t>(j - i)});
    }
    i = j;
  }
  return chunks;
}

// A pass that publishes more than this (a resync that changed every VM) is
// queued to the watchers in parts, as it goes: what waits for the pass's end
// stays bounded.
constexpr size_t kMaxPassEvents = 1024;

}  // namespace

grpc::Slice ProgressMessage(uint64_t revision, const std::string& epoch) {
  v1::WatchResponse response;
  response.mutable_progress()->set_revision(revision);
  response.mutable_progress()->set_epoch(epoch);
  size_t size = response.ByteSizeLong();
  grpc_slice slice = grpc_slice_malloc(size);
  response.SerializeWithCachedSizesToArray(GRPC_SLICE_START_PTR(slice));
  return grpc::Slice(slice, grpc::Slice::STEAL_REF);
}

EventLog::EventLog(std::string epoch, size_t history, Clock* clock,
                   std::chrono::milliseconds send_interval)
    : epoch_(std::move(epoch)),
      history_limit_(history),
      clock_(clock != nullptr ? clock : Clock::Real()),
      send_interval_(send_interval) {}

EventLog::~EventLog() { StopSender(); }

void EventLog::StartRevisionsAt(uint64_t first) {
  vmnet::MutexLock lock(&mu_);
  if (first > revision_ + 1) revision_ = first - 1;
}

void EventLog::Publish(VmEventType type, const VmView& vm, const std::string& detail) {
  EventPtr event = Event::Make(ToProto(type), vm, detail);
  // Serialized before the lock when someone watches: readers of the log
  // wait only for the fan-out.
  grpc::Slice bytes;
  if (watched_.load(std::memory_order_relaxed)) bytes = Serialize(event->ToProto(epoch_));
  std::vector<Watcher*> cut_off;
  {
    vmnet::MutexLock lock(&mu_);
    revision_ = vm.revision;
    history_.push_back(event);
    if (history_.size() > history_limit_) history_.pop_front();
    SetCurrent(vm.spec->vm_id, type == VmEventType::kRemoved ? EventPtr() : event);
    if (!watchers_.empty()) {
      // A watcher subscribed since watched_ was read.
      if (bytes.size() == 0) bytes = Serialize(event->ToProto(epoch_));
      pass_.push_back({std::move(event), std::move(bytes)});
      if (pass_.size() >= kMaxPassEvents) EndPassLocked(&cut_off);
    }
  }
  ForgetCutOff(cut_off);
}

void EventLog::SetCurrent(absl::string_view vm_id, EventPtr event) {
  // Erased and inserted, not assigned in place: a set's element is its own
  // key (the event's vm_id), and the hint keeps the insert from searching.
  auto it = current_.find(vm_id);
  if (it != current_.end()) it = current_.erase(it);
  if (event) current_.insert(it, std::move(event));
}

void EventLog::EndPass() {
  std::vector<Watcher*> cut_off;
  {
    vmnet::MutexLock lock(&mu_);
    EndPassLocked(&cut_off);
  }
  ForgetCutOff(cut_off);
}

void EventLog::EndPassLocked(std::vector<Watcher*>* cut_off) {
  if (pass_.empty()) return;
  std::vector<Pending> pass;
  pass.swap(pass_);
  const uint64_t first = pass.front().event->revision();
  // The whole pass, made once and queued to every watcher of all VMs.
  std::vector<Chunk> all;
  std::vector<Chunk> own;  // a watcher's part, for the others
  std::vector<grpc::Slice> selected;
  Clock::TimePoint now = progress_watchers_ > 0 ? clock_->Now() : Clock::TimePoint();
  std::vector<Watcher*> pushed;
  pushed.reserve(watchers_.size());
  for (auto it = watchers_.begin(); it != watchers_.end();) {
    auto current = it++;
    Watcher* watcher = current->first;
    Subscription& sub = current->second;
    const std::vector<Chunk>* chunks = &all;
    if (sub.vm_id.empty() && sub.after < first) {
      if (all.empty()) {
        selected.clear();
        for (const Pending& p : pass) selected.push_back(p.bytes);
        all = MakeChunks(selected);
      }
    } else {
      // A watcher of one VM, or one that subscribed during this pass (its
      // snapshot or replay already holds the events up to `after`).
      selected.clear();
      for (const Pending& p : pass) {
        if (p.event->revision() <= sub.after) continue;
        if (!sub.vm_id.empty() && p.event->vm_id() != sub.vm_id) continue;
        selected.push_back(p.bytes);
      }
      own = MakeChunks(selected);
      chunks = &own;
    }
    if (chunks->empty()) continue;
    sub.last_push = now;
    bool queued = true;
    for (const Chunk& c : *chunks) {
      if (!(queued = watcher->Push(c))) break;
    }
    if (queued) {
      pushed.push_back(watcher);
      continue;
    }
    if (sub.progress_interval.count() > 0) --progress_watchers_;
    watchers_.erase(current);
    watched_ = !watchers_.empty();
    cut_off->push_back(watcher);
    watcher->Close(absl::ResourceExhaustedError(
        absl::StrCat("this watcher fell behind by more than its queue holds; resume with "
                     "from_revision set to the last revision received")));
  }
  if (!pushed.empty()) {
    // The sender thread starts the writes: a gRPC write is not started on
    // the publishing (reconciler) thread. Queued under mu_, so a watcher
    // that Unsubscribe has taken out of watchers_ is never queued again.
    std::lock_guard wake(wake_mu_);
    for (Watcher* w : pushed) flush_.insert(w);
    unflushed_events_ += pass.size();
    wake_cv_.notify_one();
  }
}

void EventLog::ForgetCutOff(const std::vector<Watcher*>& cut_off) {
  if (cut_off.empty()) return;
  // Wait for a flush round that may hold them, and take them out of the next.
  vmnet::MutexLock round(&round_mu_);
  std::lock_guard lock(wake_mu_);
  for (Watcher* w : cut_off) flush_.erase(w);
}

uint64_t EventLog::QueuedRevision() const {
  return pass_.empty() ? revision_ : pass_.front().event->revision() - 1;
}

void EventLog::Seed(const VmView& vm) {
  EventPtr event = Event::Make(v1::EVENT_TYPE_SNAPSHOT, vm, "");
  vmnet::MutexLock lock(&mu_);
  SetCurrent(vm.spec->vm_id, std::move(event));
}

absl::Status EventLog::Subscribe(Watcher* watcher, const std::string& vm_id,
                                 uint64_t from_revision, bool initial_snapshot,
                                 std::chrono::milliseconds progress_interval) {
  vmnet::MutexLock lock(&mu_);
  if (closed_) return absl::UnavailableError("vmnetd is shutting down; retry");
  Subscription sub{vm_id, progress_interval, {}, revision_};
  if (from_revision != 0) {
    uint64_t oldest = history_.empty() ? revision_ + 1 : history_.front()->revision();
    if (from_revision > revision_) {
      return absl::OutOfRangeError(absl::StrCat(
          "from_revision: ", from_revision, " is ahead of the current revision ",
          revision_, " (epoch ", epoch_, "); re-list with initial_snapshot"));
    }
    if (from_revision + 1 < oldest) {
      return absl::OutOfRangeError(absl::StrCat(
          "from_revision: ", from_revision, " is compacted: the history before revision ",
          oldest, " is gone (the oldest retained; epoch ", epoch_,
          "); re-list with initial_snapshot"));
    }
  }
  // The snapshot and the replay, in Chunks: 10,000 VMs are a few dozen
  // queue entries, not 10,001.
  // Serialized again from the retained events (the live path's bytes are
  // not kept).
  std::vector<grpc::Slice> backlog;
  if (initial_snapshot) {
    backlog.reserve(vm_id.empty() ? current_.size() + 1 : 2);
    auto snapshot = [&](const Event& last) {
      v1::WatchEvent event;
      event.set_revision(last.revision());
      event.set_epoch(epoch_);
      event.set_type(v1::EVENT_TYPE_SNAPSHOT);
      FillVm(last.spec(), last.state(), last.message(), last.revision(),
             event.mutable_vm());
      backlog.push_back(Serialize(event));
    };
    if (vm_id.empty()) {
      for (const EventPtr& last : current_) snapshot(*last);
    } else if (auto it = current_.find(vm_id); it != current_.end()) {
      snapshot(**it);
    }
    v1::WatchEvent end;
    end.set_revision(revision_);
    end.set_epoch(epoch_);
    end.set_type(v1::EVENT_TYPE_SNAPSHOT_END);
    backlog.push_back(Serialize(end));
  }
  if (from_revision != 0) {
    for (const EventPtr& e : history_) {
      if (e->revision() <= from_revision) continue;
      if (!sub.vm_id.empty() && e->vm_id() != sub.vm_id) continue;
      backlog.push_back(Serialize(e->ToProto(epoch_)));
    }
  }
  for (const Chunk& c : MakeChunks(backlog)) watcher->PushBacklog(c);
  if (!sender_.joinable()) {
    sender_ = std::thread([this] { SenderLoop(); });
    clock_->AddWaker(this, [this] { WakeSender(); });
  }
  if (progress_interval.count() > 0) {
    sub.last_push = clock_->Now();
    ++progress_watchers_;
    WakeSender();  // its first progress may be due before the next one
  }
  watchers_[watcher] = std::move(sub);
  watched_ = true;
  return absl::OkStatus();
}

void EventLog::Unsubscribe(Watcher* watcher) {
  // Waits for a flush round in progress, which may be flushing `watcher`.
  vmnet::MutexLock round(&round_mu_);
  {
    // First out of watchers_: from then on no Publish queues it for a flush.
    vmnet::MutexLock lock(&mu_);
    auto it = watchers_.find(watcher);
    if (it != watchers_.end()) {
      if (it->second.progress_interval.count() > 0) --progress_watchers_;
      watchers_.erase(it);
    }
    watched_ = !watchers_.empty();
  }
  std::lock_guard lock(wake_mu_);
  flush_.erase(watcher);
}

void EventLog::CloseAll() {
  std::vector<Watcher*> cut_off;
  {
    vmnet::MutexLock lock(&mu_);
    closed_ = true;
    EndPassLocked(&cut_off);  // what was published goes before the end
    for (auto& [watcher, sub] : watchers_) watcher->Close(absl::OkStatus());
    watchers_.clear();
    watched_ = false;
    progress_watchers_ = 0;
  }
  ForgetCutOff(cut_off);
  StopSender();
}

Clock::TimePoint EventLog::OfferProgress(Clock::TimePoint now) {
  Clock::TimePoint next = Clock::TimePoint::max();
  std::optional<grpc::Slice> message;  // built once, for all who are due
  for (auto& [watcher, sub] : watchers_) {
    if (sub.progress_interval.count() <= 0) continue;
    Clock::TimePoint due = sub.last_push + sub.progress_interval;
    if (due <= now) {
      // Not past the events still waiting for their pass's end.
      uint64_t revision = QueuedRevision();
      if (!message) message = ProgressMessage(revision, epoch_);
      watcher->PushProgress(revision, *message);
      // Sent, or the watcher is busy writing: either way not idle now.
      sub.last_push = now;
      due = now + sub.progress_interval;
    }
    next = std::min(next, due);
  }
  return next;
}

void EventLog::SenderLoop() {
  Clock::TimePoint next_progress = Clock::TimePoint::min();
  // No flush round before this: send_interval_ after the last one that
  // flushed a watcher. What is pushed meanwhile waits in the watchers'
  // queues and goes out with the next round, in one write per watcher;
  // unless it is a message's worth already (kMaxPassEvents): waiting longer
  // would only fill the watchers' queues, which cut a watcher off when full.
  Clock::TimePoint next_round = Clock::TimePoint::min();
  auto round_due = [&](Clock::TimePoint now) {  // under wake_mu_
    return !flush_.empty() && (now >= next_round || unflushed_events_ >= kMaxPassEvents);
  };
  for (;;) {
    Clock::TimePoint now = clock_->Now();
    bool due;
    {
      std::lock_guard lock(wake_mu_);
      due = round_due(now);
    }
    if (due) {
      // The watchers pushed to since the last round start their writes.
      vmnet::MutexLock round(&round_mu_);
      absl::flat_hash_set<Watcher*> flush;
      {
        std::lock_guard lock(wake_mu_);
        flush.swap(flush_);
        unflushed_events_ = 0;
      }
      for (Watcher* w : flush) w->Flush();
      if (!flush.empty()) next_round = now + send_interval_;
    }
    // Read again after the round, and before wake_mu_: a fake clock calls
    // WakeSender (which takes wake_mu_) under its own lock.
    now = clock_->Now();
    if (now >= next_progress || progress_recheck_.exchange(false)) {
      vmnet::MutexLock lock(&mu_);
      next_progress =
          progress_watchers_ > 0 ? OfferProgress(now) : Clock::TimePoint::max();
    }
    std::unique_lock lock(wake_mu_);
    if (!stop_ && !wake_ && !round_due(now) && now < next_progress) {
      Clock::TimePoint wake_at = next_progress;
      if (!flush_.empty()) wake_at = std::min(wake_at, next_round);
      // Any push wakes the loop, which then waits for the round it is in.
      const size_t unflushed = unflushed_events_;
      auto woken = [&] { return wake_ || stop_ || unflushed_events_ != unflushed; };
      // The deadline is on `clock_`; a fake clock that jumps wakes us.
      if (wake_at == Clock::TimePoint::max()) {
        wake_cv_.wait(lock, woken);
      } else {
        wake_cv_.wait_for(lock, wake_at - now, woken);
      }
    }
    if (stop_) return;
    if (wake_) progress_recheck_ = true;
    wake_ = false;
  }
}

void EventLog::WakeSender() {
  std::lock_guard lock(wake_mu_);
  wake_ = true;
  wake_cv_.notify_one();
}

void EventLog::StopSender() {
  std::thread thread;
  {
    vmnet::MutexLock lock(&mu_);
    thread = std::move(sender_);
  }
  if (!thread.joinable()) return;
  clock_->RemoveWaker(this);
  {
    std::lock_guard lock(wake_mu_);
    stop_ = true;
    wake_cv_.notify_one();
  }
  thread.join();
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
