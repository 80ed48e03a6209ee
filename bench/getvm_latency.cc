// vmnet_getvm_latency: calls GetVm on one VM (--vm_id, which must exist) in a
// closed loop on a connection of its own, one call in flight, --gap_us between
// an answer and the next call, until --duration_s passed or --stop_file
// exists. Records each call's latency.
//
// With --control=health the loop alternates GetVm with a control call that
// touches none of the reconciler's state, grpc.health.v1.Health/Check (service
// ""), on the same connection and with the same gap: GetVm, Check, GetVm,
// Check... The control shares the window, the machine and the gRPC path, so
// when GetVm's tail during a storm grows as much as the control's, what grows
// it is the machine (CPU scheduling), not the agent's locks.
//
// Prints one JSON object on stdout: the count of GetVm calls, the errors (any
// status but OK is one; for the control, any answer but SERVING too), and the
// latency's p50, p90, p99 (nearest rank), mean and max in milliseconds; with a
// control, the same statistics of the control calls under "control". With
// --samples=FILE also writes one line per call, "<start> <latency> <method>"
// (start and latency in seconds, start on CLOCK_MONOTONIC, the clock of
// Python's time.monotonic(); method "getvm" or "health"), so that
// bench/run.py can take the calls that overlapped a window of its own. With
// --ready_file=FILE creates FILE once the first call answered OK: the loop
// runs. Exit status 0 when at least one call of each method was made and every
// call answered OK, 1 otherwise.
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "bench_common.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "vmnet/v1/vmnet.grpc.pb.h"

ABSL_FLAG(std::string, target, "",
          "vmnetd's gRPC address, e.g. unix:///tmp/x/vmnetd.sock");
ABSL_FLAG(std::string, vm_id, "", "The VM to read; it must be attached.");
ABSL_FLAG(double, duration_s, 5, "Stop after this many seconds.");
ABSL_FLAG(std::string, stop_file, "", "Stop as soon as this file exists.");
ABSL_FLAG(std::string, ready_file, "", "Created once the first call answered OK.");
ABSL_FLAG(std::string, samples, "", "Write each call's start and latency here.");
ABSL_FLAG(int, gap_us, 1000, "Pause between an answer and the next call.");
ABSL_FLAG(double, call_timeout_s, 30, "Deadline of each call.");
ABSL_FLAG(std::string, control, "",
          "\"health\": alternate GetVm with grpc.health.v1.Health/Check, a call that "
          "touches none of the reconciler's state; \"\": GetVm only.");

namespace vmnet::bench {
namespace {

bool Exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

// Nearest rank: the smallest latency with at least p of the calls at or
// below it (bench/run.py computes the same).
double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return -1;
  size_t rank = static_cast<size_t>(std::ceil(p * static_cast<double>(sorted.size())));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

// One method's calls: their latencies (seconds) and errors.
struct Calls {
  std::vector<double> latencies;
  std::map<std::string, int64_t> errors;  // gRPC code or a wrong answer -> count
  std::string first_error;

