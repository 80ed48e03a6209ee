#include "vmnet/api/service.h"

#include <linux/neighbour.h>

#include <algorithm>
#include <cassert>
#include <deque>
#include <mutex>

#include "absl/container/btree_map.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "vmnet/base/mutex.h"
#include "vmnet/kernel/netlink_codec.h"

namespace vmnet {
namespace {

constexpr int kDefaultPageSize = 100;
// The kernel's kNudValid (not in the uapi headers): states with a usable
// link-layer address, which arp -n flags C.
constexpr uint16_t kNudValid =
    NUD_PERMANENT | NUD_NOARP | NUD_REACHABLE | NUD_PROBE | NUD_STALE | NUD_DELAY;
constexpr int kMaxPageSize = 1000;

const grpc::Status kStarting(grpc::StatusCode::UNAVAILABLE,
                             "vmnetd is starting: its first sync with the kernel is not "
                             "done; retry");

}  // namespace

void VmNetworkService::Finish(UnaryCall* call, const char* method,
                              const grpc::Status& status) const {
  if (stats_ != nullptr) stats_->Record(method, status.error_code());
  call->Complete(status);
}

grpc::Status VmNetworkService::Authorize(const grpc::CallbackServerContext& context,
                                         const char* method) const {
  if (options_.authorizer == nullptr) return grpc::Status::OK;
  return options_.authorizer->Check(context,
                                    absl::StrCat("/vmnet.v1.VmNetwork/", method));
}

void VmNetworkService::Reply(UnaryCall* call, const char* method,
                             const grpc::Status& status) const {
  Finish(call, method, status);
}

constexpr char kUnparsable[] =
    " (invalid protobuf encoding, or a string field that is not UTF-8)";

void UnaryCall::Complete(const grpc::Status& status) {
  if (status.ok() && !SerializeResponse()) {
    Finish(
        grpc::Status(grpc::StatusCode::INTERNAL, "the response could not be serialized"));
    return;
  }
  Finish(status);
}

namespace {

// One unary call's typed request and response, served from raw bytes.
template <class Request, class Response>
class TypedCall final : public UnaryCall {
 public:
  explicit TypedCall(grpc::ByteBuffer* out) : out_(out) {}
  Request request;
  Response response;

 private:
  bool SerializeResponse() override {
    bool own_buffer = false;
    return grpc::SerializationTraits<Response>::Serialize(response, out_, &own_buffer)
        .ok();
  }
  grpc::ByteBuffer* const out_;
};

}  // namespace

// gRPC 1.51's typed callback handler (CallbackUnaryHandler::RunHandler)
// answers a request that does not parse with UNIMPLEMENTED and no message:
// it drops the deserialisation status. The methods are registered raw and
// parsed here, after the authorization check, so that it is INVALID_ARGUMENT
// saying so.
template <class Request, class Response>
grpc::ServerUnaryReactor* VmNetworkService::Serve(
    const char* method, grpc::CallbackServerContext* context, const grpc::ByteBuffer* in,
    grpc::ByteBuffer* out,
    void (VmNetworkService::*serve)(UnaryCall*, const Request*, Response*)) {
  auto* call = new TypedCall<Request, Response>(out);
  if (auto denied = Authorize(*context, method); !denied.ok()) {
    Reply(call, method, denied);
    return call;
  }
  // Deserialize consumes its buffer; an empty message has no payload.
  grpc::ByteBuffer bytes = in != nullptr ? *in : grpc::ByteBuffer();
  if (bytes.Length() > 0 &&
      !grpc::SerializationTraits<Request>::Deserialize(&bytes, &call->request).ok()) {
    Reply(call, method,
          grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                       absl::StrCat("the request could not be parsed as a ",
                                    Request::descriptor()->full_name(), kUnparsable)));
    return call;
  }
  (this->*serve)(call, &call->request, &call->response);
  return call;
}

#define VMNET_RAW_METHOD(Name)                                                           \
  grpc::ServerUnaryReactor* VmNetworkService::Name(grpc::CallbackServerContext* context, \
                                                   const grpc::ByteBuffer* request,      \
                                                   grpc::ByteBuffer* response) {         \
    return Serve<v1::Name##Request, v1::Name##Response>(                                 \
        #Name, context, request, response, &VmNetworkService::Serve##Name);              \
  }
VMNET_RAW_METHOD(AttachVm)
VMNET_RAW_METHOD(DetachVm)
VMNET_RAW_METHOD(GetVm)
VMNET_RAW_METHOD(ListVms)
VMNET_RAW_METHOD(ListArp)
VMNET_RAW_METHOD(ListRoutes)
#undef VMNET_RAW_METHOD

