#!/usr/bin/env bash
# One-command, idempotent set-up of a Debian 12 machine for ztunnel-py (run as root):
#   apt packages, the merged kernel-header tree bcc needs, a virtualenv with the
#   package in editable mode, a bcc-only path shim into that virtualenv, and the
#   data path's hot modules (agent and waypoint) compiled by mypyc.
#
# The virtualenv is built on Debian's python3.11 (PYTHON= to choose another): the
# interpreter the container image ships (Containerfile) and python3-bpfcc is built
# for. Debian builds it with profile-guided and link-time optimization into a static
# executable; a default pyenv build has neither and runs from libpython.so: a third more
# of the runtime's own cost per wakeup (bench.floor, uvloop - c) and about a tenth more
# of the agents' CPU per request at a fixed rate (bench.hbone).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$here/.venv}
python=${PYTHON:-/usr/bin/python3.11}
headers_out=${ZTUNNEL_HEADERS_DIR:-/opt/ztunnel-py/kernel-headers}

APT_PACKAGES=(
  python3-bpfcc bpfcc-tools linux-headers-amd64 bpftool
  iproute2 nftables iptables procps psmisc
  curl iperf3 wrk nghttp2-client tcpdump openssl
  haproxy stunnel4 nodejs shellcheck ruby
  gcc libc6-dev libssl-dev valgrind
  python3 python3-venv python3-dev
)

log() { printf '[setup] %s\n' "$*"; }

need_apt=0
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || { need_apt=1; break; }
done
if [ "$need_apt" = 1 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: apt packages are missing and this is not root; run as root" >&2
    exit 1
  fi
  log "installing apt packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
else
  log "apt packages present"
fi

# bcc needs one header tree; Debian splits it into -common and -amd64. Merge the
# two as a tree of symlinks (arch-specific files win).
amd64=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$amd64" ]; then
  common=${amd64%-amd64}-common
  stamp="$headers_out/.merged-from"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$amd64" ]; then
    log "merging $common + $amd64 into $headers_out"
    rm -rf "$headers_out"
    mkdir -p "$headers_out"
    cp -rs "$common/." "$headers_out/"
    cp -rsf "$amd64/." "$headers_out/"
    echo "$amd64" > "$stamp"
  else
    log "kernel headers already merged at $headers_out"
  fi
else
  log "WARNING: no /usr/src/linux-headers-*-amd64; bcc will need /lib/modules/\$(uname -r)/build"
fi

if ! found=$(command -v "$python"); then
  echo "setup: no interpreter $python (python3.11 from apt, or PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
want=$(readlink -f "$found")
if [ -x "$venv/bin/python" ]; then
  have=$(readlink -f "$("$venv/bin/python" -c 'import sys; print(sys._base_executable)')")
  if [ "$have" != "$want" ]; then
    log "virtualenv $venv runs on $have, not $want: building it again"
    rm -rf "$venv"
  fi
fi
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtualenv $venv on $want"
  "$python" -m venv "$venv"
fi
stamp="$venv/.ztunnel-installed"
if [ ! -f "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  log "installing ztunnel-py (editable) with dev tools"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "${here}[dev]"
  touch "$stamp"
else
  log "virtualenv up to date"
fi

# Expose only Debian's bcc module to the venv: never all of dist-packages (it
# carries an old cryptography).
shim="$venv/bcc-shim"
mkdir -p "$shim"
ln -sfn /usr/lib/python3/dist-packages/bcc "$shim/bcc"
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$shim" > "$site/ztunnel_bcc_shim.pth"

# The hot modules compiled by mypyc (scripts/build_native.py: a no-op while current);
# without them everything runs interpreted (the waypoint about half as fast).
"$venv/bin/python" "$here/scripts/build_native.py" \
  || log "WARNING: the hot modules are not compiled; everything runs interpreted"

# bpffs for pinned programs and maps.
if [ "$(id -u)" = 0 ] && ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf || log "WARNING: could not mount bpffs at /sys/fs/bpf"
fi
log "done"
