// vmnet_attach_storm: attaches VMs first..first+count-1 of the lab
// (bench_common.h; --first is 0 unless given) with --concurrency AttachVm
// calls in flight over --channels connections, and measures the wall time
// from the first call to the last answer (started_at: the first call's time
// on CLOCK_MONOTONIC). Every answer must be OK with state PROGRAMMED
// (AttachVm returns when the kernel holds the state, and only once the
// desired state is on disk).
//
// With --watchers=W, W Watch streams (each on its own connection) are opened
// and in place (response headers received) before the first attach; each
// must see a VM_ADDED event for every attached VM with strictly consecutive
// revisions. A watcher ended with RESOURCE_EXHAUSTED (it fell behind) resumes
// from the last revision it saw; resumes are counted and reported, and so are
// the Watch messages (each carries one or more events).
//
// With --ingress_bps / --egress_bps (and --burst_bytes), every request
// carries those bandwidth limits (AttachVmRequest.bandwidth). With --settle
// an answer that is not PROGRAMMED (PENDING) is not a failure, and the storm
// ends when every VM is PROGRAMMED as seen on one more Watch stream (opened before the
// first attach, on its own connection): wall_s is then from the first call to the later
// of the last answer and the event that made the last VM PROGRAMMED (answers_wall_s: to
// the last answer).
//
// With --detach the storm is one of DetachVm calls instead, for the same VMs
// (first..first+count-1) with the same --concurrency and --channels: every
// answer must be OK (the VM is gone from the host; allow_missing is not set,
// so a VM that was not attached fails). No watchers, limits or --settle then.
// bench/run.py detaches after each storm so that the next one starts from
// zero VMs on the same links.
//
// Prints one JSON object on stdout; exit status 0 when every attach was
// programmed (or every detach answered OK) and every watcher saw every event,
// 1 otherwise.
#include <sys/resource.h>

#include <atomic>
#include <condition_variable>
#include <iostream>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "bench_common.h"
#include "vmnet/base/lock_graph.h"
#include "vmnet/v1/vmnet.grpc.pb.h"

ABSL_FLAG(std::string, target, "",
          "vmnetd's gRPC address, e.g. unix:///tmp/x/vmnetd.sock");
ABSL_FLAG(int, count, 1000, "VMs to attach: lab VMs first..first+count-1.");
ABSL_FLAG(int, first, 0, "The lab index of the first VM to attach.");
ABSL_FLAG(int, concurrency, 256, "AttachVm calls in flight at once.");
ABSL_FLAG(int, channels, 4, "Connections the attach calls are spread over.");
ABSL_FLAG(int, watchers, 0, "Watch streams following the storm, one connection each.");
ABSL_FLAG(double, timeout_s, 300, "Give up on the storm after this many seconds.");
ABSL_FLAG(uint64_t, ingress_bps, 0,
          "bandwidth.ingress_bits_per_second of every request (0: no limit).");
ABSL_FLAG(uint64_t, egress_bps, 0,
          "bandwidth.egress_bits_per_second of every request (0: no limit).");
ABSL_FLAG(uint64_t, burst_bytes, 0,
          "bandwidth.burst_bytes of every request (0: default).");
ABSL_FLAG(bool, settle, false,
          "PENDING answers are not failures: the storm ends when a Watch stream has seen "
          "every VM PROGRAMMED (needed with --egress_bps).");
ABSL_FLAG(bool, detach, false,
          "DetachVm the VMs instead of attaching them; every answer must be OK. Not with "
          "--watchers, --settle or limits.");
ABSL_FLAG(
    double, watch_timeout_s, 60,
    "After the last attach answered, how long the watchers may take to see every event.");

namespace vmnet::bench {
namespace {

using v1::AttachVmRequest;
using v1::AttachVmResponse;
using v1::DetachVmRequest;
using v1::DetachVmResponse;
using v1::VmNetwork;
using v1::WatchEvent;
using v1::WatchResponse;

// Counts, guarded by one mutex; the calls are few enough (one lock per
// answer) that this costs nothing next to the RPC.
struct Outcome {
  std::mutex mu;
  std::condition_variable done_cv;
  int answered = 0;
  int programmed = 0;                       // attached PROGRAMMED, or detached OK
  int pending = 0;                          // answered PENDING, with --settle
  std::map<std::string, int64_t> failures;  // gRPC code or VM state -> count
  std::string first_failure;
  double last_answer = 0;
};

// Keeps `concurrency` AttachVm (or, with `detach`, DetachVm) calls in
// flight; each answer starts the next.
class Storm {
 public:
  Storm(std::vector<std::unique_ptr<VmNetwork::Stub>>* stubs, int first, int count,
        double timeout_s, const v1::Bandwidth& bandwidth, bool settle, bool detach)
      : stubs_(stubs),
        first_(first),
        count_(count),
        timeout_s_(timeout_s),
        bandwidth_(bandwidth),
        settle_(settle),
        detach_(detach) {}