namespace {

// Sort keys that order addresses numerically when compared as strings.
std::string AddressKey(const IpAddress& a) {
  return absl::StrCat(static_cast<int>(a.family()), ":",
                      absl::BytesToHexString(absl::string_view(
                          reinterpret_cast<const char*>(a.bytes()), a.size())));
}

struct PageRequest {
  int size;
  uint64_t snapshot = 0;  // the listing's snapshot, 0: none
  std::string after;      // sort key; empty: from the start
};

// Page tokens are opaque to clients: the list's name, the snapshot the
// listing reads from, and the sort key of the last entry returned,
// base64url-encoded.
std::string EncodeToken(absl::string_view list, uint64_t snapshot,
                        absl::string_view key) {
  return absl::WebSafeBase64Escape(absl::StrCat(list, "|", snapshot, "|", key));
}

absl::Status DecodeToken(absl::string_view list, absl::string_view token,
                         PageRequest* page) {
  auto invalid = absl::InvalidArgumentError(
      "page_token: is not a token this server issued for this list; start "
      "again with an empty page_token");
  std::string raw;
  std::string prefix = absl::StrCat(list, "|");
  if (token.size() > 1024 || !absl::WebSafeBase64Unescape(token, &raw) ||
      !absl::StartsWith(raw, prefix)) {
    return invalid;
  }
  absl::string_view rest = absl::string_view(raw).substr(prefix.size());
  size_t bar = rest.find('|');
  if (bar == absl::string_view::npos ||
      !absl::SimpleAtoi(rest.substr(0, bar), &page->snapshot)) {
    return invalid;
  }
  page->after = std::string(rest.substr(bar + 1));
  return absl::OkStatus();
}

absl::StatusOr<PageRequest> ParsePaging(absl::string_view list, int32_t page_size,
                                        const std::string& page_token,
                                        const std::string& interface,
                                        const std::string& vm_id) {
  if (page_size < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size: ", page_size,
                     " is negative; give 0 for the default (100) or up to 1000"));
  }
  if (interface.size() > kMaxInterfaceLength) {
    return absl::InvalidArgumentError("interface: is longer than 15 bytes");
  }
  if (!vm_id.empty()) {
    if (auto s = ValidateVmId(vm_id); !s.ok()) return s;
  }
  PageRequest page;
  page.size = page_size == 0 ? kDefaultPageSize : std::min(page_size, kMaxPageSize);
  if (!page_token.empty()) {
    if (auto s = DecodeToken(list, page_token, &page); !s.ok()) return s;
  }
  return page;
}

// A listing's entries as its snapshot holds them: each one's sort key and
// the entry serialized. About 100 bytes an entry where the message object,
// a heap string per field, is about 500: a snapshot of 10,000 routes is held
// for the whole listing, and built at once when its first page is read.
using KeyedEntries = VmNetworkService::KeyedEntries;
using Sorted = std::shared_ptr<const KeyedEntries>;

// Adds a snapshot's serialized entry to a page. The bytes are our own
// serialization of this message type: parsing cannot fail.
void AddParsed(const std::string& bytes, google::protobuf::MessageLite* to) {
  bool parsed = to->ParseFromString(bytes);
  assert(parsed);
  (void)parsed;
}

Sorted SortEntries(KeyedEntries entries) {
  std::sort(entries.begin(), entries.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  return std::make_shared<const KeyedEntries>(std::move(entries));
}

// The later pages of a listing are served from the snapshot its first page
// read: walking every page costs one kernel dump, and the pages come from
// one consistent table. A snapshot lives a minute, or until its last page is
// served; a token whose snapshot is gone continues from a fresh read after
// its last key.
class SnapshotCache {
 public:
  uint64_t Put(const std::string& filters, Sorted entries) {
    vmnet::MutexLock lock(&mu_);
    Expire();
    if (snapshots_.size() >= kMaxSnapshots) snapshots_.erase(snapshots_.begin());
    uint64_t id = ++last_id_;
    snapshots_[id] = {filters, std::move(entries), absl::Now()};
    return id;
  }
  Sorted Get(uint64_t id, const std::string& filters) {
    vmnet::MutexLock lock(&mu_);
    Expire();
    auto it = snapshots_.find(id);
    if (it == snapshots_.end() || it->second.filters != filters) return nullptr;
    return it->second.entries;
  }
  void Erase(uint64_t id) {
    vmnet::MutexLock lock(&mu_);
    snapshots_.erase(id);
  }

 private:
  static constexpr size_t kMaxSnapshots = 16;
  struct Snapshot {
    std::string filters;
    Sorted entries;
    absl::Time created;
  };
  void Expire() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    absl::Time oldest = absl::Now() - absl::Minutes(1);
    absl::erase_if(snapshots_,
                   [&](const auto& kv) { return kv.second.created < oldest; });
  }
  vmnet::Mutex mu_;
  uint64_t last_id_ ABSL_GUARDED_BY(mu_) = 0;
  absl::btree_map<uint64_t, Snapshot> snapshots_ ABSL_GUARDED_BY(mu_);
};

