// nf_tables messages to and from the value types of nft_objects.h, built and
// parsed with libnftnl. Pure functions with no socket: the parsers take what
// the kernel sent and never read past a message.
#pragma once

#include <linux/netlink.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "vmnet/kernel/nft_objects.h"

namespace vmnet::kernel {

// The names of vmnetd's tables: `inet vmnet` and `arp vmnet`.
inline constexpr char kNftTableName[] = "vmnet";

// One netlink message of a batch; nlmsg_seq is set by the sender.
using NftMessage = std::vector<uint8_t>;

// The messages of one write, in order. InvalidArgument when the write
// cannot be expressed (an interface name too long, a prefix of no family).
absl::Status EncodeNftWrite(const NftWrite& write, std::vector<NftMessage>* out);

// Dump requests. `family` is an NFPROTO_*; `table` filters by table name.
NftMessage EncodeGetGeneration();
NftMessage EncodeDumpTables();
NftMessage EncodeDumpChains(uint8_t family);
NftMessage EncodeDumpRules(uint8_t family);
NftMessage EncodeDumpSets(uint8_t family);
NftMessage EncodeDumpElements(uint8_t family, const std::string& set);
NftMessage EncodeDumpCounters(uint8_t family);

// The generation id of an NFT_MSG_NEWGEN reply or event.
std::optional<uint32_t> ParseGeneration(const nlmsghdr* msg);

// What a dump of vmnetd's tables returned, message by message; Finish()
// turns it into a snapshot.
class NftDumpParser {
 public:
  // Each takes one reply message of the matching dump request; messages of
  // other tables are ignored.
  void AddTable(const nlmsghdr* msg);
  void AddChain(const nlmsghdr* msg);
  void AddRule(const nlmsghdr* msg);
  void AddSet(const nlmsghdr* msg);
  void AddElements(const nlmsghdr* msg);
  // Counter and limit objects (EncodeDumpCounters dumps both).
  void AddCounter(const nlmsghdr* msg);

  // Which tables exist (after AddTable) and which sets each holds (after
  // AddSet): what the element dumps must ask for.
  bool HasTable(uint8_t family) const { return tables_.count(family) != 0; }
  std::vector<std::string> Sets(uint8_t family) const;

  NftSnapshot Finish() const;
  // The counters seen by AddCounter, per VM link and reason.
  std::vector<DropCounter> Counters() const;

  struct Chain {
    std::optional<uint32_t> hook;
    int32_t priority = 0;
    uint32_t policy = 1;
    std::string type;
    std::vector<std::string> rule_comments;
  };
  struct Set {
    uint32_t flags = 0;
    uint32_t key_len = 0;
    uint32_t obj_type = 0;
    // key (and key end, appended) of each element, and the object an
    // object map's element names.
    std::vector<std::pair<std::vector<uint8_t>, std::string>> elements;
  };
  struct Limit {
    uint64_t rate = 0;
    uint64_t unit = 0;
    uint32_t burst = 0;
    uint32_t type = 0;
    uint32_t flags = 0;
  };
  struct Table {
    std::string comment;
    std::map<std::string, Chain> chains;
    std::map<std::string, Set> sets;
    std::map<std::string, std::pair<uint64_t, uint64_t>> counters;  // packets, bytes
    std::map<std::string, Limit> limits;
  };

 private:
  Table* TableOf(uint8_t family, const char* table);
  std::map<uint8_t, Table> tables_;
};

// An event from the NFNLGRP_NFTABLES group; nullopt for changes to other
// tables and for messages that announce nothing (NEWGEN). An element
// message may hold many elements: one event each. `own_portid` is the port
// of the socket that writes, to tell own changes from others'.
std::vector<NftEvent> ParseNftEvent(const nlmsghdr* msg, uint32_t own_portid);

}  // namespace vmnet::kernel