  void Start(int concurrency) {
    for (int i = 0; i < concurrency; ++i) StartNext();
  }

  // Waits until every call answered or `deadline` passed; true when all did.
  bool Wait(double deadline) {
    std::unique_lock lock(outcome_.mu);
    while (outcome_.answered < count_) {
      if (Now() >= deadline) return false;
      outcome_.done_cv.wait_for(lock, std::chrono::milliseconds(50));
    }
    return true;
  }

  Outcome& outcome() { return outcome_; }

 private:
  struct Call {
    grpc::ClientContext context;
    AttachVmRequest request;
    AttachVmResponse response;
  };
  struct DetachCall {
    grpc::ClientContext context;
    DetachVmRequest request;
    DetachVmResponse response;
  };

  void StartNext() {
    int i = next_.fetch_add(1);
    if (i >= count_) return;
    auto deadline = std::chrono::system_clock::now() +
                    std::chrono::milliseconds(static_cast<int64_t>(timeout_s_ * 1000));
    auto& stub = (*stubs_)[static_cast<size_t>(i) % stubs_->size()];
    if (detach_) {
      auto* call = new DetachCall;
      call->request.set_vm_id(VmId(first_ + i));
      call->context.set_deadline(deadline);
      stub->async()->DetachVm(&call->context, &call->request, &call->response,
                              [this, call](grpc::Status status) {
                                RecordDetach(call->request.vm_id(), status);
                                delete call;
                                StartNext();
                              });
      return;
    }
    auto* call = new Call;
    call->request.set_vm_id(VmId(first_ + i));
    call->request.set_interface(Interface(first_ + i));
    call->request.add_ip_addresses(Address(first_ + i));
    if (bandwidth_.ByteSizeLong() != 0) *call->request.mutable_bandwidth() = bandwidth_;
    call->context.set_deadline(deadline);
    stub->async()->AttachVm(&call->context, &call->request, &call->response,
                            [this, call](grpc::Status status) {
                              Record(*call, status);
                              delete call;
                              StartNext();
                            });
  }

  void RecordDetach(const std::string& vm_id, const grpc::Status& status) {
    std::lock_guard lock(outcome_.mu);
    if (status.ok()) {
      ++outcome_.programmed;
    } else {
      ++outcome_.failures[absl::StrCat("grpc_code_", status.error_code())];
      if (outcome_.first_failure.empty()) {
        outcome_.first_failure = absl::StrCat(vm_id, ": ", status.error_message());
      }
    }
    ++outcome_.answered;
    outcome_.last_answer = Now();
    if (outcome_.answered == count_) outcome_.done_cv.notify_all();
  }

  void Record(const Call& call, const grpc::Status& status) {
    std::lock_guard lock(outcome_.mu);
    std::string failure;
    const v1::VmState state = call.response.vm().state();
    if (!status.ok()) {
      failure = absl::StrCat("grpc_code_", status.error_code());
      if (outcome_.first_failure.empty()) {
        outcome_.first_failure =
            absl::StrCat(call.request.vm_id(), ": ", status.error_message());
      }
    } else if (state == v1::VM_STATE_PENDING && settle_) {
      ++outcome_.pending;  // the settle watcher must see it PROGRAMMED
    } else if (state != v1::VM_STATE_PROGRAMMED) {
      failure = v1::VmState_Name(state);
      if (outcome_.first_failure.empty()) {
        outcome_.first_failure =
            absl::StrCat(call.request.vm_id(), ": ", call.response.vm().message());
      }
    } else {
      ++outcome_.programmed;
    }
    if (!failure.empty()) ++outcome_.failures[failure];
    ++outcome_.answered;
    outcome_.last_answer = Now();
    if (outcome_.answered == count_) outcome_.done_cv.notify_all();
  }

