#include "vmnet/kernel/netlink_kernel.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>
#include <netlink/attr.h>
#include <netlink/msg.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "vmnet/kernel/netlink_codec.h"
#include "vmnet/kernel/tc_codec.h"
#include "vmnet/kernel/tc_kernel.h"

namespace vmnet::kernel {
namespace {

constexpr int kDefaultRcvbuf = 32 << 20;
// The kernel sends at most about 32 KiB per datagram on dumps; events and
// acks are smaller. A larger buffer costs nothing and never truncates.
constexpr size_t kReceiveBuffer = 256 << 10;

void SetIntOption(int fd, int level, int name, int value) {
  // Failures leave defaults in place, which still work (slower, or without
  // extended error messages).
  setsockopt(fd, level, name, &value, sizeof(value));
}

// The text of an extended ack (NLMSGERR_ATTR_MSG), when the kernel sent one.
std::string ExtendedAckMessage(const nlmsghdr* msg) {
  if (!(msg->nlmsg_flags & NLM_F_ACK_TLVS)) return "";
  auto* err = static_cast<const nlmsgerr*>(NLMSG_DATA(msg));
  size_t offset = NLMSG_HDRLEN + sizeof(nlmsgerr);
  if (!(msg->nlmsg_flags & NLM_F_CAPPED)) offset += err->msg.nlmsg_len - NLMSG_HDRLEN;
  if (offset >= msg->nlmsg_len) return "";
  auto* attrs = reinterpret_cast<nlattr*>(
      const_cast<char*>(reinterpret_cast<const char*>(msg) + offset));
  nlattr* tb[NLMSGERR_ATTR_MAX + 1] = {};
  if (nla_parse(tb, NLMSGERR_ATTR_MAX, attrs, static_cast<int>(msg->nlmsg_len - offset),
                nullptr) < 0 ||
      tb[NLMSGERR_ATTR_MSG] == nullptr) {
    return "";
  }
  return std::string(static_cast<const char*>(nla_data(tb[NLMSGERR_ATTR_MSG])),
                     strnlen(static_cast<const char*>(nla_data(tb[NLMSGERR_ATTR_MSG])),
                             static_cast<size_t>(nla_len(tb[NLMSGERR_ATTR_MSG]))));
}

}  // namespace

absl::Status ErrnoStatus(int err, absl::string_view what) {
  std::string message = absl::StrCat(what, ": ", strerror(err), " (errno ", err, ")");
  switch (err) {
    case EEXIST:
      return absl::AlreadyExistsError(message);
    case ENODEV:
    case ENOENT:
    case ESRCH:
    case EADDRNOTAVAIL:
      return absl::NotFoundError(message);
    case EPERM:
    case EACCES:
      return absl::PermissionDeniedError(message);
    case EINVAL:
    case EOPNOTSUPP:
    case EAFNOSUPPORT:
      return absl::InvalidArgumentError(message);
    case ENOBUFS:
    case ENOMEM:
      return absl::ResourceExhaustedError(message);
    default:
      return absl::UnavailableError(message);
  }
}

absl::StatusOr<NetlinkSocket> NetlinkSocket::Open(const std::vector<int>& groups,
                                                  int rcvbuf) {
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
  if (fd < 0) return ErrnoStatus(errno, "open netlink socket");
  NetlinkSocket sock(fd);
  int size = rcvbuf > 0 ? rcvbuf : kDefaultRcvbuf;
  // SO_RCVBUFFORCE passes the rmem_max cap with CAP_NET_ADMIN; without it,
  // SO_RCVBUF gets what the cap allows.
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) != 0) {
    SetIntOption(fd, SOL_SOCKET, SO_RCVBUF, size);
  }
  SetIntOption(fd, SOL_SOCKET, SO_SNDBUF, 4 << 20);
  SetIntOption(fd, SOL_NETLINK, NETLINK_EXT_ACK, 1);
  SetIntOption(fd, SOL_NETLINK, NETLINK_CAP_ACK, 1);
  // Strict checking makes the kernel apply the filters of dump requests
  // (table, proxy flag) instead of dumping everything.
  SetIntOption(fd, SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1);
  sockaddr_nl addr{};
  addr.nl_family = AF_NETLINK;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return ErrnoStatus(errno, "bind netlink socket");
  }
  for (int group : groups) {
    if (setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof(group)) != 0) {
      return ErrnoStatus(errno, absl::StrCat("join netlink group ", group));
    }
  }
  return sock;
}

