#include "vmnet/kernel/nft_kernel.h"

#include <errno.h>
// The kernel's nfnetlink.h before libnetfilter_conntrack's older copy (same
// include guard), which lacks the nf_tables batch and group numbers.
#include <linux/netfilter/nfnetlink.h>
// clang-format off
#include <libnetfilter_conntrack/libnetfilter_conntrack.h>
// clang-format on
#include <linux/netfilter.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netlink.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "vmnet/kernel/netlink_codec.h"
#include "vmnet/kernel/netlink_kernel.h"
#include "vmnet/kernel/nft_codec.h"

namespace vmnet::kernel {
namespace {

constexpr int kDefaultRcvbuf = 32 << 20;
constexpr size_t kReceiveBuffer = 256 << 10;

void SetIntOption(int fd, int level, int name, int value) {
  // Failures leave defaults in place, which still work.
  setsockopt(fd, level, name, &value, sizeof(value));
}

// A NETLINK_NETFILTER socket, bound; its port in *portid.
absl::StatusOr<int> OpenNetfilterSocket(int rcvbuf, int group, uint32_t* portid) {
  int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
  if (fd < 0) return ErrnoStatus(errno, "open nfnetlink socket");
  int size = rcvbuf > 0 ? rcvbuf : kDefaultRcvbuf;
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) != 0) {
    SetIntOption(fd, SOL_SOCKET, SO_RCVBUF, size);
  }
  SetIntOption(fd, SOL_NETLINK, NETLINK_EXT_ACK, 1);
  SetIntOption(fd, SOL_NETLINK, NETLINK_CAP_ACK, 1);
  sockaddr_nl addr{};
  addr.nl_family = AF_NETLINK;
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    int err = errno;
    close(fd);
    return ErrnoStatus(err, "bind nfnetlink socket");
  }
  socklen_t len = sizeof(addr);
  if (getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0 &&
      portid != nullptr) {
    *portid = addr.nl_pid;
  }
  if (group != 0 &&
      setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof(group)) != 0) {
    int err = errno;
    close(fd);
    return ErrnoStatus(err, absl::StrCat("join nfnetlink group ", group));
  }
  return fd;
}

struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) close(fd);
  }
};

absl::StatusOr<size_t> Receive(int fd, std::vector<uint8_t>* buffer) {
  buffer->resize(kReceiveBuffer);
  while (true) {
    ssize_t n = recv(fd, buffer->data(), buffer->size(), 0);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EINTR) continue;
    return ErrnoStatus(errno, "receive from nfnetlink");
  }
}

// The text of an extended ack (NLMSGERR_ATTR_MSG), when the kernel sent one.
std::string ExtendedAckMessage(const nlmsghdr* msg) {
  if (!(msg->nlmsg_flags & NLM_F_ACK_TLVS)) return "";
  auto* err = static_cast<const nlmsgerr*>(NLMSG_DATA(msg));
  size_t offset = NLMSG_HDRLEN + sizeof(nlmsgerr);
  if (!(msg->nlmsg_flags & NLM_F_CAPPED)) offset += err->msg.nlmsg_len - NLMSG_HDRLEN;
  const char* base = reinterpret_cast<const char*>(msg);
  while (offset + NLA_HDRLEN <= msg->nlmsg_len) {
    auto* nla = reinterpret_cast<const nlattr*>(base + offset);
    if (nla->nla_len < NLA_HDRLEN || offset + nla->nla_len > msg->nlmsg_len) break;
    if ((nla->nla_type & NLA_TYPE_MASK) == NLMSGERR_ATTR_MSG) {
      const char* text = base + offset + NLA_HDRLEN;
      return std::string(text, strnlen(text, nla->nla_len - NLA_HDRLEN));
    }
    offset += NLA_ALIGN(nla->nla_len);
  }
  return "";
}

