#!/usr/bin/python3
"""The Dockerfile's build stage, without a container engine: from exactly what its COPY lines
copy, configure and build with exactly its cmake commands, and find the files it installs.

    1. Parse the Dockerfile: the build stage (`FROM ... AS build` up to the next FROM), its
       WORKDIR, its COPY lines (not `COPY --from`), its RUN line with `cmake -S`.
    2. Copy those paths from the source tree into a temporary directory that stands for the
       image's file system (/src -> <tmp>/src, /build -> <tmp>/build).
    3. Run the stage's `cmake` configure and build commands there, with the same arguments (the
       build type, the options, the targets); only the paths are the temporary ones, the jobs
       are VMNET_DOCKERFILE_JOBS (default 2), and ccache is the compiler launcher when it is
       installed.
    4. The stage's `install` sources exist, and the built vmnetd names its sources relative to
       the tree (`--help`: "Flags from server/vmnetd/main.cc"), not by a path of the build.

What it cannot see: the packages the stage installs (the machine's are used; test_deploy.py
checks the Dockerfile's list against scripts/install-deps.sh) and the runtime stage
(scripts/build-image.sh builds and smoke-tests the real image with buildah).

A cold build takes minutes on two cores; with ccache warm, well under one.

    /usr/bin/python3 tests/deploy/test_dockerfile_build.py -v
"""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
import skips  # noqa: E402  (tests/skips.py: no skips as root)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKERFILE = os.path.join(REPO, "Dockerfile")
JOBS = os.environ.get("VMNET_DOCKERFILE_JOBS", "2")
CONFIGURE_TIMEOUT = 300
BUILD_TIMEOUT = 1000


def instructions(text):
    """The Dockerfile's instructions as (KEYWORD, rest) pairs, continuation lines joined."""
    result, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        result.append((keyword.upper(), rest.strip()))
        current = ""
    if current:
        keyword, _, rest = current.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def build_stage(text, name="build"):
    """The instructions of stage `name`, after its FROM and up to the next FROM."""
    stage, inside = [], False
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            if inside:
                break
            inside = re.search(r"\bAS\s+" + re.escape(name) + r"\s*$", rest, re.I) is not None
            continue
        if inside:
            stage.append((keyword, rest))
    if not inside and not stage:
        raise ValueError(f"the Dockerfile has no stage named {name!r}")
    return stage


def copy_arguments(rest):
    """COPY's sources and destination (exec form or shell form), or None for COPY --from."""
    words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    flags = [w for w in words if w.startswith("--")]
    if any(f.startswith("--from") for f in flags):
        return None
    paths = [w for w in words if not w.startswith("--")]
    if len(paths) < 2:
        raise ValueError(f"COPY {rest}: needs a source and a destination")
    return paths[:-1], paths[-1]


class Stage:
    """What the build stage copies and runs, read from the Dockerfile."""

    def __init__(self, text):
        self.workdir = "/"
        self.copies = []      # (sources, absolute destination in the image)
        self.configure = None  # the `cmake -S` command's words
        self.build = None      # the `cmake --build` command's words
        self.installs = []     # the files `install` takes from the build
        for keyword, rest in build_stage(text):
            if keyword == "WORKDIR":
                self.workdir = os.path.join(self.workdir, rest)
            elif keyword == "COPY":
                args = copy_arguments(rest)
                if args:
                    sources, dest = args
                    absolute = os.path.normpath(os.path.join(self.workdir, dest))
                    if dest.endswith("/") or dest in (".", "./"):
                        absolute = absolute.rstrip("/") + "/"
                    self.copies.append((sources, absolute))
            elif keyword == "RUN" and re.search(r"\bcmake\b", rest):
                for command in re.split(r"\s*(?:&&|;)\s*", rest):
                    words = shlex.split(command)
                    if words[:2] == ["cmake", "-S"] or (words[:1] == ["cmake"] and "-B" in words):
                        self.configure = words
                    elif words[:2] == ["cmake", "--build"]:
                        self.build = words
                    elif words[:1] == ["install"]:
                        files = [w for w in words[1:] if w.startswith("/")]
                        if len(files) == 2:
                            self.installs.append(files[0])
        if not self.copies:
            raise ValueError("the build stage copies nothing")
        if not self.configure or not self.build:
            raise ValueError("the build stage has no `cmake -S ...` and `cmake --build ...`")


def copy_into(root, stage):
    """Copies the stage's COPY sources from REPO into `root`, laid out as in the image."""
    for sources, dest in stage.copies:
        target = os.path.join(root, dest.lstrip("/"))
        for source in sources:
            matches = sorted(glob.glob(os.path.join(REPO, source)))
            if not matches:
                raise FileNotFoundError(f"COPY {source}: no such file in {REPO}")
            for path in matches:
                if os.path.isdir(path):  # a directory's contents go to the destination
                    shutil.copytree(path, target, symlinks=True, dirs_exist_ok=True)
                elif dest.endswith("/") or len(matches) > 1 or len(sources) > 1:
                    os.makedirs(target, exist_ok=True)
                    shutil.copy2(path, os.path.join(target, os.path.basename(path)))
                else:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copy2(path, target)