  void Error(const std::string& code, const std::string& message) {
    ++errors[code];
    if (first_error.empty()) first_error = message;
  }
  int64_t ErrorCount() const {
    int64_t n = 0;
    for (const auto& [code, count] : errors) n += count;
    return n;
  }
  bool Ok() const { return !latencies.empty() && ErrorCount() == 0; }
  // count, errors, percentiles, mean, max into `out`.
  void AddTo(JsonObject& out) const {
    std::vector<double> sorted = latencies;
    std::sort(sorted.begin(), sorted.end());
    double sum = 0;
    for (double latency : sorted) sum += latency;
    out.Add("count", static_cast<int64_t>(sorted.size()))
        .Add("errors", ErrorCount())
        .Add("error_codes", errors)
        .Add("first_error", first_error)
        .Add("p50_ms", Percentile(sorted, 0.50) * 1e3)
        .Add("p90_ms", Percentile(sorted, 0.90) * 1e3)
        .Add("p99_ms", Percentile(sorted, 0.99) * 1e3)
        .Add("max_ms", sorted.empty() ? -1.0 : sorted.back() * 1e3)
        .Add("mean_ms",
             sorted.empty() ? -1.0 : sum / static_cast<double>(sorted.size()) * 1e3);
  }
};

int Main() {
  const std::string target = absl::GetFlag(FLAGS_target);
  const std::string vm_id = absl::GetFlag(FLAGS_vm_id);
  const std::string stop_file = absl::GetFlag(FLAGS_stop_file);
  const std::string ready_file = absl::GetFlag(FLAGS_ready_file);
  const std::string control = absl::GetFlag(FLAGS_control);
  if (target.empty() || vm_id.empty()) {
    std::cerr << "vmnet_getvm_latency: give --target and --vm_id\n";
    return 2;
  }
  if (!control.empty() && control != "health") {
    std::cerr << "vmnet_getvm_latency: --control is \"health\" or empty\n";
    return 2;
  }
  auto channel = Connect(target, 0);
  if (!WaitConnected(*channel, 10)) {
    std::cerr << "vmnet_getvm_latency: cannot connect to " << target << "\n";
    return 1;
  }
  auto stub = v1::VmNetwork::NewStub(channel);
  auto health = grpc::health::v1::Health::NewStub(channel);
  const auto gap = std::chrono::microseconds(std::max(0, absl::GetFlag(FLAGS_gap_us)));
  const auto call_timeout = std::chrono::milliseconds(
      static_cast<int64_t>(absl::GetFlag(FLAGS_call_timeout_s) * 1000));

  struct Sample {
    double start;    // seconds, CLOCK_MONOTONIC
    double latency;  // seconds
    bool control;
  };
  std::vector<Sample> samples;
  samples.reserve(1 << 16);
  Calls getvm_calls, control_calls;
  bool ready = false;
  bool next_is_control = false;
  const double started = Now();
  const double end = started + absl::GetFlag(FLAGS_duration_s);
  while (Now() < end && (stop_file.empty() || !Exists(stop_file))) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + call_timeout);
    const bool is_control = next_is_control;
    next_is_control = !control.empty() && !next_is_control;
    Calls& calls = is_control ? control_calls : getvm_calls;
    bool ok = false;
    double start = Now();
    if (is_control) {
      grpc::health::v1::HealthCheckResponse response;
      grpc::Status status =
          health->Check(&context, grpc::health::v1::HealthCheckRequest(), &response);
      const double latency = Now() - start;
      samples.push_back({start, latency, true});
      calls.latencies.push_back(latency);
      if (!status.ok()) {
        calls.Error(absl::StrCat("grpc_code_", status.error_code()),
                    status.error_message());
      } else if (response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
        calls.Error("not_serving", absl::StrCat("health status ", response.status()));
      } else {
        ok = true;
      }
    } else {
      v1::GetVmRequest request;
      request.set_vm_id(vm_id);
      v1::GetVmResponse response;
      grpc::Status status = stub->GetVm(&context, request, &response);
      const double latency = Now() - start;
      samples.push_back({start, latency, false});
      calls.latencies.push_back(latency);
      if (!status.ok()) {
        calls.Error(absl::StrCat("grpc_code_", status.error_code()),
                    status.error_message());
      } else if (response.vm().vm_id() != vm_id) {
        calls.Error("wrong_vm", "answered " + response.vm().vm_id());
      } else {
        ok = true;
      }
    }
    if (ok && !ready && !ready_file.empty()) {
      std::ofstream(ready_file) << "ready\n";
      ready = true;
    }
    if (gap.count() > 0) std::this_thread::sleep_for(gap);
  }
  const double ended = Now();

  if (const std::string path = absl::GetFlag(FLAGS_samples); !path.empty()) {
    std::ofstream out(path);
    for (const Sample& sample : samples) {
      out << absl::StrFormat("%.9f %.9f %s\n", sample.start, sample.latency,
                             sample.control ? control : "getvm");
    }
    if (!out) {
      std::cerr << "vmnet_getvm_latency: cannot write " << path << "\n";
      return 1;
    }
  }
  const bool ok = getvm_calls.Ok() && (control.empty() || control_calls.Ok());
  JsonObject result;
  result.Add("vm_id", vm_id);
  getvm_calls.AddTo(result);
  result.Add("started_at", started)
      .Add("ended_at", ended)
      .Add("gap_us", absl::GetFlag(FLAGS_gap_us));
  if (!control.empty()) {
    JsonObject control_result;
    control_result.Add("method", "grpc.health.v1.Health/Check");
    control_calls.AddTo(control_result);
    result.Raw("control", control_result.ToString());
  }
  result.Add("ok", ok);
  std::cout << result.ToString() << std::endl;
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace vmnet::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "calls GetVm on one VM in a closed loop and prints the latency's percentiles "
      "(JSON)");
  absl::ParseCommandLine(argc, argv);
  return vmnet::bench::Main();
}
