"""The sandbox VM's PID 1: a POSIX shell script rendered per run.

The kernel mounts the host's `/` (read-only, 9p) as root and runs this script
from the per-run scratch directory, which the host made under its own `/`.
The script uses only host binaries (mount, mkdir, env, sh), gives the VM
fresh /proc, /sys, /dev, /tmp and /run, mounts the writable shares at their
host paths, runs the command with its stdout/stderr on two virtio ports,
writes its exit status to the scratch share and powers off. Its own messages
go to the kernel console (a log file on the host), never to the command's output.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from ktstr.sandbox.qemu import STDERR_PORT, STDOUT_PORT, Share

DISK_DEVICE = "/dev/vda"
DISK_MOUNT = "/run/ktstr/disk-cache"
STATUS_FILE = "status"     # in the scratch dir: the command's exit status
KVM_FILE = "kvm"           # in the scratch dir: "ok" or why /dev/kvm is unusable
HEARTBEAT_FILE = "heartbeat"  # in the scratch dir: the guest's uptime, rewritten every few s
HEARTBEAT_S = 5
ENV_FILE = "env.sh"
INIT_FILE = "init"


@dataclass(frozen=True)
class GuestPlan:
    scratch: str                 # guest path of the scratch share (same as on the host)
    shares: Sequence[Share]      # writable shares, mounted in this order
    cwd: str
    argv: Sequence[str]
    uid: int = 0
    gid: int = 0
    groups: Sequence[int] = ()
    disk: bool = False           # /dev/vda holds the btrfs disk-template cache
    # A static busybox runs the setup as in-process applets: far fewer files
    # to fetch over 9p than util-linux and friends. The command itself always
    # starts from /bin/sh with the host's own tools.
    busybox: str | None = None
    setpriv: str = "setpriv"     # absolute path on the host (not busybox's applet)


def _q(value: str) -> str:
    return shlex.quote(value)


_PROLOGUE = r"""
# ktstr sandbox init (PID 1). Messages here go to the kernel console log.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
log() { read -r up _ < /proc/uptime; echo "ktstr-init: [$up] $*"; }
halt() {
    sync
    [ -x /bin/busybox ] && /bin/busybox poweroff -f
    poweroff -f -f 2>/dev/null
    exit 1   # PID 1 exiting panics; panic=-1 + QEMU -no-reboot end the VM
}
# Before /proc exists busybox cannot re-run itself for an applet: call it by path.
$BB mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
log "base mounts done"
share() {
    mkdir -p "$3" 2>/dev/null
    mount -t 9p -o "$2" "$1" "$3" || { log "cannot mount 9p share $1 at $3"; halt; }
}
"""

_RUN = r"""
log "shares mounted"
ip link set lo up 2>/dev/null
if ! grep -qw -e svm -e vmx /proc/cpuinfo; then
    echo "the sandbox CPU has no SVM/VMX" > "$S/kvm"
elif [ ! -c /dev/kvm ]; then
    echo "/dev/kvm is missing in the sandbox (kernel without KVM_AMD?)" > "$S/kvm"
elif ! : 2>/dev/null <>/dev/kvm; then
    echo "/dev/kvm cannot be opened in the sandbox" > "$S/kvm"
else
    echo ok > "$S/kvm"
fi
out=/dev/null; err=/dev/null
for p in /sys/class/virtio-ports/*; do
    read -r name < "$p/name" || continue
    [ "$name" = "$OUT_PORT" ] && out=/dev/${p##*/}
    [ "$name" = "$ERR_PORT" ] && err=/dev/${p##*/}
done
# Proof of life for the host (sandbox.watch.HeartbeatWatch): an emulated host that stops
# running at all (both CPUs stuck) prints nothing, so silence is the only sign of it.
( while :; do cat /proc/uptime > "$S/heartbeat"; sleep "$HEARTBEAT_S"; done ) &
log "running the command"
cd "$CWD" || { log "working directory $CWD is missing inside"; echo 126 > "$S/status"; halt; }
# A clean environment: only what the host passed through env.sh.
inner='. "$1" || exit 126; shift
[ -e /run/ktstr/disk-ok ] || unset KTSTR_DISK_CACHE_DIR
exec "$@"'
$AS_USER /usr/bin/env -i /bin/sh -c "$inner" sh "$S/env.sh" "$@" </dev/null >"$out" 2>"$err"
rc=$?
log "command exited with status $rc"
echo "$rc" > "$S/status.tmp" && mv "$S/status.tmp" "$S/status"
"""

_EPILOGUE = r"""
sync
umount /run/ktstr/disk-cache 2>/dev/null
halt
"""


def render_init(plan: GuestPlan) -> str:
    """The init script for one run (pure: same plan, same bytes)."""
    shell = f"{plan.busybox} sh" if plan.busybox else "/bin/sh"
    lines = [f"#!{shell}\nBB={_q(plan.busybox or '')}", _PROLOGUE]
    lines.append(f"S={_q(plan.scratch)}\nCWD={_q(plan.cwd)}\nHEARTBEAT_S={HEARTBEAT_S}\n"
                 f"OUT_PORT={_q(STDOUT_PORT)}\nERR_PORT={_q(STDERR_PORT)}\n")
    for share in plan.shares:
        lines.append(f"share {_q(share.tag)} {_q(share.mount_options())} "
                     f"{_q(share.guest_path)}\n")
    if plan.disk:
        lines.append(
            f"mkdir -p {DISK_MOUNT}\n"
            f"if mount -t btrfs -o noatime,discard=async {DISK_DEVICE} {DISK_MOUNT}; then\n"
            f"    chown {plan.uid}:{plan.gid} {DISK_MOUNT} && touch /run/ktstr/disk-ok\n"
            f"else\n    log 'cannot mount the disk-template cache; continuing without it'\n"
            f"fi\n")
    if plan.uid == 0 and plan.gid == 0:
        lines.append("AS_USER=\n")
    else:
        groups = ",".join(str(g) for g in plan.groups) or str(plan.gid)
        lines.append(f"AS_USER='{plan.setpriv} --reuid={plan.uid} --regid={plan.gid} "
                     f"--groups={groups}'\n")
    lines.append("set -- " + " ".join(_q(a) for a in plan.argv) + "\n")
    lines.append(_RUN)
    lines.append(_EPILOGUE)
    return "".join(lines)