NetlinkSocket::NetlinkSocket(NetlinkSocket&& other) noexcept
    : fd_(other.fd_), next_seq_(other.next_seq_) {
  other.fd_ = -1;
}

NetlinkSocket& NetlinkSocket::operator=(NetlinkSocket&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) close(fd_);
    fd_ = other.fd_;
    next_seq_ = other.next_seq_;
    other.fd_ = -1;
  }
  return *this;
}

NetlinkSocket::~NetlinkSocket() {
  if (fd_ >= 0) close(fd_);
}

absl::Status NetlinkSocket::SendDump(uint16_t type, const void* header, size_t header_len,
                                     const std::vector<uint8_t>& attrs, uint32_t seq) {
  std::vector<uint8_t> buf(NLMSG_SPACE(header_len) + attrs.size());
  auto* nlh = reinterpret_cast<nlmsghdr*>(buf.data());
  nlh->nlmsg_len = static_cast<uint32_t>(buf.size());
  nlh->nlmsg_type = type;
  nlh->nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
  nlh->nlmsg_seq = seq;
  std::memcpy(NLMSG_DATA(nlh), header, header_len);
  if (!attrs.empty()) {
    std::memcpy(buf.data() + NLMSG_SPACE(header_len), attrs.data(), attrs.size());
  }
  if (send(fd_, buf.data(), buf.size(), 0) < 0) {
    return ErrnoStatus(errno, "send netlink dump request");
  }
  return absl::OkStatus();
}

absl::StatusOr<size_t> NetlinkSocket::Receive(std::vector<uint8_t>* buffer) {
  buffer->resize(kReceiveBuffer);
  while (true) {
    ssize_t n = recv(fd_, buffer->data(), buffer->size(), 0);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EINTR) continue;
    return ErrnoStatus(errno, "receive from netlink");
  }
}

absl::Status NetlinkSocket::Dump(uint16_t type, const void* header, size_t header_len,
                                 absl::FunctionRef<void(const nlmsghdr*)> fn,
                                 const std::vector<uint8_t>& attrs) {
  uint32_t seq = next_seq_++;
  if (auto s = SendDump(type, header, header_len, attrs, seq); !s.ok()) return s;
  std::vector<uint8_t> buffer;
  while (true) {
    auto n = Receive(&buffer);
    if (!n.ok()) return n.status();
    bool done = false;
    absl::Status status;
    ForEachMessage(buffer.data(), *n, [&](const nlmsghdr* msg) {
      if (done || msg->nlmsg_seq != seq) return;  // stale reply of an old request
      if (msg->nlmsg_type == NLMSG_DONE) {
        done = true;
      } else if (msg->nlmsg_type == NLMSG_ERROR) {
        auto* err = static_cast<const nlmsgerr*>(NLMSG_DATA(msg));
        if (err->error != 0) status = ErrnoStatus(-err->error, "netlink dump");
        done = true;
      } else if (msg->nlmsg_flags & NLM_F_DUMP_INTR) {
        // The table changed during the dump; the caller retries.
        status = absl::AbortedError("netlink dump interrupted by a change");
      } else {
        fn(msg);
      }
    });
    if (done) return status;
  }
}

