// vmnet_fleet_control_plane: plays the cloud control plane of bench/fleet.
// It holds one Watch stream to every agent of the fleet (--agents_file) and a
// view of each agent's VMs built from them, as a real control plane does, and
// it is driven by bench/fleet/run.py through commands on stdin, one per line,
// each answered by one JSON object on one line of stdout:
//
//   wait_live [TIMEOUT_S]  until every stream is in place (response headers)
//                          and no host is being listed: how long that took
//                          from this process's start, and how each host began
//                          (resumed from the state file, or listed)
//   attach                 AttachVm for every VM of every agent, concurrently
//                          (--concurrency calls in flight per agent), until
//                          every call answered PROGRAMMED and every VM is
//                          PROGRAMMED with its spec in the view (seen on
//                          Watch): converge time. Specs are the lab's (no
//                          MAC), so a second attach restores what others
//                          changed.
//   expect FILE [TIMEOUT_S] every change FILE lists (lines "HOST VM_ID removed"
//                          or "HOST VM_ID changed MAC", made by someone else
//                          while this process was down) must arrive as a
//                          Watch event of this process: how many did not
//                          (missed), and when the last did
//   relisted HOST N [TIMEOUT_S] until HOST has been re-listed N times in all:
//                          the agent's CPU during the last re-list (its
//                          ListVms calls), and why it was re-listed
//   quiet SECONDS [nostreams] streams left idle: progress messages received,
//                          any other message, and the agents' CPU meanwhile;
//                          with nostreams, every stream is cancelled for the
//                          window (the agents' CPU without watchers) and
//                          resumed after it (wait_live then says when)
//   audit                  ListVms of every agent compared with the view (not
//                          a re-list: a check of the bench); mismatches
//   persist                writes the state file now (it is otherwise written
//                          at most every --persist_interval_ms after a change)
//   stats                  counters per host: re-lists, initial lists,
//                          resumes, OUT_OF_RANGE, stream ends, messages
//   quit                   cancels the streams and exits 0
//
// How the control plane follows an agent:
//   - At start, a host in the state file (--state_file: per host the last
//     revision, epoch and VMs, rewritten atomically whenever they change, at
//     most every --persist_interval_ms) is resumed: Watch with from_revision
//     set to its revision, no list. A host not in it is listed: a Watch from
//     now is put in place first, then ListVms, then the events that arrived
//     meanwhile are applied over the list (newer revisions win).
//     Until the stream's first message (an event, or progress within
//     --progress_interval_ms) the revision the list is at is unknown (ListVms
//     carries none): the host is held as such (and saved with revision 0),
//     and a stream that ends meanwhile means another list. So does a
//     revision of 0 (an agent that never changed anything): from_revision 0
//     means "from now", not "after revision 0".
//   - A stream that ends (the agent stopping, UNAVAILABLE while it starts,
//     RESOURCE_EXHAUSTED) is resumed from the last revision held.
//   - A message carrying another epoch than the one held means the agent
//     restarted: the host is re-listed (ListVms, the stream staying open and
//     its events held back until the list is merged). So is a resume answered
//     OUT_OF_RANGE (history compacted): what a restarted vmnetd answers, as
//     its revisions start at its lease, above any revision it issued before.
//   - Every stream asks for progress messages every --progress_interval_ms,
//     so an idle host still moves its revision forward and shows its epoch.
//
// The agents' CPU is read from their process CPU-time clocks
// (clock_getcpuclockid on the pid in each agent's pid file): nanoseconds, all
// threads, those ended included.
//
// Exit status: 0 after quit, 2 on bad flags or files.
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <mutex>
#include <queue>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench_common.h"
#include "vmnet/v1/vmnet.grpc.pb.h"

ABSL_FLAG(
    std::string, agents_file, "",
    "One agent per line: NAME SOCKET_PATH PID_FILE FIRST_VM VM_COUNT. Its VMs are lab "
    "VMs FIRST_VM.. (bench_common.h: id and address by that global index) on links "
    "vme0.. (by the index within the host).");
ABSL_FLAG(std::string, state_file, "",
          "Where the control plane keeps each host's revision, epoch and VMs; read at "
          "start (a host in it is resumed, not listed).");
ABSL_FLAG(int, progress_interval_ms, 1000, "progress_interval of every Watch stream.");
ABSL_FLAG(int, concurrency, 8, "AttachVm calls in flight per agent during attach.");
ABSL_FLAG(int, persist_interval_ms, 100,
          "At most this often the state file is rewritten.");

namespace vmnet::bench {
namespace {

using v1::VmNetwork;
using v1::WatchEvent;
using v1::WatchResponse;

struct AgentInfo {
  std::string name, socket, pid_file;
  int first = 0, count = 0;
};

// The agent's whole-process CPU time in nanoseconds (-1 when unreadable).
int64_t AgentCpuNs(const std::string& pid_file) {
  std::ifstream in(pid_file);
  int pid = 0;
  if (!(in >> pid) || pid <= 0) return -1;
  clockid_t clock;
  if (clock_getcpuclockid(pid, &clock) != 0) return -1;
  timespec ts;
  if (clock_gettime(clock, &ts) != 0) return -1;
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// A task runner with delays: the re-lists and resumes that must not run on
// gRPC's callback threads (they block on ListVms).
class Worker {
 public:
  explicit Worker(int threads) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { Run(); });
  }
  ~Worker() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  void Post(std::function<void()> task, double delay_s = 0) {
    std::lock_guard lock(mu_);
    tasks_.push(Task{Now() + delay_s, seq_++, std::move(task)});
    cv_.notify_one();
  }

