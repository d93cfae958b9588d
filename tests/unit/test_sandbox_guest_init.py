"""The sandbox init script: valid shell, mounts in order, runs the command as the user."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ktstr.sandbox.guest_init import DISK_MOUNT, HEARTBEAT_S, GuestPlan, render_init
from ktstr.sandbox.qemu import Share

SHARES = [Share("kt0", Path("/work/co"), "/work/co"),
          Share("kt1", Path("/tmp/ktstr-sandbox-x/share"), "/tmp/ktstr-sandbox-x/share",
                cache="none")]


def plan(**kw: object) -> GuestPlan:
    base: dict[str, object] = dict(scratch="/tmp/ktstr-sandbox-x/share", shares=SHARES,
                                   cwd="/work/co/sub dir", argv=["python", "-c", "print('hi')"],
                                   disk=True)
    base.update(kw)
    return GuestPlan(**base)  # type: ignore[arg-type]


def test_script_parses(tmp_path: Path) -> None:
    script = tmp_path / "init"
    script.write_text(render_init(plan()))
    subprocess.run(["/bin/sh", "-n", str(script)], check=True)


def test_mounts_follow_the_plan_order() -> None:
    text = render_init(plan())
    first = text.index("share kt0 ")
    second = text.index("share kt1 ")
    assert first < second
    assert "cache=none" in text[second:].splitlines()[0]
    assert f"mount -t btrfs -o noatime,discard=async /dev/vda {DISK_MOUNT}" in text
    assert text.index("mount -t tmpfs -o mode=1777 tmpfs /tmp") < first


def test_command_and_cwd_are_quoted() -> None:
    text = render_init(plan())
    assert "set -- python -c 'print('\"'\"'hi'\"'\"')'" in text
    assert "CWD='/work/co/sub dir'" in text


def test_root_runs_directly_other_users_through_setpriv() -> None:
    assert "AS_USER=\n" in render_init(plan())
    text = render_init(plan(uid=1000, gid=1000, groups=[1000, 27]))
    assert "setpriv --reuid=1000 --regid=1000 --groups=1000,27" in text


def test_no_disk_no_btrfs_mount() -> None:
    assert "btrfs" not in render_init(plan(disk=False))


def test_same_plan_same_script() -> None:
    assert render_init(plan()) == render_init(plan())


def test_the_init_beats_a_heartbeat_while_the_command_runs() -> None:
    script = render_init(plan())
    beat = script.index('cat /proc/uptime > "$S/heartbeat"')
    assert f"HEARTBEAT_S={HEARTBEAT_S}\n" in script
    assert beat < script.index('log "running the command"')