std::vector<int> NetlinkSocket::Transact(
    const std::vector<std::vector<uint8_t>>& requests, std::vector<std::string>* errors,
    size_t window, const ReplyFn& on_reply) {
  std::vector<int> result(requests.size(), 0);
  errors->assign(requests.size(), "");
  const uint32_t first_seq = next_seq_;
  next_seq_ += static_cast<uint32_t>(requests.size());
  size_t sent = 0, acked = 0;
  std::vector<uint8_t> batch;
  std::vector<uint8_t> buffer;
  while (acked < requests.size()) {
    // Fill the window with one sendmsg of many requests.
    batch.clear();
    while (sent < requests.size() && sent - acked < window &&
           batch.size() < (256u << 10)) {
      size_t offset = batch.size();
      batch.insert(batch.end(), requests[sent].begin(), requests[sent].end());
      reinterpret_cast<nlmsghdr*>(batch.data() + offset)->nlmsg_seq =
          first_seq + static_cast<uint32_t>(sent);
      ++sent;
    }
    if (!batch.empty() && send(fd_, batch.data(), batch.size(), 0) < 0) {
      int err = errno;
      for (size_t i = acked; i < requests.size(); ++i) result[i] = err;
      return result;
    }
    auto n = Receive(&buffer);
    if (!n.ok()) {
      // Lost acks (ENOBUFS) or a dead socket: what is unacknowledged is
      // unknown, so report it failed; the reconciler re-reads the kernel.
      for (size_t i = acked; i < requests.size(); ++i) result[i] = EIO;
      return result;
    }
    ForEachMessage(buffer.data(), *n, [&](const nlmsghdr* msg) {
      uint32_t index = msg->nlmsg_seq - first_seq;
      if (index >= requests.size()) return;
      if (msg->nlmsg_type != NLMSG_ERROR) {
        if (on_reply) on_reply(index, msg);
        return;
      }
      auto* err = static_cast<const nlmsgerr*>(NLMSG_DATA(msg));
      result[index] = -err->error;
      if (err->error != 0) (*errors)[index] = ExtendedAckMessage(msg);
      ++acked;
    });
  }
  return result;
}

absl::StatusOr<size_t> NetlinkSocket::ReceiveNonBlocking(std::vector<uint8_t>* buffer,
                                                         bool* overflow) {
  buffer->resize(kReceiveBuffer);
  while (true) {
    ssize_t n = recv(fd_, buffer->data(), buffer->size(), MSG_DONTWAIT);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    if (errno == ENOBUFS) {
      *overflow = true;
      continue;
    }
    return ErrnoStatus(errno, "receive netlink events");
  }
}

absl::StatusOr<std::unique_ptr<NetlinkKernel>> NetlinkKernel::Create(Options options) {
  auto writes = NetlinkSocket::Open();
  if (!writes.ok()) return writes.status();
  auto events = NetlinkSocket::Open(
      {RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_IFADDR,
       RTNLGRP_IPV6_ROUTE, RTNLGRP_NEIGH, RTNLGRP_TC,
       // Settings: sysctls that raise netconf events, and
       // a link's IPv6 coming and going (MTU).
       RTNLGRP_IPV4_NETCONF, RTNLGRP_IPV6_NETCONF, RTNLGRP_IPV6_IFINFO},
      options.event_rcvbuf);
  if (!events.ok()) return events.status();
  std::unique_ptr<PortSecurityKernel> nft;
  NftKernel::Options nft_options;
  nft_options.event_rcvbuf = options.event_rcvbuf;
  absl::StatusOr<std::unique_ptr<NftKernel>> created = NftKernel::Create(nft_options);
  // The nftables layer deletes with the kernel's "destroy" messages (delete
  // if present), which Linux has since 6.3.
  utsname uts{};
  int major = 0, minor = 0;
  if (created.ok() && uname(&uts) == 0 &&
      std::sscanf(uts.release, "%d.%d", &major, &minor) == 2 &&
      (major < 6 || (major == 6 && minor < 3))) {
    created = absl::FailedPreconditionError(absl::StrCat(
        "this kernel (", uts.release,
        ") lacks nftables' destroy messages (Linux 6.3 or newer); upgrade it, or run "
        "with --port-security=false"));
  }
  if (created.ok()) {
    nft = std::move(*created);
  } else if (options.require_nftables) {
    return absl::Status(
        created.status().code(),
        absl::StrCat("nftables (port security): ", created.status().message()));
  }
  int epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  if (epoll_fd < 0) return ErrnoStatus(errno, "epoll_create1");
  for (int fd : {events->fd(), nft ? nft->event_fd() : -1}) {
    if (fd < 0) continue;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev) != 0) {
      int err = errno;
      close(epoll_fd);
      return ErrnoStatus(err, "epoll_ctl");
    }
  }
  auto kernel = std::unique_ptr<NetlinkKernel>(new NetlinkKernel(
      options, std::move(*writes), std::move(*events), std::move(nft), epoll_fd));
  kernel->tc_capabilities_ = ProbeTcCapabilities();
  return kernel;
}

