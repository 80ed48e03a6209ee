// The Watch backend: every VM change the reconciler publishes, with a
// strictly increasing revision, a bounded history for resuming, the current
// VMs for snapshots, and a bounded queue per watcher.
//
// Each event is serialized once, when it is published, as a WatchResponse
// holding that event alone: that is what the live path queues. Concatenated
// protobuf messages are one message whose repeated fields are joined, so
// several events' bytes one after the other are the WatchResponse holding
// them all: a Chunk.
//
// What the log retains (the history, and each current VM's last event for
// snapshots) is not those bytes but a compact Event: the VM's spec as the
// desired state holds it (shared, not copied), its state, message, revision,
// the event's type and its detail text, in one allocation. A replay or a
// snapshot (rare) serializes them again; the live path never does.
//
// Events reach the watchers once per reconcile pass, not once per event: what
// a pass published is held until the reconciler marks the pass's end
// (EndPass), then joined into one Chunk (or a few, of at most kChunkBytes) and
// that Chunk is queued to every watcher that selects every VM. So a pass of
// 40 events costs each watcher one queue entry, and each Watch write is a few
// shared slices, not one per event. A watcher of one VM is queued that VM's
// events alone. Nothing is copied per watcher.
//
// The log's sender thread (started with the first watcher) does two things
// for the watchers: after chunks were queued to them, it calls Flush so that
// they start their writes (not on the publishing thread, which goes on
// reconciling); and a watcher subscribed with a progress interval that has
// been sent nothing for that long is offered a progress message. Between the
// two it sleeps until woken or the next progress is due: idle watchers cost
// no work.
//
// Thread safety: all methods may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "grpcpp/support/slice.h"
#include "vmnet/base/clock.h"
#include "vmnet/base/mutex.h"
#include "vmnet/v1/vmnet.pb.h"
#include "vmnet/vm/vm.h"

namespace vmnet {

class Event;

// A counted reference to an Event (the Event holds its count: see Event).
class EventPtr {
 public:
  EventPtr() = default;
  EventPtr(const EventPtr& other);
  EventPtr(EventPtr&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
  EventPtr& operator=(EventPtr other) noexcept {
    std::swap(event_, other.event_);
    return *this;
  }
  ~EventPtr();

  const Event* get() const { return event_; }
  const Event& operator*() const { return *event_; }
  const Event* operator->() const { return event_; }
  explicit operator bool() const { return event_ != nullptr; }

 private:
  friend class Event;
  explicit EventPtr(Event* event) : event_(event) {}
  Event* event_ = nullptr;
};

// One published WatchEvent as the log retains it: what the log filters on
// and what it takes to serialize the event again. Immutable.
//
// At 10,000 VMs the history and the current VMs hold one Event per VM, so
// its layout is what the log costs per VM: the fixed fields, the reference
// count and the text (the message, then the detail) are one allocation of
// about 40 bytes plus the text, with no control block of a shared_ptr and
// no second block for a string; the spec is the desired state's own.
class Event {
 public:
  // `vm.spec` is shared, not copied; `vm.revision` is the event's.
  static EventPtr Make(v1::EventType type, const VmView& vm, absl::string_view detail);

  uint64_t revision() const { return revision_; }
  v1::EventType type() const { return static_cast<v1::EventType>(type_); }
  const std::string& vm_id() const { return spec_->vm_id; }
  const VmSpec& spec() const { return *spec_; }
  VmState state() const { return static_cast<VmState>(state_); }
  absl::string_view message() const { return {text(), message_size_}; }
  absl::string_view detail() const { return {text() + message_size_, detail_size_}; }

  // The WatchEvent, with `epoch` (the log's).
  v1::WatchEvent ToProto(const std::string& epoch) const;

 private:
  friend class EventPtr;
  Event(v1::EventType type, const VmView& vm, absl::string_view detail);
  ~Event() = default;
  // The text follows the object in its allocation.
  const char* text() const { return reinterpret_cast<const char*>(this + 1); }
  void Ref() const { refs_.fetch_add(1, std::memory_order_relaxed); }
  void Unref() const;

