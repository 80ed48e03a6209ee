"""Skips that say why, and never on CI: the shared rule of the Python test files.

A test that cannot run here (no root, a tool or a binary missing) skips with the reason for a
developer without root. As root, which is how CI runs, nothing may skip: the same condition is a
failure that says why, so that a missing package or a broken namespace set-up can never pass
for green.

main() runs a file's tests and exits 0 when all passed, 1 when one failed, and SKIP_EXIT_CODE
(77) when none failed but some skipped: tests/CMakeLists.txt gives ctest that code as
SKIP_RETURN_CODE, so ctest reports the file as skipped, not passed, and scripts/test.sh fails a
run as root in which any test skipped.
"""

import functools
import os
import sys
import unittest

SKIP_EXIT_CODE = 77


def skips_allowed():
    """Whether a test that cannot run may skip: only without root."""
    return os.geteuid() != 0


class CannotRunAsRoot(AssertionError):
    """A test that would skip, run as root, where no test may skip."""

    def __init__(self, reason):
        super().__init__(f"this test cannot run, and as root (as CI runs) no test may skip: "
                         f"{reason}")


def skip(reason):
    """Raises the right exception for a test that cannot run: SkipTest without root,
    CannotRunAsRoot (a failure) as root. Use where `raise unittest.SkipTest` would go."""
    if skips_allowed():
        raise unittest.SkipTest(reason)
    raise CannotRunAsRoot(reason)


def require(condition, reason):
    """A decorator like unittest.skipUnless(condition, reason), that fails as root."""
    def decorate(obj):
        if condition:
            return obj
        if skips_allowed():
            return unittest.skip(reason)(obj)
        if isinstance(obj, type):
            def set_up_class(cls):
                raise CannotRunAsRoot(reason)
            obj.setUpClass = classmethod(set_up_class)
            return obj

        @functools.wraps(obj)
        def failing(*args, **kwargs):
            raise CannotRunAsRoot(reason)
        return failing
    return decorate


def main():
    """unittest.main(), with exit code SKIP_EXIT_CODE when nothing failed but a test skipped,
    and 1 when no test ran at all."""
    program = unittest.main(exit=False)
    result = program.result
    if not result.wasSuccessful():
        sys.exit(1)
    if result.skipped:  # (a class skipped in setUpClass counts here, not in testsRun)
        print(f"{len(result.skipped)} skipped, {result.testsRun} ran: reported to ctest as "
              f"skipped (exit {SKIP_EXIT_CODE})", file=sys.stderr)
        sys.exit(SKIP_EXIT_CODE)
    if result.testsRun == 0:
        print("no test ran", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
