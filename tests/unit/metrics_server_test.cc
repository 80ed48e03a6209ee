#include "vmnet/metrics/metrics_server.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <string>

#include "prometheus/client_metric.h"
#include "prometheus/metric_family.h"
#include "prometheus/metric_type.h"

namespace vmnet {
namespace {

class OneGauge : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    prometheus::ClientMetric m;
    m.gauge.value = 7;
    return {prometheus::MetricFamily{
        "vmnet_test_gauge", "a test", prometheus::MetricType::Gauge, {m}}};
  }
};

int Connect(int port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  return fd;
}

// Everything the server sends until it closes, waiting at most `timeout_ms`
// in all; "TIMEOUT" when it does not close in time.
std::string ReadAll(int fd, int timeout_ms) {
  std::string out;
  auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (true) {
    int left = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(
                                    deadline - std::chrono::steady_clock::now())
                                    .count());
    pollfd p{fd, POLLIN, 0};
    if (left <= 0 || poll(&p, 1, left) != 1) return "TIMEOUT";
    char buf[4096];
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) return out;
    out.append(buf, static_cast<size_t>(n));
  }
}

std::string Get(int port, const std::string& request) {
  int fd = Connect(port);
  send(fd, request.data(), request.size(), MSG_NOSIGNAL);
  std::string out = ReadAll(fd, 2000);
  close(fd);
  return out;
}

TEST(MetricsServerTest, ServesMetricsAndNothingElse) {
  auto gauge = std::make_shared<OneGauge>();
  auto server = MetricsServer::Start("127.0.0.1:0", {gauge});
  ASSERT_TRUE(server.ok()) << server.status();
  int port = (*server)->port();
  std::string ok = Get(port, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(ok.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << ok;
  EXPECT_NE(ok.find("vmnet_test_gauge 7"), std::string::npos) << ok;
  EXPECT_EQ(Get(port, "GET / HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 404", 0), 0u);
  EXPECT_EQ(Get(port, "POST /metrics HTTP/1.1\r\n\r\n").rfind("HTTP/1.1 405", 0), 0u);
  // A collectable that is gone is skipped.
  gauge.reset();
  std::string empty = Get(port, "GET /metrics HTTP/1.1\r\n\r\n");
  EXPECT_EQ(empty.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << empty;
  EXPECT_EQ(empty.find("vmnet_test_gauge"), std::string::npos) << empty;
}

TEST(MetricsServerTest, IdleClientsAreClosedAtTheirDeadlineAndTheCapEvictsTheOldest) {
  auto gauge = std::make_shared<OneGauge>();
  MetricsServer::Options options;
  options.max_connections = 4;
  options.request_timeout = absl::Milliseconds(300);
  auto server = MetricsServer::Start("127.0.0.1:0", {gauge}, options);
  ASSERT_TRUE(server.ok()) << server.status();
  int port = (*server)->port();
  // An idle client is closed once its request deadline passes.
  int idle = Connect(port);
  EXPECT_EQ(ReadAll(idle, 2000), "");
  close(idle);
  // Four idle clients fill the cap; a scrape still gets in (the oldest goes).
  int held[4];
  for (int& fd : held) fd = Connect(port);
  std::string ok = Get(port, "GET /metrics HTTP/1.1\r\n\r\n");
  EXPECT_NE(ok.find("vmnet_test_gauge 7"), std::string::npos) << ok;
  EXPECT_EQ(ReadAll(held[0], 100), "");  // evicted: closed at once
  for (int fd : held) close(fd);
}

}  // namespace
}  // namespace vmnet