absl::StatusOr<std::vector<Qdisc>> NetlinkKernel::DumpQdiscs() {
  std::vector<Qdisc> qdiscs;
  if (auto s = kernel::DumpQdiscs(&qdiscs); !s.ok()) return s;
  return qdiscs;
}

NetlinkKernel::~NetlinkKernel() {
  if (epoll_fd_ >= 0) close(epoll_fd_);
}

namespace {

// Dumps on a socket of their own, so that any thread may dump while the
// reconciler writes. A dump interrupted by a concurrent change is retried.
template <typename Header, typename Fn>
absl::Status DumpWithRetry(uint16_t type, const Header& header, Fn&& fn,
                           const std::vector<uint8_t>& attrs = {}) {
  absl::Status status;
  for (int attempt = 0; attempt < 5; ++attempt) {
    auto sock = NetlinkSocket::Open({}, 4 << 20);
    if (!sock.ok()) return sock.status();
    status = sock->Dump(type, &header, sizeof(header), fn, attrs);
    if (!absl::IsAborted(status)) return status;
  }
  return status;
}

std::vector<uint8_t> U32Attr(uint16_t type, uint32_t value) {
  std::vector<uint8_t> attr(NLA_HDRLEN + 4);
  auto* nla = reinterpret_cast<nlattr*>(attr.data());
  nla->nla_len = NLA_HDRLEN + 4;
  nla->nla_type = type;
  std::memcpy(attr.data() + NLA_HDRLEN, &value, 4);
  return attr;
}

absl::Status DumpProxies(std::vector<Neighbor>* out) {
  ndmsg ndm{};
  ndm.ndm_family = AF_UNSPEC;  // ARP and NDP
  ndm.ndm_flags = NTF_PROXY;
  return DumpWithRetry(RTM_GETNEIGH, ndm, [&](const nlmsghdr* msg) {
    if (auto n = ParseNeighbor(msg); n && n->proxy) out->push_back(*n);
  });
}

}  // namespace

absl::StatusOr<std::vector<Link>> NetlinkKernel::DumpLinks() {
  std::vector<Link> links;
  ifinfomsg ifi{};
  ifi.ifi_family = AF_UNSPEC;
  if (auto s = DumpWithRetry(RTM_GETLINK, ifi,
                             [&](const nlmsghdr* msg) {
                               if (auto l = ParseLink(msg))
                                 links.push_back(std::move(*l));
                             });
      !s.ok()) {
    return s;
  }
  return links;
}

absl::StatusOr<Snapshot> NetlinkKernel::Dump(const DumpSelection& what) {
  Snapshot snap;
  // Each table is dumped cleanly (retried when a change interrupts it);
  // events that follow are applied on top by the caller.
  if (what.links) {
    auto links = DumpLinks();
    if (!links.ok()) return links.status();
    snap.links = std::move(*links);
  }
  if (what.addresses) {
    ifaddrmsg ifa{};
    ifa.ifa_family = AF_UNSPEC;  // IPv4 and IPv6
    if (auto s = DumpWithRetry(RTM_GETADDR, ifa,
                               [&](const nlmsghdr* msg) {
                                 if (auto a = ParseAddress(msg))
                                   snap.addresses.push_back(*a);
                               });
        !s.ok()) {
      return s;
    }
  }
  if (what.routes) {
    for (uint8_t family : {AF_INET, AF_INET6}) {
      rtmsg rtm{};
      rtm.rtm_family = family;
      rtm.rtm_table = RT_TABLE_MAIN;
      if (auto s = DumpWithRetry(
              RTM_GETROUTE, rtm,
              [&](const nlmsghdr* msg) {
                // Without strict checking the kernel ignores the table filter.
                if (auto r = ParseRoute(msg); r && r->table == RT_TABLE_MAIN) {
                  snap.routes.push_back(*r);
                }
              },
              U32Attr(RTA_TABLE, RT_TABLE_MAIN));
          !s.ok()) {
        return s;
      }
    }
  }
  if (what.neighbors) {
    ndmsg ndm{};
    ndm.ndm_family = AF_UNSPEC;  // ARP and NDP
    if (auto s = DumpWithRetry(RTM_GETNEIGH, ndm,
                               [&](const nlmsghdr* msg) {
                                 if (auto n = ParseNeighbor(msg); n && !n->proxy)
                                   snap.neighbors.push_back(*n);
                               });
        !s.ok()) {
      return s;
    }
  }
  if (what.proxies) {
    if (auto s = DumpProxies(&snap.neighbors); !s.ok()) return s;
  }
  if (what.tc) {
    if (auto s = kernel::DumpQdiscs(&snap.qdiscs); !s.ok()) return s;
    if (auto s = DumpIngressFilters(snap.qdiscs, &snap.filters); !s.ok()) return s;
  }
  if (what.links) snap.ipv6_forwarding_all = ReadIpv6Conf("all", "forwarding");
  if (what.port_security && nft_ != nullptr) {
    auto tables = nft_->Dump();
    if (!tables.ok()) return tables.status();
    snap.port_security = std::move(*tables);
  }
  return snap;
}

