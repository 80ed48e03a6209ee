// libFuzzer harness for request validation: ParseVmSpec and the address
// parsers under it, fed what a hostile caller could put in an AttachVm
// request.
//
// Input: fields separated by 0xff (a byte that never occurs in the UTF-8
// strings a gRPC request carries, so no field loses a character it could
// really hold):
//
//   vm_id 0xff interface 0xff mac 0xff address 0xff address ...
//
// Properties checked, beyond "no crash, leak or sanitizer report":
// - an accepted spec is canonical: the same fields, addresses sorted and
//   unique, IPv4 only, never the gateway; and parsing its own text form gives
//   it back unchanged;
// - a refusal is INVALID_ARGUMENT with a short, printable message (hostile
//   values are quoted and bounded);
// - the accepted interface is a name Linux allows (dev_valid_name);
// - request_index maps each sorted address back to the request field it came
//   from (a permutation), and AddressField names that field;
// - ValidateRequestId (run on every field) accepts exactly printable ASCII
//   of at most 128 bytes;
// - ParseBandwidth, fed the input's first 32 bytes as four 64-bit numbers:
//   accepts exactly the rates 0 or within [8 kbit/s, 400 Gbit/s], the bursts
//   0 or within [1514 bytes, 1 GiB] and at most 60 s at the lower limit, and
//   no packet rate; refuses the rest naming bandwidth.<field>, a packet rate
//   in bounds with FAILED_PRECONDITION or UNIMPLEMENTED (police or not);
// - IfbName (of the interface field): at most 15 bytes, "vmb…", never the
//   link's own name, the same every time;
// - IpAddress, IpPrefix and MacAddress: what parses prints back to text that
//   parses to the same value, and an IPv4 address is accepted only in its
//   canonical text form (address.h: "Accepts the canonical text forms only").
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "vmnet/kernel/tc_objects.h"
#include "vmnet/net/address.h"
#include "vmnet/state/vm_spec.h"

namespace {

using vmnet::IpAddress;
using vmnet::IpPrefix;
using vmnet::MacAddress;

std::string Printable(absl::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    }
  }
  return out;
}

[[noreturn]] void Violated(const char* property, absl::string_view detail) {
  std::fprintf(stderr, "fuzz_vm_spec: property violated: %s\n  %s\n", property,
               Printable(detail).c_str());
  std::abort();
}

