// Tells a link's neighbours where an address now is, and asks them whether
// an address is already taken, with raw Ethernet frames on an AF_PACKET
// socket (frames.h): gratuitous ARP and unsolicited Neighbour Advertisements
// when a VM's address moves to this host, ARP probes and DAD Neighbour
// Solicitations before one is used. Nothing host-wide is changed (no
// arp_notify, no ip_nonlocal_bind) and no program is run.
//
// One thread sends and listens; callers only queue work and never wait on the
// network. Needs CAP_NET_RAW.
//
// Thread safety: all methods may be called from any thread.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "vmnet/announce/address_announcer.h"
#include "vmnet/base/mutex.h"
#include "vmnet/net/address.h"

namespace vmnet {

class Announcer : public AddressAnnouncer {
 public:
  struct Options {
    int count = 3;  // frames per announcement, at least 1
    absl::Duration interval = absl::Seconds(1);
    // How long Probe listens for an answer (--dad-timeout).
    absl::Duration dad_timeout = absl::Seconds(1);
    // False: Announce does nothing (the announcer is there only to probe).
    bool announce = true;
  };

  // Opens the AF_PACKET sockets and starts the thread. PERMISSION_DENIED,
  // naming CAP_NET_RAW, without the capability; INVALID_ARGUMENT for a count
  // below 1 or above 65535, or an interval not above zero.
  static absl::StatusOr<std::unique_ptr<Announcer>> Create(Options options);
  // Stops the thread promptly: queued announcements are dropped and the
  // `done` of unfinished probes is never called.
  ~Announcer() override;
  Announcer(const Announcer&) = delete;
  Announcer& operator=(const Announcer&) = delete;

  // Queues each announcement to be sent `count` times, the first at once,
  // then every `interval`. A newer Announce of the same (ifindex, address)
  // replaces the queued one and restarts its count. Announcements whose
  // address is neither IPv4 nor IPv6 are ignored; all of them when the
  // options say not to announce.
  void Announce(std::vector<Announcement> announcements) override;

  // ProbeAddresses with the options' dad_timeout.
  void Probe(std::vector<ProbeLink> links, std::vector<IpAddress> addresses,
             ProbeDone done) override;

  // Sends a duplicate-address probe (ARP probe for IPv4, DAD Neighbour
  // Solicitation for IPv6) for each address on each link, at once and again
  // at timeout/2, listens on those links until `timeout`, then calls `done`
  // on the announcer's thread with one Conflict per (link, address) some
  // other machine answered for or probed for too (frames.h, ParseClaim).
  // `done` must not call back into the Announcer's destructor; it may call
  // Announce and Probe.
  void ProbeAddresses(std::vector<ProbeLink> links, std::vector<IpAddress> addresses,
                      absl::Duration timeout, ProbeDone done);

  struct Stats {
    uint64_t announcements_sent = 0;  // GARP and NA frames sent
    uint64_t send_errors = 0;         // frames the kernel refused (a link gone, down)
    uint64_t probes_sent = 0;         // ARP probe and DAD NS frames sent
    uint64_t conflicts = 0;           // Conflicts reported to `done`
  };
  Stats stats() const;

 private:
  // A queued announcement, 64 bytes: the interface's name is not kept
  // (looked up by ifindex when a line is logged) and the frame is built when
  // it is sent. 2 s after a 10,000-VM attach storm the queue still holds the
  // storm's last announcements (issue 16).
  struct Pending {
    absl::Time next;
    int ifindex = 0;
    IpAddress address;
    IpAddress source;
    MacAddress mac;
    bool router = false;
    uint16_t remaining = 0;
  };
  struct ProbeRun {
    std::vector<ProbeLink> links;
    std::vector<IpAddress> addresses;
    absl::Time resend;
    absl::Time deadline;
    bool resent = false;
    ProbeDone done;
    std::vector<Conflict> conflicts;
  };
  struct Sockets {
    int send = -1;  // AF_PACKET, protocol 0: never receives
    int arp = -1;   // receives ARP while probing
    int nd = -1;    // receives NS and NA while probing
    int wake = -1;  // eventfd: new work or stop
  };

  Announcer(Options options, Sockets sockets);
  void Wake();
  void Run();
  // Takes in what Announce queued, sends what is due by `now` and returns
  // when something is next due.
  absl::Time SendDueAnnouncements(absl::Time now);
  void MergeIncoming();
  absl::Time AdvanceProbes(absl::Time now);
  void StartProbes();
  void SetListening(bool on);
  void Receive(int fd);
  // Sends one frame out of `ifindex`; false (counted, logged) on failure.
  bool Send(int ifindex, const std::vector<uint8_t>& frame, uint16_t ethertype);
  void SendProbes(const ProbeRun& run);

  const Options options_;
  const Sockets sockets_;

  mutable Mutex mu_;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  // What Announce added since the thread last looked, in call order.
  std::vector<Pending> incoming_ ABSL_GUARDED_BY(mu_);
  std::vector<ProbeRun> new_probes_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);

  // The thread's own.
  // The queue: one entry per (ifindex, address), sorted by them. A vector,
  // not a map of nodes: 64 bytes an entry instead of a 176-byte node, and
  // one block that is given back (shrunk) as the queue drains, not nodes
  // scattered between the storm's other allocations.
  std::vector<Pending> pending_;
  std::vector<ProbeRun> probes_;
  bool listening_ = false;
  std::vector<uint8_t> buffer_;

  std::thread thread_;
};

}  // namespace vmnet