  std::vector<std::unique_ptr<VmNetwork::Stub>>* stubs_;
  const int first_;
  const int count_;
  const double timeout_s_;
  const v1::Bandwidth bandwidth_;
  const bool settle_;
  const bool detach_;
  std::atomic<int> next_{0};
  Outcome outcome_;
};

// One watcher: a Watch stream (resumed after RESOURCE_EXHAUSTED) and what
// it has seen of the storm.
class Watcher {
 public:
  Watcher(std::shared_ptr<grpc::Channel> channel, int first, int count)
      : stub_(VmNetwork::NewStub(channel)),
        first_(first),
        count_(count),
        seen_(static_cast<size_t>(count)),
        state_(static_cast<size_t>(count), v1::VM_STATE_UNSPECIFIED) {}

  void Start() { Open(0); }

  // True once the first stream's response headers arrived: the watch is in
  // place and misses no later change.
  bool WaitInPlace(double deadline) {
    std::unique_lock lock(mu_);
    while (!in_place_ && !ended_) {
      if (Now() >= deadline) return false;
      cv_.wait_for(lock, std::chrono::milliseconds(20));
    }
    return in_place_;
  }

  bool WaitComplete(double deadline) {
    std::unique_lock lock(mu_);
    while (added_ < count_ && !ended_) {
      if (Now() >= deadline) return false;
      cv_.wait_for(lock, std::chrono::milliseconds(20));
    }
    return added_ >= count_;
  }

  // Cancels the stream and waits for it to end.
  void Stop() {
    Stream* current;
    {
      std::lock_guard lock(mu_);
      stopping_ = true;
      current = live_;
    }
    // Outside the lock: cancelling may run OnDone on this thread. Streams
    // are owned by the watcher, so `current` outlives its OnDone.
    if (current != nullptr) current->Cancel();
    std::unique_lock lock(mu_);
    cv_.wait_for(lock, std::chrono::seconds(10), [&] { return live_ == nullptr; });
  }

  // Until every VM has been PROGRAMMED at once (the time is settled_at()).
  bool WaitSettled(double deadline) {
    std::unique_lock lock(mu_);
    while (settled_at_ == 0 && !ended_) {
      if (Now() >= deadline) return false;
      cv_.wait_for(lock, std::chrono::milliseconds(5));
    }
    return settled_at_ != 0;
  }
  double settled_at() {
    std::lock_guard lock(mu_);
    return settled_at_;
  }
  int programmed_now() {
    std::lock_guard lock(mu_);
    return programmed_now_;
  }
  std::string first_failed() {
    std::lock_guard lock(mu_);
    return first_failed_;
  }

  int added() const { return added_; }
  int duplicates() const { return duplicates_; }
  int gaps() const { return gaps_; }
  int resumes() const { return resumes_; }
  int64_t messages() const { return messages_; }
  int64_t other_events() const { return other_events_; }
  double complete_at() const { return complete_at_; }
  std::string end_status() const { return end_status_; }

 private:
  class Stream : public grpc::ClientReadReactor<WatchResponse> {
   public:
    Stream(Watcher* owner, uint64_t from_revision) : owner_(owner) {
      request_.set_from_revision(from_revision);
    }
    void Begin(VmNetwork::Stub* stub) {
      // 100 channels connect at once: one whose first attempt is slow (an
      // agent under a sanitizer) waits for the connection instead of failing
      // the stream at once; WaitInPlace bounds the wait.
      context_.set_wait_for_ready(true);
      stub->async()->Watch(&context_, &request_, this);
      StartRead(NextResponse());
      StartCall();
    }
    void Cancel() { context_.TryCancel(); }
    void OnReadInitialMetadataDone(bool ok) override { owner_->OnInPlace(ok); }
    void OnReadDone(bool ok) override {
      if (!ok) return;  // OnDone follows
      owner_->OnMessage(*response_);
      StartRead(NextResponse());
    }
    void OnDone(const grpc::Status& status) override { owner_->OnStreamDone(status); }

   private:
    // Each message is parsed into an arena emptied before the next, as a
    // control plane that follows many hosts would: a message's events and
    // their VMs are allocated and freed in a few blocks, not one by one.
    WatchResponse* NextResponse() {
      arena_.Reset();
      response_ = google::protobuf::Arena::CreateMessage<WatchResponse>(&arena_);
      return response_;
    }

