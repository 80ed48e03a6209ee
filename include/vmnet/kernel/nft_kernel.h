// The kernel seam for port security: vmnetd's nftables tables (through
// libnftnl over NETLINK_NETFILTER) and conntrack deletion (through
// libnetfilter_conntrack). PortSecurityKernel is the interface the
// reconciler drives; NftKernel is the real one, and unit tests slide a fake
// in behind the same methods.
//
// Only vmnetd's own tables (`inet vmnet`, `arp vmnet`) are ever written,
// dumped in detail or reported in events; every other table (firewalld,
// Docker, Kubernetes) is left alone.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "vmnet/kernel/nft_objects.h"
#include "vmnet/kernel/objects.h"

namespace vmnet::kernel {

class PortSecurityKernel {
 public:
  virtual ~PortSecurityKernel() = default;

  // Applies the writes as nf_tables transactions (one for the whole span,
  // unless it is larger than Options::max_batch_bytes: then it is cut at
  // write boundaries) and returns one status per write. A transaction is
  // all or nothing: when one write in it fails (its errno, the object and
  // the kernel's extended ack in the message), the kernel rolls back the
  // others, which come back ABORTED naming the failure. Adds of what exists
  // and deletes of what is absent are OK. Element writes while vmnetd's
  // tables are absent are NOT_FOUND (rebuild the base instead); an allowed
  // range overlapping another of the same link is ALREADY_EXISTS (plan with
  // NonOverlappingPrefixes). Deletes need Linux 6.3+ (DESTROY messages).
  // A write that cannot be encoded is INVALID_ARGUMENT and is not sent.
  // Called by one thread at a time.
  virtual std::vector<absl::Status> Apply(absl::Span<const NftWrite> writes) = 0;

  // vmnetd's tables: whether the base matches, and every element. A
  // consistent view (the ruleset generation is the same before and after).
  // Any thread.
  virtual absl::StatusOr<NftSnapshot> Dump() = 0;

  // Events on vmnetd's tables: a descriptor that becomes readable when
  // ReadEvents has something, and a non-blocking read of everything
  // pending. RESOURCE_EXHAUSTED when the kernel dropped events (receive
  // buffer overflow): the caller must re-dump. Called by one thread.
  virtual int event_fd() const = 0;
  virtual absl::Status ReadEvents(std::vector<NftEvent>* events) = 0;

  // Every VM link's drop counters, read at scrape time. Any thread (a
  // socket per call).
  virtual absl::StatusOr<std::vector<DropCounter>> ReadDropCounters() = 0;

  // Deletes the conntrack entries whose original or reply source is one of
  // `addresses` (so no flow or NAT binding follows an address to its next
  // owner), with one dump of the table for the whole batch. A result per
  // address, in order: the entries deleted for it (an entry whose two
  // sources are both in the batch counts for the first of them; a repeated
  // address counts at its first occurrence), or the error of its own
  // deletion or of the dump (an entry already gone is no error). When the
  // kernel has no connection tracking in this namespace, does nothing
  // (loads nothing) and says so in the results. Any thread.
  virtual std::vector<absl::StatusOr<ConntrackDeletion>> DeleteConntrack(
      absl::Span<const IpAddress> addresses) = 0;
};

// The nftables writes of `writes` (AsNftWrite) applied as one Apply, then
// its DeleteConntrack writes as one DeleteConntrack (one dump of the table),
// each status put at its write's index in `result` (sized as `writes`); the
// other writes' statuses are left as they are. NetlinkKernel's way, and the
// fake kernel's.
void ApplyPortSecurityWrites(PortSecurityKernel& kernel, absl::Span<const Write> writes,
                             std::vector<absl::Status>* result);

class NftKernel : public PortSecurityKernel {
 public:
  struct Options {
    // Receive buffer of the event socket; small values force overflows in
    // tests. 0: a large default.
    int event_rcvbuf = 0;
    // The largest transaction Apply sends at once.
    size_t max_batch_bytes = 32 << 20;
  };

  static absl::StatusOr<std::unique_ptr<NftKernel>> Create(Options options);
  ~NftKernel() override;

  std::vector<absl::Status> Apply(absl::Span<const NftWrite> writes) override;
  absl::StatusOr<NftSnapshot> Dump() override;
  int event_fd() const override { return events_fd_; }
  absl::Status ReadEvents(std::vector<NftEvent>* events) override;
  absl::StatusOr<std::vector<DropCounter>> ReadDropCounters() override;
  std::vector<absl::StatusOr<ConntrackDeletion>> DeleteConntrack(
      absl::Span<const IpAddress> addresses) override;

  // The netlink port of the socket Apply writes on: events carrying it are
  // this process's own (NftEvent::own).
  uint32_t write_portid() const { return write_portid_; }

 private:
  NftKernel(Options options, int write_fd, uint32_t write_portid, int events_fd)
      : options_(options),
        write_fd_(write_fd),
        write_portid_(write_portid),
        events_fd_(events_fd) {}

  void ApplyTransaction(const std::vector<size_t>& writes, absl::Span<const NftWrite> all,
                        const std::vector<std::vector<std::vector<uint8_t>>>& messages,
                        std::vector<absl::Status>* result);

  Options options_;
  int write_fd_ = -1;
  uint32_t write_portid_ = 0;
  uint32_t next_seq_ = 1;
  int events_fd_ = -1;
  std::vector<uint8_t> event_buffer_;
};

}  // namespace vmnet::kernel
