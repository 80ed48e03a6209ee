// The Watch backend: every VM change the reconciler publishes, with a
// strictly increasing revision, a bounded history for resuming, the current
// VMs for snapshots, and a bounded queue per watcher.
//
// Each event is serialized once, when it is published, as a WatchResponse
// holding that event alone (kept by the history and the current VMs).
// Concatenated protobuf messages are one message whose repeated fields are
// joined, so several events' bytes one after the other are the WatchResponse
// holding them all: a Chunk.
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
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/btree_map.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "grpcpp/support/slice.h"
#include "vmnet/base/clock.h"
#include "vmnet/base/mutex.h"
#include "vmnet/v1/vmnet.pb.h"
#include "vmnet/vm/vm.h"

namespace vmnet {

// One published WatchEvent: what the log filters on, and the serialized
// message ready to be written to a Watch stream. Immutable.
class Event {
 public:
  explicit Event(const v1::WatchEvent& event);

  uint64_t revision() const { return revision_; }
  v1::EventType type() const { return type_; }
  const std::string& vm_id() const { return vm_id_; }
  // The serialized WatchResponse holding this event alone (a
  // reference-counted slice: a write refers to it, it does not copy it).
  const grpc::Slice& bytes() const { return bytes_; }
  // The message again, parsed from the bytes.
  v1::WatchEvent Parse() const;

 private:
  uint64_t revision_;
  v1::EventType type_;
  std::string vm_id_;
  grpc::Slice bytes_;
};

using EventPtr = std::shared_ptr<const Event>;

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
  // `clock` (null: the real one) times progress messages.
  EventLog(std::string epoch, size_t history, Clock* clock = nullptr);
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
  // Every event up to this revision was queued to the watchers it concerns.
  uint64_t QueuedRevision() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The sender thread: flushes the watchers pushed to, offers progress to
  // the watchers due, sleeps until the next is due or it is woken.
  void SenderLoop();
  // Offers progress to every watcher due at `now`; returns when the next is.
  Clock::TimePoint OfferProgress(Clock::TimePoint now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WakeSender();
  void StopSender();

  const std::string epoch_;
  const size_t history_limit_;
  Clock* const clock_;
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
  bool wake_ = false;                    // guarded by wake_mu_
  bool stop_ = false;                    // guarded by wake_mu_
  std::atomic<bool> progress_recheck_{false};
  uint64_t revision_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<EventPtr> history_ ABSL_GUARDED_BY(mu_);
  // Published in this pass, not yet queued to the watchers (empty while
  // there are none: a watcher that subscribes later gets them from the
  // history or the snapshot).
  std::vector<EventPtr> pass_ ABSL_GUARDED_BY(mu_);
  // The current VMs by id, as their last event left them (a B-tree: sorted
  // for snapshots, without a node per VM).
  absl::btree_map<std::string, EventPtr> current_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<Watcher*, Subscription> watchers_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace vmnet
