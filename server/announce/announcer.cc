#include "vmnet/announce/announcer.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <tuple>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "vmnet/announce/frames.h"
#include "vmnet/log/log.h"

namespace vmnet {
namespace {

using announce::Frame;

// Classic BPF for the receiving sockets: nothing at all while no probe runs,
// so an idle announcer costs the host's traffic nothing but the filter.
sock_filter kDropAll[] = {BPF_STMT(BPF_RET | BPF_K, 0)};
sock_filter kAcceptAll[] = {BPF_STMT(BPF_RET | BPF_K, 0x40000)};
// IPv6 while probing: only ICMPv6 (next header 58, no extension header)
// Neighbour Solicitations and Advertisements.
sock_filter kNeighborDiscovery[] = {
    BPF_STMT(BPF_LD | BPF_H | BPF_ABS, 12),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_IPV6, 0, 6),
    BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 20),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 58, 0, 4),
    BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 54),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 135, 1, 0),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 136, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, 0x40000),
    BPF_STMT(BPF_RET | BPF_K, 0),
};

template <size_t N>
bool Attach(int fd, sock_filter (&filter)[N]) {
  sock_fprog program = {static_cast<unsigned short>(N), filter};
  return setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &program, sizeof(program)) == 0;
}

absl::Status SocketError(const char* what) {
  int e = errno;
  std::string message = absl::StrCat(what, ": ", std::strerror(e));
  if (e == EPERM || e == EACCES) {
    return absl::PermissionDeniedError(absl::StrCat(
        "the announcer needs CAP_NET_RAW to open AF_PACKET sockets (", message, ")"));
  }
  return absl::InternalError(message);
}

// An AF_PACKET socket that receives `protocol` on every link, through a filter
// that drops everything until probing starts.
absl::StatusOr<int> OpenReceiver(uint16_t protocol) {
  // Protocol 0 at first: nothing arrives before the filter is in place.
  int fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return SocketError("socket(AF_PACKET)");
  int one = 1;
  // Our own frames are not answers. Older kernels lack the option; Receive
  // also skips PACKET_OUTGOING.
  setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof(one));
  sockaddr_ll address = {};
  address.sll_family = AF_PACKET;
  address.sll_protocol = htons(protocol);
  if (!Attach(fd, kDropAll) ||
      bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    absl::Status s = SocketError("setting up an AF_PACKET receiver");
    close(fd);
    return s;
  }
  return fd;
}

void CloseAll(std::initializer_list<int> fds) {
  for (int fd : fds) {
    if (fd >= 0) close(fd);
  }
}

// For log lines: queued entries keep only the ifindex. "?" for a link gone.
std::string LinkName(int ifindex) {
  char name[IF_NAMESIZE];
  return if_indextoname(static_cast<unsigned>(ifindex), name) != nullptr ? name : "?";
}

bool LinkGone(int e) { return e == ENXIO || e == ENODEV || e == ENETDOWN; }

int PollTimeoutMs(absl::Time next) {
  if (next == absl::InfiniteFuture()) return -1;
  absl::Duration left = next - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(
      std::min<double>(std::ceil(absl::ToDoubleMilliseconds(left)), 3'600'000.0));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Announcer>> Announcer::Create(Options options) {
  if (options.count < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("announcement count must be at least 1, not ", options.count));
  }
  if (options.count > 65535) {  // Pending::remaining
    return absl::InvalidArgumentError(
        absl::StrCat("announcement count must be at most 65535, not ", options.count));
  }
  if (options.interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("announcement interval must be positive, not ",
                     absl::FormatDuration(options.interval)));
  }
  Sockets s;
  s.send = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
  if (s.send < 0) return SocketError("socket(AF_PACKET)");
  auto arp = OpenReceiver(ETH_P_ARP);
  if (!arp.ok()) {
    CloseAll({s.send});
    return arp.status();
  }
  s.arp = *arp;
  auto nd = OpenReceiver(ETH_P_IPV6);
  if (!nd.ok()) {
    CloseAll({s.send, s.arp});
    return nd.status();
  }
  s.nd = *nd;
  s.wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (s.wake < 0) {
    absl::Status status = SocketError("eventfd");
    CloseAll({s.send, s.arp, s.nd});
    return status;
  }
  return std::unique_ptr<Announcer>(new Announcer(options, s));
}

