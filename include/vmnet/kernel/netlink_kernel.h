// The real kernel: rtnetlink over raw NETLINK_ROUTE sockets, messages built
// and parsed with libnl-3.
#pragma once

#include <linux/netlink.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "vmnet/kernel/kernel.h"
#include "vmnet/kernel/nft_kernel.h"

namespace vmnet::kernel {

// A NETLINK_ROUTE socket: requests matched to replies by sequence number,
// many requests in flight at once. Not thread-safe.
class NetlinkSocket {
 public:
  // `groups` are RTNLGRP_* multicast groups to join (events); `rcvbuf` is
  // the receive buffer in bytes (0: a large default).
  static absl::StatusOr<NetlinkSocket> Open(const std::vector<int>& groups = {},
                                            int rcvbuf = 0);
  NetlinkSocket(NetlinkSocket&& other) noexcept;
  NetlinkSocket& operator=(NetlinkSocket&& other) noexcept;
  ~NetlinkSocket();

  int fd() const { return fd_; }

  // Sends a dump request (`header` is the family header, e.g. an rtmsg,
  // followed by `attrs`, pre-encoded attributes) and hands every reply
  // message to `fn`.
  absl::Status Dump(uint16_t type, const void* header, size_t header_len,
                    absl::FunctionRef<void(const nlmsghdr*)> fn,
                    const std::vector<uint8_t>& attrs = {});

  // Sends each request (as EncodeWrite makes them) with at most `window`
  // unacknowledged at once and returns each request's errno (0 for OK).
  // Replies other than acknowledgements (a GET's answer) go to `on_reply`
  // with the index of their request.
  using ReplyFn = std::function<void(size_t index, const nlmsghdr* reply)>;
  std::vector<int> Transact(const std::vector<std::vector<uint8_t>>& requests,
                            std::vector<std::string>* errors, size_t window,
                            const ReplyFn& on_reply = nullptr);

  // Receives what is pending without blocking: the number of bytes read
  // into `buffer`, 0 when nothing is. Sets *overflow when the kernel dropped
  // messages (ENOBUFS).
  absl::StatusOr<size_t> ReceiveNonBlocking(std::vector<uint8_t>* buffer, bool* overflow);

 private:
  explicit NetlinkSocket(int fd) : fd_(fd) {}
  absl::Status SendDump(uint16_t type, const void* header, size_t header_len,
                        const std::vector<uint8_t>& attrs, uint32_t seq);
  absl::StatusOr<size_t> Receive(std::vector<uint8_t>* buffer);

  int fd_ = -1;
  uint32_t next_seq_ = 1;
};

class NetlinkKernel : public Kernel {
 public:
  struct Options {
    // Receive buffer of the event socket; small values force overflows in
    // tests. 0: a large default.
    int event_rcvbuf = 0;
    // Requests in flight at once in Apply.
    size_t write_window = 512;
    // nftables (port security): without it, Create fails when
    // `require_nftables`; otherwise the kernel has no port security, and its
    // writes fail.
    bool require_nftables = true;
  };

  static absl::StatusOr<std::unique_ptr<NetlinkKernel>> Create(Options options);

  using Kernel::Dump;
  absl::StatusOr<Snapshot> Dump(const DumpSelection& what) override;
  absl::StatusOr<std::vector<Link>> DumpLinks() override;
  absl::StatusOr<std::vector<Neighbor>> DumpProxyNeighbors() override;
  absl::StatusOr<std::vector<Link>> ReadLinks(absl::Span<const int> ifindexes) override;
  std::vector<absl::Status> Apply(absl::Span<const Write> writes) override;
  // Readable when either event socket (rtnetlink, nftables) is.
  int event_fd() const override { return epoll_fd_; }
  absl::Status ReadEvents(std::vector<Event>* events) override;
  absl::StatusOr<std::vector<DropCounter>> ReadDropCounters() override;
  absl::StatusOr<std::vector<Qdisc>> DumpQdiscs() override;
  TcCapabilities tc_capabilities() const override { return tc_capabilities_; }
  ~NetlinkKernel() override;

 private:
  NetlinkKernel(Options options, NetlinkSocket writes, NetlinkSocket events,
                std::unique_ptr<PortSecurityKernel> nft, int epoll_fd)
      : options_(options),
        writes_(std::move(writes)),
        events_(std::move(events)),
        nft_(std::move(nft)),
        epoll_fd_(epoll_fd) {}
  // The nftables writes, in order, as one transaction; then the conntrack
  // deletions, all in one DeleteConntrack call (one dump of the table).
  void ApplyNft(absl::Span<const Write> writes, std::vector<absl::Status>* result);

  void ApplyNetlink(absl::Span<const Write> writes, std::vector<absl::Status>* result);
  // Each ifb device the batch created (down) gets no IPv6 address generation
  // and is brought up (EncodeIfbBringUp), then gets its tbf and the VM link's
  // redirect (IfbFollowUps, with the ifindex read back); a failure there is
  // its CreateIfb's.
  void BringUpCreatedIfbs(absl::Span<const Write> writes, std::vector<int>* errnos,
                          std::vector<std::string>* ack_messages);
  // For each proxy entry about to be created: the entry the kernel holds at
  // that address now, if any. (The kernel ignores NLM_F_EXCL for proxy
  // entries: adding one that exists succeeds and relabels it with our
  // protocol, so an administrator's entry would silently become ours.)
  std::vector<std::optional<Neighbor>> ReadProxies(absl::Span<const Neighbor> proxies);

  // net.ipv6.conf.<name>.<key>, through /proc/sys: the only way the kernel
  // takes IPv6 link settings (it is a file write, not a program).
  static std::optional<bool> ReadIpv6Conf(absl::string_view name, absl::string_view key);
  static absl::Status WriteIpv6Conf(const SetIpv6Conf& conf);

  Options options_;
  NetlinkSocket writes_;
  NetlinkSocket events_;
  std::unique_ptr<PortSecurityKernel> nft_;  // null: no nftables here
  int epoll_fd_ = -1;
  std::vector<uint8_t> event_buffer_;
  TcCapabilities tc_capabilities_;
};

// Errno to absl::Status, once, at the netlink boundary.
absl::Status ErrnoStatus(int err, absl::string_view what);

}  // namespace vmnet::kernel
