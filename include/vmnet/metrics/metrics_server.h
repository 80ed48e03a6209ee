// The /metrics endpoint: a small HTTP/1.x server of our own, one thread, one
// epoll loop (issue 13, item 6).
//
// prometheus-cpp's Exposer (civetweb) serves a connection per worker thread:
// as many idle or slow clients as it has threads keep every scrape waiting.
// Here no client holds anything but its buffer: each connection has a
// deadline (the whole request must arrive, and the answer be taken, within
// it), a request is at most `max_request_bytes`, and at most
// `max_connections` are open; when a new one arrives at the cap, the oldest
// is closed. A scrape is a new connection, so it always gets in, and it waits
// only for the serialisation of the metrics, never for another client.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "prometheus/collectable.h"

namespace vmnet {

class MetricsServer {
 public:
  struct Options {
    size_t max_connections = 256;
    // From accept to the end of the request's headers.
    absl::Duration request_timeout = absl::Seconds(2);
    // From the end of the request to the last byte of the answer taken.
    absl::Duration response_timeout = absl::Seconds(10);
    size_t max_request_bytes = 8192;
    // Answers being written at once, each a copy of the metrics text: a
    // new one beyond this closes the oldest (a client not taking its answer).
    size_t max_responses = 16;
  };

  // `listen` is "HOST:PORT", "[V6]:PORT" or "PORT" (all IPv4 addresses).
  // Collectables are held weakly, as the Exposer did: the ones gone are
  // skipped.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& listen,
      std::vector<std::weak_ptr<prometheus::Collectable>> collectables, Options options);
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& listen,
      std::vector<std::weak_ptr<prometheus::Collectable>> collectables) {
    return Start(listen, std::move(collectables), Options());
  }
  ~MetricsServer();

  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  // The port bound (useful with port 0).
  int port() const { return port_; }

 private:
  MetricsServer(int listen_fd, int epoll_fd, int wake_fd, int port,
                std::vector<std::weak_ptr<prometheus::Collectable>> collectables,
                Options options);
  void Loop();
  std::string Render() const;

  const int listen_fd_;
  const int epoll_fd_;
  const int wake_fd_;
  const int port_;
  const std::vector<std::weak_ptr<prometheus::Collectable>> collectables_;
  const Options options_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace vmnet
