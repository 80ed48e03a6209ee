// What the benchmark programs share: the naming of the lab's VMs (the same
// scheme bench/run.py uses to create their links), the clock, channels to
// vmnetd, and a tiny JSON writer for the one result line each program prints.
#pragma once

#include <arpa/inet.h>
#include <time.h>

#include <cstdint>
#include <map>
#include <memory>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpcpp/grpcpp.h"

namespace vmnet::bench {

// VM i (0-based) of the lab: id "bench-<i>", host-side link "vme<i in hex>"
// (matches vmnetd's default --interface-pattern), one address in
// 198.18.0.0/15 (the benchmarking range, RFC 2544; no traffic is ever sent
// to it).
inline std::string VmId(int i) { return absl::StrCat("bench-", i); }
inline std::string Interface(int i) { return absl::StrFormat("vme%x", i); }
inline std::string Address(int i) {
  uint32_t base = (198u << 24) | (18u << 16);
  uint32_t a = base + 1 + static_cast<uint32_t>(i);
  return absl::StrFormat("%d.%d.%d.%d", a >> 24, (a >> 16) & 0xff, (a >> 8) & 0xff,
                         a & 0xff);
}
// The largest lab that fits in 198.18.0.0/15.
constexpr int kMaxVms = (1 << 17) - 2;

// CLOCK_MONOTONIC in seconds: the clock of Python's time.monotonic(), so
// that bench/run.py can compare its timestamps with ours.
inline double Now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// A channel of its own (its own connection): channels with different
// arguments never share a subchannel.
inline std::shared_ptr<grpc::Channel> Connect(const std::string& target, int id) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt("vmnet.bench.channel_id", id);
  args.SetInt(GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, 64 << 20);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 10);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 10);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 100);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

inline bool WaitConnected(grpc::Channel& channel, double timeout_s) {
  auto deadline = std::chrono::system_clock::now() +
                  std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  return channel.WaitForConnected(deadline);
}

// One flat JSON object, keys in insertion order.
class JsonObject {
 public:
  JsonObject& Add(const std::string& key, double v) {
    return Raw(key, absl::StrFormat("%.6f", v));
  }
  JsonObject& Add(const std::string& key, int64_t v) { return Raw(key, absl::StrCat(v)); }
  JsonObject& Add(const std::string& key, int v) { return Raw(key, absl::StrCat(v)); }
  JsonObject& Add(const std::string& key, uint64_t v) {
    return Raw(key, absl::StrCat(v));
  }
  JsonObject& Add(const std::string& key, bool v) {
    return Raw(key, v ? "true" : "false");
  }
  JsonObject& Add(const std::string& key, const std::string& v) {
    return Raw(key, Quote(v));
  }
  JsonObject& Add(const std::string& key, const char* v) {
    return Add(key, std::string(v));
  }
  JsonObject& Add(const std::string& key, const std::map<std::string, int64_t>& m) {
    std::string out = "{";
    for (const auto& [k, v] : m) {
      if (out.size() > 1) out += ", ";
      absl::StrAppend(&out, Quote(k), ": ", v);
    }
    return Raw(key, out + "}");
  }
  // An already encoded JSON value.
  JsonObject& Raw(const std::string& key, const std::string& json) {
    if (!body_.empty()) body_ += ", ";
    absl::StrAppend(&body_, Quote(key), ": ", json);
    return *this;
  }
  std::string ToString() const { return "{" + body_ + "}"; }

  static std::string Quote(const std::string& s) {
    std::string out = "\"";
    for (char c : s) {
      if (c == '"' || c == '\\') {
        out += '\\';
        out += c;
      } else if (static_cast<unsigned char>(c) < 0x20) {
        absl::StrAppendFormat(&out, "\\u%04x", c);
      } else {
        out += c;
      }
    }
    return out + "\"";
  }

 private:
  std::string body_;
};

}  // namespace vmnet::bench
