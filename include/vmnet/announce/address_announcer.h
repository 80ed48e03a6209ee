// What the reconciler asks of the network beside the kernel's tables: tell a
// link's neighbours where an address now is (gratuitous ARP, unsolicited
// Neighbour Advertisement), and ask them whether an address is already taken
// (ARP probe, duplicate-address-detection Neighbour Solicitation).
//
// vmnetd's implementation is the raw-socket Announcer (announcer.h); tests
// record the calls. Called on the reconciler thread; implementations queue
// the work and must not block on the network.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "vmnet/net/address.h"

namespace vmnet {

struct Announcement {
  int ifindex = 0;
  std::string interface;  // for logs
  MacAddress mac;         // the link's MAC: Ethernet source and sender hardware address
  IpAddress address;      // what is announced (IPv4: GARP; IPv6: unsolicited NA)
  // IPv6 only: the NA's source address (the link's link-local); kNone: `address`.
  IpAddress source;
  bool router = false;  // IPv6: set the NA's Router flag (the VMs' gateway)
  bool operator==(const Announcement&) const = default;
};

class AddressAnnouncer {
 public:
  // A link to probe on.
  struct ProbeLink {
    int ifindex = 0;
    std::string interface;  // for logs
    MacAddress mac;         // the link's MAC
  };
  // An address another machine answered for (or probed for too) on a link.
  struct Conflict {
    IpAddress address;
    std::string interface;
    MacAddress answered_by;
    int ifindex = 0;
  };
  using ProbeDone = std::function<void(std::vector<Conflict>)>;

  virtual ~AddressAnnouncer() = default;

  // Sends each announcement a few times (the implementation's count and
  // interval). Announcements whose address is neither IPv4 nor IPv6 are
  // ignored.
  virtual void Announce(std::vector<Announcement> announcements) = 0;

  // Asks on each of `links` whether another machine holds any of `addresses`;
  // `done` runs later, on any thread, with one Conflict per (link, address)
  // that was answered for, and never after the announcer is destroyed.
  virtual void Probe(std::vector<ProbeLink> links, std::vector<IpAddress> addresses,
                     ProbeDone done) = 0;
};

}  // namespace vmnet
