// libFuzzer harness for the rtnetlink codec (netlink_codec.h).
//
// The first input byte picks the mode:
//   even: the rest is a buffer as one recv() returns it (what the kernel, or
//         anything able to write to our socket, sent). Every message is
//         given to every parser; whatever parses is printed, encoded again
//         and parsed again.
//   odd:  the rest drives FuzzedDataProvider to build a Write (a route,
//         address or neighbour with arbitrary fields); it is encoded and the
//         encoding parsed back.
//
// Properties checked, beyond "no crash, leak or sanitizer report":
// - at most one typed parser accepts a message, and ParseEvent returns the
//   same object with `deleted` set exactly for RTM_DEL*;
// - EncodeWrite produces exactly one well-formed message;
// - round trip: for an address, route or neighbour, parse(encode(x)) == x
//   for every field the request carries. Not carried, hence normalized
//   before comparing: a route's preferred source (never written); a proxy
//   neighbour's state (always NUD_PERMANENT) and lladdr; a delete's address
//   flags, address protocol, neighbour lladdr and neighbour protocol. Routes
//   and neighbours whose gateway/address family differs from the
//   destination's are not representable (RTA_VIA) and are only exercised.
#include <fuzzer/FuzzedDataProvider.h>
#include <linux/neighbour.h>
#include <linux/rtnetlink.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "vmnet/kernel/netlink_codec.h"
#include "vmnet/kernel/tc_codec.h"
#include "vmnet/kernel/objects.h"