 private:
  struct Task {
    double at;
    uint64_t seq;
    std::function<void()> run;
    bool operator>(const Task& o) const { return at != o.at ? at > o.at : seq > o.seq; }
  };
  void Run() {
    std::unique_lock lock(mu_);
    for (;;) {
      if (stop_) return;
      if (tasks_.empty()) {
        cv_.wait(lock);
        continue;
      }
      double wait = tasks_.top().at - Now();
      if (wait > 0) {
        cv_.wait_for(lock, std::chrono::microseconds(static_cast<int64_t>(wait * 1e6)));
        continue;
      }
      auto run = tasks_.top().run;
      tasks_.pop();
      lock.unlock();
      run();
      lock.lock();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::priority_queue<Task, std::vector<Task>, std::greater<Task>> tasks_;
  uint64_t seq_ = 0;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// What the control plane knows of one VM.
struct VmRecord {
  v1::VmState state = v1::VM_STATE_UNSPECIFIED;
  uint64_t revision = 0;
  std::string mac;
  double matched_at = 0;  // when it last became PROGRAMMED with the lab's spec
};

bool Matches(const VmRecord& r) {
  return r.state == v1::VM_STATE_PROGRAMMED && r.mac.empty();
}

// One re-list: the agent's CPU over its ListVms calls.
struct Relist {
  int64_t cpu_ns = -1;
  int vms = 0;
  double list_s = 0;
  double started_at = 0;
  std::string reason;
};

class ControlPlane;

// One agent: its channel, its Watch stream, the view of its VMs.
class Host {
 public:
  Host(AgentInfo info, int id, int progress_ms, Worker* worker)
      : info_(std::move(info)), progress_ms_(progress_ms), worker_(worker) {
    channel_ = Connect("unix://" + info_.socket, id);
    stub_ = VmNetwork::NewStub(channel_);
  }

  const AgentInfo& info() const { return info_; }
  VmNetwork::Stub* stub() { return stub_.get(); }

  // Loads what the state file held for this host.
  void Restore(uint64_t revision, std::string epoch,
               absl::flat_hash_map<std::string, VmRecord> view) {
    std::lock_guard lock(mu_);
    revision_ = revision;
    revision_known_ = revision != 0;
    epoch_ = std::move(epoch);
    view_ = std::move(view);
  }

  // Follows the agent: resumes when a revision is held, lists otherwise.
  void Begin() {
    uint64_t from;
    {
      std::lock_guard lock(mu_);
      from = revision_;
    }
    if (from != 0) {
      {
        std::lock_guard lock(mu_);
        ++resumes_;
      }
      Open(from);
    } else {
      worker_->Post([this] { Sync("initial"); });
    }
  }

  // Cancels the stream and opens none until Unpause (the control plane
  // letting go of this host for a while).
  void Pause() {
    Stream* live;
    {
      std::lock_guard lock(mu_);
      paused_ = true;
      live = live_;
    }
    if (live != nullptr) live->Cancel();
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, std::chrono::seconds(5), [&] { return live_ == nullptr; });
  }
  // Resumes the stream from the revision held.
  void Unpause() {
    uint64_t from;
    {
      std::lock_guard lock(mu_);
      paused_ = false;
      from = revision_known_ ? revision_ : 0;
    }
    if (from != 0) {
      Open(from);
    } else {
      worker_->Post([this] { Sync("no_revision"); });
    }
  }

  void Stop() {
    Stream* live;
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
      live = live_;
    }
    if (live != nullptr) live->Cancel();
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, std::chrono::seconds(5), [&] { return live_ == nullptr; });
  }

  // -- what the commands read
  // -------------------------------------------------------------

  bool Live(double* in_place_at) {
    std::lock_guard lock(mu_);
    *in_place_at = in_place_at_;
    // A host just listed is live once a message says which revision the
    // list is at (ListVms says none): resuming needs it.
    return in_place_ && !listing_ && live_ != nullptr && revision_known_;
  }

  // Every lab VM PROGRAMMED with its spec; `latest` gets the latest time one
  // became so.
  bool Converged(double* latest) {
    std::lock_guard lock(mu_);
    if (listing_) return false;
    double last = 0;
    for (int j = 0; j < info_.count; ++j) {
      auto it = view_.find(VmId(info_.first + j));
      if (it == view_.end() || !Matches(it->second)) return false;
      last = std::max(last, it->second.matched_at);
    }
    *latest = last;
    return true;
  }

  // The last event of `vm_id` this process received: its type and MAC.
  bool LastEvent(const std::string& vm_id, v1::EventType* type, std::string* mac,
                 double* at) {
    std::lock_guard lock(mu_);
    auto it = received_.find(vm_id);
    if (it == received_.end()) return false;
    *type = it->second.type;
    *mac = it->second.mac;
    *at = it->second.at;
    return true;
  }

