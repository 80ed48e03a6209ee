#include "vmnet/kernel/tc_codec.h"

#include <arpa/inet.h>
#include <linux/gen_stats.h>
#include <linux/if.h>
#include <linux/if_ether.h>
#include <linux/if_link.h>
#include <linux/pkt_cls.h>
#include <linux/pkt_sched.h>
#include <linux/rtnetlink.h>
#include <linux/tc_act/tc_mirred.h>
#include <netlink/attr.h>
#include <netlink/msg.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "request.h"

namespace vmnet::kernel {
namespace {

// psched ticks are 64 ns (PSCHED_SHIFT 6).
constexpr uint64_t kTickNs = 64;
constexpr uint64_t kNsPerSecond = 1000000000;

using request::Bytes;
using request::Msg;
using request::NewMessage;

tcmsg TcHeader(int ifindex, uint32_t parent, uint32_t handle, uint32_t info = 0) {
  tcmsg tcm{};
  tcm.tcm_family = AF_UNSPEC;
  tcm.tcm_ifindex = ifindex;
  tcm.tcm_parent = parent;
  tcm.tcm_handle = handle;
  tcm.tcm_info = info;
  return tcm;
}

uint32_t FilterInfo(const TcFilter& f) {
  return (static_cast<uint32_t>(f.prio) << 16) | htons(f.protocol);
}

// The buffer time of a tbf, in ticks, as the kernel reports it.
uint64_t BufferTicks(uint64_t rate_bytes, uint32_t burst) {
  if (rate_bytes == 0) return 0;
  return static_cast<uint64_t>(burst) * kNsPerSecond / rate_bytes / kTickNs;
}

Msg EncodeQdisc(int type, int flags, const Qdisc& q) {
  tcmsg tcm = TcHeader(q.ifindex, q.parent, q.handle);
  Msg msg = NewMessage(type, flags, &tcm, sizeof(tcm));
  if (!q.kind.empty()) nla_put_string(msg.get(), TCA_KIND, q.kind.c_str());
  if (type == RTM_NEWQDISC && q.kind == "tbf") {
    tc_tbf_qopt opt{};
    opt.rate.linklayer = TC_LINKLAYER_ETHERNET;  // no rate table needed
    opt.rate.rate =
        static_cast<uint32_t>(std::min<uint64_t>(q.rate_bytes_per_second, UINT32_MAX));
    opt.limit = q.limit_bytes;
    opt.buffer = static_cast<uint32_t>(std::min<uint64_t>(
        BufferTicks(q.rate_bytes_per_second, q.burst_bytes), UINT32_MAX));
    nlattr* options = nla_nest_start(msg.get(), TCA_OPTIONS);
    nla_put(msg.get(), TCA_TBF_PARMS, sizeof(opt), &opt);
    if (q.rate_bytes_per_second > UINT32_MAX) {
      nla_put_u64(msg.get(), TCA_TBF_RATE64, q.rate_bytes_per_second);
    }
    // The burst in bytes: the kernel derives its buffer time from it.
    nla_put_u32(msg.get(), TCA_TBF_BURST, q.burst_bytes);
    nla_nest_end(msg.get(), options);
  }
  return msg;
}

Msg EncodeFilter(int type, int flags, const TcFilter& f) {
  tcmsg tcm = TcHeader(f.ifindex, f.parent, f.handle, FilterInfo(f));
  Msg msg = NewMessage(type, flags, &tcm, sizeof(tcm));
  nla_put_string(msg.get(), TCA_KIND, f.kind.c_str());
  if (type != RTM_NEWTFILTER) return msg;
  nlattr* options = nla_nest_start(msg.get(), TCA_OPTIONS);
  // One key with mask 0 at offset 0: matches every packet.
  uint8_t sel_bytes[sizeof(tc_u32_sel) + sizeof(tc_u32_key)] = {};
  tc_u32_sel sel{};
  sel.flags = TC_U32_TERMINAL;
  sel.nkeys = 1;
  std::memcpy(sel_bytes, &sel, sizeof(sel));  // the key after it: all zero
  nla_put(msg.get(), TCA_U32_SEL, sizeof(sel_bytes), sel_bytes);
  nlattr* actions = nla_nest_start(msg.get(), TCA_U32_ACT);
  nlattr* first = nla_nest_start(msg.get(), 1);
  nla_put_string(msg.get(), TCA_ACT_KIND, "mirred");
  nlattr* act_options = nla_nest_start(msg.get(), TCA_ACT_OPTIONS);
  tc_mirred mirred{};
  mirred.action = TC_ACT_STOLEN;
  mirred.eaction = TCA_EGRESS_REDIR;
  mirred.ifindex = static_cast<uint32_t>(f.redirect_ifindex);
  nla_put(msg.get(), TCA_MIRRED_PARMS, sizeof(mirred), &mirred);
  nla_nest_end(msg.get(), act_options);
  nla_nest_end(msg.get(), first);
  nla_nest_end(msg.get(), actions);
  nla_nest_end(msg.get(), options);
  return msg;
}

// Created down: the kernel's IPv6 setup of a link coming up (its
// link-local address and routes) costs time that grows with the host's
// routes, and an ifb needs none of it. IFLA_AF_SPEC is ignored when a link
// is created and applied after the flags when one is changed, so the mode is
// set in its own message before the link goes up (EncodeIfbBringUp).
Msg EncodeCreateIfb(const CreateIfb& w) {
  ifinfomsg ifi{};
  ifi.ifi_family = AF_UNSPEC;
  Msg msg = NewMessage(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &ifi, sizeof(ifi));
  nla_put_string(msg.get(), IFLA_IFNAME, w.name.c_str());
  nlattr* info = nla_nest_start(msg.get(), IFLA_LINKINFO);
  nla_put_string(msg.get(), IFLA_INFO_KIND, "ifb");
  nla_nest_end(msg.get(), info);
  return msg;
}

// An RTM_NEWLINK changing the link called `name`, without creating one.
Msg ChangeLinkByName(const std::string& name, unsigned flags, unsigned change) {
  ifinfomsg ifi{};
  ifi.ifi_family = AF_UNSPEC;
  ifi.ifi_flags = flags;
  ifi.ifi_change = change;
  Msg msg = NewMessage(RTM_NEWLINK, 0, &ifi, sizeof(ifi));
  nla_put_string(msg.get(), IFLA_IFNAME, name.c_str());
  return msg;
}

Msg EncodeDeleteLink(const DeleteLink& w) {
  ifinfomsg ifi{};
  ifi.ifi_family = AF_UNSPEC;
  ifi.ifi_index = w.ifindex;
  return NewMessage(RTM_DELLINK, 0, &ifi, sizeof(ifi));
}

const tcmsg* TcHeaderOf(const nlmsghdr* msg) {
  if (msg->nlmsg_len < NLMSG_LENGTH(sizeof(tcmsg))) return nullptr;
  return static_cast<const tcmsg*>(NLMSG_DATA(msg));
}

bool ParseTc(const nlmsghdr* msg, nlattr** tb) {
  nla_policy policy[TCA_MAX + 1] = {};
  policy[TCA_KIND].type = NLA_STRING;
  policy[TCA_KIND].maxlen = IFNAMSIZ;
  policy[TCA_OPTIONS].type = NLA_NESTED;
  policy[TCA_STATS2].type = NLA_NESTED;
  return nlmsg_parse(const_cast<nlmsghdr*>(msg), sizeof(tcmsg), tb, TCA_MAX, policy) >= 0;
}

std::string KindOf(nlattr* attr) {
  if (attr == nullptr) return "";
  const char* data = static_cast<const char*>(nla_data(attr));
  return std::string(data, strnlen(data, static_cast<size_t>(nla_len(attr))));
}

void ParseTbf(nlattr* options, Qdisc* q) {
  if (options == nullptr) return;
  nlattr* tb[TCA_TBF_MAX + 1] = {};
  if (nla_parse_nested(tb, TCA_TBF_MAX, options, nullptr) < 0) return;
  if (tb[TCA_TBF_PARMS] == nullptr ||
      nla_len(tb[TCA_TBF_PARMS]) < static_cast<int>(sizeof(tc_tbf_qopt))) {
    return;
  }
  tc_tbf_qopt opt;
  std::memcpy(&opt, nla_data(tb[TCA_TBF_PARMS]), sizeof(opt));
  q->rate_bytes_per_second = opt.rate.rate;
  if (tb[TCA_TBF_RATE64] != nullptr && nla_len(tb[TCA_TBF_RATE64]) >= 8) {
    q->rate_bytes_per_second = nla_get_u64(tb[TCA_TBF_RATE64]);
  }
  q->limit_bytes = opt.limit;
  // buffer (ticks) -> ns -> bytes at the rate.
  unsigned __int128 bytes = static_cast<unsigned __int128>(opt.buffer) * kTickNs *
                            q->rate_bytes_per_second / kNsPerSecond;
  q->burst_bytes = static_cast<uint32_t>(std::min<unsigned __int128>(bytes, UINT32_MAX));
}

void ParseStats(nlattr* stats2, Qdisc* q) {
  if (stats2 == nullptr) return;
  nlattr* tb[TCA_STATS_MAX + 1] = {};
  if (nla_parse_nested(tb, TCA_STATS_MAX, stats2, nullptr) < 0) return;
  if (tb[TCA_STATS_QUEUE] != nullptr &&
      nla_len(tb[TCA_STATS_QUEUE]) >= static_cast<int>(sizeof(gnet_stats_queue))) {
    gnet_stats_queue queue;
    std::memcpy(&queue, nla_data(tb[TCA_STATS_QUEUE]), sizeof(queue));
    q->drops = queue.drops;
    q->overlimits = queue.overlimits;
  }
  if (tb[TCA_STATS_BASIC] != nullptr &&
      nla_len(tb[TCA_STATS_BASIC]) >= static_cast<int>(sizeof(gnet_stats_basic))) {
    gnet_stats_basic basic;
    std::memcpy(&basic, nla_data(tb[TCA_STATS_BASIC]), sizeof(basic));
    q->packets = basic.packets;
  }
}

// The first mirred egress redirect among a u32 node's actions: its ifindex.
int RedirectOf(nlattr* actions) {
  if (actions == nullptr) return 0;
  nlattr* action;
  int rem;
  nla_for_each_nested(action, actions, rem) {
    nlattr* tb[TCA_ACT_MAX + 1] = {};
    if (nla_parse_nested(tb, TCA_ACT_MAX, action, nullptr) < 0) continue;
    if (KindOf(tb[TCA_ACT_KIND]) != "mirred" || tb[TCA_ACT_OPTIONS] == nullptr) continue;
    nlattr* mt[TCA_MIRRED_MAX + 1] = {};
    if (nla_parse_nested(mt, TCA_MIRRED_MAX, tb[TCA_ACT_OPTIONS], nullptr) < 0) continue;
    if (mt[TCA_MIRRED_PARMS] == nullptr ||
        nla_len(mt[TCA_MIRRED_PARMS]) < static_cast<int>(sizeof(tc_mirred))) {
      continue;
    }
    tc_mirred mirred;
    std::memcpy(&mirred, nla_data(mt[TCA_MIRRED_PARMS]), sizeof(mirred));
    if (mirred.eaction == TCA_EGRESS_REDIR) return static_cast<int>(mirred.ifindex);
  }
  return 0;
}

}  // namespace

std::optional<Qdisc> ParseQdisc(const nlmsghdr* msg) {
  if (msg->nlmsg_type != RTM_NEWQDISC && msg->nlmsg_type != RTM_DELQDISC) {
    return std::nullopt;
  }
  const tcmsg* tcm = TcHeaderOf(msg);
  if (tcm == nullptr) return std::nullopt;
  nlattr* tb[TCA_MAX + 1] = {};
  if (!ParseTc(msg, tb)) return std::nullopt;
  Qdisc q;
  q.ifindex = tcm->tcm_ifindex;
  q.parent = tcm->tcm_parent;
  q.handle = tcm->tcm_handle;
  q.kind = KindOf(tb[TCA_KIND]);
  if (q.ifindex <= 0 || q.kind.empty()) return std::nullopt;
  if (q.kind == "tbf") ParseTbf(tb[TCA_OPTIONS], &q);
  ParseStats(tb[TCA_STATS2], &q);
  return q;
}

std::optional<TcFilter> ParseTcFilter(const nlmsghdr* msg) {
  if (msg->nlmsg_type != RTM_NEWTFILTER && msg->nlmsg_type != RTM_DELTFILTER) {
    return std::nullopt;
  }
  const tcmsg* tcm = TcHeaderOf(msg);
  if (tcm == nullptr || tcm->tcm_ifindex <= 0) return std::nullopt;
  nlattr* tb[TCA_MAX + 1] = {};
  if (!ParseTc(msg, tb)) return std::nullopt;
  TcFilter f;
  f.ifindex = tcm->tcm_ifindex;
  f.parent = tcm->tcm_parent;
  // `tc filter ... dev X ingress` names the ingress block ffff:fff2 (clsact's
  // ingress); on an ingress qdisc that is the same block as ffff:.
  if (f.parent == kClsactIngressParent) f.parent = kIngressHandle;
  f.prio = static_cast<uint16_t>(tcm->tcm_info >> 16);
  f.protocol = ntohs(static_cast<uint16_t>(tcm->tcm_info & 0xFFFF));
  f.handle = tcm->tcm_handle;
  f.kind = KindOf(tb[TCA_KIND]);
  f.match_all = false;
  if (f.kind == "u32" && tb[TCA_OPTIONS] != nullptr) {
    nlattr* u32[TCA_U32_MAX + 1] = {};
    if (nla_parse_nested(u32, TCA_U32_MAX, tb[TCA_OPTIONS], nullptr) >= 0) {
      nlattr* sel = u32[TCA_U32_SEL];
      if (sel != nullptr && nla_len(sel) >= static_cast<int>(sizeof(tc_u32_sel))) {
        tc_u32_sel s;
        std::memcpy(&s, nla_data(sel), sizeof(s));
        size_t need = sizeof(tc_u32_sel) + s.nkeys * sizeof(tc_u32_key);
        if (s.nkeys == 1 && static_cast<size_t>(nla_len(sel)) >= need) {
          tc_u32_key key;
          std::memcpy(&key, static_cast<const char*>(nla_data(sel)) + sizeof(tc_u32_sel),
                      sizeof(key));
          f.match_all = key.mask == 0;
        }
      }
      f.redirect_ifindex = RedirectOf(u32[TCA_U32_ACT]);
    }
  }
  return f;
}

std::optional<Event> ParseTcEvent(const nlmsghdr* msg) {
  switch (msg->nlmsg_type) {
    case RTM_NEWQDISC:
    case RTM_DELQDISC:
      if (auto q = ParseQdisc(msg)) {
        return QdiscEvent{msg->nlmsg_type == RTM_DELQDISC, std::move(*q)};
      }
      break;
    case RTM_NEWTFILTER:
    case RTM_DELTFILTER:
      if (auto f = ParseTcFilter(msg)) {
        return TcFilterEvent{msg->nlmsg_type == RTM_DELTFILTER, std::move(*f)};
      }
      break;
    default:
      break;
  }
  return std::nullopt;
}

std::vector<uint8_t> EncodeTcWrite(const Write& write) {
  if (const auto* w = std::get_if<SetQdisc>(&write)) {
    // An ingress qdisc has nothing to replace: it is only ever created.
    int flags = NLM_F_CREATE | (w->qdisc.kind == "ingress" ? NLM_F_EXCL : NLM_F_REPLACE);
    return Bytes(EncodeQdisc(RTM_NEWQDISC, flags, w->qdisc));
  }
  if (const auto* w = std::get_if<DeleteQdisc>(&write)) {
    Qdisc q = w->qdisc;
    q.kind.clear();
    return Bytes(EncodeQdisc(RTM_DELQDISC, 0, q));
  }
  if (const auto* w = std::get_if<AddTcFilter>(&write)) {
    return Bytes(EncodeFilter(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL, w->filter));
  }
  if (const auto* w = std::get_if<DeleteTcFilter>(&write)) {
    TcFilter f = w->filter;
    f.handle = 0;  // the whole prio
    return Bytes(EncodeFilter(RTM_DELTFILTER, 0, f));
  }
  if (const auto* w = std::get_if<CreateIfb>(&write)) return Bytes(EncodeCreateIfb(*w));
  if (const auto* w = std::get_if<DeleteLink>(&write)) return Bytes(EncodeDeleteLink(*w));
  return {};
}

std::vector<std::vector<uint8_t>> EncodeIfbBringUp(const CreateIfb& w) {
  Msg mode = ChangeLinkByName(w.name, 0, 0);
  nlattr* af_spec = nla_nest_start(mode.get(), IFLA_AF_SPEC);
  nlattr* inet6 = nla_nest_start(mode.get(), AF_INET6);
  nla_put_u8(mode.get(), IFLA_INET6_ADDR_GEN_MODE, IN6_ADDR_GEN_MODE_NONE);
  nla_nest_end(mode.get(), inet6);
  nla_nest_end(mode.get(), af_spec);
  ifinfomsg ifi{};
  ifi.ifi_family = AF_UNSPEC;
  Msg get = NewMessage(RTM_GETLINK, 0, &ifi, sizeof(ifi));
  nla_put_string(get.get(), IFLA_IFNAME, w.name.c_str());
  std::vector<std::vector<uint8_t>> steps(kIfbBringUpSteps);
  steps[kIfbMode] = Bytes(mode);
  steps[kIfbUp] = Bytes(ChangeLinkByName(w.name, IFF_UP, IFF_UP));
  steps[kIfbGet] = Bytes(get);
  return steps;
}

std::vector<Write> IfbFollowUps(const CreateIfb& w, int ifb_ifindex) {
  Qdisc tbf = w.tbf;
  tbf.ifindex = ifb_ifindex;
  TcFilter redirect = w.redirect;
  redirect.redirect_ifindex = ifb_ifindex;
  return {SetQdisc{tbf}, AddTcFilter{redirect}};
}

Qdisc Tbf(int ifindex, uint64_t bits_per_second, uint32_t burst_bytes) {
  Qdisc q;
  q.ifindex = ifindex;
  q.parent = kRootParent;
  q.handle = kQdiscHandle;
  q.kind = "tbf";
  q.rate_bytes_per_second = bits_per_second / 8;
  q.burst_bytes = burst_bytes;
  uint64_t limit = static_cast<uint64_t>(burst_bytes) + q.rate_bytes_per_second / 20;
  q.limit_bytes = static_cast<uint32_t>(std::min<uint64_t>(limit, UINT32_MAX));
  return q;
}

bool TbfMatches(const Qdisc& have, const Qdisc& want) {
  if (have.kind != want.kind || have.handle != want.handle ||
      have.rate_bytes_per_second != want.rate_bytes_per_second ||
      have.limit_bytes != want.limit_bytes) {
    return false;
  }
  uint64_t slack = want.rate_bytes_per_second * 2 * kTickNs / kNsPerSecond + 2;
  uint64_t a = have.burst_bytes, b = want.burst_bytes;
  return (a > b ? a - b : b - a) <= slack;
}

uint32_t DefaultBurstBytes(uint64_t bits_per_second) {
  uint64_t ten_ms = bits_per_second / 8 / 100;
  return static_cast<uint32_t>(std::clamp<uint64_t>(ten_ms, 64 << 10, UINT32_MAX));
}

std::vector<uint8_t> EncodePoliceProbe() {
  tcamsg tca{};
  tca.tca_family = AF_UNSPEC;
  Msg msg = NewMessage(RTM_GETACTION, 0, &tca, sizeof(tca));
  nlattr* tab = nla_nest_start(msg.get(), TCA_ACT_TAB);
  nlattr* first = nla_nest_start(msg.get(), 1);
  nla_put_string(msg.get(), TCA_ACT_KIND, "police");
  nla_put_u32(msg.get(), TCA_ACT_INDEX, 1);
  nla_nest_end(msg.get(), first);
  nla_nest_end(msg.get(), tab);
  return Bytes(msg);
}

}  // namespace vmnet::kernel
