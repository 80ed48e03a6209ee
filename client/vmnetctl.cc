// vmnetctl: the operator's command line for vmnetd.
//
//   vmnetctl [--server=ADDR] [--ca=PEM --cert=PEM --key=PEM]
//   [--output=text|json] COMMAND [ARGS]
//
// unix:// and loopback servers are spoken to in plaintext; any other host:port
// with TLS, and vmnetd's remote listeners require a client certificate (--cert
// and --key).
//
// Exit codes: 0 success, 2 usage error, 3 the server answered with an error
// (the gRPC code is printed), 4 the server could not be reached.
#include <arpa/inet.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "google/protobuf/util/json_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "vmnet/v1/vmnet.grpc.pb.h"

namespace {

constexpr int kExitOk = 0;
constexpr int kExitUsage = 2;
constexpr int kExitServerError = 3;
constexpr int kExitUnreachable = 4;

constexpr char kUsage[] =
    R"(vmnetctl: talk to vmnetd, the host-routed VM network agent.

Usage: vmnetctl [--server=ADDR] [--ca=PEM] [--cert=PEM --key=PEM] [--output=text|json]
                [--timeout=SECONDS] COMMAND [ARGS]

Commands:
  attach VM_ID --interface IF --ip ADDR [--ip ADDR ...] [--mac MAC]
               [--allow-source PREFIX ...] [--ingress-bps N] [--egress-bps N]
               [--burst-bytes N] [--egress-pps N] [--validate-only]
                   Attach a VM (an upsert: the same spec again changes nothing).
                   --allow-source: a source prefix the VM may send from besides
                   its addresses (port security), e.g. 203.0.113.0/24.
                   --ingress-bps, --egress-bps: bandwidth limits in bit/s, towards
                   and from the VM (0 or absent: unlimited); --burst-bytes: their
                   burst (absent: the agent's default); --egress-pps: a packet
                   rate limit from the VM, in packets/s (needs port security).
  detach VM_ID [--allow-missing]
                   Remove what the VM's attach installed.
  get VM_ID        One VM: its spec, state and message.
  list [--state pending|programmed|failed]
                   The attached VMs, one line each, with their state.
  arp [--interface IF] [--vm VM_ID] [--family ipv4|ipv6|all]
                   The host's neighbour table: IPv4 (the default) laid out like
                   `arp -n`, IPv6 like `ip -6 neigh` (proxy entries included).
  routes [--interface IF] [--vm VM_ID] [--family ipv4|ipv6|all]
                   The host's main routing table, like `ip route` (IPv4 by
                   default, as `ip route`; ipv6 as `ip -6 route`).
  watch [--vm VM_ID] [--from-revision N] [--snapshot] [--progress-interval S]
                   Follow VM changes, one line per event; with
                   --progress-interval, a line "REVISION PROGRESS" whenever
                   nothing happened for S seconds.
  health           The agent's health (SERVING once its first sync is done).

Options:
  --server=ADDR    unix:///path or host:port (default unix:///run/vmnetd/vmnetd.sock).
                   unix:// and loopback addresses speak plaintext; any other
                   host:port speaks TLS, and vmnetd's remote listeners require a
                   client certificate (--cert, --key).
  --ca=PEM         CA certificates that verify the server's certificate
                   (default: the system's trusted CAs). Implies TLS.
  --cert=PEM       this client's certificate (chain); give --key too. Implies TLS.
  --key=PEM        the private key of --cert.
  --plaintext      no TLS, even to a non-loopback host:port (a vmnetd run with
                   --insecure).
  --output=FORMAT  text (default) or json, for scripts
  --timeout=S      deadline of each call in seconds (default 30; watch has none)

Exit codes: 0 success, 2 usage error, 3 server error (the gRPC code is printed),
4 server unreachable (including a refused TLS handshake; the reason is printed).
)";

struct Args {
  std::string server = "unix:///run/vmnetd/vmnetd.sock";
  std::string output = "text";
  int timeout_s = 30;
  std::string ca, cert, key;  // PEM file names; any of them means TLS
  bool plaintext = false;
  std::string command;
  std::vector<std::string> positional;
  std::multimap<std::string, std::string> options;  // --name value
  std::vector<std::string> switches;                // --name
};

int Usage(const std::string& error) {
  std::cerr << "vmnetctl: " << error << "\n\nRun 'vmnetctl --help' for usage.\n";
  return kExitUsage;
}

bool IsSwitch(const std::string& name) {
  return name == "validate-only" || name == "allow-missing" || name == "snapshot" ||
         name == "help" || name == "plaintext";
}

// Returns an error message, or "" when the arguments parse.
std::string Parse(int argc, char** argv, Args* args) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (!absl::StartsWith(a, "--")) {
      if (args->command.empty()) {
        args->command = a;
      } else {
        args->positional.push_back(a);
      }
      continue;
    }
    std::string name = a.substr(2), value;
    size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    } else if (!IsSwitch(name)) {
      if (i + 1 >= argc) return absl::StrCat("--", name, " needs a value");
      value = argv[++i];
    }
    if (name == "server") {
      args->server = value;
    } else if (name == "output") {
      if (value != "text" && value != "json") return "--output: give text or json";
      args->output = value;
    } else if (name == "timeout") {
      if (!absl::SimpleAtoi(value, &args->timeout_s) || args->timeout_s <= 0) {
        return "--timeout: give a positive number of seconds";
      }
    } else if (name == "ca" || name == "cert" || name == "key") {
      if (value.empty()) return absl::StrCat("--", name, ": give a PEM file");
      (name == "ca" ? args->ca : name == "cert" ? args->cert : args->key) = value;
    } else if (name == "plaintext") {
      args->plaintext = true;
    } else if (IsSwitch(name)) {
      args->switches.push_back(name);
    } else {
      args->options.emplace(name, value);
    }
  }
  return "";
}