// Fills one page from sorted entries, after `page.after`; returns the next
// page's token, empty at the end.
template <typename Add>
std::string Paginate(const Sorted& entries, const PageRequest& page,
                     absl::string_view list, uint64_t snapshot, Add&& add) {
  auto it = entries->begin();
  if (!page.after.empty()) {
    it = std::upper_bound(
        entries->begin(), entries->end(), page.after,
        [](const std::string& key, const auto& e) { return key < e.first; });
  }
  int n = 0;
  for (; it != entries->end() && n < page.size; ++it, ++n) add(it->second);
  if (it == entries->end() || n == 0) return "";
  return EncodeToken(list, snapshot, std::prev(it)->first);
}

// One page of a listing: from the snapshot the page token names when it is
// still cached, otherwise from a fresh `read()` (a StatusOr of keyed
// entries), cached when it spans more than one page. Returns the next
// page's token.
template <typename Read, typename Add>
absl::StatusOr<std::string> ServePage(SnapshotCache& cache, const PageRequest& page,
                                      absl::string_view list, const std::string& filters,
                                      Read&& read, Add&& add) {
  uint64_t snapshot = page.snapshot;
  Sorted entries = snapshot != 0 ? cache.Get(snapshot, filters) : nullptr;
  if (entries == nullptr) {
    auto fresh = read();
    if (!fresh.ok()) return fresh.status();
    entries = SortEntries(std::move(*fresh));
    snapshot =
        static_cast<int>(entries->size()) > page.size ? cache.Put(filters, entries) : 0;
  }
  std::string next = Paginate(entries, page, list, snapshot, std::forward<Add>(add));
  // The listing is done: its snapshot (10,000 entries: megabytes) goes now.
  if (next.empty() && snapshot != 0) cache.Erase(snapshot);
  return next;
}

// The state as `ip neigh` names it.
std::string NeighborStateName(uint16_t state) {
  static constexpr std::pair<uint16_t, const char*> kNames[] = {
      {NUD_INCOMPLETE, "INCOMPLETE"}, {NUD_REACHABLE, "REACHABLE"},
      {NUD_STALE, "STALE"},           {NUD_DELAY, "DELAY"},
      {NUD_PROBE, "PROBE"},           {NUD_FAILED, "FAILED"},
      {NUD_NOARP, "NOARP"},           {NUD_PERMANENT, "PERMANENT"}};
  std::string out;
  for (const auto& [bit, name] : kNames) {
    if (state & bit) absl::StrAppend(&out, out.empty() ? "" : ",", name);
  }
  return out.empty() ? "NONE" : out;
}

absl::Status CheckFamily(v1::AddressFamily family) {
  if (!v1::AddressFamily_IsValid(family)) {
    return absl::InvalidArgumentError(
        absl::StrCat("family: ", static_cast<int>(family), " is not an AddressFamily"));
  }
  return absl::OkStatus();
}

bool FamilyMatches(v1::AddressFamily family, const IpAddress& address) {
  return family == v1::ADDRESS_FAMILY_UNSPECIFIED ||
         (family == v1::ADDRESS_FAMILY_IPV4) == address.is_v4();
}

v1::AddressFamily FamilyOf(const IpAddress& address) {
  return address.is_v4() ? v1::ADDRESS_FAMILY_IPV4 : v1::ADDRESS_FAMILY_IPV6;
}

std::string ArpFlags(const kernel::Neighbor& n) {
  if (n.proxy) return "MP";
  std::string flags;
  if (n.state & kNudValid) flags += "C";
  if (n.state & NUD_PERMANENT) flags += "M";
  return flags;
}

}  // namespace

struct VmNetworkService::ListCaches {
  SnapshotCache arp;
  SnapshotCache routes;
  SnapshotCache vms;
};

