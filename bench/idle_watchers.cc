// vmnet_idle_watchers: opens --watchers Watch streams (each on its own
// connection) with --progress_interval_ms, waits until every one is in place
// (response headers), touches --ready_file, and holds them until
// --stop_file exists (or --duration_s passed). Each stream must receive only
// progress messages, each with a revision no lower than the one before.
//
// The harness reads vmnetd's CPU and RSS between the ready file and the stop
// file: what idle watchers cost the agent.
//
// Prints one JSON object on stdout; exit status 0 when every stream stayed
// open and received at least one progress message, 1 otherwise.
#include <sys/stat.h>

#include <atomic>
#include <condition_variable>
#include <fstream>
#include <iostream>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "bench_common.h"
#include "vmnet/v1/vmnet.grpc.pb.h"

ABSL_FLAG(std::string, target, "",
          "vmnetd's gRPC address, e.g. unix:///tmp/x/vmnetd.sock");
ABSL_FLAG(int, watchers, 100, "Watch streams, one connection each.");
ABSL_FLAG(int, progress_interval_ms, 1000, "The streams' progress_interval.");
ABSL_FLAG(double, duration_s, 600, "Give up after this many seconds.");
ABSL_FLAG(std::string, ready_file, "", "Created once every stream is in place.");
ABSL_FLAG(std::string, stop_file, "", "The streams end once this file exists.");

namespace vmnet::bench {
namespace {

using v1::VmNetwork;
using v1::WatchResponse;

class IdleStream : public grpc::ClientReadReactor<WatchResponse> {
 public:
  IdleStream(std::shared_ptr<grpc::Channel> channel, int interval_ms)
      : stub_(VmNetwork::NewStub(channel)) {
    request_.mutable_progress_interval()->set_seconds(interval_ms / 1000);
    request_.mutable_progress_interval()->set_nanos((interval_ms % 1000) * 1'000'000);
  }

  void Start() {
    context_.set_wait_for_ready(true);
    stub_->async()->Watch(&context_, &request_, this);
    StartRead(&response_);
    StartCall();
  }
  void Cancel() { context_.TryCancel(); }

  void OnReadInitialMetadataDone(bool ok) override {
    std::lock_guard lock(mu_);
    in_place_ = ok;
    cv_.notify_all();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    {
      std::lock_guard lock(mu_);
      if (response_.events_size() > 0 || !response_.has_progress()) {
        ++other_;
      } else {
        if (response_.progress().revision() < last_revision_) ++backwards_;
        last_revision_ = response_.progress().revision();
        ++progress_;
      }
    }
    StartRead(&response_);
  }
  void OnDone(const grpc::Status& status) override {
    std::lock_guard lock(mu_);
    done_ = true;
    status_ = status;
    cv_.notify_all();
  }

  bool WaitInPlace(double deadline) {
    std::unique_lock lock(mu_);
    while (!in_place_ && !done_) {
      if (Now() >= deadline) return false;
      cv_.wait_for(lock, std::chrono::milliseconds(20));
    }
    return in_place_ && !done_;
  }
  bool WaitDone(double deadline) {
    std::unique_lock lock(mu_);
    while (!done_) {
      if (Now() >= deadline) return false;
      cv_.wait_for(lock, std::chrono::milliseconds(20));
    }
    return true;
  }

  std::mutex mu_;
  std::condition_variable cv_;
  bool in_place_ = false, done_ = false;
  int64_t progress_ = 0, other_ = 0, backwards_ = 0;
  uint64_t last_revision_ = 0;
  grpc::Status status_;

 private:
  std::unique_ptr<VmNetwork::Stub> stub_;
  grpc::ClientContext context_;
  v1::WatchRequest request_;
  WatchResponse response_;
};

bool Exists(const std::string& path) {
  struct stat st;
  return !path.empty() && stat(path.c_str(), &st) == 0;
}

int Main() {
  const std::string target = absl::GetFlag(FLAGS_target);
  const int count = absl::GetFlag(FLAGS_watchers);
  const int interval_ms = absl::GetFlag(FLAGS_progress_interval_ms);
  if (target.empty() || count <= 0 || interval_ms < 100) {
    std::cerr << "vmnet_idle_watchers: give --target, --watchers > 0 and "
                 "--progress_interval_ms >= 100\n";
    return 2;
  }
  const double give_up = Now() + absl::GetFlag(FLAGS_duration_s);
  std::vector<std::unique_ptr<IdleStream>> streams;
  for (int i = 0; i < count; ++i) {
    streams.push_back(
        std::make_unique<IdleStream>(Connect(target, 2000 + i), interval_ms));
    streams.back()->Start();
  }
  int in_place = 0;
  for (auto& s : streams) in_place += s->WaitInPlace(Now() + 30) ? 1 : 0;
  double ready_at = Now();
  if (!absl::GetFlag(FLAGS_ready_file).empty()) {
    std::ofstream(absl::GetFlag(FLAGS_ready_file)) << "ready\n";
  }
  while (!Exists(absl::GetFlag(FLAGS_stop_file)) && Now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  double held_s = Now() - ready_at;
  int64_t progress = 0, other = 0, backwards = 0, min_progress = -1;
  int ended_early = 0;
  for (auto& s : streams) {
    std::lock_guard lock(s->mu_);
    progress += s->progress_;
    other += s->other_;
    backwards += s->backwards_;
    if (min_progress < 0 || s->progress_ < min_progress) min_progress = s->progress_;
    if (s->done_) ++ended_early;
  }
  for (auto& s : streams) s->Cancel();
  for (auto& s : streams) s->WaitDone(Now() + 10);
  bool ok = in_place == count && ended_early == 0 && min_progress >= 1 && backwards == 0;
  JsonObject result;
  result.Add("watchers", count)
      .Add("in_place", in_place)
      .Add("progress_interval_ms", interval_ms)
      .Add("held_s", held_s)
      .Add("progress_messages", progress)
      .Add("min_progress_per_watcher", min_progress)
      .Add("other_messages", other)
      .Add("revisions_backwards", backwards)
      .Add("ended_early", ended_early)
      .Add("ok", ok);
  std::cout << result.ToString() << std::endl;
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace vmnet::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "holds idle Watch streams with progress messages until a stop file exists (JSON)");
  absl::ParseCommandLine(argc, argv);
  return vmnet::bench::Main();
}