// A rate for people: "20 Mbit/s", "1.5 Gbit/s", "unlimited".
std::string RateText(uint64_t bits_per_second) {
  if (bits_per_second == 0) return "unlimited";
  const char* units[] = {"bit/s", "kbit/s", "Mbit/s", "Gbit/s"};
  double v = static_cast<double>(bits_per_second);
  int unit = 0;
  while (v >= 1000 && unit < 3) {
    v /= 1000;
    ++unit;
  }
  return absl::StrFormat("%g %s", v, units[unit]);
}

// "ingress 20 Mbit/s, egress unlimited, burst default[, egress 200 packets/s]",
// or "unlimited".
std::string BandwidthText(const vmnet::v1::Vm& vm) {
  if (!vm.has_bandwidth()) return "unlimited";
  const vmnet::v1::Bandwidth& b = vm.bandwidth();
  std::string text =
      absl::StrCat("ingress ", RateText(b.ingress_bits_per_second()), ", egress ",
                   RateText(b.egress_bits_per_second()), ", burst ",
                   b.burst_bytes() == 0 ? std::string("default")
                                        : absl::StrCat(b.burst_bytes(), " bytes"));
  if (b.egress_packets_per_second() != 0)
    absl::StrAppend(&text, ", egress ", b.egress_packets_per_second(), " packets/s");
  return text;
}

bool Has(const Args& args, const std::string& name) {
  return std::find(args.switches.begin(), args.switches.end(), name) !=
         args.switches.end();
}

std::string Option(const Args& args, const std::string& name) {
  auto it = args.options.find(name);
  return it == args.options.end() ? "" : it->second;
}

// --family: ipv4 (the default, as `arp -n` and `ip route`), ipv6 or all.
std::optional<vmnet::v1::AddressFamily> FamilyOption(const Args& args) {
  std::string family = Option(args, "family");
  if (family.empty() || family == "ipv4") return vmnet::v1::ADDRESS_FAMILY_IPV4;
  if (family == "ipv6") return vmnet::v1::ADDRESS_FAMILY_IPV6;
  if (family == "all") return vmnet::v1::ADDRESS_FAMILY_UNSPECIFIED;
  return std::nullopt;
}

// Refuses options the command does not take, so a typo is not silently ignored.
std::string CheckOptions(const Args& args, const std::vector<std::string>& allowed) {
  for (const auto& [name, value] : args.options) {
    if (std::find(allowed.begin(), allowed.end(), name) == allowed.end()) {
      return absl::StrCat(args.command, ": unknown option --", name);
    }
  }
  for (const std::string& name : args.switches) {
    if (name != "help" &&
        std::find(allowed.begin(), allowed.end(), name) == allowed.end()) {
      return absl::StrCat(args.command, ": unknown option --", name);
    }
  }
  return "";
}

