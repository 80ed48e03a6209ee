// vmnet_list_pages: reads the whole of ListRoutes or ListArp page by page
// (--page_size, default the maximum of 1000), --repeat times, over one
// connection that is set up before the clock starts. Prints one JSON object
// with the wall time of each complete read and the entries and pages seen.
#include <algorithm>
#include <iostream>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_join.h"
#include "bench_common.h"
#include "vmnet/v1/vmnet.grpc.pb.h"

ABSL_FLAG(std::string, target, "",
          "vmnetd's gRPC address, e.g. unix:///tmp/x/vmnetd.sock");
ABSL_FLAG(std::string, what, "routes", "routes (ListRoutes) or arp (ListArp).");
ABSL_FLAG(int, page_size, 1000, "Entries per page.");
ABSL_FLAG(int, repeat, 3, "Complete reads to time.");

namespace vmnet::bench {
namespace {

// One complete read: every page until next_page_token is empty.
grpc::Status ReadAll(v1::VmNetwork::Stub& stub, bool routes, int page_size,
                     int64_t* entries, int* pages) {
  std::string token;
  *entries = 0;
  *pages = 0;
  do {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    grpc::Status status;
    if (routes) {
      v1::ListRoutesRequest request;
      request.set_page_size(page_size);
      request.set_page_token(token);
      v1::ListRoutesResponse response;
      status = stub.ListRoutes(&context, request, &response);
      *entries += response.routes_size();
      token = response.next_page_token();
    } else {
      v1::ListArpRequest request;
      request.set_page_size(page_size);
      request.set_page_token(token);
      v1::ListArpResponse response;
      status = stub.ListArp(&context, request, &response);
      *entries += response.entries_size();
      token = response.next_page_token();
    }
    if (!status.ok()) return status;
    ++*pages;
  } while (!token.empty());
  return grpc::Status::OK;
}

int Main() {
  const std::string what = absl::GetFlag(FLAGS_what);
  if (absl::GetFlag(FLAGS_target).empty() || (what != "routes" && what != "arp")) {
    std::cerr << "vmnet_list_pages: give --target and --what=routes|arp\n";
    return 2;
  }
  auto channel = Connect(absl::GetFlag(FLAGS_target), 0);
  if (!WaitConnected(*channel, 10)) {
    std::cerr << "vmnet_list_pages: cannot connect\n";
    return 1;
  }
  auto stub = v1::VmNetwork::NewStub(channel);
  std::vector<double> times;
  int64_t entries = 0;
  int pages = 0;
  for (int r = 0; r < std::max(1, absl::GetFlag(FLAGS_repeat)); ++r) {
    double start = Now();
    grpc::Status s = ReadAll(*stub, what == "routes", absl::GetFlag(FLAGS_page_size),
                             &entries, &pages);
    if (!s.ok()) {
      std::cerr << "vmnet_list_pages: " << s.error_code() << " " << s.error_message()
                << "\n";
      return 1;
    }
    times.push_back(Now() - start);
  }
  std::vector<double> sorted = times;
  std::sort(sorted.begin(), sorted.end());
  JsonObject result;
  result.Add("what", what)
      .Add("entries", entries)
      .Add("pages", pages)
      .Add("median_s", sorted[sorted.size() / 2])
      .Add("min_s", sorted.front())
      .Raw("times_s", "[" + absl::StrJoin(times, ", ", [](std::string* out, double t) {
                        absl::StrAppendFormat(out, "%.6f", t);
                      }) + "]");
  std::cout << result.ToString() << std::endl;
  return 0;
}

}  // namespace
}  // namespace vmnet::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "reads every page of ListRoutes or ListArp and times it (JSON)");
  absl::ParseCommandLine(argc, argv);
  return vmnet::bench::Main();
}
