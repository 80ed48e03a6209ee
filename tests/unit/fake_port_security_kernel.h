// An in-memory PortSecurityKernel, for fast unit tests of whoever plans port
// security. It answers writes the way NftKernel does: one Apply is one
// transaction (a failing write rolls back the others, which come back
// ABORTED), adds are idempotent, deletes of absent elements are OK, element
// writes without the base are NOT_FOUND, overlapping allowed ranges of one
// link are refused. Its own writes raise events marked `own`; tests change
// it "from outside" to simulate someone else (events not marked).
#pragma once

#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "vmnet/base/mutex.h"
#include "vmnet/kernel/nft_kernel.h"

namespace vmnet::testing {

class FakePortSecurityKernel : public kernel::PortSecurityKernel {
 public:
  FakePortSecurityKernel();
  ~FakePortSecurityKernel() override;

  std::vector<absl::Status> Apply(absl::Span<const kernel::NftWrite> writes) override;
  absl::StatusOr<kernel::NftSnapshot> Dump() override;
  int event_fd() const override { return event_fd_; }
  absl::Status ReadEvents(std::vector<kernel::NftEvent>* events) override;
  absl::StatusOr<std::vector<kernel::DropCounter>> ReadDropCounters() override;
  std::vector<absl::StatusOr<kernel::ConntrackDeletion>> DeleteConntrack(
      absl::Span<const IpAddress> addresses) override;

  // Changes made by "someone else".
  void DeleteTable();                                     // nft delete table inet vmnet
  void DamageBase();                                      // a rule deleted by hand
  void RemoveElement(const kernel::NftElement& element);  // nft delete element ...
  void Overflow();           // the next ReadEvents reports lost events
  void FailWrites(int err);  // every transaction fails with this errno (0: succeed)
  void SetDropCounter(const std::string& ifname, kernel::DropReason reason,
                      uint64_t packets, uint64_t bytes);
  // Conntrack entries by source address (original or reply).
  void AddConntrackEntries(const IpAddress& address, int count);
  void SetConntrackPresent(bool present);

  // Inspection.
  std::optional<kernel::PortSecurityConfig> base() const;
  std::set<kernel::NftElement> elements() const;
  size_t transactions() const;  // Applies that wrote something
  // Every write of every committed Apply, as ToString, in order.
  std::vector<std::string> write_log() const;
  std::vector<IpAddress> conntrack_deletions() const;

 private:
  void Emit(kernel::NftEvent event) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable vmnet::Mutex mu_;
  int event_fd_ = -1;
  std::optional<kernel::PortSecurityConfig> base_ ABSL_GUARDED_BY(mu_);
  bool base_intact_ ABSL_GUARDED_BY(mu_) = true;
  std::set<kernel::NftElement> elements_ ABSL_GUARDED_BY(mu_);
  std::map<std::pair<std::string, kernel::DropReason>, kernel::DropCounter> counters_
      ABSL_GUARDED_BY(mu_);
  std::vector<kernel::NftEvent> events_ ABSL_GUARDED_BY(mu_);
  bool overflow_ ABSL_GUARDED_BY(mu_) = false;
  int fail_errno_ ABSL_GUARDED_BY(mu_) = 0;
  size_t transactions_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<std::string> write_log_ ABSL_GUARDED_BY(mu_);
  bool conntrack_present_ ABSL_GUARDED_BY(mu_) = true;
  std::map<IpAddress, int> conntrack_ ABSL_GUARDED_BY(mu_);
  std::vector<IpAddress> conntrack_deletions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace vmnet::testing
