#!/usr/bin/env bash
# Builds the vmnetd container image from the top-level Dockerfile without a Docker engine, then
# smoke-tests it.
#
#   scripts/build-image.sh                 build and smoke-test localhost/vmnetd:latest
#   IMAGE=localhost/vmnetd:0.1 scripts/build-image.sh
#   scripts/build-image.sh --rebuild-base  make the debian:bookworm base again
#   KEEP_BUILD_CACHE=1 scripts/build-image.sh   keep the intermediate layers (next build is quicker)
#   SMOKE_LAB=0 scripts/build-image.sh          skip the namespace-lab smoke test
#
# How: buildah (Debian package) with `--storage-driver vfs --isolation chroot`, which needs no
# daemon, no overlay filesystem and no user namespaces. No image registry is reachable from our
# machines, so the `debian:bookworm` base image is made here with debootstrap (variant minbase)
# from the Debian mirror this machine's apt already uses, and imported into buildah's storage. The
# root filesystem is cached as a tarball in $CACHE_DIR and the image stays in buildah's storage;
# both are reused on the next run.
#
# Smoke tests on the built image: `vmnetd --help` and `vmnetctl --help` run inside it as the
# image's user, the user is `vmnetd` (not root), vmnetd carries the file capabilities
# cap_net_admin,cap_net_raw+ep, and no compiler is in it. Then the image's vmnetd, as that user
# with only NET_ADMIN and NET_RAW, serves a small lab in a network namespace this script makes
# (and always removes): it becomes SERVING, programs an attached VM's /32 route and proxy ARP
# entry, serves /metrics, and on SIGTERM exits 0 leaving the route in place
# (SMOKE_LAB=0 skips this part).
#
# Needs root (debootstrap, buildah's vfs storage and chroot isolation). It takes minutes and
# downloads a few hundred MB of Debian packages; it is not part of the default test run.
# Nothing is started as a service and the machine's own network namespace is never changed: the
# lab's links, addresses and routes live only in the script's namespace vmnt-<pid>-0-image.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/vmnetd:latest}
BASE_IMAGE=${BASE_IMAGE:-docker.io/library/debian:bookworm}
SUITE=bookworm
CACHE_DIR=${CACHE_DIR:-/var/cache/vmnet-image}
export STORAGE_DRIVER=vfs        # buildah reads it, for every buildah command below
export BUILDAH_ISOLATION=chroot
rebuild_base=0
[[ "${1:-}" == "--rebuild-base" ]] && rebuild_base=1

