# vmnetd container image: a multi-stage build from Debian bookworm.
#
#   build    the toolchain and -dev packages; builds vmnetd and vmnetctl with CMake/Ninja, strips
#            them, gives vmnetd its two file capabilities, and works out from `ldd` which Debian
#            packages hold the shared libraries they need.
#   runtime  the same Debian base with only those runtime packages (no compiler, no -dev, no docs),
#            the two binaries, and a non-root user `vmnetd` (uid/gid 64237).
#
# No Docker engine runs on our machines: scripts/build-image.sh builds this file with buildah
# (`--storage-driver vfs --isolation chroot`) from a `debian:bookworm` base it makes locally with
# debootstrap. Any OCI builder works too: `docker build -t vmnetd .` with the registry's image.
#
# Capabilities: vmnetd needs CAP_NET_ADMIN and CAP_NET_RAW and nothing else. It runs as the
# non-root user, so the capabilities come from the binary's file capabilities
# (cap_net_admin,cap_net_raw+ep), which the kernel grants at exec within the container's bounding
# set. The container must therefore be given NET_ADMIN and NET_RAW (Kubernetes:
# securityContext.capabilities.add) and must NOT set no_new_privs (Kubernetes:
# allowPrivilegeEscalation must not be false), or the kernel ignores file capabilities.
# deploy/kubernetes/daemonset.yaml does both.

ARG BASE_IMAGE=debian:bookworm

FROM ${BASE_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive
# The "build" packages of scripts/install-deps.sh (keep the two in step; tests/deploy checks it),
# and libcap2-bin for setcap. Tests and benchmarks are not configured here
# (VMNET_BUILD_TESTS=OFF, VMNET_BUILD_BENCH=OFF), so their packages are not needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      cmake ninja-build g++ pkg-config \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler grpc-proto \
      libabsl-dev libnl-3-dev libnl-route-3-dev prometheus-cpp-dev libsystemd-dev \
      libnftnl-dev libmnl-dev libnetfilter-conntrack-dev \
      libcap2-bin \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only the sources the two binaries are built from: the work tree's build directories, tests/
# and bench/ never reach the image. The suite's deploy.dockerfile_build configures and builds
# from exactly these paths, with the flags below.
COPY CMakeLists.txt ./
COPY proto/ proto/
COPY include/ include/
COPY server/ server/
COPY client/ client/

RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DVMNET_BUILD_TESTS=OFF -DVMNET_BUILD_BENCH=OFF \
 && cmake --build /build --target vmnetd vmnetctl -j "$(nproc)" \
 && install -D -s -m 0755 /build/server/vmnetd /out/usr/sbin/vmnetd \
 && install -D -s -m 0755 /build/client/vmnetctl /out/usr/bin/vmnetctl \
 && setcap cap_net_admin,cap_net_raw+ep /out/usr/sbin/vmnetd \
 && getcap /out/usr/sbin/vmnetd

# The runtime packages: the Debian package of every shared library the binaries load. With
# Debian's merged /usr a library may be found as /lib/... while dpkg knows it as /usr/lib/... (or
# the other way round), so each path is tried in both spellings and through its symlinks.
RUN set -eu; \
    : > /out/runtime-packages.txt; \
    for lib in $(ldd /out/usr/sbin/vmnetd /out/usr/bin/vmnetctl \
                 | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $2 ~ /^\(/ { print $1 }' \
                 | sort -u); do \
      real=$(readlink -f "$lib"); pkg=""; \
      for p in "$lib" "$real" "/usr$lib" "/usr$real" "${lib#/usr}" "${real#/usr}"; do \
        pkg=$(dpkg-query -S "$p" 2>/dev/null | head -n1 | cut -d: -f1) && [ -n "$pkg" ] && break; \
      done; \
      if [ -z "$pkg" ]; then echo "no Debian package holds $lib" >&2; exit 1; fi; \
      echo "$pkg" >> /out/runtime-packages.txt; \
    done; \
    sort -u -o /out/runtime-packages.txt /out/runtime-packages.txt; \
    echo "runtime packages:"; cat /out/runtime-packages.txt


FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# Slim as debian:bookworm-slim is: dpkg leaves out documentation, manuals and translations.
RUN printf '%s\n' \
      'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
      'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/lintian/*' \
      > /etc/dpkg/dpkg.cfg.d/slim
COPY --from=build /out/runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update \
 && xargs -a /tmp/runtime-packages.txt apt-get install -y --no-install-recommends \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
           /tmp/runtime-packages.txt

# A fixed uid/gid so that Kubernetes (runAsUser) and host paths (hostPath ownership) can name it.
RUN groupadd --system --gid 64237 vmnetd \
 && useradd --system --uid 64237 --gid vmnetd --home-dir /var/lib/vmnetd --no-create-home \
            --shell /usr/sbin/nologin vmnetd \
 && install -d -o vmnetd -g vmnetd -m 0750 /var/lib/vmnetd \
 && install -d -o vmnetd -g vmnetd -m 0755 /run/vmnetd

COPY --from=build /out/usr/ /usr/
# `ip route` inside the container (and on the host, if installed there) names protocol 237.
COPY deploy/iproute2/rt_protos.d/vmnet.conf /etc/iproute2/rt_protos.d/vmnet.conf

USER vmnetd:vmnetd
VOLUME ["/var/lib/vmnetd", "/run/vmnetd"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/sbin/vmnetd"]
