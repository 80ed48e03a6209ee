#include "vmnet/metrics/metrics_server.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"
#include "vmnet/log/log.h"

namespace vmnet {
namespace {

struct Connection {
  absl::Time accepted;
  absl::Time deadline;
  std::string in;
  std::string out;
  size_t written = 0;
  bool responding = false;
};

absl::Status Errno(const std::string& what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(errno)));
}

std::string Response(const char* status, const char* content_type,
                     const std::string& body, bool head) {
  std::string out =
      absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", content_type,
                   "\r\nContent-Length: ", body.size(), "\r\nConnection: close\r\n\r\n");
  if (!head) out += body;
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const std::string& listen,
    std::vector<std::weak_ptr<prometheus::Collectable>> collectables, Options options) {
  std::string host = "0.0.0.0";
  std::string port = listen;
  if (size_t colon = listen.rfind(':'); colon != std::string::npos) {
    host = listen.substr(0, colon);
    port = listen.substr(colon + 1);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
      host = host.substr(1, host.size() - 2);
    }
    if (host.empty()) host = "0.0.0.0";
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &found); rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("\"", listen, "\" is not HOST:PORT: ", gai_strerror(rc)));
  }
  std::unique_ptr<addrinfo, decltype(&freeaddrinfo)> owned(found, freeaddrinfo);
  int fd = socket(found->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return Errno("socket");
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd, found->ai_addr, found->ai_addrlen) != 0) {
    absl::Status s = Errno(absl::StrCat("bind ", listen));
    close(fd);
    return s;
  }
  if (::listen(fd, 1024) != 0) {
    absl::Status s = Errno("listen");
    close(fd);
    return s;
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &bound_len);
  int bound_port = ntohs(bound.ss_family == AF_INET6
                             ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                             : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  int epfd = epoll_create1(EPOLL_CLOEXEC);
  int wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (epfd < 0 || wake < 0) {
    absl::Status s = Errno("epoll/eventfd");
    close(fd);
    if (epfd >= 0) close(epfd);
    if (wake >= 0) close(wake);
    return s;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = fd;
  epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
  ev.data.fd = wake;
  epoll_ctl(epfd, EPOLL_CTL_ADD, wake, &ev);
  return std::unique_ptr<MetricsServer>(
      new MetricsServer(fd, epfd, wake, bound_port, std::move(collectables), options));
}

MetricsServer::MetricsServer(
    int listen_fd, int epoll_fd, int wake_fd, int port,
    std::vector<std::weak_ptr<prometheus::Collectable>> collectables, Options options)
    : listen_fd_(listen_fd),
      epoll_fd_(epoll_fd),
      wake_fd_(wake_fd),
      port_(port),
      collectables_(std::move(collectables)),
      options_(options) {
  thread_ = std::thread([this] { Loop(); });
}

MetricsServer::~MetricsServer() {
  stop_ = true;
  uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof(one));
  thread_.join();
  close(listen_fd_);
  close(epoll_fd_);
  close(wake_fd_);
}

std::string MetricsServer::Render() const {
  std::vector<prometheus::MetricFamily> families;
  for (const auto& weak : collectables_) {
    if (auto c = weak.lock()) {
      auto more = c->Collect();
      std::move(more.begin(), more.end(), std::back_inserter(families));
    }
  }
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, families);
  return std::move(out).str();
}

