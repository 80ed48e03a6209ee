#include "vmnet/events/event_log.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <thread>

#include "fake_clock.h"

namespace vmnet {
namespace {

// Keeps every Chunk it is given, and the events parsed from them. Its limit
// counts events.
class QueueWatcher : public Watcher {
 public:
  explicit QueueWatcher(size_t limit = 100) : limit_(limit) {}
  bool Push(const Chunk& chunk) override {
    if (events.size() + chunk.events > limit_) return false;
    PushBacklog(chunk);
    return true;
  }
  void PushBacklog(const Chunk& chunk) override {
    chunks.push_back(chunk);
    std::vector<v1::WatchEvent> parsed = chunk.Parse();
    EXPECT_EQ(parsed.size(), chunk.events);
    events.insert(events.end(), parsed.begin(), parsed.end());
  }
  void Close(absl::Status status) override { closed = status; }
  void PushProgress(uint64_t revision, const grpc::Slice& message) override {
    v1::WatchResponse parsed;
    parsed.ParseFromArray(message.begin(), static_cast<int>(message.size()));
    vmnet::MutexLock lock(&mu);
    progress.push_back({revision, parsed});
  }
  void Flush() override { flushes++; }
  std::atomic<int> flushes{0};
  size_t progress_count() {
    vmnet::MutexLock lock(&mu);
    return progress.size();
  }
  std::vector<Chunk> chunks;
  std::vector<v1::WatchEvent> events;
  std::optional<absl::Status> closed;
  vmnet::Mutex mu;  // the progress thread pushes progress
  std::vector<std::pair<uint64_t, v1::WatchResponse>> progress;