// The contents of a PEM file, or an error message naming the flag and the file.
std::string ReadPem(const std::string& flag, const std::string& path, std::string* pem) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::StrCat("--", flag, ": cannot read ", path, ": ", std::strerror(errno));
  }
  pem->clear();
  char buffer[4096];
  ssize_t n;
  while ((n = read(fd, buffer, sizeof(buffer))) > 0) pem->append(buffer, n);
  int error = errno;
  close(fd);
  if (n < 0) {
    return absl::StrCat("--", flag, ": cannot read ", path, ": ", std::strerror(error));
  }
  if (!absl::StrContains(*pem, "-----BEGIN ")) {
    return absl::StrCat("--", flag, ": ", path, " is not a PEM file");
  }
  return "";
}

// True for a host:port (or gRPC's dns:, ipv4:, ipv6: targets) on this machine's loopback.
bool IsLoopbackTarget(std::string target) {
  for (const char* scheme : {"dns:///", "dns:", "ipv4:", "ipv6:"}) {
    if (absl::StartsWith(target, scheme)) {
      target = target.substr(std::strlen(scheme));
      break;
    }
  }
  std::string host = target;
  if (absl::StartsWith(target, "[")) {
    host = target.substr(1, target.find(']') - 1);
  } else if (size_t colon = target.rfind(':'); colon != std::string::npos) {
    host = target.substr(0, colon);
  }
  if (host == "localhost") return true;
  in_addr v4;
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6;
  return inet_pton(AF_INET6, host.c_str(), &v6) == 1 && IN6_IS_ADDR_LOOPBACK(&v6);
}

// How vmnetctl talks to args.server.
struct Transport {
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  // Added to "cannot reach the server": gRPC reports a refused TLS handshake only as a
  // connection that failed or closed.
  std::string unreachable_hint;
};

// The transport to args.server, or an error message (a usage error).
std::string MakeTransport(const Args& args, Transport* out) {
  bool tls_flags = !args.ca.empty() || !args.cert.empty() || !args.key.empty();
  if (args.cert.empty() != args.key.empty()) {
    return args.cert.empty()
               ? "--key needs --cert: give the client certificate too"
               : "--cert needs --key: give the certificate's private key too";
  }
  bool unix_socket = absl::StartsWith(args.server, "unix:") ||
                     absl::StartsWith(args.server, "unix-abstract:");
  if (tls_flags && args.plaintext) {
    return "--plaintext contradicts --ca, --cert and --key: give one or the other";
  }
  if (tls_flags && unix_socket) {
    return "--ca, --cert and --key are for host:port servers; unix:// sockets are "
           "plaintext";
  }
  if (args.plaintext || unix_socket || (!tls_flags && IsLoopbackTarget(args.server))) {
    out->credentials = grpc::InsecureChannelCredentials();
    return "";
  }
  grpc::SslCredentialsOptions options;
  if (!args.ca.empty()) {
    if (auto e = ReadPem("ca", args.ca, &options.pem_root_certs); !e.empty()) return e;
  }
  if (!args.cert.empty()) {
    std::string e = ReadPem("cert", args.cert, &options.pem_cert_chain);
    if (e.empty()) e = ReadPem("key", args.key, &options.pem_private_key);
    if (!e.empty()) return e;
  }
  out->credentials = grpc::SslCredentials(options);
  out->unreachable_hint =
      args.cert.empty()
          ? "TLS without a client certificate: vmnetd's TLS listeners require one "
            "(--cert, --key)"
          : "TLS: if the server is up, it refused the handshake: is --cert issued "
            "by a CA of its --tls-client-ca, and does --ca verify its certificate?";
  return "";
}

int ServerError(const grpc::Status& status, const std::string& unreachable_hint) {
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE &&
      (absl::StrContains(status.error_message(), "connect") ||
       absl::StrContains(status.error_message(), "No such file"))) {
    std::cerr << "vmnetctl: cannot reach the server: " << status.error_message() << "\n";
    if (!unreachable_hint.empty()) std::cerr << "vmnetctl: " << unreachable_hint << "\n";
    return kExitUnreachable;
  }
  // gRPC's status codes have absl's numbers and names.
  std::cerr << "vmnetctl: "
            << absl::StatusCodeToString(
                   static_cast<absl::StatusCode>(status.error_code()))
            << ": " << status.error_message() << "\n";
  return kExitServerError;
}