// Sends one request with `seq` and hands every reply to `fn` until the
// dump is done (or, for a plain GET, the one reply came).
absl::Status Request(int fd, NftMessage request, uint32_t seq, bool dump,
                     absl::FunctionRef<void(const nlmsghdr*)> fn) {
  reinterpret_cast<nlmsghdr*>(request.data())->nlmsg_seq = seq;
  if (send(fd, request.data(), request.size(), 0) < 0) {
    return ErrnoStatus(errno, "send nfnetlink request");
  }
  std::vector<uint8_t> buffer;
  while (true) {
    auto n = Receive(fd, &buffer);
    if (!n.ok()) return n.status();
    bool done = false;
    absl::Status status;
    ForEachMessage(buffer.data(), *n, [&](const nlmsghdr* msg) {
      if (done || msg->nlmsg_seq != seq) return;
      if (msg->nlmsg_type == NLMSG_DONE) {
        done = true;
      } else if (msg->nlmsg_type == NLMSG_ERROR) {
        auto* err = static_cast<const nlmsgerr*>(NLMSG_DATA(msg));
        if (err->error != 0) status = ErrnoStatus(-err->error, "nfnetlink dump");
        done = true;
      } else if (msg->nlmsg_flags & NLM_F_DUMP_INTR) {
        status = absl::AbortedError("nftables dump interrupted by a change");
      } else {
        fn(msg);
        if (!dump) done = true;
      }
    });
    if (done) return status;
  }
}

// One consistent dump of vmnetd's tables into `parser`, on a fresh socket.
// ABORTED when the ruleset changed meanwhile.
absl::Status DumpOnce(NftDumpParser* parser, bool counters_only) {
  auto fd = OpenNetfilterSocket(4 << 20, 0, nullptr);
  if (!fd.ok()) return fd.status();
  FdCloser closer{*fd};
  uint32_t seq = 1;
  std::optional<uint32_t> gen_before, gen_after;
  auto gen = [&](std::optional<uint32_t>* out) {
    return Request(*fd, EncodeGetGeneration(), seq++, false,
                   [&](const nlmsghdr* msg) { *out = ParseGeneration(msg); });
  };
  if (auto s = gen(&gen_before); !s.ok()) return s;
  auto dump = [&](NftMessage request, auto add) {
    return Request(*fd, std::move(request), seq++, true,
                   [&](const nlmsghdr* msg) { (parser->*add)(msg); });
  };
  if (auto s = dump(EncodeDumpTables(), &NftDumpParser::AddTable); !s.ok()) return s;
  for (uint8_t family : {NFPROTO_INET, NFPROTO_ARP}) {
    if (!parser->HasTable(family)) continue;
    if (auto s = dump(EncodeDumpCounters(family), &NftDumpParser::AddCounter); !s.ok())
      return s;
    if (counters_only) continue;
    if (auto s = dump(EncodeDumpChains(family), &NftDumpParser::AddChain); !s.ok())
      return s;
    if (auto s = dump(EncodeDumpRules(family), &NftDumpParser::AddRule); !s.ok())
      return s;
    if (auto s = dump(EncodeDumpSets(family), &NftDumpParser::AddSet); !s.ok()) return s;
    for (const std::string& set : parser->Sets(family)) {
      if (auto s = dump(EncodeDumpElements(family, set), &NftDumpParser::AddElements);
          !s.ok())
        return s;
    }
  }
  if (auto s = gen(&gen_after); !s.ok()) return s;
  if (gen_before != gen_after)
    return absl::AbortedError("nftables ruleset changed during the dump");
  return absl::OkStatus();
}

template <typename Result>
absl::StatusOr<Result> DumpWithRetry(bool counters_only,
                                     Result (*finish)(const NftDumpParser&)) {
  absl::Status status;
  for (int attempt = 0; attempt < 5; ++attempt) {
    NftDumpParser parser;
    status = DumpOnce(&parser, counters_only);
    if (status.ok()) return finish(parser);
    if (!absl::IsAborted(status)) return status;
  }
  return status;
}

