#include "vmnet/kernel/tc_kernel.h"

#include <errno.h>
#include <linux/rtnetlink.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/utsname.h>

#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "vmnet/kernel/netlink_kernel.h"
#include "vmnet/kernel/tc_codec.h"

namespace vmnet::kernel {
namespace {

template <typename Fn>
absl::Status DumpTc(NetlinkSocket& sock, uint16_t type, const tcmsg& header, Fn&& fn) {
  absl::Status status;
  for (int attempt = 0; attempt < 5; ++attempt) {
    status = sock.Dump(type, &header, sizeof(header), fn);
    if (!absl::IsAborted(status)) return status;
  }
  return status;
}

bool FileMentions(const std::string& path, const std::string& needle) {
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.find(needle) != std::string::npos) return true;
  }
  return false;
}

// A module loaded now, or one the running kernel has built in or can load.
bool HasModule(const std::string& name) {
  struct stat st;
  if (stat(absl::StrCat("/sys/module/", name).c_str(), &st) == 0) return true;
  utsname uts{};
  if (uname(&uts) != 0) return false;
  std::string dir = absl::StrCat("/lib/modules/", uts.release, "/");
  std::string file = absl::StrCat("/", name, ".ko");
  return FileMentions(dir + "modules.builtin", file) ||
         FileMentions(dir + "modules.dep", file);
}

}  // namespace

absl::Status DumpQdiscs(std::vector<Qdisc>* out) {
  auto sock = NetlinkSocket::Open({}, 4 << 20);
  if (!sock.ok()) return sock.status();
  tcmsg tcm{};
  tcm.tcm_family = AF_UNSPEC;
  size_t start = out->size();
  absl::Status s = DumpTc(*sock, RTM_GETQDISC, tcm, [&](const nlmsghdr* msg) {
    auto q = ParseQdisc(msg);
    if (q && (q->parent == kRootParent || q->parent == kIngressParent)) {
      out->push_back(std::move(*q));
    }
  });
  if (!s.ok()) out->resize(start);
  return s;
}

absl::Status DumpIngressFilters(const std::vector<Qdisc>& qdiscs,
                                std::vector<TcFilter>* out) {
  auto sock = NetlinkSocket::Open({}, 4 << 20);
  if (!sock.ok()) return sock.status();
  for (const Qdisc& q : qdiscs) {
    if (q.parent != kIngressParent || q.kind != "ingress") continue;
    tcmsg tcm{};
    tcm.tcm_family = AF_UNSPEC;
    tcm.tcm_ifindex = q.ifindex;
    tcm.tcm_parent = kIngressHandle;
    absl::Status s = DumpTc(*sock, RTM_GETTFILTER, tcm, [&](const nlmsghdr* msg) {
      if (auto f = ParseTcFilter(msg)) out->push_back(std::move(*f));
    });
    // A link gone since the qdisc dump has no filters to report.
    if (!s.ok() && !absl::IsNotFound(s) && !absl::IsInvalidArgument(s)) return s;
  }
  return absl::OkStatus();
}

TcCapabilities ProbeTcCapabilities() {
  TcCapabilities caps;
  auto sock = NetlinkSocket::Open({}, 1 << 20);
  if (sock.ok()) {
    std::vector<std::string> errors;
    std::vector<int> result = sock->Transact({EncodePoliceProbe()}, &errors, 1);
    caps.police = !result.empty() && (result[0] == ENOENT || result[0] == 0);
  }
  caps.police = caps.police || HasModule("act_police");
  caps.matchall = HasModule("cls_matchall");
  return caps;
}

}  // namespace vmnet::kernel
