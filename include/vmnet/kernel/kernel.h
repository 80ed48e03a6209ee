// The seam between vmnet and the host's kernel. The reconciler drives the
// kernel only through this interface; NetlinkKernel is the real one, and
// tests slide in an in-memory fake behind the same methods.
#pragma once

#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "vmnet/kernel/objects.h"

namespace vmnet::kernel {

class Kernel {
 public:
  virtual ~Kernel() = default;

  // A dump of the selected tables: links, IPv4 addresses, main-table IPv4
  // routes, IPv4 neighbours and proxy entries. Safe to call from any thread.
  virtual absl::StatusOr<Snapshot> Dump(const DumpSelection& what) = 0;
  absl::StatusOr<Snapshot> Dump() { return Dump(DumpSelection::All()); }

  // Only the links, with their 64-bit counters: what a metrics scrape
  // reads. Any thread.
  virtual absl::StatusOr<std::vector<Link>> DumpLinks() = 0;

  // Only these links, read now (one that is gone is left out): what finds
  // drift in settings that raise no event (accept_ra). Called by the thread
  // that calls Apply.
  virtual absl::StatusOr<std::vector<Link>> ReadLinks(
      absl::Span<const int> ifindexes) = 0;

  // Only the IPv4 proxy entries: the cheap dump that finds their drift
  // (adding or deleting a proxy entry raises no kernel event). Any thread.
  virtual absl::StatusOr<std::vector<Neighbor>> DumpProxyNeighbors() = 0;

  // Applies the writes in order, many in flight at once, and returns one
  // status per write. (SetIpv6Conf writes, which are no netlink messages,
  // go first, in their own order; the nftables writes follow the rtnetlink
  // ones as one transaction, all or nothing; conntrack deletions come
  // last.) A create of an object that exists already is an
  // error (ALREADY_EXISTS): callers decide what may be replaced. A delete of
  // an object that is already gone is OK. Other failures carry the object
  // and the errno in the message. Called by one thread at a time.
  virtual std::vector<absl::Status> Apply(absl::Span<const Write> writes) = 0;

  // Events: a descriptor that becomes readable when ReadEvents has
  // something, and a non-blocking read of everything pending. ReadEvents
  // returns RESOURCE_EXHAUSTED when the kernel dropped events (the receive
  // buffer overflowed): the caller must re-dump. Called by one thread.
  virtual int event_fd() const = 0;
  virtual absl::Status ReadEvents(std::vector<Event>* events) = 0;

  // Port security's per-VM drop counters, as a scrape reads them. Any
  // thread. Empty when the kernel has no nftables.
  virtual absl::StatusOr<std::vector<DropCounter>> ReadDropCounters() = 0;

  // The root and ingress qdiscs of every link with their statistics: what a
  // scrape reads for the bandwidth limits' drops. Any thread.
  virtual absl::StatusOr<std::vector<Qdisc>> DumpQdiscs() { return std::vector<Qdisc>{}; }
  // What the kernel's traffic control offers, found when it was opened.
  virtual TcCapabilities tc_capabilities() const { return {}; }
};

}  // namespace vmnet::kernel