NftSnapshot FinishSnapshot(const NftDumpParser& p) { return p.Finish(); }
std::vector<DropCounter> FinishCounters(const NftDumpParser& p) { return p.Counters(); }

}  // namespace

absl::StatusOr<std::unique_ptr<NftKernel>> NftKernel::Create(Options options) {
  uint32_t portid = 0;
  auto writes = OpenNetfilterSocket(0, 0, &portid);
  if (!writes.ok()) return writes.status();
  auto events = OpenNetfilterSocket(options.event_rcvbuf, NFNLGRP_NFTABLES, nullptr);
  if (!events.ok()) {
    close(*writes);
    return events.status();
  }
  return std::unique_ptr<NftKernel>(new NftKernel(options, *writes, portid, *events));
}

NftKernel::~NftKernel() {
  if (write_fd_ >= 0) close(write_fd_);
  if (events_fd_ >= 0) close(events_fd_);
}

std::vector<absl::Status> NftKernel::Apply(absl::Span<const NftWrite> writes) {
  std::vector<absl::Status> result(writes.size());
  std::vector<std::vector<NftMessage>> messages(writes.size());
  std::vector<size_t> batch;
  size_t batch_bytes = 0;
  for (size_t i = 0; i < writes.size(); ++i) {
    if (auto s = EncodeNftWrite(writes[i], &messages[i]); !s.ok()) {
      result[i] = s;
      continue;
    }
    size_t bytes = 0;
    for (const auto& m : messages[i]) bytes += m.size();
    if (!batch.empty() && batch_bytes + bytes > options_.max_batch_bytes) {
      ApplyTransaction(batch, writes, messages, &result);
      batch.clear();
      batch_bytes = 0;
    }
    batch.push_back(i);
    batch_bytes += bytes;
  }
  if (!batch.empty()) ApplyTransaction(batch, writes, messages, &result);
  return result;
}