  struct Counters {
    int relists = 0, initial_lists = 0, resumes = 0, out_of_range = 0, stream_ends = 0,
        epoch_changes = 0;
    int64_t messages = 0, events = 0, progress = 0;
    uint64_t revision = 0;
    std::string epoch;
    size_t vms = 0;
  };
  Counters counters() {
    std::lock_guard lock(mu_);
    Counters c;
    c.relists = relists_;
    c.initial_lists = initial_lists_;
    c.resumes = resumes_;
    c.out_of_range = out_of_range_;
    c.stream_ends = stream_ends_;
    c.epoch_changes = epoch_changes_;
    c.messages = messages_;
    c.events = events_;
    c.progress = progress_;
    c.revision = revision_;
    c.epoch = epoch_;
    c.vms = view_.size();
    return c;
  }
  std::vector<Relist> relist_samples() {
    std::lock_guard lock(mu_);
    return samples_;
  }

  // The state file's lines for this host; `version` is bumped by every change.
  std::string Serialize() {
    std::lock_guard lock(mu_);
    std::string out =
        absl::StrCat("host ", info_.name, " ", revision_known_ ? revision_ : 0, " ",
                     epoch_.empty() ? "-" : epoch_, " ", view_.size(), "\n");
    for (const auto& [id, r] : view_) {
      absl::StrAppend(&out, id, " ", static_cast<int>(r.state), " ", r.revision, " ",
                      r.mac.empty() ? "-" : r.mac, "\n");
    }
    return out;
  }
  static std::atomic<uint64_t> version;

  // ListVms of the agent, every page. Counted nowhere: the caller says what it is.
  grpc::Status ListAll(std::vector<v1::Vm>* out) {
    std::string token;
    do {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
      v1::ListVmsRequest request;
      request.set_page_size(1000);
      request.set_page_token(token);
      v1::ListVmsResponse response;
      grpc::Status s = stub_->ListVms(&context, request, &response);
      if (!s.ok()) return s;
      for (auto& vm : *response.mutable_vms()) out->push_back(std::move(vm));
      token = response.next_page_token();
    } while (!token.empty());
    return grpc::Status::OK;
  }

  // The view against a list: VMs missing on either side or differing.
  int Compare(const std::vector<v1::Vm>& list) {
    std::lock_guard lock(mu_);
    int mismatches = 0;
    std::set<std::string> listed;
    for (const v1::Vm& vm : list) {
      listed.insert(vm.vm_id());
      auto it = view_.find(vm.vm_id());
      if (it == view_.end() || it->second.state != vm.state() ||
          it->second.revision != vm.revision() || it->second.mac != vm.mac_address()) {
        ++mismatches;
      }
    }
    for (const auto& [id, r] : view_) mismatches += listed.count(id) ? 0 : 1;
    return mismatches;
  }

 private:
  class Stream : public grpc::ClientReadReactor<WatchResponse> {
   public:
    Stream(Host* owner, uint64_t from_revision, int progress_ms) : owner_(owner) {
      request_.set_from_revision(from_revision);
      request_.mutable_progress_interval()->set_seconds(progress_ms / 1000);
      request_.mutable_progress_interval()->set_nanos((progress_ms % 1000) * 1'000'000);
    }
    void Begin(VmNetwork::Stub* stub) {
      context_.set_wait_for_ready(true);  // the agent may be restarting
      stub->async()->Watch(&context_, &request_, this);
      StartRead(&response_);
      StartCall();
    }
    void Cancel() { context_.TryCancel(); }
    void OnReadInitialMetadataDone(bool ok) override { owner_->OnInPlace(ok); }
    void OnReadDone(bool ok) override {
      if (!ok) return;  // OnDone follows
      owner_->OnMessage(std::move(response_));
      response_.Clear();
      StartRead(&response_);
    }
    void OnDone(const grpc::Status& status) override { owner_->OnStreamDone(status); }

   private:
    Host* owner_;
    grpc::ClientContext context_;
    v1::WatchRequest request_;
    WatchResponse response_;
  };

  // Opens a stream (not under mu_: starting a call may run callbacks inline).
  void Open(uint64_t from_revision) {
    Stream* stream;
    {
      std::lock_guard lock(mu_);
      if (stopping_) return;
      streams_.push_back(std::make_unique<Stream>(this, from_revision, progress_ms_));
      stream = live_ = streams_.back().get();
      in_place_ = false;
    }
    stream->Begin(stub_.get());
  }

  void OnInPlace(bool ok) {
    std::lock_guard lock(mu_);
    if (ok) {
      in_place_ = true;
      in_place_at_ = Now();
    }
    cv_.notify_all();
  }

  void OnMessage(WatchResponse message) {
    std::lock_guard lock(mu_);
    ++messages_;
    const std::string& epoch =
        message.has_progress()
            ? message.progress().epoch()
            : (message.events_size() > 0 ? message.events(0).epoch() : "");
    if (listing_) {
      held_.push_back(std::move(message));
      return;
    }
    if (!epoch_.empty() && !epoch.empty() && epoch != epoch_) {
      // The agent restarted: its history before now is gone, and what it
      // holds may not be what it held. Re-list; hold the stream's messages
      // back until the list is merged.
      ++epoch_changes_;
      epoch_ = epoch;
      listing_ = true;
      held_.push_back(std::move(message));
      worker_->Post([this] { RelistLive(); });
      return;
    }
    ApplyLocked(message);
  }

