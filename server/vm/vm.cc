#include "vmnet/vm/vm.h"

namespace vmnet {

const char* VmStateName(VmState state) {
  switch (state) {
    case VmState::kPending:
      return "pending";
    case VmState::kProgrammed:
      return "programmed";
    case VmState::kFailed:
      return "failed";
  }
  return "unknown";
}

}  // namespace vmnet