grpc::Status ToGrpc(const absl::Status& status) {
  using grpc::StatusCode;
  StatusCode code;
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return grpc::Status::OK;
    case absl::StatusCode::kInvalidArgument:
      code = StatusCode::INVALID_ARGUMENT;
      break;
    case absl::StatusCode::kNotFound:
      code = StatusCode::NOT_FOUND;
      break;
    case absl::StatusCode::kAlreadyExists:
      code = StatusCode::ALREADY_EXISTS;
      break;
    case absl::StatusCode::kResourceExhausted:
      code = StatusCode::RESOURCE_EXHAUSTED;
      break;
    case absl::StatusCode::kFailedPrecondition:
      code = StatusCode::FAILED_PRECONDITION;
      break;
    case absl::StatusCode::kOutOfRange:
      code = StatusCode::OUT_OF_RANGE;
      break;
    case absl::StatusCode::kPermissionDenied:
      code = StatusCode::PERMISSION_DENIED;
      break;
    case absl::StatusCode::kUnavailable:
      code = StatusCode::UNAVAILABLE;
      break;
    case absl::StatusCode::kAborted:
      code = StatusCode::ABORTED;
      break;
    case absl::StatusCode::kCancelled:
      code = StatusCode::CANCELLED;
      break;
    case absl::StatusCode::kDeadlineExceeded:
      code = StatusCode::DEADLINE_EXCEEDED;
      break;
    case absl::StatusCode::kUnimplemented:
      code = StatusCode::UNIMPLEMENTED;
      break;
    default:
      code = StatusCode::INTERNAL;
      break;
  }
  return grpc::Status(code, std::string(status.message()));
}

VmNetworkService::VmNetworkService(Reconciler* reconciler, kernel::Kernel* kernel,
                                   EventLog* events, RequestStats* stats,
                                   ServiceOptions options)
    : reconciler_(reconciler),
      kernel_(kernel),
      events_(events),
      stats_(stats),
      options_(std::move(options)),
      caches_(std::make_unique<ListCaches>()) {}

VmNetworkService::~VmNetworkService() = default;

void VmNetworkService::ServeAttachVm(UnaryCall* call, const v1::AttachVmRequest* request,
                                     v1::AttachVmResponse* response) {
  if (auto s = ValidateRequestId(request->request_id()); !s.ok()) {
    return Reply(call, "AttachVm", ToGrpc(s));
  }
  if (!reconciler_->ready()) return Reply(call, "AttachVm", kStarting);
  std::vector<std::string> addresses(request->ip_addresses().begin(),
                                     request->ip_addresses().end());
  std::vector<size_t> request_index;
  auto spec = ParseVmSpec(request->vm_id(), request->interface(), addresses,
                          request->mac_address(), options_.rules, &request_index);
  if (!spec.ok()) return Reply(call, "AttachVm", ToGrpc(spec.status()));
  std::vector<std::string> prefixes(request->allowed_source_prefixes().begin(),
                                    request->allowed_source_prefixes().end());
  auto allowed = ParseSourcePrefixes(prefixes, options_.rules);
  if (!allowed.ok()) return Reply(call, "AttachVm", ToGrpc(allowed.status()));
  spec->allowed_source_prefixes = std::move(*allowed);
  if (request->has_bandwidth()) {
    const v1::Bandwidth& b = request->bandwidth();
    auto bandwidth =
        ParseBandwidth(b.ingress_bits_per_second(), b.egress_bits_per_second(),
                       b.burst_bytes(), b.egress_packets_per_second(), options_.rules);
    if (!bandwidth.ok()) return Reply(call, "AttachVm", ToGrpc(bandwidth.status()));
    spec->bandwidth = *bandwidth;
  }
  auto* reactor = call;
  VmSpec sent = *spec;
  reconciler_->Attach(
      std::move(*spec), request->validate_only(), request->request_id(),
      [this, reactor, response, sent = std::move(sent),
       request_index = std::move(request_index)](absl::StatusOr<VmView> vm) {
        if (!vm.ok()) {
          Finish(reactor, "AttachVm",
                 ToGrpc(NameAddressField(vm.status(), sent, request_index)));
          return;
        }
        *response->mutable_vm() = ToProto(*vm);
        Finish(reactor, "AttachVm", grpc::Status::OK);
      });
}