std::string Json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, options);
  return out;
}

std::string StateName(vmnet::v1::VmState state) {
  switch (state) {
    case vmnet::v1::VM_STATE_PENDING:
      return "pending";
    case vmnet::v1::VM_STATE_PROGRAMMED:
      return "programmed";
    case vmnet::v1::VM_STATE_FAILED:
      return "failed";
    default:
      return "unspecified";
  }
}

class Client {
 public:
  Client(const Args& args, const Transport& transport)
      : args_(args),
        unreachable_hint_(transport.unreachable_hint),
        channel_(grpc::CreateChannel(args.server, transport.credentials)),
        stub_(vmnet::v1::VmNetwork::NewStub(channel_)) {}

  int Error(const grpc::Status& status) const {
    return ServerError(status, unreachable_hint_);
  }

  void Prepare(grpc::ClientContext* context, bool deadline = true) const {
    if (deadline) {
      context->set_deadline(std::chrono::system_clock::now() +
                            std::chrono::seconds(args_.timeout_s));
    }
  }

  // Calls a List RPC of the stub (`call`) page by page, 1000 items a page, until the last
  // page, each call with its own deadline; `on_page` gets every response in order.
  // Returns the status of the first call that fails, or OK.
  template <typename Request, typename Response, typename OnPage>
  grpc::Status ForEachPage(grpc::Status (vmnet::v1::VmNetwork::Stub::*call)(
                               grpc::ClientContext*, const Request&, Response*),
                           Request request, OnPage on_page) {
    std::string token;
    do {
      request.set_page_size(1000);
      request.set_page_token(token);
      Response response;
      grpc::ClientContext context;
      Prepare(&context);
      grpc::Status status = ((*stub_).*call)(&context, request, &response);
      if (!status.ok()) return status;
      on_page(response);
      token = response.next_page_token();
    } while (!token.empty());
    return grpc::Status::OK;
  }

  int Attach() {
    if (auto e = CheckOptions(
            args_, {"interface", "ip", "mac", "allow-source", "ingress-bps", "egress-bps",
                    "burst-bytes", "egress-pps", "validate-only"});
        !e.empty()) {
      return Usage(e);
    }
    if (args_.positional.size() != 1) return Usage("attach: give exactly one VM_ID");
    vmnet::v1::AttachVmRequest request;
    request.set_vm_id(args_.positional[0]);
    request.set_interface(Option(args_, "interface"));
    auto [begin, end] = args_.options.equal_range("ip");
    for (auto it = begin; it != end; ++it) request.add_ip_addresses(it->second);
    auto [first, last] = args_.options.equal_range("allow-source");
    for (auto it = first; it != last; ++it)
      request.add_allowed_source_prefixes(it->second);
    request.set_mac_address(Option(args_, "mac"));
    for (const char* name : {"ingress-bps", "egress-bps", "burst-bytes", "egress-pps"}) {
      // A valued option, not a switch (Has() looks at switches only, so the
      // limits were silently dropped before).
      if (args_.options.count(name) == 0) continue;
      uint64_t value = 0;
      if (!absl::SimpleAtoi(Option(args_, name), &value)) {
        return Usage(absl::StrCat("attach: --", name, " takes a number, not \"",
                                  Option(args_, name), "\""));
      }
      vmnet::v1::Bandwidth* b = request.mutable_bandwidth();
      if (std::string(name) == "ingress-bps") b->set_ingress_bits_per_second(value);
      if (std::string(name) == "egress-bps") b->set_egress_bits_per_second(value);
      if (std::string(name) == "burst-bytes") b->set_burst_bytes(value);
      if (std::string(name) == "egress-pps") b->set_egress_packets_per_second(value);
    }
    request.set_validate_only(Has(args_, "validate-only"));
    vmnet::v1::AttachVmResponse response;
    grpc::ClientContext context;
    Prepare(&context);
    grpc::Status status = stub_->AttachVm(&context, request, &response);
    if (!status.ok()) return Error(status);
    if (args_.output == "json") {
      std::cout << Json(response) << "\n";
    } else {
      const auto& vm = response.vm();
      std::cout << vm.vm_id() << " " << StateName(vm.state()) << " interface "
                << vm.interface() << " addresses "
                << absl::StrJoin(vm.ip_addresses(), ",");
      if (!vm.message().empty()) std::cout << ": " << vm.message();
      std::cout << "\n";
    }
    return kExitOk;
  }