void NftKernel::ApplyTransaction(const std::vector<size_t>& indices,
                                 absl::Span<const NftWrite> writes,
                                 const std::vector<std::vector<NftMessage>>& messages,
                                 std::vector<absl::Status>* result) {
  // BEGIN, every write's messages, END: one transaction. The kernel answers
  // only failures (no NLM_F_ACK: 100,000 acks would overflow the receive
  // buffer); the reply to a GETGEN sent after the batch says every answer
  // is in, since nfnetlink runs the batch inside the sendmsg.
  std::vector<uint8_t> buf;
  std::vector<size_t> owner;  // per sequence number offset: index into `indices`
  const uint32_t first = next_seq_;
  auto append = [&](const nlmsghdr* nlh, size_t who) {
    size_t offset = buf.size();
    buf.insert(buf.end(), reinterpret_cast<const uint8_t*>(nlh),
               reinterpret_cast<const uint8_t*>(nlh) + NLMSG_ALIGN(nlh->nlmsg_len));
    reinterpret_cast<nlmsghdr*>(buf.data() + offset)->nlmsg_seq =
        first + static_cast<uint32_t>(owner.size());
    owner.push_back(who);
  };
  char edge[NLMSG_SPACE(sizeof(nfgenmsg))] = {};
  auto batch_edge = [&](uint16_t type) {
    std::memset(edge, 0, sizeof(edge));
    auto* nlh = reinterpret_cast<nlmsghdr*>(edge);
    nlh->nlmsg_len = NLMSG_LENGTH(sizeof(nfgenmsg));
    nlh->nlmsg_type = type;
    nlh->nlmsg_flags = NLM_F_REQUEST;
    auto* nfg = static_cast<nfgenmsg*>(NLMSG_DATA(nlh));
    nfg->nfgen_family = AF_UNSPEC;
    nfg->version = NFNETLINK_V0;
    nfg->res_id = htons(NFNL_SUBSYS_NFTABLES);
    return nlh;
  };
  constexpr size_t kNobody = SIZE_MAX;
  append(batch_edge(NFNL_MSG_BATCH_BEGIN), kNobody);
  for (size_t k = 0; k < indices.size(); ++k) {
    for (const NftMessage& m : messages[indices[k]]) {
      append(reinterpret_cast<const nlmsghdr*>(m.data()), k);
    }
  }
  append(batch_edge(NFNL_MSG_BATCH_END), kNobody);
  const uint32_t sync_seq = first + static_cast<uint32_t>(owner.size());
  next_seq_ = sync_seq + 1;

  auto fail_all = [&](const absl::Status& why) {
    for (size_t k : indices) {
      (*result)[k] = absl::Status(why.code(),
                                  absl::StrCat(ToString(writes[k]), ": ", why.message()));
    }
  };
  int sndbuf = static_cast<int>(buf.size() + (64 << 10));
  if (setsockopt(write_fd_, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)) != 0) {
    SetIntOption(write_fd_, SOL_SOCKET, SO_SNDBUF, sndbuf);
  }
  if (send(write_fd_, buf.data(), buf.size(), 0) < 0) {
    fail_all(ErrnoStatus(errno, "send nftables batch"));
    return;
  }
  NftMessage sync = EncodeGetGeneration();
  reinterpret_cast<nlmsghdr*>(sync.data())->nlmsg_seq = sync_seq;
  if (send(write_fd_, sync.data(), sync.size(), 0) < 0) {
    fail_all(ErrnoStatus(errno, "send nftables sync request"));
    return;
  }
  // The first error of each write, and of the batch as a whole.
  std::vector<int> errnos(indices.size(), 0);
  std::vector<std::string> texts(indices.size());
  int batch_errno = 0;
  std::string first_failure;
  std::vector<uint8_t> buffer;
  bool synced = false;
  while (!synced) {
    auto n = Receive(write_fd_, &buffer);
    if (!n.ok()) {
      // Lost answers (ENOBUFS): what was committed is unknown; re-dump.
      fail_all(absl::UnavailableError(
          absl::StrCat("answers to the nftables batch were lost (", n.status().message(),
                       "); dump to see what was applied")));
      return;
    }
    ForEachMessage(buffer.data(), *n, [&](const nlmsghdr* msg) {
      if (msg->nlmsg_seq == sync_seq) {
        synced = true;
        return;
      }
      if (msg->nlmsg_type != NLMSG_ERROR) return;
      auto* err = static_cast<const nlmsgerr*>(NLMSG_DATA(msg));
      if (err->error == 0) return;
      uint32_t offset = msg->nlmsg_seq - first;
      if (offset >= owner.size()) return;
      size_t who = owner[offset];
      std::string text = ExtendedAckMessage(msg);
      if (first_failure.empty()) {
        first_failure =
            ErrnoStatus(-err->error, who == kNobody ? "nftables batch"
                                                    : ToString(writes[indices[who]]))
                .ToString();
      }
      if (who == kNobody) {
        if (batch_errno == 0) batch_errno = -err->error;
      } else if (errnos[who] == 0) {
        errnos[who] = -err->error;
        texts[who] = text;
      }
    });
  }
  if (first_failure.empty()) {
    for (size_t k : indices) (*result)[k] = absl::OkStatus();
    return;
  }
  for (size_t k = 0; k < indices.size(); ++k) {
    const NftWrite& w = writes[indices[k]];
    if (errnos[k] != 0) {
      std::string what = ToString(w);
      if (!texts[k].empty()) absl::StrAppend(&what, " (", texts[k], ")");
      (*result)[indices[k]] = ErrnoStatus(errnos[k], what);
    } else if (batch_errno != 0) {
      (*result)[indices[k]] =
          ErrnoStatus(batch_errno, absl::StrCat(ToString(w), ": nftables batch"));
    } else {
      (*result)[indices[k]] = absl::AbortedError(absl::StrCat(
          ToString(w),
          ": rolled back with its nftables transaction, because: ", first_failure));
    }
  }
}