void VmNetworkService::ServeDetachVm(UnaryCall* call, const v1::DetachVmRequest* request,
                                     v1::DetachVmResponse*) {
  if (auto s = ValidateVmId(request->vm_id()); !s.ok())
    return Reply(call, "DetachVm", ToGrpc(s));
  if (auto s = ValidateRequestId(request->request_id()); !s.ok()) {
    return Reply(call, "DetachVm", ToGrpc(s));
  }
  if (!reconciler_->ready()) return Reply(call, "DetachVm", kStarting);
  auto* reactor = call;
  reconciler_->Detach(
      request->vm_id(), request->allow_missing(), request->request_id(),
      [this, reactor](absl::Status s) { Finish(reactor, "DetachVm", ToGrpc(s)); });
}

void VmNetworkService::ServeGetVm(UnaryCall* call, const v1::GetVmRequest* request,
                                  v1::GetVmResponse* response) {
  if (auto s = ValidateVmId(request->vm_id()); !s.ok()) {
    return Reply(call, "GetVm", ToGrpc(s));
  }
  auto vm = reconciler_->FindVm(request->vm_id());
  if (!vm) {
    return Reply(call, "GetVm",
                 grpc::Status(grpc::StatusCode::NOT_FOUND,
                              absl::StrCat("vm_id: no VM \"", request->vm_id(),
                                           "\" is attached")));
  }
  *response->mutable_vm() = ToProto(*vm);
  return Reply(call, "GetVm", grpc::Status::OK);
}

void VmNetworkService::ServeListVms(UnaryCall* call, const v1::ListVmsRequest* request,
                                    v1::ListVmsResponse* response) {
  auto page = ParsePaging("vms", request->page_size(), request->page_token(), "", "");
  if (!page.ok()) return Reply(call, "ListVms", ToGrpc(page.status()));
  if (!v1::VmState_IsValid(request->state())) {
    return Reply(
        call, "ListVms",
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                     absl::StrCat("state: ", request->state(), " is not a VmState")));
  }
  auto token = ServePage(
      caches_->vms, *page, "vms", absl::StrCat(request->state()),
      [&]() -> absl::StatusOr<KeyedEntries> {
        KeyedEntries read;
        for (const VmView& vm : reconciler_->Vms()) {
          v1::Vm proto = ToProto(vm);
          if (request->state() != v1::VM_STATE_UNSPECIFIED &&
              proto.state() != request->state()) {
            continue;
          }
          read.emplace_back(vm.spec->vm_id, proto.SerializeAsString());
        }
        return read;
      },
      [&](const std::string& vm) { AddParsed(vm, response->add_vms()); });
  response->set_next_page_token(*token);  // reading the VMs cannot fail
  return Reply(call, "ListVms", grpc::Status::OK);
}

absl::StatusOr<VmNetworkService::KeyedEntries> VmNetworkService::ReadArp(
    const v1::ListArpRequest& request) const {
  auto snapshot =
      kernel_->Dump(kernel::DumpSelection::Only(true, false, false, true, true));
  if (!snapshot.ok()) return snapshot.status();
  absl::flat_hash_map<int, std::string> names;
  for (const auto& l : snapshot->links) names[l.ifindex] = l.name;

  KeyedEntries entries;
  entries.reserve(snapshot->neighbors.size());
  v1::ArpEntry e;  // one, cleared for each entry: its strings are reused
  for (const kernel::Neighbor& n : snapshot->neighbors) {
    // As /proc/net/arp and `ip neigh`: entries that never need resolution
    // are not shown.
    if (!n.proxy && (n.state & NUD_NOARP)) continue;
    if (!FamilyMatches(request.family(), n.address)) continue;
    e.Clear();
    e.set_ip_address(n.address.ToString());
    e.set_family(FamilyOf(n.address));
    e.set_proxy(n.proxy);
    if (!n.proxy) e.set_state(NeighborStateName(n.state));
    if (n.lladdr && !n.proxy) e.set_lladdr(n.lladdr->ToString());
    e.set_interface(names[n.ifindex]);
    e.set_flags(ArpFlags(n));
    if (n.proxy) {
      e.set_hw_type("*");
      e.set_hw_address("*");
    } else if (n.lladdr && (n.state & kNudValid)) {
      e.set_hw_type("ether");
      e.set_hw_address(n.lladdr->ToString());
    } else {
      e.set_hw_address("(incomplete)");
    }
    // An entry belongs to a VM when it is for one of its addresses, or on
    // its link.
    std::string vm = reconciler_->VmOfAddress(n.address);
    if (vm.empty()) vm = reconciler_->VmOfInterface(e.interface());
    e.set_vm_id(vm);
    if (!request.interface().empty() && e.interface() != request.interface()) continue;
    if (!request.vm_id().empty() && e.vm_id() != request.vm_id()) continue;
    std::string key =
        absl::StrCat(e.interface(), "|", AddressKey(n.address), "|", n.proxy ? "p" : "n");
    entries.emplace_back(std::move(key), e.SerializeAsString());
  }
  return entries;
}