  int Detach() {
    if (auto e = CheckOptions(args_, {"allow-missing"}); !e.empty()) return Usage(e);
    if (args_.positional.size() != 1) return Usage("detach: give exactly one VM_ID");
    vmnet::v1::DetachVmRequest request;
    request.set_vm_id(args_.positional[0]);
    request.set_allow_missing(Has(args_, "allow-missing"));
    vmnet::v1::DetachVmResponse response;
    grpc::ClientContext context;
    Prepare(&context);
    grpc::Status status = stub_->DetachVm(&context, request, &response);
    if (!status.ok()) return Error(status);
    if (args_.output == "json") {
      std::cout << "{}\n";
    } else {
      std::cout << args_.positional[0] << " detached\n";
    }
    return kExitOk;
  }

  static void PrintVm(const vmnet::v1::Vm& vm) {
    std::cout << absl::StrFormat("%-24s %-11s %-15s %-34s %s\n", vm.vm_id(),
                                 StateName(vm.state()), vm.interface(),
                                 absl::StrJoin(vm.ip_addresses(), ","), vm.message());
  }
  static void PrintVmHeader() {
    std::cout << absl::StrFormat("%-24s %-11s %-15s %-34s %s\n", "VM", "STATE",
                                 "INTERFACE", "ADDRESSES", "MESSAGE");
  }

  int Get() {
    if (auto e = CheckOptions(args_, {}); !e.empty()) return Usage(e);
    if (args_.positional.size() != 1) return Usage("get: give exactly one VM_ID");
    vmnet::v1::GetVmRequest request;
    request.set_vm_id(args_.positional[0]);
    vmnet::v1::GetVmResponse response;
    grpc::ClientContext context;
    Prepare(&context);
    grpc::Status status = stub_->GetVm(&context, request, &response);
    if (!status.ok()) return Error(status);
    if (args_.output == "json") {
      std::cout << Json(response.vm()) << "\n";
      return kExitOk;
    }
    const auto& vm = response.vm();
    std::cout << "vm_id:       " << vm.vm_id() << "\n"
              << "state:       " << StateName(vm.state()) << "\n"
              << "interface:   " << vm.interface() << "\n"
              << "addresses:   " << absl::StrJoin(vm.ip_addresses(), ", ") << "\n"
              << "mac_address: " << (vm.mac_address().empty() ? "-" : vm.mac_address())
              << "\n"
              << "allowed_source_prefixes: "
              << (vm.allowed_source_prefixes().empty()
                      ? "-"
                      : absl::StrJoin(vm.allowed_source_prefixes(), ", "))
              << "\n"
              << "bandwidth:   " << BandwidthText(vm) << "\n"
              << "revision:    " << vm.revision() << "\n";
    if (!vm.message().empty()) std::cout << "message:     " << vm.message() << "\n";
    return kExitOk;
  }

  int List() {
    if (auto e = CheckOptions(args_, {"state"}); !e.empty()) return Usage(e);
    vmnet::v1::VmState state = vmnet::v1::VM_STATE_UNSPECIFIED;
    if (std::string s = Option(args_, "state"); !s.empty()) {
      if (s == "pending") {
        state = vmnet::v1::VM_STATE_PENDING;
      } else if (s == "programmed") {
        state = vmnet::v1::VM_STATE_PROGRAMMED;
      } else if (s == "failed") {
        state = vmnet::v1::VM_STATE_FAILED;
      } else {
        return Usage("--state: give pending, programmed or failed");
      }
    }
    vmnet::v1::ListVmsRequest request;
    request.set_state(state);
    bool first_page = true;
    auto print_page = [&](const vmnet::v1::ListVmsResponse& response) {
      if (first_page && args_.output == "text") PrintVmHeader();
      first_page = false;
      for (const auto& vm : response.vms()) {
        if (args_.output == "json") {
          std::cout << Json(vm) << "\n";
        } else {
          PrintVm(vm);
        }
      }
    };
    grpc::Status status =
        ForEachPage(&vmnet::v1::VmNetwork::Stub::ListVms, request, print_page);
    return status.ok() ? kExitOk : Error(status);
  }