namespace {

using namespace vmnet;          // NOLINT
using namespace vmnet::kernel;  // NOLINT

[[noreturn]] void Violated(const char* property, const std::string& detail) {
  std::fprintf(stderr, "fuzz_netlink: property violated: %s\n  %s\n", property,
               detail.c_str());
  std::abort();
}

#define EXPECT(cond, detail)              \
  do {                                    \
    if (!(cond)) Violated(#cond, detail); \
  } while (0)

std::string Describe(const Event& e) {
  return std::visit(
      [](const auto& ev) {
        using T = std::decay_t<decltype(ev)>;
        if constexpr (std::is_same_v<T, NftEvent>) {
          return ev.ToString();
        } else if constexpr (std::is_same_v<T, HostSettingsEvent>) {
          return std::string("net.ipv6.conf.all.forwarding ") +
                 (ev.ipv6_forwarding_all ? (*ev.ipv6_forwarding_all ? "1" : "0") : "?");
        } else {
          std::string s = ev.deleted ? "deleted " : "";
          if constexpr (std::is_same_v<T, LinkEvent>) return s + ev.link.ToString();
          if constexpr (std::is_same_v<T, AddressEvent>) return s + ev.address.ToString();
          if constexpr (std::is_same_v<T, RouteEvent>) return s + ev.route.ToString();
          if constexpr (std::is_same_v<T, NeighborEvent>)
            return s + ev.neighbor.ToString();
          if constexpr (std::is_same_v<T, QdiscEvent>) return s + ev.qdisc.ToString();
          if constexpr (std::is_same_v<T, TcFilterEvent>) return s + ev.filter.ToString();
        }
      },
      e);
}

bool IsDelete(uint16_t type) {
  return type == RTM_DELLINK || type == RTM_DELADDR || type == RTM_DELROUTE ||
         type == RTM_DELNEIGH || type == RTM_DELQDISC || type == RTM_DELTFILTER;
}

// Encodes `write`, checks the result is exactly one message, and returns the
// event parsed from it.
std::optional<Event> EncodeAndParse(const Write& write) {
  const std::string text = ToString(write);
  (void)ObjectKindName(KindOf(write));
  std::vector<uint8_t> bytes = EncodeWrite(write);
  EXPECT(bytes.size() >= NLMSG_HDRLEN, text);
  // A heap copy of exactly the message's size, so ASan catches any read
  // past its end.
  auto copy = std::make_unique<uint8_t[]>(bytes.size());
  std::memcpy(copy.get(), bytes.data(), bytes.size());
  const auto* hdr = reinterpret_cast<const nlmsghdr*>(copy.get());
  EXPECT(hdr->nlmsg_len == bytes.size(), text);
  EXPECT((hdr->nlmsg_flags & (NLM_F_REQUEST | NLM_F_ACK)) == (NLM_F_REQUEST | NLM_F_ACK),
         text);
  int messages = 0;
  ForEachMessage(copy.get(), bytes.size(), [&](const nlmsghdr*) { ++messages; });
  EXPECT(messages == 1, text);
  return ParseEvent(hdr);
}

template <typename EventT>
const EventT* As(const std::optional<Event>& e) {
  return e ? std::get_if<EventT>(&*e) : nullptr;
}

void RoundTripAddress(const Address& a) {
  {
    auto e = EncodeAndParse(AddAddress{a});
    const auto* got = As<AddressEvent>(e);
    EXPECT(got != nullptr && !got->deleted, ToString(Write{AddAddress{a}}));
    EXPECT(got->address == a,
           ToString(Write{AddAddress{a}}) + " came back as " + got->address.ToString());
  }
  {
    Address expected = a;
    expected.flags = 0;
    expected.protocol = 0;
    auto e = EncodeAndParse(DeleteAddress{a});
    const auto* got = As<AddressEvent>(e);
    EXPECT(got != nullptr && got->deleted, ToString(Write{DeleteAddress{a}}));
    EXPECT(got->address == expected, ToString(Write{DeleteAddress{a}}) +
                                         " came back as " + got->address.ToString());
  }
}

void RoundTripRoute(const Route& r) {
  Route expected = r;
  expected.source = IpAddress();
  {
    auto e = EncodeAndParse(AddRoute{r});
    const auto* got = As<RouteEvent>(e);
    EXPECT(got != nullptr && !got->deleted, ToString(Write{AddRoute{r}}));
    EXPECT(got->route == expected,
           ToString(Write{AddRoute{r}}) + " came back as " + got->route.ToString());
  }
  {
    auto e = EncodeAndParse(DeleteRoute{r});
    const auto* got = As<RouteEvent>(e);
    EXPECT(got != nullptr && got->deleted, ToString(Write{DeleteRoute{r}}));
    EXPECT(got->route == expected,
           ToString(Write{DeleteRoute{r}}) + " came back as " + got->route.ToString());
  }
}

void RoundTripNeighbor(const Neighbor& n) {
  Neighbor expected = n;
  if (n.proxy) {
    expected.state = NUD_PERMANENT;
    expected.lladdr.reset();
  }
  {
    auto e = EncodeAndParse(SetNeighbor{n});
    const auto* got = As<NeighborEvent>(e);
    EXPECT(got != nullptr && !got->deleted, ToString(Write{SetNeighbor{n}}));
    EXPECT(got->neighbor == expected,
           ToString(Write{SetNeighbor{n}}) + " came back as " + got->neighbor.ToString());
  }
  {
    expected.lladdr.reset();
    expected.protocol = 0;
    auto e = EncodeAndParse(DeleteNeighbor{n});
    const auto* got = As<NeighborEvent>(e);
    EXPECT(got != nullptr && got->deleted, ToString(Write{DeleteNeighbor{n}}));
    EXPECT(got->neighbor == expected, ToString(Write{DeleteNeighbor{n}}) +
                                          " came back as " + got->neighbor.ToString());
  }
}

// Raw mode: one message from an untrusted buffer.
void ParseOne(const nlmsghdr* msg) {
  auto link = ParseLink(msg);
  auto address = ParseAddress(msg);
  auto route = ParseRoute(msg);
  auto neighbor = ParseNeighbor(msg);
  auto qdisc = ParseQdisc(msg);
  auto filter = ParseTcFilter(msg);
  auto event = ParseEvent(msg);
  int accepted = link.has_value() + address.has_value() + route.has_value() +
                 neighbor.has_value() + qdisc.has_value() + filter.has_value();
  // (A settings message parses as neither: the links it names are read again.)
  (void)ParseSettingsChanged(msg);
  std::string what = "message type " + std::to_string(msg->nlmsg_type);
  EXPECT(accepted <= 1, what);
  EXPECT(event.has_value() == (accepted == 1), what);
  if (!event) return;

  std::string text = Describe(*event);
  bool deleted = std::visit(
      [](const auto& ev) {
        using T = std::decay_t<decltype(ev)>;
        if constexpr (std::is_same_v<T, NftEvent> || std::is_same_v<T, HostSettingsEvent>) {
          return false;
        } else {
          return ev.deleted;
        }
      },
      *event);
  EXPECT(deleted == IsDelete(msg->nlmsg_type), text);

  if (link) {
    const auto* ev = std::get_if<LinkEvent>(&*event);
    EXPECT(ev != nullptr && ev->link == *link, text);
    EXPECT(link->ifindex > 0 && !link->name.empty() && link->name.size() < 16, text);
  }
  if (address) {
    const auto* ev = std::get_if<AddressEvent>(&*event);
    EXPECT(ev != nullptr && ev->address == *address, text);
    EXPECT(address->prefix.length >= 0 &&
               address->prefix.length <= address->prefix.address.bit_length(),
           text);
    RoundTripAddress(*address);
  }
  if (route) {
    const auto* ev = std::get_if<RouteEvent>(&*event);
    EXPECT(ev != nullptr && ev->route == *route, text);
    EXPECT(route->destination.length >= 0 &&
               route->destination.length <= route->destination.address.bit_length(),
           text);
    (void)RouteTypeName(route->type);
    RoundTripRoute(*route);
  }
  if (neighbor) {
    const auto* ev = std::get_if<NeighborEvent>(&*event);
    EXPECT(ev != nullptr && ev->neighbor == *neighbor, text);
    RoundTripNeighbor(*neighbor);
  }
}

void RawMode(const uint8_t* data, size_t size) {
  // An exactly sized heap buffer (aligned like a recv buffer; ASan's redzone
  // right after the last byte).
  auto buf = std::make_unique<uint8_t[]>(size);
  if (size > 0) std::memcpy(buf.get(), data, size);
  ForEachMessage(buf.get(), size, [](const nlmsghdr* msg) { ParseOne(msg); });
}

IpAddress ConsumeAddress(FuzzedDataProvider& fdp, IpAddress::Family family) {
  uint8_t bytes[16] = {};
  fdp.ConsumeData(bytes, family == IpAddress::Family::kV4 ? 4 : 16);
  return IpAddress::FromBytes(family, bytes);
}

IpAddress::Family ConsumeFamily(FuzzedDataProvider& fdp) {
  return fdp.ConsumeBool() ? IpAddress::Family::kV4 : IpAddress::Family::kV6;
}

IpPrefix ConsumePrefix(FuzzedDataProvider& fdp, IpAddress::Family family) {
  IpAddress a = ConsumeAddress(fdp, family);
  return {a, fdp.ConsumeIntegralInRange<int>(0, a.bit_length())};
}

std::optional<MacAddress> ConsumeMac(FuzzedDataProvider& fdp) {
  if (!fdp.ConsumeBool()) return std::nullopt;
  std::array<uint8_t, 6> bytes{};
  fdp.ConsumeData(bytes.data(), bytes.size());
  return MacAddress(bytes);
}

void StructuredMode(const uint8_t* data, size_t size) {
  FuzzedDataProvider fdp(data, size);
  switch (fdp.ConsumeIntegralInRange<int>(0, 4)) {
    case 0: {
      Address a;
      a.prefix = ConsumePrefix(fdp, ConsumeFamily(fdp));
      a.ifindex = fdp.ConsumeIntegral<int>();
      a.scope = fdp.ConsumeIntegral<uint8_t>();
      a.flags = fdp.ConsumeIntegral<uint32_t>();
      a.protocol = fdp.ConsumeIntegral<uint8_t>();
      RoundTripAddress(a);
      break;
    }
    case 1: {
      Route r;
      IpAddress::Family family = ConsumeFamily(fdp);
      r.destination = ConsumePrefix(fdp, family);
      r.ifindex = fdp.ConsumeIntegral<int>();
      if (fdp.ConsumeBool()) r.gateway = ConsumeAddress(fdp, family);
      bool with_source = fdp.ConsumeBool();
      if (with_source) r.source = ConsumeAddress(fdp, family);
      r.protocol = fdp.ConsumeIntegral<uint8_t>();
      r.scope = fdp.ConsumeIntegral<uint8_t>();
      r.type = fdp.ConsumeIntegral<uint8_t>();
      r.table = fdp.ConsumeIntegral<uint32_t>();
      r.metric = fdp.ConsumeIntegral<uint32_t>();
      RoundTripRoute(r);
      break;
    }
    case 2: {
      Neighbor n;
      n.address = ConsumeAddress(fdp, ConsumeFamily(fdp));
      n.ifindex = fdp.ConsumeIntegral<int>();
      n.proxy = fdp.ConsumeBool();
      n.lladdr = ConsumeMac(fdp);
      n.state = fdp.ConsumeIntegral<uint16_t>();
      n.protocol = fdp.ConsumeIntegral<uint8_t>();
      RoundTripNeighbor(n);
      break;
    }
    case 3: {
      // Link writes carry no name, so they never parse back as a Link; and
      // mixed-family routes are not representable. Exercise only.
      int ifindex = fdp.ConsumeIntegral<int>();
      std::string name = fdp.ConsumeRandomLengthString(32);
      bool enabled = fdp.ConsumeBool();
      for (const Write& w : {Write{SetLinkUp{ifindex, name}},
                             Write{SetIpv4Forwarding{ifindex, name, enabled}}}) {
        if (auto e = EncodeAndParse(w)) (void)Describe(*e);
      }
      break;
    }
    case 4: {
      Route r;
      r.destination = ConsumePrefix(fdp, IpAddress::Family::kV4);
      r.gateway = ConsumeAddress(fdp, IpAddress::Family::kV6);
      r.ifindex = fdp.ConsumeIntegral<int>();
      r.table = fdp.ConsumeIntegral<uint32_t>();
      if (auto e = EncodeAndParse(AddRoute{r})) (void)Describe(*e);
      break;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  if (data[0] % 2 == 0) {
    RawMode(data + 1, size - 1);
  } else {
    StructuredMode(data + 1, size - 1);
  }
  return 0;
}