  void ApplyLocked(const WatchResponse& message) {
    double now = Now();
    revision_known_ = true;
    if (message.has_progress()) {
      ++progress_;
      if (epoch_.empty()) epoch_ = message.progress().epoch();
      revision_ = std::max(revision_, message.progress().revision());
    }
    for (const WatchEvent& e : message.events()) {
      ++events_;
      if (epoch_.empty()) epoch_ = e.epoch();
      revision_ = std::max(revision_, e.revision());
      const std::string& id = e.vm().vm_id();
      auto& seen = received_[id];
      seen.type = e.type();
      seen.mac = e.vm().mac_address();
      seen.at = now;
      if (e.type() == v1::EVENT_TYPE_SNAPSHOT_END) continue;
      auto it = view_.find(id);
      if (it != view_.end() && e.revision() <= it->second.revision) continue;  // stale
      if (e.type() == v1::EVENT_TYPE_VM_REMOVED) {
        if (it != view_.end()) view_.erase(it);
        continue;
      }
      VmRecord& r = view_[id];
      bool matched = Matches(r);
      r.state = e.vm().state();
      r.revision = e.revision();
      r.mac = e.vm().mac_address();
      if (Matches(r) && !matched) r.matched_at = now;
    }
    ++version;
  }

  void OnStreamDone(const grpc::Status& status) {
    bool out_of_range = false;
    uint64_t from = 0;
    {
      std::lock_guard lock(mu_);
      live_ = nullptr;
      in_place_ = false;
      cv_.notify_all();
      if (!revision_known_) revision_ = 0;  // a list whose revision never came
      if (stopping_ || paused_) return;
      ++stream_ends_;
      last_end_ = absl::StrCat(status.error_code(), " ", status.error_message());
      out_of_range = status.error_code() == grpc::StatusCode::OUT_OF_RANGE;
      if (out_of_range) ++out_of_range_;
      from = revision_;
    }
    if (out_of_range || from == 0) {
      worker_->Post(
          [this, out_of_range] { Sync(out_of_range ? "out_of_range" : "no_revision"); });
    } else {
      // The agent stopping (OK), starting (UNAVAILABLE), or this stream fell
      // behind (RESOURCE_EXHAUSTED): resume from the revision held.
      worker_->Post([this, from] { Open(from); }, 0.02);
    }
  }

  // A list with a new stream: the stream is put in place first, so nothing
  // after the list is missed; its messages are held back until the list is
  // merged.
  void Sync(const std::string& reason) {
    std::lock_guard op(op_mu_);
    {
      std::lock_guard lock(mu_);
      if (stopping_) return;
      listing_ = true;
      epoch_.clear();           // the stream's first message says it
      revision_known_ = false;  // and the revision the list is at
      held_.clear();
    }
    Open(0);
    {
      std::unique_lock lock(mu_);
      cv_.wait_for(lock, std::chrono::seconds(30),
                   [&] { return in_place_ || live_ == nullptr || stopping_; });
      if (!in_place_) {
        // Ended or never started (OnStreamDone schedules the next try).
        listing_ = false;
        held_.clear();
        return;
      }
    }
    ListAndMerge(reason);
  }

  // A re-list under a live stream (the epoch changed).
  void RelistLive() {
    std::lock_guard op(op_mu_);
    ListAndMerge("epoch");
  }

  void ListAndMerge(const std::string& reason) {
    Relist sample;
    sample.reason = reason;
    sample.started_at = Now();
    int64_t cpu_before = AgentCpuNs(info_.pid_file);
    std::vector<v1::Vm> list;
    grpc::Status s = ListAll(&list);
    int64_t cpu_after = AgentCpuNs(info_.pid_file);
    sample.list_s = Now() - sample.started_at;
    sample.vms = static_cast<int>(list.size());
    if (cpu_before >= 0 && cpu_after >= cpu_before)
      sample.cpu_ns = cpu_after - cpu_before;
    std::lock_guard lock(mu_);
    if (!s.ok()) {
      // Try again shortly, under the same stream if it lives.
      std::cerr << "fleet_control_plane: ListVms of " << info_.name
                << " failed: " << s.error_message() << "\n";
      worker_->Post([this] { RelistLive(); }, 0.1);
      return;
    }
    bool initial = reason == "initial";
    if (initial) {
      ++initial_lists_;
    } else {
      ++relists_;
    }
    samples_.push_back(sample);
    double now = Now();
    absl::flat_hash_map<std::string, VmRecord> view;
    for (const v1::Vm& vm : list) {
      VmRecord& r = view[vm.vm_id()];
      r.state = vm.state();
      r.revision = vm.revision();
      r.mac = vm.mac_address();
      auto old = view_.find(vm.vm_id());
      r.matched_at =
          old != view_.end() && Matches(old->second) ? old->second.matched_at : now;
    }
    view_ = std::move(view);
    listing_ = false;
    std::vector<WatchResponse> held;
    held.swap(held_);
    for (const WatchResponse& m : held) ApplyLocked(m);
    ++version;
  }

