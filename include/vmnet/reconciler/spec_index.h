// Indexes into immutable, shared VmSpecs: who holds an address, who holds an
// interface. Each is a set of pointers into the specs that hashes and
// compares what they point at, so it is searched by the address or the name
// itself (transparent functors) and stores neither: slots of 16 bytes (an
// address) and 8 (an interface), where maps from an IpAddress or a
// string_view to the spec would be 32 and 24. 10,000 VMs fill 16,383 slots.
//
// An entry points into its spec: erase it before the spec goes.
#pragma once

#include "absl/container/flat_hash_set.h"
#include "absl/hash/hash.h"
#include "absl/strings/string_view.h"
#include "vmnet/net/address.h"
#include "vmnet/state/vm_spec.h"

namespace vmnet {

// One of a spec's addresses (or of its allowed source prefixes).
struct SpecAddress {
  const IpAddress* address;
  const VmSpec* spec;
};

struct SpecAddressHash {
  using is_transparent = void;
  size_t operator()(const IpAddress& a) const { return absl::Hash<IpAddress>()(a); }
  size_t operator()(const SpecAddress& s) const { return (*this)(*s.address); }
};
struct SpecAddressEq {
  using is_transparent = void;
  static const IpAddress& Of(const IpAddress& a) { return a; }
  static const IpAddress& Of(const SpecAddress& s) { return *s.address; }
  bool operator()(const auto& a, const auto& b) const { return Of(a) == Of(b); }
};
using SpecAddressIndex = absl::flat_hash_set<SpecAddress, SpecAddressHash, SpecAddressEq>;

struct SpecInterfaceHash {
  using is_transparent = void;
  size_t operator()(absl::string_view name) const {
    return absl::Hash<absl::string_view>()(name);
  }
  size_t operator()(const VmSpec* s) const { return (*this)(s->interface); }
};
struct SpecInterfaceEq {
  using is_transparent = void;
  static absl::string_view Of(absl::string_view name) { return name; }
  static absl::string_view Of(const VmSpec* s) { return s->interface; }
  bool operator()(const auto& a, const auto& b) const { return Of(a) == Of(b); }
};
using SpecInterfaceIndex =
    absl::flat_hash_set<const VmSpec*, SpecInterfaceHash, SpecInterfaceEq>;

}  // namespace vmnet
