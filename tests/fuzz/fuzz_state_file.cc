// libFuzzer harness for the state file (StateStore::Decode / Encode).
//
// Inputs are whole state files, as vmnetd reads them from --state-dir, so a
// reproducer can be copied there as state.bin. A custom mutator repairs the
// header's length and CRC-32 after most mutations (7 in 8), so that the
// fuzzer gets past the checksum into the protobuf payload and the
// validation of each record; the rest keep a damaged header to exercise its
// checks.
//
// Properties checked, beyond "no crash, leak or sanitizer report":
// - a refusal is DATA_LOSS;
// - whenever Decode(x) succeeds, Decode(Encode(Decode(x))) == Decode(x), and
//   Encode is a fixed point from there on (Encode(Decode(Encode(s))) ==
//   Encode(s)).
#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>

#include "absl/strings/string_view.h"
#include "google/protobuf/stubs/logging.h"
#include "vmnet/state/state_store.h"

namespace {

constexpr char kMagic[8] = {'V', 'M', 'N', 'E', 'T', 'S', 'T', '1'};
constexpr size_t kHeader = 16;  // magic, u32 length, u32 crc32 (little endian)

std::string Hex(absl::string_view s) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s.substr(0, 512)) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  if (s.size() > 512) out += "...";
  return out;
}

[[noreturn]] void Violated(const char* property, absl::string_view detail) {
  std::fprintf(stderr, "fuzz_state_file: property violated: %s\n  %s\n", property,
               std::string(detail).c_str());
  std::abort();
}

#define EXPECT(cond, detail)              \
  do {                                    \
    if (!(cond)) Violated(#cond, detail); \
  } while (0)

void PutU32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

}  // namespace

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Proto3 strings with invalid UTF-8 are refused with a log line each; the
  // refusal is what we test, the lines would only drown the fuzzer's output.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int seed) {
  size = LLVMFuzzerMutate(data, size, max_size);
  std::minstd_rand rng(seed);
  if (size >= kHeader && std::memcmp(data, kMagic, sizeof(kMagic)) == 0 &&
      rng() % 8 != 0) {
    size_t payload = size - kHeader;
    PutU32(data + 8, static_cast<uint32_t>(payload));
    PutU32(data + 12,
           static_cast<uint32_t>(crc32(0, data + kHeader, static_cast<uInt>(payload))));
  }
  return size;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view input(reinterpret_cast<const char*>(data), size);
  auto state = vmnet::StateStore::Decode(input);
  if (!state.ok()) {
    EXPECT(state.status().code() == absl::StatusCode::kDataLoss,
           std::string(state.status().ToString()));
    return 0;
  }
  std::string encoded = vmnet::StateStore::Encode(*state);
  auto again = vmnet::StateStore::Decode(encoded);
  EXPECT(again.ok(),
         "Decode(Encode(s)) failed: " + std::string(again.status().ToString()) +
             "; Encode(s) = " + Hex(encoded));
  EXPECT(*again == *state, "Decode(Encode(s)) != s; Encode(s) = " + Hex(encoded));
  EXPECT(vmnet::StateStore::Encode(*again) == encoded,
         "Encode(Decode(Encode(s))) != Encode(s); Encode(s) = " + Hex(encoded));
  return 0;
}