absl::StatusOr<std::vector<Neighbor>> NetlinkKernel::DumpProxyNeighbors() {
  std::vector<Neighbor> out;
  if (auto s = DumpProxies(&out); !s.ok()) return s;
  return out;
}

std::vector<absl::Status> NetlinkKernel::Apply(absl::Span<const Write> writes) {
  // The port-security base and element additions first, as one nftables
  // transaction (a VM's link is filtered before it is up and forwarding);
  // then the IPv6 settings (files, in order); then every rtnetlink write in
  // one pipeline (a link brought up after its setting announces the new
  // value in its RTM_NEWLINK, never a stale one); then the nftables
  // deletions as one transaction, then the conntrack deletions (after the
  // elements that let the address's packets in are gone).
  bool any_other = std::any_of(writes.begin(), writes.end(), [](const Write& w) {
    return std::holds_alternative<SetIpv6Conf>(w) || IsNftWrite(w) ||
           std::holds_alternative<DeleteConntrack>(w);
  });
  if (!any_other) {
    std::vector<absl::Status> result;
    result.reserve(writes.size());
    ApplyNetlink(writes, &result);
    return result;
  }
  std::vector<absl::Status> result(writes.size());
  std::vector<Write> before, netlink, after;
  std::vector<size_t> before_index, netlink_index, after_index;
  for (size_t i = 0; i < writes.size(); ++i) {
    const Write& w = writes[i];
    if (std::holds_alternative<EnsurePortSecurityBase>(w) ||
        std::holds_alternative<AddNftElement>(w)) {
      before.push_back(w);
      before_index.push_back(i);
    } else if (IsNftWrite(w) || std::holds_alternative<DeleteConntrack>(w)) {
      after.push_back(w);
      after_index.push_back(i);
    } else if (!std::holds_alternative<SetIpv6Conf>(w)) {
      netlink.push_back(w);
      netlink_index.push_back(i);
    }
  }
  std::vector<absl::Status> part;
  ApplyNft(before, &part);
  for (size_t i = 0; i < before.size(); ++i) result[before_index[i]] = std::move(part[i]);
  for (size_t i = 0; i < writes.size(); ++i) {
    if (const auto* conf = std::get_if<SetIpv6Conf>(&writes[i])) {
      result[i] = WriteIpv6Conf(*conf);
    }
  }
  part.clear();
  part.reserve(netlink.size());
  ApplyNetlink(netlink, &part);
  for (size_t i = 0; i < netlink.size(); ++i) {
    result[netlink_index[i]] = std::move(part[i]);
  }
  part.clear();
  ApplyNft(after, &part);
  for (size_t i = 0; i < after.size(); ++i) result[after_index[i]] = std::move(part[i]);
  return result;
}