Announcer::Announcer(Options options, Sockets sockets)
    : options_(options), sockets_(sockets), buffer_(4096) {
  thread_ = std::thread([this] { Run(); });
}

Announcer::~Announcer() {
  {
    MutexLock l(&mu_);
    stopping_ = true;
  }
  Wake();
  thread_.join();
  CloseAll({sockets_.send, sockets_.arp, sockets_.nd, sockets_.wake});
}

void Announcer::Wake() {
  uint64_t one = 1;
  // Fails only when the counter is saturated: the thread is awake anyway.
  (void)!write(sockets_.wake, &one, sizeof(one));
}

void Announcer::Announce(std::vector<Announcement> announcements) {
  if (!options_.announce) return;
  absl::Time now = absl::Now();
  {
    MutexLock l(&mu_);
    for (const Announcement& a : announcements) {
      if (!a.address.is_v4() && !a.address.is_v6()) continue;
      incoming_.push_back(Pending{now, a.ifindex, a.address, a.source, a.mac, a.router,
                                  static_cast<uint16_t>(options_.count)});
    }
  }
  Wake();
}

void Announcer::Probe(std::vector<ProbeLink> links, std::vector<IpAddress> addresses,
                      ProbeDone done) {
  ProbeAddresses(std::move(links), std::move(addresses), options_.dad_timeout,
                 std::move(done));
}

void Announcer::ProbeAddresses(std::vector<ProbeLink> links,
                               std::vector<IpAddress> addresses, absl::Duration timeout,
                               ProbeDone done) {
  timeout = std::max(timeout, absl::ZeroDuration());
  absl::Time now = absl::Now();
  ProbeRun run;
  run.links = std::move(links);
  run.addresses = std::move(addresses);
  run.resend = now + timeout / 2;
  run.deadline = now + timeout;
  run.done = std::move(done);
  {
    MutexLock l(&mu_);
    new_probes_.push_back(std::move(run));
  }
  Wake();
}

Announcer::Stats Announcer::stats() const {
  ReaderMutexLock l(&mu_);
  return stats_;
}

void Announcer::Run() {
  for (;;) {
    {
      MutexLock l(&mu_);
      if (stopping_) break;
    }
    StartProbes();
    absl::Time now = absl::Now();
    absl::Time next = std::min(SendDueAnnouncements(now), AdvanceProbes(now));
    pollfd fds[3] = {
        {sockets_.wake, POLLIN, 0}, {sockets_.arp, POLLIN, 0}, {sockets_.nd, POLLIN, 0}};
    int n = poll(fds, listening_ ? 3 : 1, PollTimeoutMs(next));
    if (n <= 0) continue;  // timeout, or EINTR
    if (fds[0].revents != 0) {
      uint64_t count;
      (void)!read(sockets_.wake, &count, sizeof(count));
    }
    if (listening_) {
      if (fds[1].revents != 0) Receive(sockets_.arp);
      if (fds[2].revents != 0) Receive(sockets_.nd);
    }
  }
}