    static google::protobuf::ArenaOptions ArenaSizes() {
      google::protobuf::ArenaOptions options;
      options.start_block_size = 64 << 10;
      options.max_block_size = 1 << 20;
      return options;
    }

    Watcher* owner_;
    grpc::ClientContext context_;
    v1::WatchRequest request_;
    google::protobuf::Arena arena_{ArenaSizes()};
    WatchResponse* response_ = nullptr;
  };

  // Called without mu_ held: starting a call may run its callbacks inline.
  void Open(uint64_t from_revision) {
    Stream* stream;
    {
      std::lock_guard lock(mu_);
      streams_.push_back(std::make_unique<Stream>(this, from_revision));
      stream = live_ = streams_.back().get();
    }
    stream->Begin(stub_.get());
  }

  void OnInPlace(bool ok) {
    std::lock_guard lock(mu_);
    if (ok) in_place_ = true;
    cv_.notify_all();
  }

  void OnMessage(const WatchResponse& message) {
    std::lock_guard lock(mu_);
    ++messages_;
    for (const WatchEvent& e : message.events()) OnEventLocked(e);
  }

  void OnEventLocked(const WatchEvent& e) {
    if (last_revision_ != 0 && e.revision() != last_revision_ + 1) ++gaps_;
    if (e.revision() > last_revision_) last_revision_ = e.revision();
    int index = -1;
    const std::string& id = e.vm().vm_id();
    if (id.rfind("bench-", 0) == 0) index = std::atoi(id.c_str() + 6) - first_;
    if (index >= 0 && index < count_ && e.type() != v1::EVENT_TYPE_VM_REMOVED) {
      TrackStateLocked(static_cast<size_t>(index), e.vm());
    }
    if (e.type() != v1::EVENT_TYPE_VM_ADDED) {
      ++other_events_;
      return;
    }
    if (index < 0 || index >= count_) {
      ++other_events_;
      return;
    }
    if (seen_[static_cast<size_t>(index)]) {
      ++duplicates_;
      return;
    }
    seen_[static_cast<size_t>(index)] = true;
    if (++added_ == count_) {
      complete_at_ = Now();
      cv_.notify_all();
    }
  }

  // The VM's latest state; the time every VM was first PROGRAMMED at once.
  void TrackStateLocked(size_t index, const v1::Vm& vm) {
    bool was = state_[index] == v1::VM_STATE_PROGRAMMED;
    state_[index] = vm.state();
    bool is = vm.state() == v1::VM_STATE_PROGRAMMED;
    if (vm.state() == v1::VM_STATE_FAILED && first_failed_.empty()) {
      first_failed_ = absl::StrCat(vm.vm_id(), ": ", vm.message());
    }
    if (was == is) return;
    programmed_now_ += is ? 1 : -1;
    if (programmed_now_ == count_ && settled_at_ == 0) {
      settled_at_ = Now();
      cv_.notify_all();
    }
  }

  void OnStreamDone(const grpc::Status& status) {
    uint64_t resume_from;
    {
      std::lock_guard lock(mu_);
      live_ = nullptr;
      bool fell_behind = status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED;
      if (stopping_ || !fell_behind || resumes_ >= 100) {
        end_status_ = absl::StrCat(status.error_code(), " ", status.error_message());
        ended_ = true;
        cv_.notify_all();
        return;
      }
      ++resumes_;
      resume_from = last_revision_;
    }
    Open(resume_from);  // fell behind: resume after the last event seen
  }