  int Arp() {
    if (auto e = CheckOptions(args_, {"interface", "vm", "family"}); !e.empty())
      return Usage(e);
    std::vector<vmnet::v1::ArpEntry> entries;
    auto family = FamilyOption(args_);
    if (!family) return Usage("arp: --family: give ipv4, ipv6 or all");
    vmnet::v1::ListArpRequest request;
    request.set_interface(Option(args_, "interface"));
    request.set_vm_id(Option(args_, "vm"));
    request.set_family(*family);
    grpc::Status status =
        ForEachPage(&vmnet::v1::VmNetwork::Stub::ListArp, request,
                    [&](const vmnet::v1::ListArpResponse& response) {
                      entries.insert(entries.end(), response.entries().begin(),
                                     response.entries().end());
                    });
    if (!status.ok()) return Error(status);
    if (args_.output == "json") {
      for (const auto& e : entries) std::cout << Json(e) << "\n";
      return kExitOk;
    }
    if (*family == vmnet::v1::ADDRESS_FAMILY_IPV4) {
      // The columns of net-tools' arp -n.
      std::cout << absl::StrFormat("%-24s %-7s %-19s %-5s %-15s %s\n", "Address",
                                   "HWtype", "HWaddress", "Flags", "Mask", "Iface");
      for (const auto& e : entries) {
        std::cout << absl::StrFormat("%-24s %-7s %-19s %-5s %-15s %s\n", e.ip_address(),
                                     e.hw_type(), e.hw_address(), e.flags(), e.mask(),
                                     e.interface());
      }
      return kExitOk;
    }
    // As `ip neigh` and `ip neigh show proxy` print them.
    for (const auto& e : entries) {
      std::string line = absl::StrCat(e.ip_address(), " dev ", e.interface());
      if (e.proxy()) {
        absl::StrAppend(&line, " proxy");
      } else {
        if (!e.lladdr().empty()) absl::StrAppend(&line, " lladdr ", e.lladdr());
        absl::StrAppend(&line, " ", e.state());
      }
      if (!e.vm_id().empty()) absl::StrAppend(&line, "  # vm ", e.vm_id());
      std::cout << line << "\n";
    }
    return kExitOk;
  }

  int Routes() {
    if (auto e = CheckOptions(args_, {"interface", "vm", "family"}); !e.empty())
      return Usage(e);
    auto family = FamilyOption(args_);
    if (!family) return Usage("routes: --family: give ipv4, ipv6 or all");
    vmnet::v1::ListRoutesRequest request;
    request.set_interface(Option(args_, "interface"));
    request.set_vm_id(Option(args_, "vm"));
    request.set_family(*family);
    grpc::Status status = ForEachPage(
        &vmnet::v1::VmNetwork::Stub::ListRoutes, request,
        [&](const vmnet::v1::ListRoutesResponse& response) {
          for (const auto& r : response.routes()) {
            if (args_.output == "json") {
              std::cout << Json(r) << "\n";
              continue;
            }
            // Laid out as `ip route` prints the main table.
            std::string line = r.destination();
            if (absl::EndsWith(line, "/32") && line.find(':') == std::string::npos) {
              line.resize(line.size() - 3);
            } else if (absl::EndsWith(line, "/128")) {
              line.resize(line.size() - 4);
            }
            if (line == "0.0.0.0/0" || line == "::/0") line = "default";
            if (r.type() != "unicast") line = absl::StrCat(r.type(), " ", line);
            if (!r.gateway().empty()) absl::StrAppend(&line, " via ", r.gateway());
            if (!r.interface().empty()) absl::StrAppend(&line, " dev ", r.interface());
            if (r.protocol() != "boot") absl::StrAppend(&line, " proto ", r.protocol());
            if (r.scope() != "global") absl::StrAppend(&line, " scope ", r.scope());
            if (!r.source().empty()) absl::StrAppend(&line, " src ", r.source());
            if (r.metric() != 0) absl::StrAppend(&line, " metric ", r.metric());
            if (!r.vm_id().empty()) absl::StrAppend(&line, "  # vm ", r.vm_id());
            std::cout << line << "\n";
          }
        });
    return status.ok() ? kExitOk : Error(status);
  }

