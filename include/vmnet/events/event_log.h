// The Watch backend: every VM change the reconciler publishes, with a
// strictly increasing revision, a bounded history for resuming, the current
// VMs for snapshots, and a bounded queue per watcher.
//
// Each event is serialized once, when it is published, and the bytes are
// shared by the history and every watcher's queue: a fan-out to many watchers
// copies pointers, and writing an event to a stream copies no bytes.
//
// Thread safety: all methods may be called from any thread.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "grpcpp/support/slice.h"
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
  // The serialized WatchEvent (a reference-counted slice: a write refers to
  // it, it does not copy it).
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

// The protos of a VM, shared by the API and the event log.
v1::Vm ToProto(const VmView& vm);

// One watcher's side of the log. The log pushes into it under the log's lock,
// so Push must be quick and must not call back into the log.
class Watcher {
 public:
  virtual ~Watcher() = default;
  // A live event. Returns false when the watcher's queue is full: the log
  // then drops the watcher and calls Close with RESOURCE_EXHAUSTED.
  virtual bool Push(EventPtr event) = 0;
  // The snapshot and the replay at subscription: always taken. They are
  // bounded by the VM count and the retained history, and must fit whatever
  // the live queue's size, or a watcher cut off for being slow could never
  // resume.
  virtual void PushBacklog(EventPtr event) = 0;
  // No more events will come, with the reason (OK on shutdown).
  virtual void Close(absl::Status status) = 0;
};

class EventLog : public VmObserver {
 public:
  EventLog(std::string epoch, size_t history);

  void StartRevisionsAt(uint64_t first) override;
  void Publish(VmEventType type, const VmView& vm, const std::string& detail) override;
  void Seed(const VmView& vm) override;

  // Subscribes `watcher` and, under one lock so nothing is lost or repeated
  // in between, pushes what it asked for first: the snapshot (every current
  // VM matching `vm_id`, then a snapshot-end event) and/or the retained
  // events after `from_revision`. OUT_OF_RANGE when that revision is older
  // than the retained history.
  absl::Status Subscribe(Watcher* watcher, const std::string& vm_id,
                         uint64_t from_revision, bool initial_snapshot);
  // After this returns, the log never touches `watcher` again.
  void Unsubscribe(Watcher* watcher);
  // Ends every watcher with OK (shutdown).
  void CloseAll();

  size_t watcher_count() const;
  uint64_t revision() const;
  const std::string& epoch() const { return epoch_; }

 private:
  struct Subscription {
    std::string vm_id;  // filter; empty: all
  };
  bool Deliver(Watcher* watcher, const Subscription& sub, const EventPtr& event)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string epoch_;
  const size_t history_limit_;
  mutable vmnet::Mutex mu_;
  uint64_t revision_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<EventPtr> history_ ABSL_GUARDED_BY(mu_);
  // The current VMs by id, as their last event left them.
  std::map<std::string, EventPtr> current_ ABSL_GUARDED_BY(mu_);
  std::map<Watcher*, Subscription> watchers_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace vmnet