def in_root(root, workdir, path):
    """An image path (absolute, or relative to WORKDIR) inside `root`."""
    return os.path.normpath(os.path.join(root, os.path.join(workdir, path).lstrip("/")))


def localized(words, root, workdir):
    """A cmake command with its -S/-B paths inside `root` and -j set to JOBS."""
    out, i = [], 0
    while i < len(words):
        word = words[i]
        if word in ("-S", "-B", "--build") and i + 1 < len(words):
            out += [word, in_root(root, workdir, words[i + 1])]
            i += 2
            continue
        if word in ("-j", "--parallel"):
            out += ["-j", JOBS]
            i += 2 if i + 1 < len(words) and not words[i + 1].startswith("-") else 1
            continue
        if word.startswith("-j") and len(word) > 2:
            out += ["-j", JOBS]
        else:
            out.append(word)
        i += 1
    return out


class DockerfileParseTest(unittest.TestCase):
    """The parser, on a small Dockerfile of its own."""

    SAMPLE = """
        FROM base AS build
        WORKDIR /src
        # a comment
        COPY CMakeLists.txt ./
        COPY proto/ proto/
        COPY ["client/", "client/"]
        RUN cmake -S . -B /build -G Ninja -DX=1 \\
              -DY=OFF \\
         && cmake --build /build --target a b -j "$(nproc)" \\
         && install -D -s -m 0755 /build/a /out/usr/bin/a
        FROM base AS runtime
        COPY --from=build /out/usr/ /usr/
        COPY deploy/x /etc/x
    """

    def test_reads_the_build_stage_only(self):
        stage = Stage(self.SAMPLE.replace("\n        ", "\n"))
        self.assertEqual(stage.copies, [(["CMakeLists.txt"], "/src/"), (["proto/"], "/src/proto/"),
                                        (["client/"], "/src/client/")])
        self.assertEqual(stage.configure, ["cmake", "-S", ".", "-B", "/build", "-G", "Ninja",
                                           "-DX=1", "-DY=OFF"])
        self.assertEqual(stage.build, ["cmake", "--build", "/build", "--target", "a", "b", "-j",
                                       "$(nproc)"])
        self.assertEqual(stage.installs, ["/build/a"])
        self.assertEqual(localized(stage.build, "/r", "/src"),
                         ["cmake", "--build", "/r/build", "--target", "a", "b", "-j", JOBS])
        self.assertEqual(localized(stage.configure, "/r", "/src")[:5],
                         ["cmake", "-S", "/r/src", "-B", "/r/build"])


class DockerfileBuildTest(unittest.TestCase):
    def test_build_stage_builds_from_what_it_copies(self):
        with open(DOCKERFILE, encoding="utf-8") as f:
            stage = Stage(f.read())
        root = tempfile.mkdtemp(prefix="vmnet-dockerfile-")
        self.addCleanup(shutil.rmtree, root, ignore_errors=True)
        copy_into(root, stage)
        configure = localized(stage.configure, root, stage.workdir)
        build = localized(stage.build, root, stage.workdir)
        env = dict(os.environ)
        if shutil.which("ccache"):
            # Paths relative to the temporary root, so that one run's objects serve the next.
            configure.append("-DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
            env["CCACHE_BASEDIR"] = root
        started = time.monotonic()
        out = subprocess.run(configure, cwd=in_root(root, stage.workdir, "."), env=env,
                             capture_output=True, text=True, timeout=CONFIGURE_TIMEOUT)
        self.assertEqual(out.returncode, 0,
                         f"the Dockerfile's configure fails on what it copies "
                         f"({' '.join(stage.configure)}):\n"
                         f"{out.stdout[-3000:]}{out.stderr[-6000:]}")
        out = subprocess.run(build, cwd=in_root(root, stage.workdir, "."), env=env,
                             capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        self.assertEqual(out.returncode, 0,
                         f"the Dockerfile's build fails ({' '.join(stage.build)}):\n"
                         f"{out.stdout[-6000:]}{out.stderr[-3000:]}")
        print(f"\nconfigured and built in {time.monotonic() - started:.0f} s", flush=True)
        self.assertTrue(stage.installs, "the build stage installs nothing")
        for path in stage.installs:
            with self.subTest(install=path):
                self.assertTrue(os.access(in_root(root, "/", path), os.X_OK),
                                f"the build stage installs {path}, which the build did not make")
        vmnetd = [p for p in stage.installs if os.path.basename(p) == "vmnetd"]
        self.assertTrue(vmnetd, "the build stage does not install vmnetd")
        help_out = subprocess.run([in_root(root, "/", vmnetd[0]), "--help"],
                                  capture_output=True, text=True, timeout=20)
        text = help_out.stdout + help_out.stderr
        self.assertIn("Flags from server/vmnetd/main.cc", text)
        self.assertNotIn(root, text, "vmnetd --help names a path of the build machine")


if __name__ == "__main__":
    skips.main()