absl::StatusOr<VmNetworkService::KeyedEntries> VmNetworkService::ReadRoutes(
    const v1::ListRoutesRequest& request) const {
  auto snapshot =
      kernel_->Dump(kernel::DumpSelection::Only(true, false, true, false, false));
  if (!snapshot.ok()) return snapshot.status();
  absl::flat_hash_map<int, std::string> names;
  for (const auto& l : snapshot->links) names[l.ifindex] = l.name;

  KeyedEntries entries;
  entries.reserve(snapshot->routes.size());
  v1::RouteEntry e;  // one, cleared for each entry: its strings are reused
  for (const kernel::Route& r : snapshot->routes) {
    if (!FamilyMatches(request.family(), r.destination.address)) continue;
    e.Clear();
    e.set_destination(r.destination.ToString());
    e.set_interface(r.ifindex != 0 ? names[r.ifindex] : "");
    if (r.gateway.family() != IpAddress::Family::kNone)
      e.set_gateway(r.gateway.ToString());
    if (r.source.family() != IpAddress::Family::kNone) e.set_source(r.source.ToString());
    e.set_protocol(r.protocol == options_.route_protocol
                       ? "vmnet"
                       : kernel::RouteProtocolName(r.protocol));
    e.set_scope(kernel::RouteScopeName(r.scope));
    e.set_table(kernel::RouteTableName(r.table));
    e.set_type(kernel::RouteTypeName(r.type));
    e.set_metric(r.metric);
    std::string vm;
    if (r.destination.length == r.destination.address.bit_length()) {
      vm = reconciler_->VmOfAddress(r.destination.address);
    }
    if (vm.empty() && !e.interface().empty())
      vm = reconciler_->VmOfInterface(e.interface());
    e.set_vm_id(vm);
    if (!request.interface().empty() && e.interface() != request.interface()) continue;
    if (!request.vm_id().empty() && e.vm_id() != request.vm_id()) continue;
    std::string key =
        absl::StrFormat("%s/%03d|%s|%010u", AddressKey(r.destination.address),
                        r.destination.length, e.interface(), r.metric);
    entries.emplace_back(std::move(key), e.SerializeAsString());
  }
  return entries;
}

namespace {

// The paging and the filters ListArp and ListRoutes share: the page, the
// family, and the key under which the listing's snapshot is kept.
template <typename Request, typename Read, typename Add>
absl::StatusOr<std::string> ServeFilteredPage(SnapshotCache& cache,
                                              absl::string_view list,
                                              const Request& request, Read&& read,
                                              Add&& add) {
  auto page = ParsePaging(list, request.page_size(), request.page_token(),
                          request.interface(), request.vm_id());
  if (!page.ok()) return page.status();
  if (auto s = CheckFamily(request.family()); !s.ok()) return s;
  return ServePage(cache, *page, list,
                   absl::StrCat(request.interface(), "|", request.vm_id(), "|",
                                static_cast<int>(request.family())),
                   std::forward<Read>(read), std::forward<Add>(add));
}

}  // namespace

void VmNetworkService::ServeListArp(UnaryCall* call, const v1::ListArpRequest* request,
                                    v1::ListArpResponse* response) {
  auto token = ServeFilteredPage(
      caches_->arp, "arp", *request, [&] { return ReadArp(*request); },
      [&](const std::string& e) { AddParsed(e, response->add_entries()); });
  if (!token.ok()) return Reply(call, "ListArp", ToGrpc(token.status()));
  response->set_next_page_token(*token);
  return Reply(call, "ListArp", grpc::Status::OK);
}

void VmNetworkService::ServeListRoutes(UnaryCall* call,
                                       const v1::ListRoutesRequest* request,
                                       v1::ListRoutesResponse* response) {
  auto token = ServeFilteredPage(
      caches_->routes, "routes", *request, [&] { return ReadRoutes(*request); },
      [&](const std::string& e) { AddParsed(e, response->add_routes()); });
  if (!token.ok()) return Reply(call, "ListRoutes", ToGrpc(token.status()));
  response->set_next_page_token(*token);
  return Reply(call, "ListRoutes", grpc::Status::OK);
}