void MetricsServer::Loop() {
  std::map<int, Connection> conns;
  auto drop = [&](std::map<int, Connection>::iterator it) {
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, it->first, nullptr);
    close(it->first);
    return conns.erase(it);
  };
  auto flush = [&](std::map<int, Connection>::iterator it) {
    Connection& c = it->second;
    while (c.written < c.out.size()) {
      ssize_t n = send(it->first, c.out.data() + c.written, c.out.size() - c.written,
                       MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      if (n <= 0) break;
      c.written += static_cast<size_t>(n);
    }
    drop(it);  // answered (or the client went away): Connection: close
  };
  std::vector<epoll_event> events(64);
  while (!stop_) {
    absl::Time now = absl::Now();
    for (auto it = conns.begin(); it != conns.end();) {
      it = it->second.deadline <= now ? drop(it) : std::next(it);
    }
    int timeout_ms = -1;
    for (const auto& [fd, c] : conns) {
      int ms = static_cast<int>(absl::ToInt64Milliseconds(c.deadline - now)) + 1;
      timeout_ms = timeout_ms < 0 ? ms : std::min(timeout_ms, ms);
    }
    int n =
        epoll_wait(epoll_fd_, events.data(), static_cast<int>(events.size()), timeout_ms);
    if (n < 0 && errno != EINTR) {
      VMNET_LOG(Error) << "event=metrics_epoll_failed error=\"" << std::strerror(errno)
                       << "\"";
      return;
    }
    for (int i = 0; i < n; ++i) {
      int fd = events[i].data.fd;
      if (fd == wake_fd_) continue;
      if (fd == listen_fd_) {
        while (true) {
          int c = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
          if (c < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if ((errno == EMFILE || errno == ENFILE) && !conns.empty()) {
              // Out of descriptors: the oldest client makes room.
              auto oldest = std::min_element(
                  conns.begin(), conns.end(), [](const auto& a, const auto& b) {
                    return a.second.accepted < b.second.accepted;
                  });
              drop(oldest);
              continue;
            }
            break;  // EAGAIN, or nothing to free: the backlog keeps it
          }
          if (conns.size() >= options_.max_connections) {
            auto oldest = std::min_element(conns.begin(), conns.end(),
                                           [](const auto& a, const auto& b) {
                                             return a.second.accepted < b.second.accepted;
                                           });
            drop(oldest);
          }
          epoll_event ev{};
          ev.events = EPOLLIN | EPOLLRDHUP;
          ev.data.fd = c;
          epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, c, &ev);
          absl::Time t = absl::Now();
          conns[c] = Connection{t, t + options_.request_timeout, {}, {}, 0, false};
        }
        continue;
      }
      auto it = conns.find(fd);
      if (it == conns.end()) continue;
      Connection& c = it->second;
      if (c.responding) {
        if (events[i].events & (EPOLLERR | EPOLLHUP)) {
          drop(it);
        } else {
          flush(it);
        }
        continue;
      }
      char buf[4096];
      bool closed = false;
      while (c.in.size() <= options_.max_request_bytes) {
        ssize_t r = recv(fd, buf, sizeof(buf), 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (r <= 0) {
          closed = true;
          break;
        }
        c.in.append(buf, static_cast<size_t>(r));
      }
      size_t end = c.in.find("\r\n\r\n");
      if (end == std::string::npos) {
        if (closed || c.in.size() > options_.max_request_bytes) drop(it);
        continue;
      }
      // Memory: at most max_responses copies of the answer are held.
      size_t responding = 0;
      auto oldest_answer = conns.end();
      for (auto j = conns.begin(); j != conns.end(); ++j) {
        if (!j->second.responding) continue;
        ++responding;
        if (oldest_answer == conns.end() ||
            j->second.deadline < oldest_answer->second.deadline) {
          oldest_answer = j;
        }
      }
      if (responding >= options_.max_responses && oldest_answer != conns.end()) {
        drop(oldest_answer);
      }
      // "METHOD TARGET VERSION"
      std::string line = c.in.substr(0, c.in.find("\r\n"));
      size_t sp1 = line.find(' ');
      size_t sp2 = sp1 == std::string::npos ? sp1 : line.find(' ', sp1 + 1);
      std::string method = line.substr(0, sp1);
      std::string target =
          sp1 == std::string::npos ? "" : line.substr(sp1 + 1, sp2 - sp1 - 1);
      std::string path = target.substr(0, target.find('?'));
      bool head = method == "HEAD";
      if (method != "GET" && !head) {
        c.out = Response("405 Method Not Allowed", "text/plain", "GET /metrics\n", false);
      } else if (path != "/metrics") {
        c.out = Response("404 Not Found", "text/plain", "see /metrics\n", head);
      } else {
        c.out = Response("200 OK", "text/plain; version=0.0.4; charset=utf-8", Render(),
                         head);
      }
      c.in.clear();
      c.responding = true;
      c.deadline = absl::Now() + options_.response_timeout;
      epoll_event ev{};
      ev.events = EPOLLOUT;
      ev.data.fd = fd;
      epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, fd, &ev);
      flush(it);
    }
  }
  for (auto it = conns.begin(); it != conns.end();) it = drop(it);
}

}  // namespace vmnet
