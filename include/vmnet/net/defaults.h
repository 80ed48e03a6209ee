// The agent's network defaults, defined once: the flags of vmnetd and the
// option structs of the modules (SpecRules, HostConfig, ServiceOptions)
// start from these.
#pragma once

#include <cstdint>

#include "absl/strings/string_view.h"

namespace vmnet {

// The VMs' IPv4 default gateway, answered by the host on each VM link.
inline constexpr absl::string_view kDefaultGateway = "169.255.30.1";
// The VMs' IPv6 default gateway: link-local, on the link of each VM with
// IPv6 addresses.
inline constexpr absl::string_view kDefaultGateway6 = "fe80::ffff:1:1";
// The rtm_protocol number that marks what the agent installs.
inline constexpr uint8_t kDefaultRouteProtocol = 237;
// The host-side VM links the agent may manage (full match).
inline constexpr absl::string_view kDefaultInterfacePattern = "vme[0-9a-f]{1,12}";

}  // namespace vmnet