absl::StatusOr<NftSnapshot> NftKernel::Dump() {
  return DumpWithRetry<NftSnapshot>(false, &FinishSnapshot);
}

absl::StatusOr<std::vector<DropCounter>> NftKernel::ReadDropCounters() {
  return DumpWithRetry<std::vector<DropCounter>>(true, &FinishCounters);
}

absl::Status NftKernel::ReadEvents(std::vector<NftEvent>* events) {
  bool overflow = false;
  event_buffer_.resize(kReceiveBuffer);
  while (true) {
    ssize_t n =
        recv(events_fd_, event_buffer_.data(), event_buffer_.size(), MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      if (errno == ENOBUFS) {
        overflow = true;
        continue;
      }
      return ErrnoStatus(errno, "receive nftables events");
    }
    ForEachMessage(event_buffer_.data(), static_cast<size_t>(n),
                   [&](const nlmsghdr* msg) {
                     for (NftEvent& e : ParseNftEvent(msg, write_portid_))
                       events->push_back(std::move(e));
                   });
  }
  if (overflow) {
    return absl::ResourceExhaustedError(
        "nftables event socket overflowed (ENOBUFS): events were lost; dump again");
  }
  return absl::OkStatus();
}

namespace {

// The batch's addresses, each with the index of its first occurrence (the
// one an entry's deletion is attributed to), and what the dump found.
struct ConntrackMatch {
  absl::flat_hash_map<IpAddress, size_t> wanted;
  // A clone of each matching entry, with the index it is attributed to.
  std::vector<std::pair<nf_conntrack*, size_t>> found;
};

// The index of the batch address that `ct`'s original or reply source is
// (the lower one when both are), or nullopt.
std::optional<size_t> MatchingSource(const ConntrackMatch& match,
                                     const nf_conntrack* ct) {
  std::optional<size_t> best;
  auto consider = [&](int attr, IpAddress::Family family) {
    const void* p = nfct_get_attr(ct, static_cast<nf_conntrack_attr>(attr));
    if (p == nullptr) return;
    auto it = match.wanted.find(IpAddress::FromBytes(family, p));
    if (it != match.wanted.end() && (!best || it->second < *best)) best = it->second;
  };
  if (nfct_get_attr_u8(ct, ATTR_L3PROTO) == AF_INET) {
    consider(ATTR_ORIG_IPV4_SRC, IpAddress::Family::kV4);
    consider(ATTR_REPL_IPV4_SRC, IpAddress::Family::kV4);
  } else {
    consider(ATTR_ORIG_IPV6_SRC, IpAddress::Family::kV6);
    consider(ATTR_REPL_IPV6_SRC, IpAddress::Family::kV6);
  }
  return best;
}

int CollectMatches(enum nf_conntrack_msg_type, nf_conntrack* ct, void* data) {
  auto* match = static_cast<ConntrackMatch*>(data);
  if (std::optional<size_t> index = MatchingSource(*match, ct)) {
    match->found.emplace_back(nfct_clone(ct), *index);
  }
  return NFCT_CB_CONTINUE;
}

}  // namespace