void NetlinkKernel::ApplyNft(absl::Span<const Write> writes,
                             std::vector<absl::Status>* result) {
  result->assign(writes.size(), absl::OkStatus());
  if (writes.empty()) return;
  if (nft_ == nullptr) {
    for (size_t i = 0; i < writes.size(); ++i) {
      (*result)[i] = absl::FailedPreconditionError(
          absl::StrCat(ToString(writes[i]), ": this kernel has no nftables"));
    }
    return;
  }
  ApplyPortSecurityWrites(*nft_, writes, result);
}

absl::StatusOr<std::vector<DropCounter>> NetlinkKernel::ReadDropCounters() {
  if (nft_ == nullptr) return std::vector<DropCounter>{};
  return nft_->ReadDropCounters();
}

namespace {

// GET requests (one object each), pipelined: each request's answer as
// `parse` reads it, nullopt where the kernel answered with an error (its
// errno in *errnos, when given).
template <typename Parse>
auto GetEach(NetlinkSocket& sock, size_t window,
             const std::vector<std::vector<uint8_t>>& requests, Parse parse,
             std::vector<int>* errnos = nullptr) {
  std::vector<decltype(parse(nullptr))> found(requests.size());
  std::vector<std::string> ignored;
  std::vector<int> result = sock.Transact(
      requests, &ignored, window,
      [&](size_t index, const nlmsghdr* reply) { found[index] = parse(reply); });
  if (errnos != nullptr) *errnos = std::move(result);
  return found;
}

}  // namespace

std::vector<std::optional<Neighbor>> NetlinkKernel::ReadProxies(
    absl::Span<const Neighbor> proxies) {
  std::vector<std::vector<uint8_t>> requests;
  requests.reserve(proxies.size());
  for (const Neighbor& n : proxies) requests.push_back(EncodeGetProxy(n));
  return GetEach(writes_, options_.write_window, requests,
                 [](const nlmsghdr* reply) -> std::optional<Neighbor> {
                   auto n = ParseNeighbor(reply);
                   if (n && n->proxy) return n;
                   return std::nullopt;
                 });
}

void NetlinkKernel::BringUpCreatedIfbs(absl::Span<const Write> writes,
                                       std::vector<int>* errnos,
                                       std::vector<std::string>* ack_messages) {
  // Only the ifbs this batch created: a name whose create failed may be
  // another's link. Their bring-up and the get of their ifindex go in one
  // more pipelined batch, their tbf and redirect in another.
  std::vector<std::vector<uint8_t>> requests;
  std::vector<size_t> owner;
  for (size_t i = 0; i < writes.size(); ++i) {
    const auto* create = std::get_if<CreateIfb>(&writes[i]);
    if (create == nullptr || (*errnos)[i] != 0) continue;
    for (std::vector<uint8_t>& request : EncodeIfbBringUp(*create)) {
      requests.push_back(std::move(request));
      owner.push_back(i);
    }
  }
  if (requests.empty()) return;
  auto fail = [&](size_t i, int err, absl::string_view step, const std::string& message) {
    if ((*errnos)[i] != 0) return;
    (*errnos)[i] = err;
    (*ack_messages)[i] = absl::StrCat("created, but ", step, ": ", message);
  };
  std::vector<int> ifindex(writes.size(), 0);
  std::vector<std::string> messages;
  std::vector<int> result = writes_.Transact(
      requests, &messages, options_.write_window, [&](size_t k, const nlmsghdr* reply) {
        if (std::optional<Link> link = ParseLink(reply))
          ifindex[owner[k]] = link->ifindex;
      });
  for (size_t k = 0; k < requests.size(); ++k) {
    auto step = static_cast<IfbBringUpStep>(k % kIfbBringUpSteps);
    // A kernel without IPv6 has no address generation mode to set
    // (EAFNOSUPPORT): the up that follows is what matters.
    if (result[k] == 0 || (step == kIfbMode && result[k] == EAFNOSUPPORT)) continue;
    fail(owner[k], result[k], step == kIfbGet ? "not found again" : "not brought up",
         messages[k]);
  }
  requests.clear();
  std::vector<size_t> follow_up_owner;
  for (size_t i = 0; i < writes.size(); ++i) {
    const auto* create = std::get_if<CreateIfb>(&writes[i]);
    if (create == nullptr || (*errnos)[i] != 0) continue;
    if (ifindex[i] == 0) {
      fail(i, EIO, "not found again", "the kernel's answer carried no ifindex");
      continue;
    }
    for (const Write& w : IfbFollowUps(*create, ifindex[i])) {
      requests.push_back(EncodeTcWrite(w));
      follow_up_owner.push_back(i);
    }
  }
  if (requests.empty()) return;
  result = writes_.Transact(requests, &messages, options_.write_window);
  for (size_t k = 0; k < requests.size(); ++k) {
    if (result[k] != 0) {
      fail(follow_up_owner[k], result[k], "its tbf or redirect failed", messages[k]);
    }
  }
}

