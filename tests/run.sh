#!/usr/bin/env bash
# Install everything the tests need, then run the whole test suite.
#
#   bash tests/run.sh                 # the full suite (what CI runs, via .ci/run)
#   bash tests/run.sh tests/unit -x   # extra arguments go to pytest
#
# - qemu-img/qemu-io (Debian package qemu-utils) are installed with apt-get when missing and
#   we are root; otherwise the tests marked `qemu` are skipped (pytest -ra lists them).
# - CI=true selects the reproducible hypothesis profile "ci" (see tests/conftest.py).
# - pytest exit code 5 ("no tests collected"): with no arguments this means the suite itself
#   is broken and is a failure; with a user filter (-k, a path) it is only reported.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
SUITE_TIMEOUT="${SUITE_TIMEOUT:-1500}"   # seconds; the suite takes a few minutes on 2 cores

# Debian packages the tests use: qemu-img/qemu-io/qemu-nbd (the oracle), nbdinfo/nbdcopy (libnbd-bin),
# python3-libnbd (an NBD client for tests/nbd, run with /usr/bin/python3) and libvirt's schema
# validator for the pool XML (virt-xml-validate, from libvirt-clients + libxml2-utils), and
# libvirtd (libvirt-daemon) so a private session daemon gives virsh's own output as an oracle,
# and nginx (nginx-light), the HTTP server with Range support that tests/anywhere starts,
# and qemu-img's curl driver (qemu-block-extra), the oracle for images over HTTP.
missing=()
{ command -v qemu-img && command -v qemu-io; } >/dev/null 2>&1 || missing+=(qemu-utils)
command -v virt-xml-validate >/dev/null 2>&1 || missing+=(libvirt-clients)
command -v xmllint >/dev/null 2>&1 || missing+=(libxml2-utils)
command -v nbdinfo >/dev/null 2>&1 || missing+=(libnbd-bin)   # nbdinfo: dirty-bitmap maps via qemu-nbd
command -v nbdcopy >/dev/null 2>&1 || missing+=(libnbd-bin)   # nbdcopy: tests/nbd
/usr/bin/python3 -c "import nbd" >/dev/null 2>&1 || missing+=(python3-libnbd)   # tests/nbd (system python)
command -v libvirtd >/dev/null 2>&1 || [ -x /usr/sbin/libvirtd ] || missing+=(libvirt-daemon)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)   # images over HTTP (tests/anywhere)
# qemu-img's curl driver (http/https sources): the oracle for diskimg's URL sources
ls /usr/lib/*/qemu/block-curl.so >/dev/null 2>&1 || missing+=(qemu-block-extra)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tests/run.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "tests/run.sh: note: ${missing[*]} not installed and not root; the tests that" \
         "need them will be skipped" >&2
  fi
fi

# Debian's own python3 refuses `pip install` outside a virtualenv (PEP 668).  On a
# throwaway CI machine that is fine to override; elsewhere use a virtualenv.
if ! "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' &&
   [ -e "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')/EXTERNALLY-MANAGED" ]; then
  if [ "${CI:-}" = true ]; then
    export PIP_BREAK_SYSTEM_PACKAGES=1
  else
    echo "tests/run.sh: $PY is managed by the OS; run inside a virtualenv:" >&2
    echo "  python3 -m venv .venv && . .venv/bin/activate && bash tests/run.sh" >&2
    exit 1
  fi
fi

"$PY" -m pip install -q --disable-pip-version-check -e '.[test]'

rc=0
timeout --signal=INT --kill-after=30 "$SUITE_TIMEOUT" \
  "$PY" -m pytest -ra --durations=10 "$@" || rc=$?
case "$rc" in
  5)
    if [ "$#" -eq 0 ]; then
      echo "tests/run.sh: pytest collected no tests: the test suite is broken" >&2
      exit 1
    fi
    echo "tests/run.sh: note: no tests matched the given arguments ($*)" >&2
    exit 0 ;;
  124|130)
    echo "tests/run.sh: the suite did not finish within ${SUITE_TIMEOUT}s" >&2
    exit 1 ;;
esac
exit "$rc"
