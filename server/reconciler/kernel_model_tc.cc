// The traffic-control part of the KernelModel: root and ingress qdiscs,
// the filters of ingress qdiscs, and which VM link an ifb device serves.
#include <algorithm>

#include "absl/strings/match.h"
#include "vmnet/reconciler/kernel_model.h"

namespace vmnet {

using kernel::Qdisc;
using kernel::TcFilter;

namespace {

// u32's handle of the first node of its first hash table ("800::800"):
// what a filter added at an empty prio gets.
constexpr uint32_t kFirstU32Node = 0x80000800;

bool SameSlot(const TcFilter& a, const TcFilter& b) {
  return a.parent == b.parent && a.prio == b.prio && a.handle == b.handle;
}

}  // namespace

void KernelModel::ResetTc(const kernel::Snapshot& snapshot) {
  qdiscs_.clear();
  ingress_filters_.clear();
  for (const Qdisc& q : snapshot.qdiscs) ReplaceQdisc(q);
  for (const TcFilter& f : snapshot.filters) ingress_filters_[f.ifindex].push_back(f);
}

void KernelModel::ForgetTc(int ifindex) {
  qdiscs_.erase(QdiscKey{ifindex, kernel::kRootParent});
  qdiscs_.erase(QdiscKey{ifindex, kernel::kIngressParent});
  ingress_filters_.erase(ifindex);
}

void KernelModel::ReplaceQdisc(const Qdisc& q) {
  // The kernel's default root qdisc (handle 0: the fq_codel or noqueue every
  // new link gets) is not kept: to the planner it is the same as none (a
  // replace puts a tbf in its place, and there is nothing of ours to
  // remove), and keeping it would cost 110 bytes for every VM link.
  if (q.parent == kernel::kRootParent && q.handle == 0) {
    qdiscs_.erase(QdiscKey::Of(q));
    return;
  }
  // Whole, statistics included (Qdisc's operator== leaves them out).
  auto [it, inserted] = qdiscs_.insert(q);
  if (!inserted) {
    qdiscs_.erase(it);
    qdiscs_.insert(q);
  }
}

const Qdisc* KernelModel::FindQdisc(int ifindex, uint32_t parent) const {
  auto it = qdiscs_.find(QdiscKey{ifindex, parent});
  return it == qdiscs_.end() ? nullptr : &*it;
}

const std::vector<TcFilter>* KernelModel::IngressFilters(int ifindex) const {
  auto it = ingress_filters_.find(ifindex);
  return it == ingress_filters_.end() || it->second.empty() ? nullptr : &it->second;
}

void KernelModel::AddIfbOwners(Touched* touched) const {
  std::vector<std::string> owners;
  for (const std::string& name : touched->links) {
    if (!kernel::IsIfbName(name)) continue;
    if (auto it = ifb_owner_.find(name); it != ifb_owner_.end()) {
      owners.push_back(it->second);
      continue;
    }
    // vmbX serves vmeX (IfbName's readable form)...
    std::string vm_link = "vme" + name.substr(kernel::kIfbPrefix.size());
    if (LinkByName(vm_link) != nullptr && kernel::IfbName(vm_link) == name) {
      owners.push_back(vm_link);
    }
    // ...and whatever link's filter redirects to it.
    if (const kernel::LinkInfo* ifb = LinkByName(name)) {
      for (const auto& [ifindex, filters] : ingress_filters_) {
        for (const TcFilter& f : filters) {
          if (f.redirect_ifindex != ifb->ifindex) continue;
          if (const kernel::LinkInfo* l = LinkByIndex(ifindex)) owners.push_back(l->name);
        }
      }
    }
  }
  touched->links.insert(touched->links.end(), owners.begin(), owners.end());
}

bool KernelModel::ApplyTcEvent(const kernel::Event& event, Touched* touched) {
  int ifindex = 0;
  if (const auto* e = std::get_if<kernel::QdiscEvent>(&event)) {
    const Qdisc& q = e->qdisc;
    if (q.parent != kernel::kRootParent && q.parent != kernel::kIngressParent)
      return true;
    ifindex = q.ifindex;
    if (e->deleted) {
      auto it = qdiscs_.find(QdiscKey::Of(q));
      if (it != qdiscs_.end() && it->handle == q.handle) qdiscs_.erase(it);
      // An ingress qdisc takes its filters with it.
      if (q.parent == kernel::kIngressParent) ingress_filters_.erase(q.ifindex);
    } else {
      ReplaceQdisc(q);
    }
  } else if (const auto* e = std::get_if<kernel::TcFilterEvent>(&event)) {
    const TcFilter& f = e->filter;
    if (f.parent != kernel::kIngressHandle) return true;
    ifindex = f.ifindex;
    auto& list = ingress_filters_[f.ifindex];
    if (e->deleted) {
      // Handle 0: the whole prio went.
      std::erase_if(list, [&](const TcFilter& x) {
        return x.parent == f.parent && x.prio == f.prio &&
               (f.handle == 0 || x.handle == f.handle);
      });
    } else {
      auto it = std::find_if(list.begin(), list.end(),
                             [&](const TcFilter& x) { return SameSlot(x, f); });
      if (it != list.end()) {
        *it = f;
      } else {
        list.push_back(f);
      }
    }
    if (list.empty()) ingress_filters_.erase(f.ifindex);
  } else {
    return false;
  }
  if (const kernel::LinkInfo* l = LinkByIndex(ifindex)) touched->links.push_back(l->name);
  AddIfbOwners(touched);
  return true;
}

void KernelModel::ApplyTcWrite(const kernel::Write& write) {
  if (const auto* w = std::get_if<kernel::SetQdisc>(&write)) {
    ReplaceQdisc(w->qdisc);
  } else if (const auto* w = std::get_if<kernel::DeleteQdisc>(&write)) {
    qdiscs_.erase(QdiscKey::Of(w->qdisc));
    if (w->qdisc.parent == kernel::kIngressParent)
      ingress_filters_.erase(w->qdisc.ifindex);
  } else if (const auto* w = std::get_if<kernel::AddTcFilter>(&write)) {
    TcFilter f = w->filter;
    if (f.handle == 0) f.handle = kFirstU32Node;
    auto& list = ingress_filters_[f.ifindex];
    std::erase_if(list, [&](const TcFilter& x) { return SameSlot(x, f); });
    list.push_back(f);
  } else if (const auto* w = std::get_if<kernel::DeleteTcFilter>(&write)) {
    auto it = ingress_filters_.find(w->filter.ifindex);
    if (it != ingress_filters_.end()) {
      std::erase_if(it->second, [&](const TcFilter& x) {
        return x.parent == w->filter.parent && x.prio == w->filter.prio;
      });
      if (it->second.empty()) ingress_filters_.erase(it);
    }
  } else if (const auto* w = std::get_if<kernel::CreateIfb>(&write)) {
    ifb_owner_[w->name] = w->vm_link;
  } else if (const auto* w = std::get_if<kernel::DeleteLink>(&write)) {
    ifb_owner_.erase(w->name);
    RemoveLink(w->ifindex);
  }
}

}  // namespace vmnet