namespace {

// A Watch message holds as many queued events as fit in this many bytes (at
// least one): a burst or a snapshot goes out in a few messages, each far
// below gRPC's default 4 MiB receive limit.
constexpr size_t kMaxMessageBytes = 256 * 1024;

// One Watch stream: a bounded queue of Chunks filled by the event log,
// drained by one write in flight at a time. Each write is one WatchResponse
// made of every Chunk queued (up to kMaxMessageBytes): their bytes, shared
// with every other watcher, one after the other without a copy. A reconcile
// pass that published 40 events is one Chunk, queued with one push; gRPC's
// cost per message (a call batch, a pass through the transport, a
// completion) is paid per write. A write is started by the log's sender
// thread (Flush) or when the previous one is done (OnWriteDone), never on
// the thread that publishes (the reconciler's). The queue's limit counts
// events: a watcher is cut off when what it has not yet been sent would
// exceed it, except that a watcher with nothing queued takes any one pass.
class WatchReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer>,
                           public Watcher {
 public:
  WatchReactor(EventLog* log, RequestStats* stats, size_t queue_limit)
      : log_(log), stats_(stats), queue_limit_(queue_limit) {}

  void Begin(const v1::WatchRequest& request, std::chrono::milliseconds progress) {
    {
      vmnet::MutexLock lock(&mu_);
      subscribing_ = true;  // events pushed meanwhile wait for the headers
    }
    absl::Status s = log_->Subscribe(this, request.vm_id(), request.from_revision(),
                                     request.initial_snapshot(), progress);
    vmnet::MutexLock lock(&mu_);
    subscribing_ = false;
    if (!s.ok()) {
      FinishLocked(ToGrpc(s));
      return;
    }
    // Headers tell the client the watch is in place before any event.
    if (!finished_) StartSendInitialMetadata();
    MaybeWriteLocked();
  }

  bool Push(const Chunk& chunk) override {
    vmnet::MutexLock lock(&mu_);
    if (live_events_ > 0 && live_events_ + chunk.events > queue_limit_) return false;
    queue_.push_back(chunk);
    live_events_ += chunk.events;
    return true;  // written from Flush, on the log's sender thread
  }

  void Flush() override {
    vmnet::MutexLock lock(&mu_);
    MaybeWriteLocked();
  }

  void PushBacklog(const Chunk& chunk) override {
    vmnet::MutexLock lock(&mu_);
    queue_.push_back(chunk);
    ++backlog_;  // called only before any live event is queued
  }

  void PushProgress(uint64_t, const grpc::Slice& message) override {
    vmnet::MutexLock lock(&mu_);
    if (writing_ || finished_ || closing_ || subscribing_ || !queue_.empty()) {
      return;  // not idle
    }
    current_ = grpc::ByteBuffer(&message, 1);
    writing_ = true;
    StartWrite(&current_);
  }

  void Close(absl::Status status) override {
    vmnet::MutexLock lock(&mu_);
    closing_ = true;
    close_status_ = ToGrpc(status);
    // A slow watcher is cut off at once; on shutdown, what is queued is sent.
    if (!status.ok()) {
      queue_.clear();
      backlog_ = 0;
      live_events_ = 0;
    }
    MaybeWriteLocked();
  }

  void OnWriteDone(bool ok) override {
    vmnet::MutexLock lock(&mu_);
    writing_ = false;
    if (!ok) {
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "stream closed"));
      return;
    }
    MaybeWriteLocked();
  }

  void OnCancel() override {
    vmnet::MutexLock lock(&mu_);
    FinishLocked(grpc::Status::CANCELLED);
  }

  void OnDone() override {
    log_->Unsubscribe(this);
    delete this;
  }

 private:
  void MaybeWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_ || subscribing_) return;
    if (!queue_.empty()) {
      slices_.clear();
      size_t bytes = 0;
      while (!queue_.empty() && (slices_.empty() || bytes + queue_.front().bytes.size() <=
                                                        kMaxMessageBytes)) {
        Chunk& c = queue_.front();
        bytes += c.bytes.size();
        if (backlog_ > 0) {
          --backlog_;  // the backlog is at the front
        } else {
          live_events_ -= c.events;
        }
        slices_.push_back(std::move(c.bytes));
        queue_.pop_front();
      }
      // The buffer refers to the slices (a reference each), not a copy.
      current_ = grpc::ByteBuffer(slices_.data(), slices_.size());
      slices_.clear();
      writing_ = true;
      StartWrite(&current_);
      return;
    }
    if (closing_) FinishLocked(close_status_);
  }

  void FinishLocked(grpc::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (finished_) return;
    finished_ = true;
    if (stats_ != nullptr) stats_->Record("Watch", status.error_code());
    Finish(std::move(status));
  }

  EventLog* const log_;
  RequestStats* const stats_;
  const size_t queue_limit_;
  vmnet::Mutex mu_;
  std::deque<Chunk> queue_ ABSL_GUARDED_BY(mu_);
  size_t backlog_ ABSL_GUARDED_BY(mu_) = 0;      // snapshot/replay chunks at the front
  size_t live_events_ ABSL_GUARDED_BY(mu_) = 0;  // events in the other chunks
  std::vector<grpc::Slice> slices_ ABSL_GUARDED_BY(mu_);  // the next message's parts
  grpc::ByteBuffer current_ ABSL_GUARDED_BY(mu_);  // kept alive while being written
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool subscribing_ ABSL_GUARDED_BY(mu_) = false;
  bool closing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status close_status_ ABSL_GUARDED_BY(mu_);
};