  mutable std::atomic<uint32_t> refs_{1};
  uint32_t message_size_;
  uint32_t detail_size_;
  uint8_t type_;   // a v1::EventType
  uint8_t state_;  // a VmState
  uint64_t revision_;
  std::shared_ptr<const VmSpec> spec_;
};

inline EventPtr::EventPtr(const EventPtr& other) : event_(other.event_) {
  if (event_ != nullptr) event_->Ref();
}

inline EventPtr::~EventPtr() {
  if (event_ != nullptr) event_->Unref();
}

// Events as a Watch stream writes them: the serialized WatchResponse holding
// `events` events in order (a reference-counted slice, shared by every
// watcher it is queued to). A Watch message is one or more Chunks' bytes one
// after the other.
struct Chunk {
  grpc::Slice bytes;
  uint32_t events = 0;
  // The events, parsed from the bytes (for tests and tools).
  std::vector<v1::WatchEvent> Parse() const;
};

// A Chunk joins events up to this many bytes (at least one event), so a
// Watch message of up to 256 KiB holds several.
constexpr size_t kChunkBytes = 64 * 1024;

// The protos of a VM, shared by the API and the event log.
v1::Vm ToProto(const VmView& vm);

// One watcher's side of the log. The log pushes into it under the log's lock,
// so Push must be quick and must not call back into the log.
class Watcher {
 public:
  virtual ~Watcher() = default;
  // Live events, queued (the events of one reconcile pass, or of part of
  // one). Returns false when the watcher's queue is full: the log then drops
  // the watcher and calls Close with RESOURCE_EXHAUSTED. Flush follows, from
  // the log's sender thread.
  virtual bool Push(const Chunk& chunk) = 0;
  // Start sending what is queued (the log's sender thread calls it, not
  // under the log's lock, after Push).
  virtual void Flush() {}
  // The snapshot and the replay at subscription: always taken. They are
  // bounded by the VM count and the retained history, and must fit whatever
  // the live queue's size, or a watcher cut off for being slow could never
  // resume.
  virtual void PushBacklog(const Chunk& chunk) = 0;
  // No more events will come, with the reason (OK on shutdown).
  virtual void Close(absl::Status status) = 0;
  // The progress interval passed with nothing pushed: `message` is a
  // serialized WatchResponse with progress at `revision`, to be sent only if
  // the watcher is idle (nothing queued, nothing being written); a busy
  // watcher ignores it. Every event up to `revision` the watcher selects was
  // pushed before.
  virtual void PushProgress(uint64_t revision, const grpc::Slice& message) {
    (void)revision;
    (void)message;
  }
};

// The bytes of a WatchResponse with progress at `revision`.
grpc::Slice ProgressMessage(uint64_t revision, const std::string& epoch);

class EventLog : public VmObserver {
 public:
  // `clock` (null: the real one) times progress messages and the send
  // interval. With a `send_interval` above zero, the sender thread starts
  // writes at most once per interval: the passes that end within it go to
  // each watcher together, in fewer and larger messages. The first pass
  // after a quiet interval goes at once, and so do 1,024 events (a
  // message's worth) pushed within one; a watcher still writing when its
  // events are queued sends them when that write is done, as without it.
  EventLog(std::string epoch, size_t history, Clock* clock = nullptr,
           std::chrono::milliseconds send_interval = std::chrono::milliseconds(0));
  ~EventLog() override;

  void StartRevisionsAt(uint64_t first) override;
  // Into the history and the current VMs at once (a snapshot or a resume
  // sees it); to the watchers at the pass's end.
  void Publish(VmEventType type, const VmView& vm, const std::string& detail) override;
  void Seed(const VmView& vm) override;
  // Queues what was published since the last EndPass to the watchers, as
  // one Chunk per kChunkBytes, and wakes the sender thread to write it.
  void EndPass() override;

  // Subscribes `watcher` and, under one lock so nothing is lost or repeated
  // in between, pushes what it asked for first: the snapshot (every current
  // VM matching `vm_id`, then a snapshot-end event) and/or the retained
  // events after `from_revision`. OUT_OF_RANGE when that revision is older
  // than the retained history (compacted) or ahead of the current revision.
  // With a `progress_interval` above zero, the watcher is offered a progress
  // message whenever nothing was pushed to it for that long.
  absl::Status Subscribe(
      Watcher* watcher, const std::string& vm_id, uint64_t from_revision,
      bool initial_snapshot,
      std::chrono::milliseconds progress_interval = std::chrono::milliseconds(0));
  // After this returns, the log never touches `watcher` again.
  void Unsubscribe(Watcher* watcher);
  // Ends every watcher with OK (shutdown), and the sender thread.
  void CloseAll();

