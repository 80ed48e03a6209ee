// vmnet_wait_serving: polls grpc.health.v1.Health/Check on a unix socket
// every --interval_ms until it answers SERVING, and prints (JSON) the
// CLOCK_MONOTONIC time at which it first did, so that bench/run.py can
// subtract the time it started vmnetd. Started before vmnetd: while the
// socket does not exist or refuses connections, it retries with a fresh
// channel each time (a channel's reconnect backoff would blur the result).
#include <unistd.h>

#include <iostream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "bench_common.h"
#include "grpc/health/v1/health.grpc.pb.h"

ABSL_FLAG(std::string, socket, "", "Path of vmnetd's unix socket.");
ABSL_FLAG(double, timeout_s, 120, "Give up after this many seconds.");
ABSL_FLAG(int, interval_ms, 5, "Pause between checks.");

namespace vmnet::bench {
namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

int Main() {
  const std::string path = absl::GetFlag(FLAGS_socket);
  if (path.empty()) {
    std::cerr << "vmnet_wait_serving: give --socket\n";
    return 2;
  }
  const double start = Now();
  const double deadline = start + absl::GetFlag(FLAGS_timeout_s);
  const auto pause = std::chrono::milliseconds(absl::GetFlag(FLAGS_interval_ms));
  int checks = 0, connects = 0;
  double first_answer = 0;  // the first NOT_SERVING or SERVING: the server listens
  std::unique_ptr<Health::Stub> stub;
  while (Now() < deadline) {
    if (stub == nullptr) {
      if (access(path.c_str(), F_OK) != 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      stub = Health::NewStub(Connect("unix://" + path, connects++));
    }
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(500));
    HealthCheckResponse response;
    grpc::Status status = stub->Check(&context, HealthCheckRequest(), &response);
    ++checks;
    if (status.ok()) {
      if (first_answer == 0) first_answer = Now();
      if (response.status() == HealthCheckResponse::SERVING) {
        JsonObject result;
        result.Add("serving_at", Now())
            .Add("first_answer_at", first_answer)
            .Add("checks", checks)
            .Add("connects", connects);
        std::cout << result.ToString() << std::endl;
        return 0;
      }
    } else {
      stub.reset();  // not listening yet (or a stale socket): a fresh channel next time
    }
    std::this_thread::sleep_for(pause);
  }
  std::cerr << "vmnet_wait_serving: not SERVING within " << absl::GetFlag(FLAGS_timeout_s)
            << " s\n";
  return 1;
}

}  // namespace
}  // namespace vmnet::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("waits for vmnetd's health to say SERVING (JSON)");
  absl::ParseCommandLine(argc, argv);
  return vmnet::bench::Main();
}