// progress_interval: unset or zero is none; otherwise 100 ms to 1 hour.
absl::StatusOr<std::chrono::milliseconds> ProgressInterval(const v1::WatchRequest& r) {
  if (!r.has_progress_interval()) return std::chrono::milliseconds(0);
  const auto& d = r.progress_interval();
  auto invalid = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("progress_interval: ", d.seconds(), "s ", d.nanos(), "ns ", why,
                     "; give 0 (no progress messages) or from 0.1 s to 3600 s"));
  };
  if (d.nanos() < 0 || d.nanos() > 999'999'999 || d.seconds() < 0) {
    return invalid("is negative or not a valid Duration");
  }
  if (d.seconds() > 3600 || (d.seconds() == 3600 && d.nanos() > 0)) {
    return invalid("is over 1 hour");
  }
  auto ms = std::chrono::milliseconds(d.seconds() * 1000 + d.nanos() / 1'000'000);
  if (d.seconds() == 0 && d.nanos() == 0) return ms;
  if (ms < std::chrono::milliseconds(100)) return invalid("is under 100 ms");
  return ms;
}

}  // namespace

grpc::ServerWriteReactor<grpc::ByteBuffer>* VmNetworkService::Watch(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* raw_request) {
  auto* reactor = new WatchReactor(events_, stats_, options_.watch_queue);
  if (auto denied = Authorize(*context, "Watch"); !denied.ok()) {
    reactor->Close(absl::PermissionDeniedError(denied.error_message()));
    return reactor;
  }
  v1::WatchRequest parsed;
  grpc::ByteBuffer bytes(*raw_request);  // Deserialize consumes its buffer
  if (!grpc::SerializationTraits<v1::WatchRequest>::Deserialize(&bytes, &parsed).ok()) {
    reactor->Close(absl::InvalidArgumentError(
        absl::StrCat("the request could not be parsed as a ",
                     v1::WatchRequest::descriptor()->full_name(), kUnparsable)));
    return reactor;
  }
  const v1::WatchRequest* request = &parsed;
  if (!request->vm_id().empty()) {
    if (auto s = ValidateVmId(request->vm_id()); !s.ok()) {
      reactor->Close(s);
      return reactor;
    }
  }
  auto progress = ProgressInterval(*request);
  if (!progress.ok()) {
    reactor->Close(progress.status());
    return reactor;
  }
  if (!reconciler_->ready()) {
    reactor->Close(absl::UnavailableError(kStarting.error_message()));
    return reactor;
  }
  if (events_->watcher_count() >= options_.max_watchers) {
    reactor->Close(absl::ResourceExhaustedError(
        absl::StrCat("this agent serves ", options_.max_watchers,
                     " watchers, the limit (--max-watchers)")));
    return reactor;
  }
  reactor->Begin(*request, *progress);
  return reactor;
}

grpc::ServerUnaryReactor* HealthService::Check(
    grpc::CallbackServerContext* context,
    const grpc::health::v1::HealthCheckRequest* request,
    grpc::health::v1::HealthCheckResponse* response) {
  using grpc::health::v1::HealthCheckResponse;
  const std::string& service = request->service();
  if (!service.empty() && service != "vmnet.v1.VmNetwork") {
    auto* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND,
                                 "service: unknown; use \"\" or \"vmnet.v1.VmNetwork\""));
    return reactor;
  }
  bool serving = reconciler_->ready() && !draining_.load();
  response->set_status(serving ? HealthCheckResponse::SERVING
                               : HealthCheckResponse::NOT_SERVING);
  auto* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace vmnet