void Announcer::MergeIncoming() {
  std::vector<Pending> incoming;
  {
    MutexLock l(&mu_);
    incoming.swap(incoming_);
  }
  if (incoming.empty()) return;
  auto by_key = [](const Pending& a, const Pending& b) {
    return std::tie(a.ifindex, a.address) < std::tie(b.ifindex, b.address);
  };
  // Stable throughout, so that of the entries for one (ifindex, address)
  // the newest comes last: the queued one, then the new ones in call order.
  size_t queued = pending_.size();
  // Room for an eighth more, not the double that insert would make: the
  // storm's queue is thousands of entries, merged a batch at a time.
  if (size_t want = queued + incoming.size(); want > pending_.capacity()) {
    pending_.reserve(want + want / 8);
  }
  pending_.insert(pending_.end(), incoming.begin(), incoming.end());
  std::stable_sort(pending_.begin() + queued, pending_.end(), by_key);
  std::inplace_merge(pending_.begin(), pending_.begin() + queued, pending_.end(), by_key);
  // A newer Announce replaces the queued one: keep the last of each run.
  auto out = pending_.begin();
  for (auto it = pending_.begin(); it != pending_.end(); ++it) {
    auto next = std::next(it);
    if (next != pending_.end() && !by_key(*it, *next)) continue;
    *out++ = *it;
  }
  pending_.erase(out, pending_.end());
}

absl::Time Announcer::SendDueAnnouncements(absl::Time now) {
  MergeIncoming();
  absl::Time next = absl::InfiniteFuture();
  uint64_t sent = 0;
  auto out = pending_.begin();
  for (Pending& p : pending_) {
    if (p.next <= now) {
      bool ok =
          p.address.is_v4()
              ? Send(p.ifindex, announce::GratuitousArp(p.mac, p.address), ETH_P_ARP)
              : Send(p.ifindex,
                     announce::UnsolicitedNeighborAdvertisement(p.mac, p.address,
                                                                p.source, p.router),
                     ETH_P_IPV6);
      if (ok) {
        ++sent;
        VMNET_LOG(Debug) << "event=announced interface=" << LinkName(p.ifindex)
                         << " address=" << p.address.ToString()
                         << " mac=" << p.mac.ToString();
      }
      if (--p.remaining == 0) continue;
      p.next = now + options_.interval;
    }
    next = std::min(next, p.next);
    *out++ = p;
  }
  pending_.erase(out, pending_.end());
  // The storm's queue is given back as it drains.
  if (pending_.capacity() > 1024 && pending_.size() < pending_.capacity() / 2) {
    pending_.shrink_to_fit();
  }
  if (sent > 0) {
    MutexLock l(&mu_);
    stats_.announcements_sent += sent;
  }
  return next;
}

void Announcer::StartProbes() {
  std::vector<ProbeRun> runs;
  {
    MutexLock l(&mu_);
    runs.swap(new_probes_);
  }
  if (runs.empty()) return;
  SetListening(true);  // before the probes go out, so no answer is missed
  for (ProbeRun& run : runs) {
    SendProbes(run);
    probes_.push_back(std::move(run));
  }
}

void Announcer::SendProbes(const ProbeRun& run) {
  uint64_t sent = 0;
  for (const ProbeLink& p : run.links) {
    for (const IpAddress& a : run.addresses) {
      if (a.is_v4()) {
        sent += Send(p.ifindex, announce::ArpProbe(p.mac, a), ETH_P_ARP);
      } else if (a.is_v6()) {
        sent += Send(p.ifindex, announce::DadNeighborSolicitation(p.mac, a), ETH_P_IPV6);
      }
    }
  }
  MutexLock l(&mu_);
  stats_.probes_sent += sent;
}

absl::Time Announcer::AdvanceProbes(absl::Time now) {
  bool ending = std::any_of(probes_.begin(), probes_.end(),
                            [&](const ProbeRun& run) { return now >= run.deadline; });
  if (ending && listening_) {
    // Answers already queued count: read them before the runs end.
    Receive(sockets_.arp);
    Receive(sockets_.nd);
  }
  absl::Time next = absl::InfiniteFuture();
  std::vector<ProbeRun> finished;
  for (auto it = probes_.begin(); it != probes_.end();) {
    if (now >= it->deadline) {
      finished.push_back(std::move(*it));
      it = probes_.erase(it);
      continue;
    }
    if (!it->resent && now >= it->resend) {
      SendProbes(*it);
      it->resent = true;
    }
    next = std::min(next, it->resent ? it->deadline : it->resend);
    ++it;
  }
  if (probes_.empty()) SetListening(false);
  for (ProbeRun& run : finished) {
    {
      MutexLock l(&mu_);
      stats_.conflicts += run.conflicts.size();
    }
    if (run.done) run.done(std::move(run.conflicts));
  }
  return next;
}