 private:
  size_t limit_;
};

VmView Vm(const std::string& id) {
  VmSpec spec;
  spec.vm_id = id;
  spec.interface = "vme1";
  VmView v;
  v.spec = std::make_shared<const VmSpec>(std::move(spec));
  v.state = VmState::kProgrammed;
  return v;
}

// The desired state issues the revisions and the reconciler ends its passes;
// these tests play their part. Each Publish is a pass of its own unless
// `end_pass` is false.
uint64_t Publish(EventLog& log, VmEventType type, VmView vm, const std::string& detail,
                 bool end_pass = true) {
  vm.revision = log.revision() + 1;
  log.Publish(type, vm, detail);
  if (end_pass) log.EndPass();
  return vm.revision;
}

const uint8_t* Data(const Chunk& c) { return c.bytes.begin(); }

TEST(EventLogTest, RevisionsIncreaseFromTheLease) {
  EventLog log("e", 10);
  log.StartRevisionsAt(1000);
  EXPECT_EQ(Publish(log, VmEventType::kAdded, Vm("a"), ""), 1000u);
  EXPECT_EQ(Publish(log, VmEventType::kChanged, Vm("a"), ""), 1001u);
}

TEST(EventLogTest, SnapshotThenEndThenChanges) {
  EventLog log("e", 10);
  Publish(log, VmEventType::kAdded, Vm("a"), "");
  Publish(log, VmEventType::kAdded, Vm("b"), "");
  Publish(log, VmEventType::kRemoved, Vm("a"), "");
  QueueWatcher w;
  ASSERT_TRUE(log.Subscribe(&w, "", 0, true).ok());
  ASSERT_EQ(w.events.size(), 2u);
  EXPECT_EQ(w.events[0].type(), v1::EVENT_TYPE_SNAPSHOT);
  EXPECT_EQ(w.events[0].vm().vm_id(), "b");
  EXPECT_EQ(w.events[0].revision(), 2u);
  EXPECT_EQ(w.events[1].type(), v1::EVENT_TYPE_SNAPSHOT_END);
  EXPECT_EQ(w.events[1].revision(), 3u);
  EXPECT_FALSE(w.events[1].has_vm());
  EXPECT_EQ(w.chunks.size(), 1u);  // the snapshot and its end: one Chunk
  Publish(log, VmEventType::kChanged, Vm("b"), "");
  ASSERT_EQ(w.events.size(), 3u);
  EXPECT_EQ(w.events[2].revision(), 4u);
  log.Unsubscribe(&w);
}

// What a Watch stream writes is each event's bytes: they must be the whole
// WatchEvent, for live events and for the snapshot alike.
TEST(EventLogTest, EventBytesAreTheWholeWatchEvent) {
  EventLog log("epoch-1", 10);
  Publish(log, VmEventType::kAdded, Vm("a"), "attached: set link vme1 up");
  QueueWatcher w;
  ASSERT_TRUE(log.Subscribe(&w, "", 0, true).ok());
  Publish(log, VmEventType::kChanged, Vm("a"), "changed");
  ASSERT_EQ(w.events.size(), 3u);

  const v1::WatchEvent& snapshot = w.events[0];
  EXPECT_EQ(snapshot.type(), v1::EVENT_TYPE_SNAPSHOT);
  EXPECT_EQ(snapshot.epoch(), "epoch-1");
  EXPECT_EQ(snapshot.revision(), 1u);
  EXPECT_EQ(snapshot.vm().vm_id(), "a");
  EXPECT_EQ(snapshot.vm().interface(), "vme1");
  EXPECT_EQ(snapshot.vm().state(), v1::VM_STATE_PROGRAMMED);

  const v1::WatchEvent& live = w.events[2];
  EXPECT_EQ(live.type(), v1::EVENT_TYPE_VM_CHANGED);
  EXPECT_EQ(live.epoch(), "epoch-1");
  EXPECT_EQ(live.revision(), 2u);
  EXPECT_EQ(live.vm().revision(), 2u);
  EXPECT_EQ(live.vm().vm_id(), "a");
  EXPECT_EQ(live.detail(), "changed");
  v1::WatchResponse alone;
  *alone.add_events() = live;
  EXPECT_EQ(w.chunks.back().bytes.size(), alone.ByteSizeLong());
  log.Unsubscribe(&w);
}

// The log keeps no bytes of a published event, only what makes them: a
// replay and a snapshot serialize the event again, and must say what the
// live event said, every field of the VM included.
TEST(EventLogTest, ReplayAndSnapshotSayWhatTheLiveEventSaid) {
  EventLog log("epoch-1", 10);
  VmSpec spec;
  spec.vm_id = "vm-full";
  spec.interface = "vme7";
  spec.addresses = {*IpAddress::Parse("198.51.100.7"), *IpAddress::Parse("2001:db8::7")};
  spec.mac = MacAddress::Parse("02:00:00:00:00:07").value();
  spec.allowed_source_prefixes = {*IpPrefix::Parse("203.0.113.0/24")};
  spec.bandwidth = {20000000, 8000000, 30000, 200};
  VmView vm{std::make_shared<const VmSpec>(spec), VmState::kFailed,
            "address 198.51.100.7 is held by another host", 0};
  Publish(log, VmEventType::kAdded, Vm("a"), "attached");  // the revision to resume from
  QueueWatcher live;
  ASSERT_TRUE(log.Subscribe(&live, "", 0, false).ok());
  uint64_t revision = Publish(log, VmEventType::kChanged, vm,
                              "programmed -> failed: add route 198.51.100.7/32");
  ASSERT_EQ(live.chunks.size(), 1u);

  QueueWatcher resumed;
  ASSERT_TRUE(log.Subscribe(&resumed, "", revision - 1, false).ok());
  ASSERT_EQ(resumed.chunks.size(), 1u);
  EXPECT_EQ(resumed.chunks[0].bytes.size(), live.chunks[0].bytes.size());
  EXPECT_EQ(std::memcmp(Data(resumed.chunks[0]), Data(live.chunks[0]),
                        live.chunks[0].bytes.size()),
            0);
  const v1::WatchEvent& e = resumed.events.at(0);
  EXPECT_EQ(e.detail(), "programmed -> failed: add route 198.51.100.7/32");
  EXPECT_EQ(e.vm().message(), "address 198.51.100.7 is held by another host");
  EXPECT_EQ(e.vm().state(), v1::VM_STATE_FAILED);
  EXPECT_EQ(e.vm().ip_addresses_size(), 2);
  EXPECT_EQ(e.vm().mac_address(), "02:00:00:00:00:07");
  EXPECT_EQ(e.vm().allowed_source_prefixes(0), "203.0.113.0/24");
  EXPECT_EQ(e.vm().bandwidth().egress_packets_per_second(), 200u);

  QueueWatcher listed;
  ASSERT_TRUE(log.Subscribe(&listed, "", 0, true).ok());
  ASSERT_EQ(listed.events.size(), 3u);
  v1::WatchEvent snapshot = listed.events[1];
  ASSERT_EQ(snapshot.vm().vm_id(), "vm-full");
  EXPECT_EQ(snapshot.type(), v1::EVENT_TYPE_SNAPSHOT);
  EXPECT_EQ(snapshot.detail(), "");  // a snapshot says what the VM is, not what changed
  snapshot.set_type(e.type());
  snapshot.set_detail(e.detail());
  EXPECT_EQ(snapshot.SerializeAsString(), e.SerializeAsString());
  for (QueueWatcher* w : {&live, &resumed, &listed}) log.Unsubscribe(w);
}

// A retained event holds the desired state's spec, not a copy, and lets it
// go once neither the history nor the current VMs need the event.
TEST(EventLogTest, RetainedEventsShareTheSpec) {
  EventLog log("e", 2);
  VmView a = Vm("a");
  const std::shared_ptr<const VmSpec> spec = a.spec;
  Publish(log, VmEventType::kAdded, a, "attached");
  // `spec`, `a`, and the one event the history and the current VMs share.
  EXPECT_EQ(spec.use_count(), 3);
  Publish(log, VmEventType::kAdded, Vm("b"), "attached");
  Publish(log, VmEventType::kAdded, Vm("c"), "attached");
  EXPECT_EQ(spec.use_count(), 3);  // out of the history, still a current VM
  Publish(log, VmEventType::kRemoved, a, "detached");
  EXPECT_EQ(spec.use_count(), 3);  // the removal, in the history
  Publish(log, VmEventType::kChanged, Vm("b"), "changed");
  Publish(log, VmEventType::kChanged, Vm("c"), "changed");
  EXPECT_EQ(spec.use_count(), 2);
}

// The current VMs are keyed by the vm_id of their last event's spec: a VM
// whose first event left the history long ago, changed with a spec of its
// own, is found, listed once and in order.
TEST(EventLogTest, SnapshotAfterTheHistoryMovedOn) {
  EventLog log("e", 1);
  for (const char* id : {"c", "a", "b"})
    Publish(log, VmEventType::kAdded, Vm(id), "attached");
  Publish(log, VmEventType::kChanged, Vm("a"), "changed");  // a new spec for "a"
  Publish(log, VmEventType::kChanged, Vm("c"), "changed");
  QueueWatcher w;
  ASSERT_TRUE(log.Subscribe(&w, "", 0, true).ok());
  ASSERT_EQ(w.events.size(), 4u);
  EXPECT_EQ(w.events[0].vm().vm_id(), "a");
  EXPECT_EQ(w.events[0].revision(), 4u);
  EXPECT_EQ(w.events[1].vm().vm_id(), "b");
  EXPECT_EQ(w.events[1].revision(), 3u);
  EXPECT_EQ(w.events[2].vm().vm_id(), "c");
  EXPECT_EQ(w.events[2].revision(), 5u);
  QueueWatcher one;
  ASSERT_TRUE(log.Subscribe(&one, "a", 0, true).ok());
  ASSERT_EQ(one.events.size(), 2u);
  EXPECT_EQ(one.events[0].revision(), 4u);
  log.Unsubscribe(&w);
  log.Unsubscribe(&one);
}

// A Watch message is several events' bytes one after the other: that must
// parse as one WatchResponse with every event, in order.
TEST(EventLogTest, ConcatenatedEventsAreOneWatchResponse) {
  EventLog log("epoch-1", 10);
  Publish(log, VmEventType::kAdded, Vm("a"), "attached");
  QueueWatcher w;
  ASSERT_TRUE(log.Subscribe(&w, "", 0, true).ok());
  Publish(log, VmEventType::kChanged, Vm("a"), "changed");
  Publish(log, VmEventType::kRemoved, Vm("a"), "detached");
  ASSERT_EQ(w.events.size(), 4u);
  std::string joined;
  for (const Chunk& c : w.chunks) {
    joined.append(reinterpret_cast<const char*>(c.bytes.begin()), c.bytes.size());
  }
  v1::WatchResponse message;
  ASSERT_TRUE(message.ParseFromString(joined));
  ASSERT_EQ(message.events_size(), 4);
  EXPECT_FALSE(message.has_progress());
  EXPECT_EQ(message.events(0).type(), v1::EVENT_TYPE_SNAPSHOT);
  EXPECT_EQ(message.events(1).type(), v1::EVENT_TYPE_SNAPSHOT_END);
  EXPECT_EQ(message.events(2).type(), v1::EVENT_TYPE_VM_CHANGED);
  EXPECT_EQ(message.events(2).detail(), "changed");
  EXPECT_EQ(message.events(3).type(), v1::EVENT_TYPE_VM_REMOVED);
  EXPECT_EQ(message.events(3).revision(), 3u);
  log.Unsubscribe(&w);
}

bool WaitFor(const std::function<bool()>& condition) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!condition()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

// The progress thread runs asynchronously: tests wait for what must happen,
// and assert that something did not happen only in the same pass of the
// thread as something that did.
TEST(EventLogTest, ProgressWhenIdleForTheInterval) {
  FakeClock clock;
  EventLog log("epoch-1", 10, &clock);
  Publish(log, VmEventType::kAdded, Vm("a"), "");
  QueueWatcher idle, silent;
  ASSERT_TRUE(log.Subscribe(&idle, "", 0, false, std::chrono::seconds(10)).ok());
  ASSERT_TRUE(log.Subscribe(&silent, "", 0, false).ok());  // no interval: never
  clock.Advance(std::chrono::seconds(10));
  ASSERT_TRUE(WaitFor([&] { return idle.progress_count() == 1; }));
  {
    vmnet::MutexLock lock(&idle.mu);
    EXPECT_EQ(idle.progress[0].first, 1u);
    EXPECT_EQ(idle.progress[0].second.progress().revision(), 1u);
    EXPECT_EQ(idle.progress[0].second.progress().epoch(), "epoch-1");
    EXPECT_EQ(idle.progress[0].second.events_size(), 0);
  }
  // The next carries the revision current when it is sent.
  Publish(log, VmEventType::kChanged, Vm("a"), "");
  clock.Advance(std::chrono::seconds(10));
  ASSERT_TRUE(WaitFor([&] { return idle.progress_count() == 2; }));
  {
    vmnet::MutexLock lock(&idle.mu);
    EXPECT_EQ(idle.progress[1].first, 2u);
  }
  EXPECT_EQ(silent.progress_count(), 0u);
  log.Unsubscribe(&idle);
  log.Unsubscribe(&silent);
}

// Idle time counts from the last event the watcher was sent (events it
// does not select do not count).
TEST(EventLogTest, ProgressCountsIdleTimeFromTheLastEvent) {
  FakeClock clock;
  EventLog log("e", 10, &clock);
  QueueWatcher idle, filtered;
  ASSERT_TRUE(log.Subscribe(&idle, "", 0, false, std::chrono::seconds(10)).ok());
  ASSERT_TRUE(log.Subscribe(&filtered, "b", 0, false, std::chrono::seconds(10)).ok());
  clock.Advance(std::chrono::seconds(9));
  Publish(log, VmEventType::kAdded, Vm("a"), "");  // not b's: filtered stays idle
  clock.Advance(std::chrono::seconds(1));
  ASSERT_TRUE(WaitFor([&] { return filtered.progress_count() == 1; }));
  // The same wake-up looked at `idle`, which had an event 1 s ago.
  EXPECT_EQ(idle.progress_count(), 0u);
  {
    vmnet::MutexLock lock(&filtered.mu);
    EXPECT_EQ(filtered.progress[0].first, 1u);  // the log's revision, not b's
  }
  clock.Advance(std::chrono::seconds(9));
  ASSERT_TRUE(WaitFor([&] { return idle.progress_count() == 1; }));
  log.Unsubscribe(&idle);
  log.Unsubscribe(&filtered);
}

// Writes start on the sender thread: a Push is followed by a Flush, and a
// watcher pushed nothing is not flushed.
TEST(EventLogTest, PushedWatchersAreFlushed) {
  EventLog log("e", 10);
  QueueWatcher a, b;
  ASSERT_TRUE(log.Subscribe(&a, "a", 0, false).ok());
  ASSERT_TRUE(log.Subscribe(&b, "b", 0, false).ok());
  Publish(log, VmEventType::kAdded, Vm("a"), "");
  ASSERT_TRUE(WaitFor([&] { return a.flushes.load() >= 1; }));
  Publish(log, VmEventType::kAdded, Vm("b"), "");
  ASSERT_TRUE(WaitFor([&] { return b.flushes.load() >= 1; }));
  EXPECT_EQ(a.events.size(), 1u);
  log.Unsubscribe(&a);
  log.Unsubscribe(&b);
  EXPECT_EQ(a.flushes.load(), 1);  // b's round came after a's, and did not flush a
}

// With a send interval, writes start at most once per interval: the first
// pass after a quiet interval goes at once, the passes that follow within
// the interval wait for its end and go together. A progress watcher shows
// when the sender has looked (it flushes what is due before it offers
// progress, in the same round).
TEST(EventLogTest, PassesWithinTheSendIntervalAreFlushedTogether) {
  FakeClock clock;
  EventLog log("e", 10, &clock, std::chrono::milliseconds(100));
  QueueWatcher w, marker;
  ASSERT_TRUE(log.Subscribe(&w, "", 0, false).ok());
  ASSERT_TRUE(
      log.Subscribe(&marker, "none", 0, false, std::chrono::milliseconds(50)).ok());
  Publish(log, VmEventType::kAdded, Vm("a"), "");
  ASSERT_TRUE(WaitFor([&] { return w.flushes.load() == 1; }));
  Publish(log, VmEventType::kAdded, Vm("b"), "");
  Publish(log, VmEventType::kAdded, Vm("c"), "");
  EXPECT_EQ(w.events.size(), 3u);  // queued at once; written later
  clock.Advance(std::chrono::milliseconds(50));
  ASSERT_TRUE(WaitFor([&] { return marker.progress_count() == 1; }));
  EXPECT_EQ(w.flushes.load(), 1);
  clock.Advance(std::chrono::milliseconds(50));
  ASSERT_TRUE(WaitFor([&] { return w.flushes.load() == 2; }));
  // Quiet for a whole interval since: the next pass goes at once.
  clock.Advance(std::chrono::milliseconds(100));
  ASSERT_TRUE(WaitFor([&] { return marker.progress_count() == 3; }));
  Publish(log, VmEventType::kAdded, Vm("d"), "");
  ASSERT_TRUE(WaitFor([&] { return w.flushes.load() == 3; }));
  log.Unsubscribe(&w);
  log.Unsubscribe(&marker);
}

// A message's worth of events (1,024) does not wait for the interval's
// end: waiting would only fill the watchers' queues.
TEST(EventLogTest, ABigPassIsFlushedWithoutWaitingForTheSendInterval) {
  FakeClock clock;
  EventLog log("e", 2000, &clock, std::chrono::milliseconds(100));
  QueueWatcher w(5000);
  ASSERT_TRUE(log.Subscribe(&w, "", 0, false).ok());
  Publish(log, VmEventType::kAdded, Vm("a"), "");
  ASSERT_TRUE(WaitFor([&] { return w.flushes.load() == 1; }));
  for (int i = 0; i < 1024; ++i) Publish(log, VmEventType::kChanged, Vm("a"), "", false);
  log.EndPass();
  EXPECT_TRUE(WaitFor([&] { return w.flushes.load() == 2; }));  // the clock stood still
  log.Unsubscribe(&w);
}

TEST(EventLogTest, TooOldSaysCompacted) {
  EventLog log("e", 2);
  for (int i = 0; i < 5; ++i) Publish(log, VmEventType::kChanged, Vm("a"), "");
  QueueWatcher w;
  absl::Status s = log.Subscribe(&w, "", 2, false);
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  EXPECT_NE(s.message().find("compacted"), std::string::npos) << s;
  EXPECT_NE(s.message().find("revision 4"), std::string::npos) << s;
  EXPECT_TRUE(log.Subscribe(&w, "", 3, false).ok());
  log.Unsubscribe(&w);
}

TEST(EventLogTest, ResumeReplaysInOrderAndTooOldIsOutOfRange) {
  EventLog log("e", 3);
  for (int i = 0; i < 5; ++i) Publish(log, VmEventType::kChanged, Vm("a"), "");
  QueueWatcher w;
  ASSERT_TRUE(log.Subscribe(&w, "", 3, false).ok());
  ASSERT_EQ(w.events.size(), 2u);
  EXPECT_EQ(w.events[0].revision(), 4u);
  EXPECT_EQ(w.events[1].revision(), 5u);
  log.Unsubscribe(&w);
  QueueWatcher old;
  EXPECT_EQ(log.Subscribe(&old, "", 1, false).code(), absl::StatusCode::kOutOfRange);
}

TEST(EventLogTest, FilterByVm) {
  EventLog log("e", 10);
  QueueWatcher w;
  ASSERT_TRUE(log.Subscribe(&w, "b", 0, false).ok());
  Publish(log, VmEventType::kAdded, Vm("a"), "");
  Publish(log, VmEventType::kAdded, Vm("b"), "");
  ASSERT_EQ(w.events.size(), 1u);
  EXPECT_EQ(w.events[0].vm().vm_id(), "b");
  log.Unsubscribe(&w);
}

TEST(EventLogTest, SlowWatcherIsCutOffWithoutSlowingOthers) {
  EventLog log("e", 10);
  QueueWatcher slow(2), fast(100);
  ASSERT_TRUE(log.Subscribe(&slow, "", 0, false).ok());
  ASSERT_TRUE(log.Subscribe(&fast, "", 0, false).ok());
  for (int i = 0; i < 5; ++i) Publish(log, VmEventType::kChanged, Vm("a"), "");
  ASSERT_TRUE(slow.closed.has_value());
  EXPECT_EQ(slow.closed->code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(fast.events.size(), 5u);
  EXPECT_EQ(log.watcher_count(), 1u);
  log.Unsubscribe(&fast);
}

TEST(EventLogTest, CutOffWatcherCanResumeWhateverItsQueueSize) {
  EventLog log("e", 100);
  QueueWatcher slow(2);
  ASSERT_TRUE(log.Subscribe(&slow, "", 0, false).ok());
  for (int i = 0; i < 10; ++i) Publish(log, VmEventType::kChanged, Vm("a"), "");
  ASSERT_TRUE(slow.closed.has_value());
  uint64_t last_seen = slow.events.back().revision();
  QueueWatcher resumed(2);
  ASSERT_TRUE(log.Subscribe(&resumed, "", last_seen, false).ok());
  ASSERT_EQ(resumed.events.size(), 10 - last_seen);
  EXPECT_EQ(resumed.events.back().revision(), 10u);
  log.Unsubscribe(&resumed);
}

TEST(EventLogTest, FanOutSharesOneEvent) {
  EventLog log("e", 10);
  std::vector<QueueWatcher> watchers(100);
  for (auto& w : watchers) ASSERT_TRUE(log.Subscribe(&w, "", 0, false).ok());
  Publish(log, VmEventType::kAdded, Vm("a"), "");
  for (auto& w : watchers) {
    ASSERT_EQ(w.chunks.size(), 1u);
    EXPECT_EQ(Data(w.chunks[0]), Data(watchers[0].chunks[0]));  // the same bytes
  }
  for (auto& w : watchers) log.Unsubscribe(&w);
}

// What a pass published reaches the watchers at its end, as one Chunk of
// every event in order, the same bytes for every watcher of all VMs; a
// watcher of one VM gets that VM's events alone.
TEST(EventLogTest, OnePassIsOneChunkPerWatcher) {
  EventLog log("e", 10);
  QueueWatcher w1, w2, only_b;
  ASSERT_TRUE(log.Subscribe(&w1, "", 0, false).ok());
  ASSERT_TRUE(log.Subscribe(&w2, "", 0, false).ok());
  ASSERT_TRUE(log.Subscribe(&only_b, "b", 0, false).ok());
  Publish(log, VmEventType::kAdded, Vm("a"), "", false);
  Publish(log, VmEventType::kAdded, Vm("b"), "", false);
  Publish(log, VmEventType::kChanged, Vm("a"), "", false);
  EXPECT_TRUE(w1.events.empty());  // not before the pass's end
  EXPECT_EQ(log.revision(), 3u);
  log.EndPass();
  ASSERT_EQ(w1.chunks.size(), 1u);
  EXPECT_EQ(w1.chunks[0].events, 3u);
  ASSERT_EQ(w1.events.size(), 3u);
  for (uint64_t i = 0; i < 3; ++i) EXPECT_EQ(w1.events[i].revision(), i + 1);
  EXPECT_EQ(w1.events[1].vm().vm_id(), "b");
  ASSERT_EQ(w2.chunks.size(), 1u);
  EXPECT_EQ(Data(w2.chunks[0]), Data(w1.chunks[0]));
  ASSERT_EQ(only_b.events.size(), 1u);
  EXPECT_EQ(only_b.events[0].revision(), 2u);
  log.EndPass();  // an empty pass queues nothing
  EXPECT_EQ(w1.chunks.size(), 1u);
  log.Unsubscribe(&w1);
  log.Unsubscribe(&w2);
  log.Unsubscribe(&only_b);
}

// A watcher that subscribes in the middle of a pass gets the pass's earlier
// events from its snapshot or replay and the later ones at the pass's end:
// each exactly once.
TEST(EventLogTest, SubscribedDuringAPassSeesEachEventOnce) {
  EventLog log("e", 10);
  QueueWatcher before;
  ASSERT_TRUE(log.Subscribe(&before, "", 0, false).ok());
  Publish(log, VmEventType::kAdded, Vm("a"), "", false);
  Publish(log, VmEventType::kAdded, Vm("b"), "", false);
  QueueWatcher resumed, snapshot, now;
  ASSERT_TRUE(log.Subscribe(&resumed, "", 1, false).ok());
  ASSERT_TRUE(log.Subscribe(&snapshot, "", 0, true).ok());
  ASSERT_TRUE(log.Subscribe(&now, "", 0, false).ok());
  Publish(log, VmEventType::kChanged, Vm("a"), "", false);
  log.EndPass();
  auto revisions = [](const QueueWatcher& w) {
    std::vector<uint64_t> r;
    for (const auto& e : w.events) r.push_back(e.revision());
    return r;
  };
  EXPECT_EQ(revisions(before), (std::vector<uint64_t>{1, 2, 3}));
  EXPECT_EQ(revisions(resumed), (std::vector<uint64_t>{2, 3}));
  // a at 1 and b at 2, the end at 2, then the change of a.
  EXPECT_EQ(revisions(snapshot), (std::vector<uint64_t>{1, 2, 2, 3}));
  EXPECT_EQ(snapshot.events[2].type(), v1::EVENT_TYPE_SNAPSHOT_END);
  EXPECT_EQ(revisions(now), (std::vector<uint64_t>{3}));
  for (QueueWatcher* w : {&before, &resumed, &snapshot, &now}) log.Unsubscribe(w);
}

// A pass larger than kChunkBytes goes out as several Chunks, in order.
TEST(EventLogTest, ALargePassIsSeveralChunks) {
  EventLog log("e", 100);
  QueueWatcher w(1000);
  ASSERT_TRUE(log.Subscribe(&w, "", 0, false).ok());
  const std::string detail(kChunkBytes / 4, 'x');
  for (int i = 0; i < 10; ++i) {
    Publish(log, VmEventType::kChanged, Vm("a"), detail, false);
  }
  log.EndPass();
  ASSERT_GE(w.chunks.size(), 3u);
  for (const Chunk& c : w.chunks) {
    EXPECT_TRUE(c.events == 1 || c.bytes.size() <= kChunkBytes) << c.bytes.size();
  }
  ASSERT_EQ(w.events.size(), 10u);
  for (uint64_t i = 0; i < 10; ++i) EXPECT_EQ(w.events[i].revision(), i + 1);
  log.Unsubscribe(&w);
}

// A progress message never claims a revision whose event is still waiting
// for its pass's end.
TEST(EventLogTest, ProgressIsNotAheadOfThePass) {
  FakeClock clock;
  EventLog log("e", 10, &clock);
  QueueWatcher idle;
  ASSERT_TRUE(log.Subscribe(&idle, "", 0, false, std::chrono::seconds(10)).ok());
  Publish(log, VmEventType::kAdded, Vm("a"), "");
  Publish(log, VmEventType::kAdded, Vm("b"), "", false);  // the pass goes on
  clock.Advance(std::chrono::seconds(10));
  ASSERT_TRUE(WaitFor([&] { return idle.progress_count() == 1; }));
  {
    vmnet::MutexLock lock(&idle.mu);
    EXPECT_EQ(idle.progress[0].first, 1u);
    EXPECT_EQ(idle.progress[0].second.progress().revision(), 1u);
  }
  log.EndPass();
  log.Unsubscribe(&idle);
}

}  // namespace
}  // namespace vmnet