#define EXPECT(cond, detail)              \
  do {                                    \
    if (!(cond)) Violated(#cond, detail); \
  } while (0)

void CheckAddressParsers(absl::string_view text) {
  if (auto a = IpAddress::Parse(text)) {
    EXPECT(a->is_v4() || a->is_v6(), text);
    std::string printed = a->ToString();
    auto again = IpAddress::Parse(printed);
    EXPECT(again.has_value() && *again == *a, text);
    if (a->is_v4()) EXPECT(printed == text, text);
    (void)a->IsUnspecified();
    (void)a->IsLoopback();
    (void)a->IsMulticast();
    (void)a->IsLinkLocal();
    (void)a->IsLimitedBroadcast();
    (void)a->IsV4Mapped();
  }
  if (auto p = IpPrefix::Parse(text)) {
    EXPECT(p->length >= 0 && p->length <= p->address.bit_length(), text);
    EXPECT(p->Contains(p->address), text);
    IpAddress last = p->Last();
    EXPECT(p->Contains(last), text);
    EXPECT(last >= p->address, text);
    auto again = IpPrefix::Parse(p->ToString());
    EXPECT(again.has_value() && *again == *p, text);
  }
  if (auto m = MacAddress::Parse(text)) {
    std::string printed = m->ToString();
    std::string expected;
    for (char c : text) {
      expected.push_back(
          c == '-' ? ':'
                   : static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
    }
    EXPECT(printed == expected, text);
    auto again = MacAddress::Parse(printed);
    EXPECT(again.has_value() && *again == *m, text);
  }
}

void CheckRefusal(const absl::Status& status, absl::string_view input) {
  EXPECT(status.code() == absl::StatusCode::kInvalidArgument, input);
  absl::string_view message = status.message();
  EXPECT(!message.empty() && message.size() <= 512, input);
  for (unsigned char c : message) EXPECT(c >= 0x20 && c < 0x7f, input);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const vmnet::SpecRules* rules = new vmnet::SpecRules();

  absl::string_view input(reinterpret_cast<const char*>(data), size);
  std::vector<absl::string_view> fields = absl::StrSplit(input, '\xff');
  absl::string_view vm_id = fields[0];
  absl::string_view interface = fields.size() > 1 ? fields[1] : "";
  absl::string_view mac = fields.size() > 2 ? fields[2] : "";
  std::vector<std::string> addresses;
  for (size_t i = 3; i < fields.size(); ++i) addresses.emplace_back(fields[i]);

  for (absl::string_view f : fields) CheckAddressParsers(f);

  for (absl::string_view f : fields) {
    absl::Status s = vmnet::ValidateRequestId(f);
    bool printable = f.size() <= 128;
    for (unsigned char c : f) printable = printable && c >= 0x20 && c < 0x7f;
    EXPECT(s.ok() == printable, f);
    if (!s.ok()) CheckRefusal(s, f);
  }

  // allowed_source_prefixes: every field after the first three, as prefixes.
  auto prefixes = vmnet::ParseSourcePrefixes(addresses, *rules);
  if (!prefixes.ok()) {
    CheckRefusal(prefixes.status(), input);
    EXPECT(absl::StartsWith(prefixes.status().message(), "allowed_source_prefixes"),
           input);
  } else {
    EXPECT(prefixes->size() == addresses.size(), input);
    for (size_t i = 0; i < prefixes->size(); ++i) {
      const IpPrefix& p = (*prefixes)[i];
      // As given (request order), canonical, no host bits, none twice.
      EXPECT(IpPrefix::Parse(addresses[i]) == p, input);
      EXPECT(p.Masked() == p, input);
      EXPECT(!(p.address.is_v6() && p.length > 0 && p.address.IsV4Mapped()), input);
      for (size_t j = 0; j < i; ++j) EXPECT((*prefixes)[j] != p, input);
    }
    std::vector<std::string> printed;
    for (const IpPrefix& p : *prefixes) printed.push_back(p.ToString());
    auto again = vmnet::ParseSourcePrefixes(printed, *rules);
    EXPECT(again.ok() && *again == *prefixes, input);
  }

  if (size >= 32) {
    uint64_t v[4];
    std::memcpy(v, data, sizeof(v));
    // Small values too, where the bounds are.
    for (uint64_t& x : v) {
      if (x & 1) x = (x >> 1) % 20000;
    }
    vmnet::SpecRules portsec = *rules;
    portsec.port_security = (data[0] & 2) != 0;
    auto b = vmnet::ParseBandwidth(v[0], v[1], v[2], v[3], portsec);
    auto rate_ok = [](uint64_t r) {
      return r == 0 || (r >= vmnet::kMinBitsPerSecond && r <= vmnet::kMaxBitsPerSecond);
    };
    uint64_t lowest = 0;
    for (uint64_t r : {v[0], v[1]}) {
      if (r != 0 && (lowest == 0 || r < lowest)) lowest = r;
    }
    bool burst_ok =
        v[2] == 0 || (v[2] >= vmnet::kMinBurstBytes && v[2] <= vmnet::kMaxBurstBytes &&
                      (lowest == 0 || v[2] * 8 <= lowest * vmnet::kMaxBurstSeconds));
    bool valid =
        rate_ok(v[0]) && rate_ok(v[1]) && burst_ok && v[3] <= vmnet::kMaxPacketsPerSecond;
    // A packet rate needs port security.
    EXPECT(b.ok() == (valid && (v[3] == 0 || portsec.port_security)), input);
    if (b.ok()) {
      EXPECT(b->ingress_bits_per_second == v[0] && b->egress_bits_per_second == v[1] &&
                 b->burst_bytes == v[2] && b->egress_packets_per_second == v[3],
             input);
    } else {
      EXPECT(absl::StartsWith(b.status().message(), "bandwidth."), input);
      if (valid) {
        EXPECT(b.status().code() == absl::StatusCode::kFailedPrecondition &&
                   absl::StrContains(b.status().message(), "--port-security=false"),
               input);
      } else {
        CheckRefusal(b.status(), input);
      }
    }
  }
  if (interface.size() <= vmnet::kMaxInterfaceLength) {
    std::string ifb = vmnet::kernel::IfbName(interface);
    EXPECT(ifb.size() <= vmnet::kMaxInterfaceLength && vmnet::kernel::IsIfbName(ifb),
           input);
    EXPECT(ifb != interface && ifb == vmnet::kernel::IfbName(interface), input);
  }

  absl::Status id_status = vmnet::ValidateVmId(vm_id);
  if (!id_status.ok()) CheckRefusal(id_status, input);

  std::vector<size_t> request_index;
  auto spec =
      vmnet::ParseVmSpec(vm_id, interface, addresses, mac, *rules, &request_index);
  if (!spec.ok()) {
    CheckRefusal(spec.status(), input);
    return 0;
  }

  EXPECT(id_status.ok(), input);
  EXPECT(spec->vm_id == vm_id, input);
  EXPECT(spec->interface == interface, input);
  EXPECT(spec->interface.size() <= vmnet::kMaxInterfaceLength, input);
  EXPECT(interface != "." && interface != "..", input);
  for (unsigned char c : interface) {
    EXPECT(c > 0x20 && c < 0x7f && c != '/' && c != ':', input);
  }
  EXPECT(!addresses.empty() && addresses.size() <= rules->max_addresses, input);
  EXPECT(spec->addresses.size() == addresses.size(), input);
  EXPECT(request_index.size() == addresses.size(), input);
  std::vector<bool> seen(addresses.size());
  for (size_t i = 0; i < spec->addresses.size(); ++i) {
    const IpAddress& a = spec->addresses[i];
    EXPECT(a.is_v4() || (a.is_v6() && !a.IsV4Mapped()), input);
    EXPECT(a != rules->gateway && a != rules->gateway6, input);
    EXPECT(!a.IsUnspecified() && !a.IsMulticast() && !a.IsLoopback() &&
               !a.IsLinkLocal() && !a.IsLimitedBroadcast(),
           input);
    if (i > 0) EXPECT(spec->addresses[i - 1] < a, input);
    size_t from = request_index[i];
    EXPECT(from < addresses.size() && !seen[from], input);
    seen[from] = true;
    EXPECT(IpAddress::Parse(addresses[from]) == a, input);
    EXPECT(vmnet::AddressField(request_index, i) ==
               "ip_addresses[" + std::to_string(from) + "]",
           input);
  }
  if (mac.empty()) {
    EXPECT(!spec->mac.has_value(), input);
  } else {
    EXPECT(spec->mac.has_value() && !spec->mac->IsZero() && !spec->mac->IsMulticast(),
           input);
  }

  // An error about an address, named by value below the API, names the
  // field the caller sent.
  for (size_t i = 0; i < spec->addresses.size(); ++i) {
    absl::Status named =
        vmnet::NameAddressField(vmnet::AddressError(absl::StatusCode::kAlreadyExists,
                                                    spec->addresses[i], "is held"),
                                *spec, request_index);
    EXPECT(
        absl::StartsWith(named.message(), vmnet::AddressField(request_index, i) + ": "),
        input);
  }

  // The canonical form parses to the same spec.
  std::vector<std::string> canonical;
  for (const IpAddress& a : spec->addresses) canonical.push_back(a.ToString());
  std::string canonical_mac = spec->mac ? spec->mac->ToString() : "";
  auto again =
      vmnet::ParseVmSpec(spec->vm_id, spec->interface, canonical, canonical_mac, *rules);
  EXPECT(again.ok() && *again == *spec, input);
  return 0;
}