  std::unique_ptr<VmNetwork::Stub> stub_;
  const int first_;
  const int count_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Stream>> streams_;  // every stream opened, ended or not
  Stream* live_ = nullptr;                        // the one not ended yet
  bool in_place_ = false;
  bool ended_ = false;
  bool stopping_ = false;
  uint64_t last_revision_ = 0;
  std::vector<bool> seen_;
  std::vector<v1::VmState> state_;  // each VM's latest state seen
  int programmed_now_ = 0;          // VMs whose latest state is PROGRAMMED
  double settled_at_ = 0;           // when programmed_now_ first reached count_
  std::string first_failed_;
  int added_ = 0;
  int duplicates_ = 0;
  int gaps_ = 0;
  int resumes_ = 0;
  int64_t messages_ = 0;
  int64_t other_events_ = 0;
  double complete_at_ = 0;
  std::string end_status_;
};

double CpuSeconds() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

// --detach: DetachVm for every VM, `concurrency` calls in flight; every
// answer must be OK.
int DetachStorm(std::vector<std::unique_ptr<VmNetwork::Stub>>* stubs, int first,
                int count, JsonObject* result) {
  const double timeout_s = absl::GetFlag(FLAGS_timeout_s);
  double cpu_before = CpuSeconds();
  double start = Now();
  Storm storm(stubs, first, count, timeout_s, v1::Bandwidth(), /*settle=*/false,
              /*detach=*/true);
  storm.Start(std::max(1, absl::GetFlag(FLAGS_concurrency)));
  bool finished = storm.Wait(start + timeout_s + 5);
  Outcome& o = storm.outcome();
  bool ok;
  {
    std::lock_guard lock(o.mu);
    double wall = (finished ? o.last_answer : Now()) - start;
    ok = finished && o.programmed == count;
    result->Add("mode", "detach")
        .Add("finished", finished)
        .Add("answered", o.answered)
        .Add("detached", o.programmed)
        .Add("failures", o.failures)
        .Add("first_failure", o.first_failure)
        .Add("started_at", start)
        .Add("wall_s", wall)
        .Add("detaches_per_s", count / std::max(wall, 1e-9));
  }
  result->Add("client_cpu_s", CpuSeconds() - cpu_before).Add("ok", ok);
  std::cout << result->ToString() << std::endl;
  return ok ? 0 : 1;
}

int Main() {
  const std::string target = absl::GetFlag(FLAGS_target);
  const int first = absl::GetFlag(FLAGS_first);
  const int count = absl::GetFlag(FLAGS_count);
  const int watcher_count = absl::GetFlag(FLAGS_watchers);
  if (target.empty() || count <= 0 || first < 0 || first + count > kMaxVms) {
    std::cerr << "vmnet_attach_storm: give --target, --count and --first (first + count "
              << "at most " << kMaxVms << ")\n";
    return 2;
  }
  const bool detach = absl::GetFlag(FLAGS_detach);
  if (detach &&
      (watcher_count != 0 || absl::GetFlag(FLAGS_settle) ||
       absl::GetFlag(FLAGS_ingress_bps) != 0 || absl::GetFlag(FLAGS_egress_bps) != 0 ||
       absl::GetFlag(FLAGS_burst_bytes) != 0)) {
    std::cerr << "vmnet_attach_storm: --detach takes no --watchers, --settle, "
              << "--ingress_bps, --egress_bps or --burst_bytes\n";
    return 2;
  }
  JsonObject result;
  result.Add("first", first)
      .Add("count", count)
      .Add("concurrency", absl::GetFlag(FLAGS_concurrency))
      .Add("channels", absl::GetFlag(FLAGS_channels))
      .Add("watchers", watcher_count);

  std::vector<std::unique_ptr<VmNetwork::Stub>> stubs;
  for (int i = 0; i < std::max(1, absl::GetFlag(FLAGS_channels)); ++i) {
    auto channel = Connect(target, i);
    if (!WaitConnected(*channel, 10)) {
      std::cerr << "vmnet_attach_storm: cannot connect to " << target << "\n";
      return 1;
    }
    stubs.push_back(VmNetwork::NewStub(channel));
  }
  if (detach) return DetachStorm(&stubs, first, count, &result);

  std::vector<std::unique_ptr<Watcher>> watchers;
  for (int i = 0; i < watcher_count; ++i) {
    watchers.push_back(
        std::make_unique<Watcher>(Connect(target, 1000 + i), first, count));
    watchers.back()->Start();
  }
  for (auto& w : watchers) {
    if (!w->WaitInPlace(Now() + 30)) {
      std::cerr << "vmnet_attach_storm: a Watch stream did not start: " << w->end_status()
                << "\n";
      for (auto& x : watchers) x->Stop();
      return 1;
    }
  }

  v1::Bandwidth bandwidth;
  bandwidth.set_ingress_bits_per_second(absl::GetFlag(FLAGS_ingress_bps));
  bandwidth.set_egress_bits_per_second(absl::GetFlag(FLAGS_egress_bps));
  bandwidth.set_burst_bytes(absl::GetFlag(FLAGS_burst_bytes));
  const bool settle = absl::GetFlag(FLAGS_settle);
  result.Add("ingress_bps", bandwidth.ingress_bits_per_second())
      .Add("egress_bps", bandwidth.egress_bits_per_second())
      .Add("burst_bytes", bandwidth.burst_bytes())
      .Add("settle", settle);
  // With --settle: one more Watch stream, in place before the first attach,
  // that tells when every VM is PROGRAMMED.
  std::unique_ptr<Watcher> settler;
  if (settle) {
    settler = std::make_unique<Watcher>(Connect(target, 999), first, count);
    settler->Start();
    if (!settler->WaitInPlace(Now() + 30)) {
      std::cerr << "vmnet_attach_storm: the settle Watch stream did not start: "
                << settler->end_status() << "\n";
      settler->Stop();
      for (auto& x : watchers) x->Stop();
      return 1;
    }
  }

  double cpu_before = CpuSeconds();
  double start = Now();
  Storm storm(&stubs, first, count, absl::GetFlag(FLAGS_timeout_s), bandwidth, settle,
              /*detach=*/false);
  storm.Start(std::max(1, absl::GetFlag(FLAGS_concurrency)));
  bool finished = storm.Wait(start + absl::GetFlag(FLAGS_timeout_s) + 5);
  Outcome& o = storm.outcome();
  double wall, answers_wall;
  int answered_programmed, answered_pending;
  {
    std::lock_guard lock(o.mu);
    answers_wall = (finished ? o.last_answer : Now()) - start;
    answered_programmed = o.programmed;
    answered_pending = o.pending;
    result.Add("finished", finished)
        .Add("answered", o.answered)
        .Add("answered_programmed", o.programmed)
        .Add("answered_pending", o.pending)
        .Add("failures", o.failures)
        .Add("first_failure", o.first_failure)
        .Add("started_at", start)
        .Add("answers_wall_s", answers_wall);
  }
  wall = answers_wall;
  int programmed = answered_programmed;
  bool ok = finished && answered_programmed + answered_pending == count;
  if (settler) {
    bool settled =
        finished && settler->WaitSettled(Now() + absl::GetFlag(FLAGS_timeout_s));
    if (settled) wall = std::max(answers_wall, settler->settled_at() - start);
    programmed = settler->programmed_now();
    result.Add("settled", settled).Add("first_failed_state", settler->first_failed());
    settler->Stop();
    ok = ok && settled;
  } else {
    ok = ok && answered_programmed == count;
  }
  result.Add("programmed", programmed)
      .Add("wall_s", wall)
      .Add("attaches_per_s", count / std::max(wall, 1e-9));

  if (!watchers.empty()) {
    double deadline = Now() + absl::GetFlag(FLAGS_watch_timeout_s);
    int complete = 0, gaps = 0, duplicates = 0, resumes = 0;
    int64_t other = 0, messages = 0;
    double last_complete = 0;
    int min_added = count;
    std::string failed_status;
    for (auto& w : watchers) {
      if (w->WaitComplete(deadline)) {
        ++complete;
        last_complete = std::max(last_complete, w->complete_at());
      } else if (failed_status.empty()) {
        failed_status = w->end_status();
      }
    }
    for (auto& w : watchers) w->Stop();
    for (auto& w : watchers) {
      gaps += w->gaps();
      duplicates += w->duplicates();
      resumes += w->resumes();
      other += w->other_events();
      messages += w->messages();
      min_added = std::min(min_added, w->added());
    }
    result.Add("watchers_complete", complete)
        .Add("watcher_min_events", min_added)
        .Add("watch_revision_gaps", gaps)
        .Add("watch_duplicates", duplicates)
        .Add("watch_resumes", resumes)
        .Add("watch_other_events", other)
        .Add("watch_messages", messages)
        .Add("watch_first_failure", failed_status)
        .Add("watch_all_seen_s",
             complete == watcher_count ? last_complete - start : -1.0);
    ok = ok && complete == watcher_count && gaps == 0 && duplicates == 0;
  }
  result.Add("client_cpu_s", CpuSeconds() - cpu_before).Add("ok", ok);
  std::cout << result.ToString() << std::endl;
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace vmnet::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "attaches (or, with --detach, detaches) lab VMs over gRPC with many calls in "
      "flight and prints the wall time (JSON)");
  absl::ParseCommandLine(argc, argv);
  // As vmnetd does: the watchers' gRPC threads share no process-wide lock.
  vmnet::SkipAbslLockGraph();
  return vmnet::bench::Main();
}