  int Watch() {
    if (auto e =
            CheckOptions(args_, {"vm", "from-revision", "snapshot", "progress-interval"});
        !e.empty()) {
      return Usage(e);
    }
    vmnet::v1::WatchRequest request;
    request.set_vm_id(Option(args_, "vm"));
    uint64_t from = 0;
    if (!Option(args_, "from-revision").empty() &&
        !absl::SimpleAtoi(Option(args_, "from-revision"), &from)) {
      return Usage("--from-revision: give a revision number");
    }
    request.set_from_revision(from);
    request.set_initial_snapshot(Has(args_, "snapshot"));
    if (!Option(args_, "progress-interval").empty()) {
      double seconds = 0;
      if (!absl::SimpleAtod(Option(args_, "progress-interval"), &seconds) ||
          !(seconds == 0 || (seconds >= 0.1 && seconds <= 3600))) {
        return Usage("--progress-interval: give seconds, from 0.1 to 3600 (0: none)");
      }
      auto nanos = static_cast<int64_t>(seconds * 1e9 + 0.5);
      request.mutable_progress_interval()->set_seconds(nanos / 1'000'000'000);
      request.mutable_progress_interval()->set_nanos(
          static_cast<int32_t>(nanos % 1'000'000'000));
    }
    grpc::ClientContext context;
    Prepare(&context, /*deadline=*/false);
    auto reader = stub_->Watch(&context, request);
    // Each message carries one or more events (or is a progress message):
    // one line per event, as before the messages were batched.
    vmnet::v1::WatchResponse response;
    while (reader->Read(&response)) {
      if (response.has_progress()) {
        if (args_.output == "json") {
          std::cout << Json(response) << std::endl;
        } else {
          std::cout << response.progress().revision() << " PROGRESS" << std::endl;
        }
      }
      for (const vmnet::v1::WatchEvent& event : response.events()) {
        if (args_.output == "json") {
          std::cout << Json(event) << "\n";
          continue;
        }
        std::string type = vmnet::v1::EventType_Name(event.type());
        if (absl::StartsWith(type, "EVENT_TYPE_")) type = type.substr(11);
        std::cout << event.revision() << " " << type;
        if (event.has_vm()) {
          std::cout << " " << event.vm().vm_id() << " " << StateName(event.vm().state());
        }
        if (!event.detail().empty()) std::cout << " " << event.detail();
        std::cout << "\n";
      }
      std::cout << std::flush;
    }
    grpc::Status status = reader->Finish();
    return status.ok() ? kExitOk : Error(status);
  }

  int Health() {
    if (auto e = CheckOptions(args_, {}); !e.empty()) return Usage(e);
    auto stub = grpc::health::v1::Health::NewStub(channel_);
    grpc::health::v1::HealthCheckRequest request;
    grpc::health::v1::HealthCheckResponse response;
    grpc::ClientContext context;
    Prepare(&context);
    grpc::Status status = stub->Check(&context, request, &response);
    if (!status.ok()) return Error(status);
    if (args_.output == "json") {
      std::cout << Json(response) << "\n";
    } else {
      std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(
                       response.status())
                << "\n";
    }
    return response.status() == grpc::health::v1::HealthCheckResponse::SERVING
               ? kExitOk
               : kExitServerError;
  }

 private:
  const Args& args_;
  std::string unreachable_hint_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<vmnet::v1::VmNetwork::Stub> stub_;
};

}  // namespace

int main(int argc, char** argv) {
  Args args;
  if (std::string error = Parse(argc, argv, &args); !error.empty()) return Usage(error);
  if (Has(args, "help") || args.command == "help") {
    std::cout << kUsage;
    return kExitOk;
  }
  if (args.command.empty()) return Usage("give a command");
  Transport transport;
  if (std::string error = MakeTransport(args, &transport); !error.empty()) {
    return Usage(error);
  }
  Client client(args, transport);
  if (args.command == "attach") return client.Attach();
  if (args.command == "detach") return client.Detach();
  if (args.command == "get") return client.Get();
  if (args.command == "list") return client.List();
  if (args.command == "arp") return client.Arp();
  if (args.command == "routes") return client.Routes();
  if (args.command == "watch") return client.Watch();
  if (args.command == "health") return client.Health();
  return Usage(absl::StrCat("unknown command \"", args.command, "\""));
}