  const AgentInfo info_;
  const int progress_ms_;
  Worker* worker_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<VmNetwork::Stub> stub_;
  std::mutex op_mu_;  // one list at a time per host
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Stream>> streams_;  // every stream opened
  Stream* live_ = nullptr;
  bool in_place_ = false;
  double in_place_at_ = 0;
  bool stopping_ = false;
  bool paused_ = false;
  bool listing_ = false;
  std::vector<WatchResponse> held_;  // while listing
  uint64_t revision_ = 0;
  bool revision_known_ = false;  // a message said it (after a list: not yet)
  std::string epoch_;
  absl::flat_hash_map<std::string, VmRecord> view_;
  struct Received {
    v1::EventType type;
    std::string mac;
    double at;
  };
  absl::flat_hash_map<std::string, Received> received_;  // by this process
  std::vector<Relist> samples_;
  int relists_ = 0, initial_lists_ = 0, resumes_ = 0, out_of_range_ = 0, stream_ends_ = 0,
      epoch_changes_ = 0;
  int64_t messages_ = 0, events_ = 0, progress_ = 0;
  std::string last_end_;
};

std::atomic<uint64_t> Host::version{0};

// Keeps `concurrency` AttachVm calls in flight to one agent.
class AttachRun {
 public:
  AttachRun(Host* host, int concurrency) : host_(host), concurrency_(concurrency) {}
  void Start() {
    for (int i = 0; i < concurrency_; ++i) Next();
  }
  bool Done() {
    std::lock_guard lock(mu_);
    return answered_ == host_->info().count;
  }
  int programmed() {
    std::lock_guard lock(mu_);
    return programmed_;
  }
  double last_answer() {
    std::lock_guard lock(mu_);
    return last_answer_;
  }
  std::string first_failure() {
    std::lock_guard lock(mu_);
    return first_failure_;
  }

 private:
  struct Call {
    grpc::ClientContext context;
    v1::AttachVmRequest request;
    v1::AttachVmResponse response;
  };
  void Next() {
    int j = next_.fetch_add(1);
    if (j >= host_->info().count) return;
    auto* call = new Call;
    int g = host_->info().first + j;
    call->request.set_vm_id(VmId(g));
    call->request.set_interface(Interface(j));
    call->request.add_ip_addresses(Address(g));
    call->context.set_deadline(std::chrono::system_clock::now() +
                               std::chrono::seconds(120));
    host_->stub()->async()->AttachVm(&call->context, &call->request, &call->response,
                                     [this, call](grpc::Status status) {
                                       // The next call first: once the last answer is
                                       // recorded, Attach may destroy this run.
                                       Next();
                                       Record(*call, status);
                                       delete call;
                                     });
  }
  void Record(const Call& call, const grpc::Status& status) {
    std::lock_guard lock(mu_);
    ++answered_;
    last_answer_ = Now();
    if (status.ok() && call.response.vm().state() == v1::VM_STATE_PROGRAMMED) {
      ++programmed_;
    } else if (first_failure_.empty()) {
      first_failure_ =
          absl::StrCat(call.request.vm_id(), ": ",
                       status.ok() ? v1::VmState_Name(call.response.vm().state()) + " " +
                                         call.response.vm().message()
                                   : absl::StrCat("grpc code ", status.error_code(), " ",
                                                  status.error_message()));
    }
  }
  Host* host_;
  const int concurrency_;
  std::atomic<int> next_{0};
  std::mutex mu_;
  int answered_ = 0, programmed_ = 0;
  double last_answer_ = 0;
  std::string first_failure_;
};

class ControlPlane {
 public:
  ControlPlane(std::vector<AgentInfo> agents, std::string state_file, int progress_ms,
               int concurrency, int persist_ms)
      : state_file_(std::move(state_file)),
        concurrency_(concurrency),
        persist_ms_(persist_ms),
        worker_(4) {  // hosts_ is empty until the body
    int id = 0;
    for (auto& a : agents) {
      hosts_.push_back(std::make_unique<Host>(std::move(a), id++, progress_ms, &worker_));
    }
  }

  bool LoadState(std::string* error) {
    std::ifstream in(state_file_);
    if (!in) return true;  // a first start
    std::string line;
    if (!std::getline(in, line) || line != "vmnet-fleet-cp 1") {
      *error = "state file: not a vmnet-fleet-cp 1 file";
      return false;
    }
    std::map<std::string, Host*> by_name;
    for (auto& h : hosts_) by_name[h->info().name] = h.get();
    while (std::getline(in, line)) {
      std::vector<std::string> f = absl::StrSplit(line, ' ');
      uint64_t revision = 0;
      size_t n = 0;
      if (f.size() != 5 || f[0] != "host" || !absl::SimpleAtoi(f[2], &revision) ||
          !absl::SimpleAtoi(f[4], &n)) {
        *error = "state file: bad host line: " + line;
        return false;
      }
      absl::flat_hash_map<std::string, VmRecord> view;
      for (size_t i = 0; i < n; ++i) {
        std::string vm_line;
        std::vector<std::string> v;
        int state = 0;
        VmRecord r;
        if (std::getline(in, vm_line))
          v = std::vector<std::string>(absl::StrSplit(vm_line, ' '));
        if (v.size() != 4 || !absl::SimpleAtoi(v[1], &state) ||
            !absl::SimpleAtoi(v[2], &r.revision)) {
          *error = "state file: bad VM line: " + vm_line;
          return false;
        }
        r.state = static_cast<v1::VmState>(state);
        r.mac = v[3] == "-" ? "" : v[3];
        view[v[0]] = r;
      }
      auto it = by_name.find(f[1]);
      if (it != by_name.end()) {
        it->second->Restore(revision, f[3] == "-" ? "" : f[3], std::move(view));
      }
    }
    return true;
  }