void NetlinkKernel::ApplyNetlink(absl::Span<const Write> writes,
                                 std::vector<absl::Status>* result) {
  // A proxy entry is created only where none is: read them first.
  std::vector<Neighbor> proxies;
  std::vector<size_t> proxy_index;
  for (size_t i = 0; i < writes.size(); ++i) {
    const auto* set = std::get_if<SetNeighbor>(&writes[i]);
    if (set != nullptr && set->neighbor.proxy) {
      proxies.push_back(set->neighbor);
      proxy_index.push_back(i);
    }
  }
  std::vector<std::optional<absl::Status>> decided(writes.size());
  if (!proxies.empty()) {
    std::vector<std::optional<Neighbor>> existing = ReadProxies(proxies);
    for (size_t k = 0; k < proxies.size(); ++k) {
      if (!existing[k]) continue;
      decided[proxy_index[k]] =
          existing[k]->protocol == proxies[k].protocol
              ? absl::OkStatus()
              : absl::AlreadyExistsError(absl::StrCat(
                    existing[k]->ToString(),
                    " is not vmnetd's: left alone (adding ours would relabel it)"));
    }
  }
  std::vector<std::vector<uint8_t>> requests;
  std::vector<size_t> request_index;
  requests.reserve(writes.size());
  for (size_t i = 0; i < writes.size(); ++i) {
    if (decided[i]) continue;
    requests.push_back(EncodeWrite(writes[i]));
    request_index.push_back(i);
  }
  std::vector<std::string> sent_messages;
  std::vector<int> sent_errnos =
      writes_.Transact(requests, &sent_messages, options_.write_window);
  std::vector<int> errnos(writes.size(), 0);
  std::vector<std::string> ack_messages(writes.size());
  for (size_t k = 0; k < request_index.size(); ++k) {
    errnos[request_index[k]] = sent_errnos[k];
    ack_messages[request_index[k]] = std::move(sent_messages[k]);
  }
  BringUpCreatedIfbs(writes, &errnos, &ack_messages);
  for (size_t i = 0; i < writes.size(); ++i) {
    if (decided[i]) {
      result->push_back(std::move(*decided[i]));
      continue;
    }
    int err = errnos[i];
    bool is_delete = std::holds_alternative<DeleteRoute>(writes[i]) ||
                     std::holds_alternative<DeleteAddress>(writes[i]) ||
                     std::holds_alternative<DeleteNeighbor>(writes[i]) ||
                     std::holds_alternative<DeleteQdisc>(writes[i]) ||
                     std::holds_alternative<DeleteTcFilter>(writes[i]) ||
                     std::holds_alternative<DeleteLink>(writes[i]);
    // Deleting what is already gone is what the caller wanted.
    // (A tc object or ifb whose link is gone went with it; a filter whose
    // ingress qdisc is gone went with that.)
    bool tc_delete = is_delete && IsTcWrite(writes[i]);
    bool filter_parent_gone = std::holds_alternative<DeleteTcFilter>(writes[i]) &&
                              err == EINVAL &&
                              absl::StrContains(ack_messages[i], "Parent Qdisc doesn");
    if (err == 0 || filter_parent_gone ||
        (is_delete && (err == ESRCH || err == ENOENT || err == EADDRNOTAVAIL ||
                       (tc_delete && err == ENODEV)))) {
      result->push_back(absl::OkStatus());
      continue;
    }
    std::string what = ToString(writes[i]);
    if (!ack_messages[i].empty()) absl::StrAppend(&what, " (", ack_messages[i], ")");
    result->push_back(ErrnoStatus(err, what));
  }
}