  size_t watcher_count() const;
  uint64_t revision() const;
  const std::string& epoch() const { return epoch_; }

 private:
  struct Subscription {
    std::string vm_id;                               // filter; empty: all
    std::chrono::milliseconds progress_interval{0};  // 0: none
    Clock::TimePoint last_push{};                    // of an event or a progress message
    // The revision when it subscribed: its snapshot or replay holds every
    // event up to it, including those of the pass not yet ended.
    uint64_t after = 0;
  };
  // Queues pass_ to the watchers; the ones whose queue was full are closed,
  // out of watchers_, and appended to `cut_off` (for ForgetCutOff, after mu_).
  void EndPassLocked(std::vector<Watcher*>* cut_off) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A watcher cut off is never touched again (its owner may destroy it once
  // closed): waits for a flush round that may hold it, takes it out of the next.
  void ForgetCutOff(const std::vector<Watcher*>& cut_off) ABSL_LOCKS_EXCLUDED(mu_);
  // Replaces `vm_id`'s entry in current_ with `event` (null: removes it).
  void SetCurrent(absl::string_view vm_id, EventPtr event)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Every event up to this revision was queued to the watchers it concerns.
  uint64_t QueuedRevision() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The sender thread: flushes the watchers pushed to (at most once per
  // send interval), offers progress to the watchers due, sleeps until the
  // next of these is due or it is woken.
  void SenderLoop();
  // Offers progress to every watcher due at `now`; returns when the next is.
  Clock::TimePoint OfferProgress(Clock::TimePoint now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WakeSender();
  void StopSender();

  const std::string epoch_;
  const size_t history_limit_;
  Clock* const clock_;
  const std::chrono::milliseconds send_interval_;
  mutable vmnet::Mutex mu_;
  // Watchers with a progress interval: Publish reads the clock only then.
  size_t progress_watchers_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread sender_ ABSL_GUARDED_BY(mu_);
  // Held by the sender while it flushes, and by Unsubscribe: once
  // Unsubscribe returns, no flush of that watcher is running or to come.
  vmnet::Mutex round_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  // The sender's work and sleep.
  std::mutex wake_mu_;
  std::condition_variable wake_cv_;
  absl::flat_hash_set<Watcher*> flush_;  // guarded by wake_mu_
  size_t unflushed_events_ = 0;          // guarded by wake_mu_: pushed since
                                         // the last flush round
  bool wake_ = false;                    // guarded by wake_mu_
  bool stop_ = false;                    // guarded by wake_mu_
  std::atomic<bool> progress_recheck_{false};
  uint64_t revision_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<EventPtr> history_ ABSL_GUARDED_BY(mu_);
  // An event published in this pass, with its bytes for the live path.
  struct Pending {
    EventPtr event;
    grpc::Slice bytes;
  };
  // Published in this pass, not yet queued to the watchers (empty while
  // there are none: a watcher that subscribes later gets them from the
  // history or the snapshot).
  std::vector<Pending> pass_ ABSL_GUARDED_BY(mu_);
  // Whether watchers_ is not empty, read by Publish before it takes mu_: it
  // serializes an event for the live path outside the lock only then (and
  // under it in the rare race with a Subscribe).
  std::atomic<bool> watched_{false};
  // Orders the current VMs by id without a copy of it: the key is the
  // event's spec's own vm_id.
  struct ByVmId {
    using is_transparent = void;
    static absl::string_view Id(const EventPtr& e) { return e->vm_id(); }
    static absl::string_view Id(absl::string_view id) { return id; }
    template <typename A, typename B>
    bool operator()(const A& a, const B& b) const {
      return Id(a) < Id(b);
    }
  };
  // The current VMs, as their last event left them, by id (a B-tree: sorted
  // for snapshots, a pointer per VM, without a node per VM or a key copied).
  absl::btree_set<EventPtr, ByVmId> current_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<Watcher*, Subscription> watchers_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace vmnet