  void Start() {
    persister_ = std::thread([this] { PersistLoop(); });
    for (auto& h : hosts_) h->Begin();
  }

  void Stop() {
    for (auto& h : hosts_) h->Stop();
    {
      std::lock_guard lock(persist_mu_);
      stop_ = true;
    }
    persist_cv_.notify_all();
    persister_.join();
  }

  std::string Command(const std::string& line) {
    std::vector<std::string> w = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (w.empty()) return Error("empty command");
    const std::string& c = w[0];
    auto number = [&](size_t i, double fallback) {
      double v = fallback;
      if (w.size() > i && !absl::SimpleAtod(w[i], &v)) v = fallback;
      return v;
    };
    if (c == "wait_live") return WaitLive(number(1, 60));
    if (c == "attach") return Attach();
    if (c == "expect" && w.size() >= 2) return Expect(w[1], number(2, 60));
    if (c == "relisted" && w.size() >= 3) {
      return Relisted(w[1], static_cast<int>(number(2, 1)), number(3, 60));
    }
    if (c == "quiet" && w.size() >= 2) {
      return Quiet(number(1, 10), w.size() >= 3 && w[2] == "nostreams");
    }
    if (c == "audit") return Audit();
    if (c == "persist") return Persist();
    if (c == "stats") return Stats();
    return Error("unknown command: " + line);
  }

 private:
  static std::string Error(const std::string& message) {
    JsonObject o;
    o.Add("ok", false).Add("error", message);
    return o.ToString();
  }