log() { printf '[build-image %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
started=$SECONDS

[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap and buildah's chroot isolation need it)"

# 1. Tools.
need=()
command -v buildah >/dev/null || need+=(buildah)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
log "$(buildah --version)"

# The Debian mirror apt uses here (deb822 sources first, then the one-line format).
debian_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' "$f")
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
}

# 2. The debian:bookworm base image.
image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
rootfs_tar=$CACHE_DIR/debian-$SUITE-minbase.tar
if ((rebuild_base)); then
  rm -f "$rootfs_tar"
  if image_exists "$BASE_IMAGE"; then
    # Images built on it keep its layers; only its name goes.
    buildah rmi "$BASE_IMAGE" >/dev/null || die "could not remove $BASE_IMAGE"
  fi
fi
if image_exists "$BASE_IMAGE"; then
  log "base image $BASE_IMAGE is in buildah's storage; reusing it"
else
  if [[ -f $rootfs_tar ]]; then
    log "reusing the cached root filesystem $rootfs_tar"
  else
    mirror=${DEBIAN_MIRROR:-$(debian_mirror)}
    [[ -n $mirror ]] || die "no Debian mirror found in /etc/apt; set DEBIAN_MIRROR"
    mkdir -p "$CACHE_DIR"
    rootfs=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap --variant=minbase $SUITE from $mirror (a few minutes)"
    t0=$SECONDS
    if ! debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$CACHE_DIR/debootstrap.log" 2>&1; then
      tail -n 20 "$CACHE_DIR/debootstrap.log" >&2
      die "debootstrap (log: $CACHE_DIR/debootstrap.log)"
    fi
    log "debootstrap took $((SECONDS - t0)) s"
    # The apt sources of this machine (same mirror, updates and security suites), when it has
    # them in deb822 form for our suite; otherwise debootstrap's own sources.list stays.
    if [[ -f /etc/apt/sources.list.d/debian.sources ]] \
        && grep -q "^Suites:.*\b$SUITE\b" /etc/apt/sources.list.d/debian.sources; then
      cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/debian.sources"
      rm -f "$rootfs/etc/apt/sources.list"
    fi
    # What the official image does too: no apt caches or logs, no recommends, small indexes.
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
      >"$rootfs/etc/apt/apt.conf.d/99no-recommends"
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
           "$rootfs"/var/log/apt/* "$rootfs"/var/log/dpkg.log "$rootfs"/var/log/bootstrap.log \
           "$rootfs"/tmp/* "$rootfs"/proc/* "$rootfs"/sys/* "$rootfs"/dev/*
    tar --numeric-owner --xattrs --xattrs-include='*' -C "$rootfs" -cf "$rootfs_tar.partial" .
    mv "$rootfs_tar.partial" "$rootfs_tar"
    rm -rf "$rootfs"
    trap - EXIT
  fi
  log "importing $rootfs_tar as $BASE_IMAGE"
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$rootfs_tar" / >/dev/null
  buildah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --os linux --arch "$(dpkg --print-architecture)" "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
fi
log "base ready after $((SECONDS - started)) s"

# 3. The image.
log "buildah bud -t $IMAGE (the build stage compiles vmnetd: several minutes)"
t0=$SECONDS
buildah --storage-driver vfs bud --isolation chroot --pull=never --layers --force-rm \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" -f Dockerfile .
log "image built in $((SECONDS - t0)) s"

# 4. Smoke tests.
ctr=$(buildah from --pull=never "$IMAGE")
mnt=""
cleanup() {
  [[ -n $mnt ]] && buildah umount "$ctr" >/dev/null 2>&1 || true
  buildah rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# vmnetd's file capabilities make the kernel refuse to exec it (EPERM) unless the container's
# bounding set holds both; buildah's default set lacks them, as a Kubernetes pod's does.
caps_args=(--cap-add CAP_NET_ADMIN --cap-add CAP_NET_RAW)
log "smoke: vmnetd --help inside the image"
# (absl exits 1 after --help: judge by what it prints)
help=$(buildah run "${caps_args[@]}" "$ctr" -- /usr/sbin/vmnetd --help 2>&1 || true)
grep -q -- "--uplinks" <<<"$help" || die "vmnetd --help printed no --uplinks flag: $help"
printf '%s\n' "$help" | head -n 3
log "smoke: vmnetctl --help inside the image"
buildah run "$ctr" -- /usr/bin/vmnetctl --help >/dev/null 2>&1 || die "vmnetctl --help"

log "smoke: runs as the non-root user vmnetd"
user=$(buildah run "$ctr" -- id -un) || die "id -un"
[[ $user == vmnetd ]] || die "the image runs as '$user', not vmnetd"
[[ $(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$IMAGE") == vmnetd* ]] \
  || die "the image's User is not vmnetd"

mnt=$(buildah mount "$ctr")
log "smoke: file capabilities of /usr/sbin/vmnetd"
caps=$(getcap "$mnt/usr/sbin/vmnetd" 2>&1 || true)
[[ $caps == *cap_net_admin,cap_net_raw=ep* ]] \
  || die "vmnetd lacks cap_net_admin,cap_net_raw=ep in the image (getcap: '${caps:-none}')"
echo "$caps" | sed "s|$mnt||"

log "smoke: no compiler, no headers in the runtime image"
for tool in gcc g++ cc c++ cpp clang ld as cmake ninja protoc; do
  for dir in usr/bin usr/sbin usr/local/bin; do
    [[ -e $mnt/$dir/$tool ]] && die "the runtime image has /$dir/$tool"
  done
done
compilers=$(ls "$mnt"/usr/bin/ | grep -E '^(x86_64-linux-gnu-)?(gcc|g\+\+|cc1)' || true)
[[ -z $compilers ]] || die "the runtime image has compilers: $compilers"
[[ -d $mnt/usr/include/grpcpp || -d $mnt/usr/include/google ]] && die "the runtime image has -dev headers"
dev=$(chroot "$mnt" dpkg-query -W -f='${Package}\n' | grep -E -- '-dev$|^(gcc|g\+\+|cpp|clang)(-[0-9]+)?$|^binutils|^(cmake|ninja-build|protobuf-compiler.*)$' || true)
[[ -z $dev ]] || die "the runtime image has build packages: $(echo $dev)"

buildah umount "$ctr" >/dev/null
mnt=""

# 5. The agent from the image serving a lab: uplink eth0 and one VM link vme1a (a veth pair each,
#    both ends in the namespace), documentation addresses only.
if [[ ${SMOKE_LAB:-1} == 1 ]]; then
  command -v ip >/dev/null || die "the lab smoke test needs iproute2 (or SMOKE_LAB=0)"
  ns=vmnt-$$-0-image
  client=""
  agent_runner=""
  agent_log=$(mktemp /tmp/vmnetd-image-smoke.XXXXXX.log)
  agent_pid() {  # vmnetd's pid: the only vmnetd process in our namespace
    local pid
    for pid in $(ip netns pids "$ns" 2>/dev/null); do
      [[ $(cat "/proc/$pid/comm" 2>/dev/null) == vmnetd ]] && { echo "$pid"; return; }
    done
  }
  lab_cleanup() {
    local pid
    pid=$(agent_pid)
    [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null
    [[ -n $agent_runner ]] && wait "$agent_runner" 2>/dev/null
    ip netns delete "$ns" 2>/dev/null
    [[ -n $client ]] && buildah rm "$client" >/dev/null 2>&1
    cleanup
  }
  trap lab_cleanup EXIT
  in_ns() { ip netns exec "$ns" "$@"; }
  ctl() { in_ns buildah run "$client" -- /usr/bin/vmnetctl --server=127.0.0.1:50051 --timeout=5 "$@"; }

  log "smoke: lab in namespace $ns"
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "$ns" link add eth0 type veth peer name lan0
  ip -n "$ns" addr add 198.51.100.1/24 dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lan0 up
  ip -n "$ns" link add vme1a type veth peer name vm1
  ip -n "$ns" link set vm1 up        # vme1a stays down: the agent brings it up
  client=$(buildah from --pull=never "$IMAGE")

  in_ns buildah run "${caps_args[@]}" "$ctr" -- /usr/sbin/vmnetd --uplinks=eth0 \
    --listen=127.0.0.1:50051 --health-listen=127.0.0.1:9448 --metrics-listen=127.0.0.1:9447 \
    >"$agent_log" 2>&1 &
  agent_runner=$!
  serving=0
  for _ in $(seq 1 60); do
    if out=$(ctl health 2>&1) && grep -q SERVING <<<"$out" && ! grep -q NOT_SERVING <<<"$out"; then
      serving=1
      break
    fi
    kill -0 "$agent_runner" 2>/dev/null || break
    sleep 0.5
  done
  ((serving)) || die "vmnetd in the image did not become SERVING; its log:
$(cat "$agent_log")"
  log "smoke: vmnetd in the image is SERVING; uid $(stat -c %u "/proc/$(agent_pid)"), $(grep CapEff "/proc/$(agent_pid)/status" | tr -s '\t' ' ')"
  [[ $(stat -c %u "/proc/$(agent_pid)") == 64237 ]] || die "vmnetd does not run as uid 64237"

  ctl attach vm-1 --interface vme1a --ip 198.51.100.201 >/dev/null || die "vmnetctl attach"
  programmed=0
  for _ in $(seq 1 40); do
    if ip -n "$ns" route show 198.51.100.201 | grep -q "dev vme1a" \
        && ip -n "$ns" neigh show proxy | grep -q "198.51.100.201 dev eth0"; then
      programmed=1
      break
    fi
    sleep 0.25
  done
  ((programmed)) || die "the VM's route or proxy entry is missing: $(ip -n "$ns" route; ip -n "$ns" neigh show proxy)"
  log "smoke: route $(ip -n "$ns" route show 198.51.100.201); proxy $(ip -n "$ns" neigh show proxy)"

  metrics=$(in_ns /usr/bin/python3 -c 'import urllib.request, sys
sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:9447/metrics", timeout=5).read().decode())') \
    || die "GET /metrics"
  grep -q '^vmnet_vm_info{.*vm_id="vm-1"' <<<"$metrics" || die "/metrics has no vmnet_vm_info for vm-1"

  log "smoke: SIGTERM"
  kill -TERM "$(agent_pid)"
  rc=0
  wait "$agent_runner" || rc=$?
  agent_runner=""
  ((rc == 0)) || die "vmnetd exited $rc on SIGTERM; its log:
$(cat "$agent_log")"
  ip -n "$ns" route show 198.51.100.201 | grep -q "dev vme1a" \
    || die "the VM's route did not survive the agent's exit"
  log "smoke: vmnetd exited 0 and left the VM's route in place"
  rm -f "$agent_log"
fi

# vfs keeps a full copy of every layer: drop the untagged intermediate images of this and earlier
# builds (about 1 GB each), unless asked to keep them for a quicker next build.
if [[ ${KEEP_BUILD_CACHE:-0} != 1 ]]; then
  buildah rmi --prune >/dev/null 2>&1 || log "could not prune intermediate images (buildah rmi --prune)"
fi

size=$(buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -F "${IMAGE#localhost/}" | head -n1 || true)
log "OK: $IMAGE (${size:-size unknown}); total $((SECONDS - started)) s"