void Announcer::SetListening(bool on) {
  if (on == listening_) return;
  bool ok =
      on ? Attach(sockets_.arp, kAcceptAll) && Attach(sockets_.nd, kNeighborDiscovery)
         : Attach(sockets_.arp, kDropAll) && Attach(sockets_.nd, kDropAll);
  if (!ok) {
    VMNET_LOG(Warning) << "event=announcer_filter_failed error=\"" << std::strerror(errno)
                       << "\"";
  }
  listening_ = on;
  if (!on) {
    // What arrived before the filter changed: nobody is waiting for it.
    for (int fd : {sockets_.arp, sockets_.nd}) {
      while (recv(fd, buffer_.data(), buffer_.size(), MSG_DONTWAIT) >= 0) {
      }
    }
  }
}

void Announcer::Receive(int fd) {
  // Bounded per wake, so a flood on one socket cannot starve the rest.
  for (int i = 0; i < 256; ++i) {
    sockaddr_ll from = {};
    socklen_t from_len = sizeof(from);
    ssize_t n = recvfrom(fd, buffer_.data(), buffer_.size(), MSG_DONTWAIT,
                         reinterpret_cast<sockaddr*>(&from), &from_len);
    if (n < 0) return;
    if (from.sll_pkttype == PACKET_OUTGOING) continue;
    absl::Span<const uint8_t> frame(buffer_.data(), static_cast<size_t>(n));
    for (ProbeRun& run : probes_) {
      for (const ProbeLink& p : run.links) {
        if (p.ifindex != from.sll_ifindex) continue;
        std::optional<announce::Claim> claim = announce::ParseClaim(frame, p.mac);
        if (!claim || std::find(run.addresses.begin(), run.addresses.end(),
                                claim->address) == run.addresses.end()) {
          continue;
        }
        bool known = std::any_of(
            run.conflicts.begin(), run.conflicts.end(), [&](const Conflict& c) {
              return c.ifindex == p.ifindex && c.address == claim->address;
            });
        if (known) continue;
        VMNET_LOG(Warning) << "event=address_conflict interface="
                           << p.interface << " address=" << claim->address.ToString()
                           << " answered_by=" << claim->mac.ToString();
        run.conflicts.push_back(
            Conflict{claim->address, p.interface, claim->mac, p.ifindex});
      }
    }
  }
}

bool Announcer::Send(int ifindex, const Frame& frame, uint16_t ethertype) {
  sockaddr_ll to = {};
  to.sll_family = AF_PACKET;
  to.sll_protocol = htons(ethertype);
  to.sll_ifindex = ifindex;
  to.sll_halen = 6;
  std::memcpy(to.sll_addr, frame.data(), 6);
  if (sendto(sockets_.send, frame.data(), frame.size(), MSG_DONTWAIT,
             reinterpret_cast<sockaddr*>(&to), sizeof(to)) >= 0) {
    return true;
  }
  int e = errno;
  {
    MutexLock l(&mu_);
    ++stats_.send_errors;
  }
  if (LinkGone(e)) {
    VMNET_LOG(Debug) << "event=announce_send_failed interface=" << LinkName(ifindex)
                     << " ifindex=" << ifindex << " error=\"" << std::strerror(e) << "\"";
  } else {
    VMNET_LOG(Warning) << "event=announce_send_failed interface=" << LinkName(ifindex)
                       << " ifindex=" << ifindex << " error=\"" << std::strerror(e)
                       << "\"";
  }
  return false;
}

}  // namespace vmnet
