#!/usr/bin/env bash
# What `make test` (and .ci/run) needs beyond Python: the real programs the
# tests run. Installs the Debian packages of the missing ones when it can (root,
# or sudo without a password, and apt-get); otherwise stops at once with the
# exact command to run. Nothing to do when everything is there.
#
#   scripts/provision.sh           install what is missing, or say how
#   scripts/provision.sh --check   only say what is missing (exit 1 if anything is)
set -euo pipefail

# The one list of programs and their Debian packages: the tests' hints
# (tests/integration/conftest.py) read it, tests/test_provision.py checks that
# every package exists. One "program package" pair per line.
TOOLS='
openssl              openssl
curl                 curl
nginx                nginx
haproxy              haproxy
wrk                  wrk
h2load               nghttp2-client
nghttp               nghttp2-client
node                 nodejs
chromium             chromium
taskset              util-linux
unshare              util-linux
pkill                procps
systemd-analyze      systemd
etcd                 etcd-server
pebble               pebble
pebble-challtestsrv  pebble
cc                   gcc
'

# nginx and haproxy live in /usr/sbin, which a user's PATH on Debian lacks
# (make test adds it for the tests too).
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
missing=()
while read -r tool package; do
  [ -n "$tool" ] || continue
  if ! command -v "$tool" >/dev/null 2>&1; then
    missing+=("$package")
  fi
done <<<"$TOOLS"
# Debian's own python3 makes venvs (make test does) only with python3-venv;
# python3-dev for a dependency that has no wheel for this Python.
PYTHON="${PYTHON:-python3}"
if command -v "$PYTHON" >/dev/null 2>&1 && ! "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then
  missing+=(python3-venv python3-dev)
fi
# The compiled request path (scripts/compile.py, mypyc) needs Python's headers;
# without them edge still runs, on its sources.
if command -v "$PYTHON" >/dev/null 2>&1 && ! "$PYTHON" -c \
    "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then
  missing+=(python3-dev)
fi
# Unique, in a stable order, for a command one can read and copy.
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sed '/^$/d' | sort -u)
[ "${#packages[@]}" -eq 0 ] && exit 0

command_line="apt-get install -y --no-install-recommends ${packages[*]}"
if [ "${1:-}" = "--check" ]; then
  echo "provision: missing: ${packages[*]}; run: sudo $command_line" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  sudo=(unavailable)
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "${sudo[*]}" = unavailable ]; then
  echo "provision: the tests need these Debian packages: ${packages[*]}" >&2
  echo "provision: run this, then make test again:" >&2
  echo "    sudo apt-get update && sudo $command_line" >&2
  exit 1
fi
echo "provision: installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# A failed update (offline, a broken mirror) leaves the lists as they are: try the install anyway.
"${sudo[@]}" apt-get update -qq || echo "provision: apt-get update failed; installing from the package lists already here" >&2
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