  std::string WaitLive(double timeout_s) {
    double deadline = Now() + timeout_s;
    int live = 0;
    double last = 0;
    while (Now() < deadline) {
      live = 0;
      last = 0;
      for (auto& h : hosts_) {
        double at = 0;
        if (h->Live(&at)) {
          ++live;
          last = std::max(last, at);
        }
      }
      if (live == static_cast<int>(hosts_.size())) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    int resumes = 0, relists = 0, initial = 0, out_of_range = 0;
    for (auto& h : hosts_) {
      auto c = h->counters();
      resumes += c.resumes;
      relists += c.relists;
      initial += c.initial_lists;
      out_of_range += c.out_of_range;
    }
    JsonObject o;
    o.Add("ok", live == static_cast<int>(hosts_.size()))
        .Add("hosts", static_cast<int>(hosts_.size()))
        .Add("live", live)
        .Add("live_s", last - started_at_)
        .Add("resumed", resumes)
        .Add("initial_lists", initial)
        .Add("relists", relists)
        .Add("out_of_range", out_of_range);
    return o.ToString();
  }

  // The agents' CPU in all (ns), and this process's own.
  int64_t AgentsCpuNs() {
    int64_t total = 0;
    for (auto& h : hosts_) total += std::max<int64_t>(0, AgentCpuNs(h->info().pid_file));
    return total;
  }
  static double OwnCpuSeconds() {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
  }

  std::string Attach() {
    int64_t agents_cpu = AgentsCpuNs();
    double own_cpu = OwnCpuSeconds();
    double start = Now();
    std::vector<std::unique_ptr<AttachRun>> runs;
    int vms = 0;
    for (auto& h : hosts_) {
      runs.push_back(std::make_unique<AttachRun>(h.get(), concurrency_));
      vms += h->info().count;
    }
    for (auto& r : runs) r->Start();
    double deadline = start + 300;
    bool answered = false, converged = false;
    double latest = 0;
    std::vector<bool> host_done(hosts_.size());
    while (Now() < deadline) {
      answered = std::all_of(runs.begin(), runs.end(), [](auto& r) { return r->Done(); });
      converged = true;
      for (size_t i = 0; i < hosts_.size(); ++i) {
        if (host_done[i]) continue;
        double at = 0;
        if (hosts_[i]->Converged(&at)) {
          host_done[i] = true;
          latest = std::max(latest, at);
        } else {
          converged = false;
        }
      }
      if (answered && converged) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    int programmed = 0;
    double last_answer = 0;
    std::string failure;
    for (auto& r : runs) {
      programmed += r->programmed();
      last_answer = std::max(last_answer, r->last_answer());
      if (failure.empty()) failure = r->first_failure();
    }
    agents_cpu = AgentsCpuNs() - agents_cpu;
    own_cpu = OwnCpuSeconds() - own_cpu;
    // Calls still in flight (a timeout) hold pointers to the runs.
    while (!std::all_of(runs.begin(), runs.end(), [](auto& r) { return r->Done(); })) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    JsonObject o;
    o.Add("ok", answered && converged && programmed == vms)
        .Add("vms", vms)
        .Add("programmed_answers", programmed)
        .Add("answers_s", last_answer - start)
        .Add("converge_s", std::max(last_answer, latest) - start)
        .Add("watch_converge_s", latest - start)
        .Add("converged", converged)
        .Add("agents_cpu_s", static_cast<double>(agents_cpu) / 1e9)
        .Add("control_plane_cpu_s", own_cpu)
        .Add("first_failure", failure);
    return o.ToString();
  }

  Host* FindHost(const std::string& name) {
    for (auto& h : hosts_) {
      if (h->info().name == name) return h.get();
    }
    return nullptr;
  }

  std::string Expect(const std::string& file, double timeout_s) {
    struct Change {
      Host* host;
      std::string vm_id, kind, mac;
    };
    std::vector<Change> changes;
    std::ifstream in(file);
    std::string line;
    while (std::getline(in, line)) {
      std::vector<std::string> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
      if (f.empty()) continue;
      Host* host = f.size() >= 3 ? FindHost(f[0]) : nullptr;
      if (host == nullptr || (f[2] != "removed" && f[2] != "changed") ||
          (f[2] == "changed" && f.size() != 4)) {
        return Error("expect: bad line: " + line);
      }
      changes.push_back({host, f[1], f[2], f[2] == "changed" ? f[3] : ""});
    }
    double deadline = Now() + timeout_s;
    int arrived = 0;
    double last = 0;
    for (;;) {
      arrived = 0;
      last = 0;
      for (const Change& c : changes) {
        v1::EventType type;
        std::string mac;
        double at;
        if (!c.host->LastEvent(c.vm_id, &type, &mac, &at)) continue;
        bool ok = c.kind == "removed" ? type == v1::EVENT_TYPE_VM_REMOVED
                                      : type != v1::EVENT_TYPE_VM_REMOVED && mac == c.mac;
        if (ok) {
          ++arrived;
          last = std::max(last, at);
        }
      }
      if (arrived == static_cast<int>(changes.size()) || Now() >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    JsonObject o;
    o.Add("ok", arrived == static_cast<int>(changes.size()))
        .Add("expected", static_cast<int>(changes.size()))
        .Add("arrived", arrived)
        .Add("missed", static_cast<int>(changes.size()) - arrived)
        .Add("arrived_s", last > 0 ? last - started_at_ : 0.0);
    return o.ToString();
  }

  std::string Relisted(const std::string& name, int count, double timeout_s) {
    Host* host = FindHost(name);
    if (host == nullptr) return Error("relisted: no host " + name);
    double deadline = Now() + timeout_s;
    while (host->counters().relists < count && Now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    auto c = host->counters();
    JsonObject o;
    o.Add("ok", c.relists >= count).Add("relists", c.relists);
    auto samples = host->relist_samples();
    if (!samples.empty()) {
      const Relist& r = samples.back();
      o.Add("cpu_ms", static_cast<double>(r.cpu_ns) / 1e6)
          .Add("vms", r.vms)
          .Add("list_s", r.list_s)
          .Add("reason", r.reason)
          .Add("started_at", r.started_at);
    }
    return o.ToString();
  }

  // With `nostreams`, every stream is cancelled for the window and resumed
  // after it: the agents' CPU without any watcher, to compare.
  std::string Quiet(double seconds, bool nostreams) {
    if (nostreams) {
      for (auto& h : hosts_) h->Pause();
    }
    std::vector<Host::Counters> before, after;
    std::vector<int64_t> cpu_before, cpu_after;
    for (auto& h : hosts_) {
      before.push_back(h->counters());
      cpu_before.push_back(AgentCpuNs(h->info().pid_file));
    }
    double start = Now();
    std::this_thread::sleep_for(
        std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)));
    double held = Now() - start;
    for (auto& h : hosts_) {
      after.push_back(h->counters());
      cpu_after.push_back(AgentCpuNs(h->info().pid_file));
    }
    int64_t progress = 0, min_progress = -1, events = 0, cpu_total = 0, cpu_max = 0;
    int ends = 0, unreadable = 0;
    for (size_t i = 0; i < hosts_.size(); ++i) {
      int64_t p = after[i].progress - before[i].progress;
      progress += p;
      if (min_progress < 0 || p < min_progress) min_progress = p;
      events += after[i].events - before[i].events;
      ends += after[i].stream_ends - before[i].stream_ends;
      if (cpu_before[i] < 0 || cpu_after[i] < cpu_before[i]) {
        ++unreadable;
        continue;
      }
      int64_t cpu = cpu_after[i] - cpu_before[i];
      cpu_total += cpu;
      cpu_max = std::max(cpu_max, cpu);
    }
    int n = static_cast<int>(hosts_.size());
    if (nostreams) {
      for (auto& h : hosts_) h->Unpause();
    }
    JsonObject o;
    o.Add("ok", ends == 0 && events == 0 && unreadable == 0 &&
                    (nostreams ? progress == 0 : min_progress >= 1))
        .Add("streams_open", !nostreams)
        .Add("held_s", held)
        .Add("streams", n)
        .Add("progress_messages", progress)
        .Add("min_progress_per_stream", min_progress)
        .Add("events", events)
        .Add("stream_ends", ends)
        .Add("agent_cpu_ms_total", static_cast<double>(cpu_total) / 1e6)
        .Add("agent_cpu_ms_mean", static_cast<double>(cpu_total) / 1e6 / std::max(n, 1))
        .Add("agent_cpu_ms_max", static_cast<double>(cpu_max) / 1e6)
        .Add("cpu_unreadable", unreadable);
    return o.ToString();
  }

  std::string Audit() {
    int mismatches = 0, failed = 0, vms = 0;
    std::string first;
    for (auto& h : hosts_) {
      std::vector<v1::Vm> list;
      grpc::Status s = h->ListAll(&list);
      if (!s.ok()) {
        ++failed;
        continue;
      }
      vms += static_cast<int>(list.size());
      int m = h->Compare(list);
      if (m > 0 && first.empty()) first = h->info().name;
      mismatches += m;
    }
    JsonObject o;
    o.Add("ok", mismatches == 0 && failed == 0)
        .Add("vms", vms)
        .Add("mismatches", mismatches)
        .Add("list_failures", failed)
        .Add("first_host_off", first);
    return o.ToString();
  }

  std::string Stats() {
    int relists = 0, initial = 0, resumes = 0, out_of_range = 0, ends = 0, epochs = 0;
    int64_t messages = 0, events = 0, progress = 0;
    std::string per_host = "{";
    for (auto& h : hosts_) {
      auto c = h->counters();
      relists += c.relists;
      initial += c.initial_lists;
      resumes += c.resumes;
      out_of_range += c.out_of_range;
      ends += c.stream_ends;
      epochs += c.epoch_changes;
      messages += c.messages;
      events += c.events;
      progress += c.progress;
      if (per_host.size() > 1) per_host += ", ";
      absl::StrAppend(&per_host, JsonObject::Quote(h->info().name), ": ", c.relists);
    }
    JsonObject o;
    o.Add("ok", true)
        .Add("relists", relists)
        .Add("initial_lists", initial)
        .Add("resumes", resumes)
        .Add("out_of_range", out_of_range)
        .Add("stream_ends", ends)
        .Add("epoch_changes", epochs)
        .Add("messages", messages)
        .Add("events", events)
        .Add("progress_messages", progress)
        .Raw("relists_per_host", per_host + "}");
    return o.ToString();
  }

  // Rewrites the state file (write, fsync, rename) when something changed,
  // at most every persist_ms_: the revisions and views are taken host by
  // host, each consistent with itself.
  void PersistLoop() {
    std::unique_lock lock(persist_mu_);
    while (!stop_) {
      persist_cv_.wait_for(lock, std::chrono::milliseconds(persist_ms_));
      WriteState();
    }
  }

  // Writes the state file if anything changed since the last write; true
  // when the file holds everything up to now.
  bool WriteState() {
    std::lock_guard lock(write_mu_);
    uint64_t v = Host::version.load();
    if (v == written_) return true;
    std::string body = "vmnet-fleet-cp 1\n";
    for (auto& h : hosts_) body += h->Serialize();
    std::string tmp = state_file_ + ".tmp";
    FILE* f = fopen(tmp.c_str(), "w");
    if (f == nullptr) return false;
    bool ok = fwrite(body.data(), 1, body.size(), f) == body.size();
    ok = fflush(f) == 0 && fsync(fileno(f)) == 0 && ok;
    fclose(f);
    if (!ok || rename(tmp.c_str(), state_file_.c_str()) != 0) return false;
    written_ = v;
    return true;
  }

  std::string Persist() {
    JsonObject o;
    o.Add("ok", WriteState());
    return o.ToString();
  }

  const std::string state_file_;
  const int concurrency_;
  const int persist_ms_;
  const double started_at_ = Now();
  std::vector<std::unique_ptr<Host>> hosts_;
  Worker worker_;  // after hosts_: stopped (its threads joined) before they go
  std::thread persister_;
  std::mutex persist_mu_;
  std::mutex write_mu_;
  uint64_t written_ = 0;  // the Host::version the state file holds; guarded by write_mu_
  std::condition_variable persist_cv_;
  bool stop_ = false;
};

int Main() {
  std::vector<AgentInfo> agents;
  std::ifstream in(absl::GetFlag(FLAGS_agents_file));
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (f.empty()) continue;
    AgentInfo a;
    if (f.size() != 5 || !absl::SimpleAtoi(f[3], &a.first) ||
        !absl::SimpleAtoi(f[4], &a.count) || a.first < 0 || a.count < 0 ||
        a.first + a.count > kMaxVms) {
      std::cerr << "fleet_control_plane: bad agents line: " << line << "\n";
      return 2;
    }
    a.name = f[0];
    a.socket = f[1];
    a.pid_file = f[2];
    agents.push_back(std::move(a));
  }
  if (agents.empty() || absl::GetFlag(FLAGS_state_file).empty() ||
      absl::GetFlag(FLAGS_progress_interval_ms) < 100) {
    std::cerr << "fleet_control_plane: give --agents_file (at least one agent), "
                 "--state_file and --progress_interval_ms >= 100\n";
    return 2;
  }
  ControlPlane cp(std::move(agents), absl::GetFlag(FLAGS_state_file),
                  absl::GetFlag(FLAGS_progress_interval_ms),
                  std::max(1, absl::GetFlag(FLAGS_concurrency)),
                  std::max(1, absl::GetFlag(FLAGS_persist_interval_ms)));
  std::string error;
  if (!cp.LoadState(&error)) {
    std::cerr << "fleet_control_plane: " << error << "\n";
    return 2;
  }
  cp.Start();
  while (std::getline(std::cin, line)) {
    if (line == "quit") break;
    std::cout << cp.Command(line) << std::endl;
  }
  cp.Stop();
  return 0;
}

}  // namespace
}  // namespace vmnet::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "plays a control plane following a fleet of vmnetd agents; driven by "
      "bench/fleet/run.py through commands on stdin (see the source's head comment)");
  absl::ParseCommandLine(argc, argv);
  return vmnet::bench::Main();
}
