// Traffic-control rtnetlink messages (qdiscs, filters, ifb links) to and
// from the value types of tc_objects.h. Pure functions, like
// netlink_codec.h: the parsers take untrusted bytes and never read past the
// message.
#pragma once

#include <linux/netlink.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "vmnet/kernel/objects.h"

namespace vmnet::kernel {

std::optional<Qdisc> ParseQdisc(const nlmsghdr* msg);
std::optional<TcFilter> ParseTcFilter(const nlmsghdr* msg);
// A QdiscEvent or TcFilterEvent (RTM_NEWQDISC, RTM_DELQDISC, RTM_NEWTFILTER,
// RTM_DELTFILTER); nullopt for anything else.
std::optional<Event> ParseTcEvent(const nlmsghdr* msg);

// The request for a traffic-control write (IsTcWrite); empty otherwise.
std::vector<uint8_t> EncodeTcWrite(const Write& write);

// EncodeTcWrite creates an ifb device down. Once the kernel has acknowledged
// it, these requests (by name) turn off its IPv6 address generation and bring
// it up: an ifb needs no IPv6 setup, which on a host of many routes costs
// more than everything else vmnetd does for the VM (BENCHMARKS.md).
// Three requests, in this order (kIfbBringUp*): the IPv6 mode, the up, and
// a get of the link, whose answer tells its ifindex.
enum IfbBringUpStep { kIfbMode = 0, kIfbUp = 1, kIfbGet = 2, kIfbBringUpSteps = 3 };
std::vector<std::vector<uint8_t>> EncodeIfbBringUp(const CreateIfb& w);
// The writes that finish a CreateIfb once the ifb's ifindex is known: its
// tbf, and the VM link's redirect to it.
std::vector<Write> IfbFollowUps(const CreateIfb& w, int ifb_ifindex);

// The tbf vmnetd installs for a limit of `bits_per_second` with `burst_bytes`
// of burst: its queue holds the burst and 50 ms at the rate (enough for TCP
// to keep the link busy, little enough to add no more than 50 ms of delay).
Qdisc Tbf(int ifindex, uint64_t bits_per_second, uint32_t burst_bytes);
// Whether a tbf the kernel reports is the one `want` asks for: the burst
// the kernel reports is derived from a buffer time in 64 ns ticks, so it
// may differ from the asked one by the bytes of two ticks.
bool TbfMatches(const Qdisc& have, const Qdisc& want);

// The burst when a spec gives none: 10 ms at the rate, and at least 64 KiB
// (a GSO packet of a veth or tap passes whole instead of being segmented).
uint32_t DefaultBurstBytes(uint64_t bits_per_second);

// A request that asks whether the kernel has the police action (as the
// action with index 1: ENOENT says it has, EINVAL that it does not).
std::vector<uint8_t> EncodePoliceProbe();

}  // namespace vmnet::kernel