namespace {

// /proc/sys/net/ipv6/conf/<name>/<key>: names come from the kernel's own
// link dump (or "all"), never from a request.
std::string Ipv6ConfPath(absl::string_view name, absl::string_view key) {
  return absl::StrCat("/proc/sys/net/ipv6/conf/", name, "/", key);
}

}  // namespace

std::optional<bool> NetlinkKernel::ReadIpv6Conf(absl::string_view name,
                                                absl::string_view key) {
  int fd = open(Ipv6ConfPath(name, key).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  char buf[16] = {};
  ssize_t n = read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (n <= 0) return std::nullopt;
  return buf[0] != '0';
}

absl::Status NetlinkKernel::WriteIpv6Conf(const SetIpv6Conf& conf) {
  if (conf.name.empty() || conf.name == "." || conf.name == ".." ||
      conf.name.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(ToString(Write(conf)), ": not a link name"));
  }
  std::string path = Ipv6ConfPath(conf.name, kernel::Ipv6ConfKeyName(conf.key));
  int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus(errno, ToString(Write(conf)));
  std::string value = absl::StrCat(conf.value, "\n");
  ssize_t n = write(fd, value.data(), value.size());
  int err = errno;
  close(fd);
  if (n != static_cast<ssize_t>(value.size()))
    return ErrnoStatus(err, ToString(Write(conf)));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Link>> NetlinkKernel::ReadLinks(
    absl::Span<const int> ifindexes) {
  std::vector<std::vector<uint8_t>> requests;
  requests.reserve(ifindexes.size());
  for (int ifindex : ifindexes) requests.push_back(EncodeGetLink(ifindex));
  std::vector<int> errnos;
  std::vector<std::optional<Link>> found =
      GetEach(writes_, options_.write_window, requests, ParseLink, &errnos);
  std::vector<Link> links;
  for (size_t i = 0; i < found.size(); ++i) {
    if (found[i]) {
      links.push_back(std::move(*found[i]));
    } else if (errnos[i] != 0 && errnos[i] != ENODEV) {
      return ErrnoStatus(errnos[i], absl::StrCat("read link #", ifindexes[i]));
    }
  }
  return links;
}

absl::Status NetlinkKernel::ReadEvents(std::vector<Event>* events) {
  std::vector<int> reread;
  absl::flat_hash_set<int> reread_seen;
  bool overflow = false;
  while (true) {
    auto n = events_.ReceiveNonBlocking(&event_buffer_, &overflow);
    if (!n.ok()) return n.status();
    if (*n == 0) break;
    ForEachMessage(event_buffer_.data(), *n, [&](const nlmsghdr* msg) {
      if (auto changed = ParseSettingsChanged(msg)) {
        if (changed->ifindex > 0) {
          // ("all" forwarding raises one per link: thousands at once.)
          if (reread_seen.insert(changed->ifindex).second)
            reread.push_back(changed->ifindex);
        } else if (changed->ipv6_forwarding_all) {
          events->push_back(HostSettingsEvent{changed->ipv6_forwarding_all});
        }
      } else if (auto e = ParseEvent(msg)) {
        events->push_back(std::move(*e));
      }
    });
  }
  // Read the links again whose settings changed: the events say which, not
  // what they are now. (A link gone in between raised its own RTM_DELLINK.)
  if (!reread.empty()) {
    auto links = ReadLinks(reread);
    if (!links.ok()) return links.status();
    for (Link& link : *links) events->push_back(LinkEvent{false, std::move(link)});
  }
  absl::Status nft_status;
  if (nft_ != nullptr) {
    std::vector<NftEvent> nft_events;
    nft_status = nft_->ReadEvents(&nft_events);
    // Our own writes are in the model already.
    for (NftEvent& e : nft_events) {
      if (!e.own) events->push_back(std::move(e));
    }
  }
  if (overflow || absl::IsResourceExhausted(nft_status)) {
    return absl::ResourceExhaustedError(
        "netlink event socket overflowed (ENOBUFS): events were lost");
  }
  return nft_status;
}

}  // namespace vmnet::kernel