std::vector<absl::StatusOr<ConntrackDeletion>> NftKernel::DeleteConntrack(
    absl::Span<const IpAddress> addresses) {
  std::vector<absl::StatusOr<ConntrackDeletion>> result(addresses.size(),
                                                        ConntrackDeletion{});
  ConntrackMatch match;
  bool v4 = false, v6 = false;
  for (size_t i = 0; i < addresses.size(); ++i) {
    const IpAddress& a = addresses[i];
    if (!a.is_v4() && !a.is_v6()) {
      result[i] =
          absl::InvalidArgumentError("delete conntrack entries: not an IP address");
      continue;
    }
    match.wanted.try_emplace(a, i);
    (a.is_v4() ? v4 : v6) = true;
  }
  if (match.wanted.empty()) return result;
  // Connection tracking registers this file in every namespace once it is
  // in the kernel; without it there is nothing to delete, and asking
  // ctnetlink could make the kernel load modules.
  if (access("/proc/sys/net/netfilter/nf_conntrack_count", F_OK) != 0) return result;
  for (auto& r : result) {
    if (r.ok()) r->conntrack_present = true;
  }
  // Address i's error, from the step that failed for it.
  auto failed = [&](size_t i, int err, absl::string_view step) {
    return ErrnoStatus(
        err, absl::StrCat(step, " conntrack entries of ", addresses[i].ToString()));
  };
  // Every valid address gets the error of a step that failed for all.
  auto fail_all = [&](int err, absl::string_view step) {
    for (size_t i = 0; i < addresses.size(); ++i) {
      if (result[i].ok()) result[i] = failed(i, err, step);
    }
  };
  // One dump for the whole batch, however many addresses: the kernel walks
  // every bucket of the table for each dump, however few entries match.
  // Both families in one walk when both are asked for.
  nfct_handle* dump = nfct_open(CONNTRACK, 0);
  if (dump == nullptr) {
    fail_all(errno, "open ctnetlink for");
    return result;
  }
  nfct_callback_register(dump, NFCT_T_ALL, CollectMatches, &match);
  uint32_t family = v4 && v6 ? AF_UNSPEC : (v4 ? AF_INET : AF_INET6);
  int rc = nfct_query(dump, NFCT_Q_DUMP, &family);
  int dump_errno = errno;
  nfct_close(dump);
  nfct_handle* del = nullptr;
  if (rc < 0) {
    fail_all(dump_errno, "dump");
  } else if (!match.found.empty() && (del = nfct_open(CONNTRACK, 0)) == nullptr) {
    fail_all(errno, "open ctnetlink for");
  }
  for (auto& [ct, i] : match.found) {
    // After a failure, an address's other entries stay (as they did when
    // each address was its own call).
    if (del != nullptr && result[i].ok()) {
      if (nfct_query(del, NFCT_Q_DESTROY, ct) == 0) {
        ++result[i]->deleted;
      } else if (errno != ENOENT) {  // gone meanwhile: what we wanted
        result[i] = failed(i, errno, "delete");
      }
    }
    nfct_destroy(ct);
  }
  if (del != nullptr) nfct_close(del);
  return result;
}

void ApplyPortSecurityWrites(PortSecurityKernel& kernel, absl::Span<const Write> writes,
                             std::vector<absl::Status>* result) {
  std::vector<NftWrite> transaction;
  std::vector<size_t> index;
  for (size_t i = 0; i < writes.size(); ++i) {
    if (auto w = AsNftWrite(writes[i])) {
      transaction.push_back(std::move(*w));
      index.push_back(i);
    }
  }
  std::vector<absl::Status> done = kernel.Apply(transaction);
  for (size_t i = 0; i < index.size(); ++i) (*result)[index[i]] = std::move(done[i]);
  // Every conntrack deletion of the batch in one call: one dump of the
  // table, however many addresses.
  std::vector<IpAddress> addresses;
  index.clear();
  for (size_t i = 0; i < writes.size(); ++i) {
    if (const auto* conntrack = std::get_if<DeleteConntrack>(&writes[i])) {
      addresses.push_back(conntrack->address);
      index.push_back(i);
    }
  }
  if (addresses.empty()) return;
  std::vector<absl::StatusOr<ConntrackDeletion>> deleted =
      kernel.DeleteConntrack(addresses);
  for (size_t i = 0; i < index.size(); ++i) {
    if (!deleted[i].ok()) (*result)[index[i]] = deleted[i].status();
  }
}

}  // namespace vmnet::kernel
