// vmnet_micro_bench: Google Benchmark of the agent's own per-batch and
// per-event work that the whole-process benchmarks (bench/run.sh) point at,
// without gRPC or the kernel in the way, so that a change to one of them can
// be measured in seconds:
//
//   BM_StateEncode/N   what every durable batch serializes: the whole state of
//                      N VMs (Reconciler::Persist writes all of it each time)
//   BM_StateSave/N     the same, written, fsynced and renamed into place
//   BM_StateDecode/N   what a restart reads back
//   BM_EventPublish/W  one Watch event published to W subscribed watchers
//                      (a pass of one event)
//   BM_EventPass/P     a reconcile pass of P events to 100 watchers
//
//   build/bench/vmnet_micro_bench [--benchmark_filter=State]
#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <vector>

#include "bench_common.h"
#include "benchmark/benchmark.h"
#include "vmnet/events/event_log.h"
#include "vmnet/state/state_store.h"
#include "vmnet/state/vm_spec.h"

namespace vmnet::bench {
namespace {

// N VMs as the lab attaches them: one address each.
StoredState LabState(int n) {
  StoredState state;
  SpecRules rules;
  for (int i = 0; i < n; ++i) {
    std::vector<std::string> addresses = {Address(i)};
    auto spec = ParseVmSpec(VmId(i), Interface(i), addresses, "", rules);
    if (!spec.ok()) abort();
    state.vms.push_back({std::move(*spec), static_cast<uint64_t>(i + 1)});
  }
  state.revision_lease = 1 << 20;
  return state;
}

void BM_StateEncode(benchmark::State& s) {
  StoredState state = LabState(static_cast<int>(s.range(0)));
  size_t bytes = 0;
  for (auto _ : s) {
    std::string encoded = StateStore::Encode(state);
    bytes = encoded.size();
    benchmark::DoNotOptimize(encoded);
  }
  s.counters["bytes"] = static_cast<double>(bytes);
}
BENCHMARK(BM_StateEncode)->Arg(1000)->Arg(10000)->Unit(benchmark::kMillisecond);

void BM_StateSave(benchmark::State& s) {
  // On the disk the agent's state would live on (/var/tmp: not a tmpfs here).
  char dir[] = "/var/tmp/vmnet-micro-bench-XXXXXX";
  if (mkdtemp(dir) == nullptr) {
    s.SkipWithError("mkdtemp failed");
    return;
  }
  {
    auto store = StateStore::Open(dir);
    if (!store.ok()) {
      s.SkipWithError(std::string(store.status().message()).c_str());
    } else {
      StoredState state = LabState(static_cast<int>(s.range(0)));
      for (auto _ : s) {
        if (absl::Status saved = store->Save(state); !saved.ok()) {
          s.SkipWithError(std::string(saved.message()).c_str());
          break;
        }
      }
    }
  }
  std::filesystem::remove_all(dir);
}
BENCHMARK(BM_StateSave)
    ->Arg(1000)
    ->Arg(10000)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_StateDecode(benchmark::State& s) {
  std::string encoded = StateStore::Encode(LabState(static_cast<int>(s.range(0))));
  for (auto _ : s) {
    auto decoded = StateStore::Decode(encoded);
    if (!decoded.ok()) abort();
    benchmark::DoNotOptimize(decoded);
  }
}
BENCHMARK(BM_StateDecode)->Arg(1000)->Arg(10000)->Unit(benchmark::kMillisecond);

// A watcher that only counts: the cost measured is the log's, not gRPC's.
class CountingWatcher : public Watcher {
 public:
  bool Push(const Chunk& chunk) override {
    benchmark::DoNotOptimize(chunk);
    ++pushed_;
    return true;
  }
  void PushBacklog(const Chunk& chunk) override { benchmark::DoNotOptimize(chunk); }
  void Close(absl::Status) override {}

 private:
  int64_t pushed_ = 0;
};

// Reconcile passes of `per_pass` events each, published to `watchers`
// watchers of all VMs.
void PublishPasses(benchmark::State& s, size_t watchers, int64_t per_pass) {
  EventLog log("bench", 65536);
  std::vector<CountingWatcher> subscribed(watchers);
  for (CountingWatcher& w : subscribed) {
    if (!log.Subscribe(&w, "", 0, false).ok()) abort();
  }
  StoredState one = LabState(1);
  VmView view{std::make_shared<const VmSpec>(one.vms[0].spec), VmState::kProgrammed, "",
              0};
  const std::string detail =
      "attached: set link vme0 up; add address 169.255.30.1/32 dev vme0; add route "
      "198.18.0.1/32 dev vme0; add proxy 198.18.0.1 dev eth0";
  for (auto _ : s) {
    for (int64_t i = 0; i < per_pass; ++i) {
      ++view.revision;
      log.Publish(VmEventType::kChanged, view, detail);
    }
    log.EndPass();
  }
  for (CountingWatcher& w : subscribed) log.Unsubscribe(&w);
}

// One event per pass, to 0, 1 or 100 watchers.
void BM_EventPublish(benchmark::State& s) {
  PublishPasses(s, static_cast<size_t>(s.range(0)), 1);
}
BENCHMARK(BM_EventPublish)->Arg(0)->Arg(1)->Arg(100);

// A reconcile pass of P events (a storm's pass is about 40) to 100
// watchers: one Chunk queued per watcher per pass.
void BM_EventPass(benchmark::State& s) {
  PublishPasses(s, 100, s.range(0));
  s.SetItemsProcessed(s.iterations() * s.range(0));
}
BENCHMARK(BM_EventPass)->Arg(1)->Arg(40);

}  // namespace
}  // namespace vmnet::bench

BENCHMARK_MAIN();
