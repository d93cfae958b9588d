"""Scheduler definitions: flag profiles, validation, binary discovery."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ktstr.errors import KtstrError
from ktstr.scheduler import (
    BUILTIN,
    EEVDF,
    Discover,
    FlagSpec,
    Scheduler,
    discover,
    get_scheduler,
    parse_scheduler_option,
)


def _exe(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@dataclass
class FakeEntry:
    """Only the attributes discovery reads; a real KernelEntry has many more."""

    id: str = "6.12"
    schedulers: dict[str, Path] = field(default_factory=dict)


def test_profiles_power_set_filtered_by_requires() -> None:
    s = Scheduler(
        "x",
        Discover("x"),
        flags={
            "b": FlagSpec(("-b",)),
            "a": FlagSpec(("-a",), requires=("b",)),
            "c": FlagSpec(("-c",)),
        },
    )
    names = [p.name for p in s.profiles()]
    # 8 subsets, minus those with a but not b: {a}, {a,c}.
    assert names == ["default", "b", "c", "a+b", "b+c", "a+b+c"]
    assert len(set(names)) == len(names)
    # Deterministic across calls and insertion orders.
    s2 = Scheduler("x", Discover("x"), flags=dict(reversed(list(s.flags.items()))))
    assert [p.name for p in s2.profiles()] == names


def test_profile_lookup_any_order_and_args() -> None:
    s = BUILTIN["scx_qmap"]
    prof = s.profile("highpri+batch")
    assert prof.name == "batch+highpri"
    assert s.command_args(prof) == ["-b", "8", "-H"]
    assert s.command_args("default") == []
    with pytest.raises(KtstrError, match="breaks a 'requires'"):
        s.profile("highpri")
    with pytest.raises(KtstrError, match="unknown flag"):
        s.profile("turbo")


def test_with_args_keeps_flags() -> None:
    base = BUILTIN["scx_qmap"]
    stall = base.with_args("-t", "5")
    assert stall.command_args("batch") == ["-t", "5", "-b", "8"]
    assert stall.profiles() == base.profiles()
    assert base.args == ()


def test_eevdf_is_not_sched_ext_and_takes_no_flags() -> None:
    assert not BUILTIN["eevdf"].sched_ext
    assert BUILTIN["scx_simple"].sched_ext
    assert BUILTIN["eevdf"].resolve_binary() is None
    with pytest.raises(KtstrError, match="takes no flags"):
        Scheduler("e", EEVDF, flags={"f": FlagSpec(("-f",))})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "has space"}, "without spaces"),
        ({"name": "x", "binary": "scx_simple"}, "use Discover"),
        ({"name": "x", "watchdog_timeout": 0}, "watchdog_timeout"),
        (
            {"name": "x", "binary": Discover("x"), "flags": {"a": FlagSpec(requires=("zz",))}},
            "unknown flag 'zz'",
        ),
        ({"name": "x", "binary": Discover("x"), "flags": {"a+b": FlagSpec()}}, "reserved"),
        ({"name": "x", "binary": Discover("x"), "flags": {"a": ("-a",)}}, "FlagSpec"),
    ],
)
def test_bad_definitions_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(KtstrError, match=message):
        Scheduler(**kwargs)  # type: ignore[arg-type]


def test_builtins_are_the_matrix_schedulers() -> None:
    assert list(BUILTIN) == ["eevdf", "scx_simple", "scx_qmap", "scx_central", "scx_flatcg"]
    for sched in BUILTIN.values():
        assert sched.profiles()[0].name == "default"


def test_discover_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = tmp_path / "env"
    built_dir = tmp_path / "built"
    path_dir = tmp_path / "path"
    for d in (env_dir, built_dir, path_dir):
        d.mkdir()
        _exe(d / "scx_simple")
    entry = FakeEntry(schedulers={"scx_simple": built_dir / "scx_simple"})
    monkeypatch.setenv("PATH", str(path_dir))
    monkeypatch.setenv("KTSTR_SCHEDULER_DIR", str(env_dir))
    assert discover("scx_simple", entry) == env_dir / "scx_simple"
    monkeypatch.delenv("KTSTR_SCHEDULER_DIR")
    assert discover("scx_simple", entry) == built_dir / "scx_simple"
    assert discover("scx_simple", FakeEntry()) == path_dir / "scx_simple"
    assert BUILTIN["scx_simple"].resolve_binary(entry) == built_dir / "scx_simple"


def test_discover_not_found_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("KTSTR_SCHEDULER_DIR", str(tmp_path))
    with pytest.raises(KtstrError) as err:
        discover("scx_nope", FakeEntry(schedulers={"scx_simple": tmp_path / "x"}))
    text = str(err.value)
    assert "KTSTR_SCHEDULER_DIR" in text and "kernel 6.12" in text and "PATH" in text
    assert "\n" not in text


def test_path_binary_checked(tmp_path: Path) -> None:
    missing = Scheduler("m", tmp_path / "missing")
    with pytest.raises(KtstrError, match="does not exist"):
        missing.resolve_binary()
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(KtstrError, match="not executable"):
        Scheduler("p", plain).resolve_binary()
    good = _exe(tmp_path / "good")
    assert Scheduler("g", good).resolve_binary() == good


def test_get_scheduler_and_option(tmp_path: Path) -> None:
    assert get_scheduler(None).name == "eevdf"
    assert get_scheduler("scx_central") is BUILTIN["scx_central"]
    exe = _exe(tmp_path / "scx_custom")
    custom = get_scheduler(str(exe))
    assert custom.name == "scx_custom" and custom.sched_ext
    with pytest.raises(KtstrError, match="unknown scheduler 'bogus'"):
        get_scheduler("bogus")
    sched, prof = parse_scheduler_option("scx_qmap@batch")
    assert sched.name == "scx_qmap" and prof.name == "batch"
    assert parse_scheduler_option("eevdf")[1].name == "default"


def test_attach_policy_defaults_to_no_retry() -> None:
    from ktstr.scheduler import BUILTIN

    assert BUILTIN["scx_simple"].attach.retries == 0
    central = BUILTIN["scx_central"].attach
    assert central.retries > 0 and any("non-central" in p for p in central.transient)


def test_attach_policy_refuses_retries_without_a_reason() -> None:
    from ktstr.errors import KtstrError
    from ktstr.scheduler import AttachPolicy

    with pytest.raises(KtstrError, match="transient"):
        AttachPolicy(retries=2)
    with pytest.raises(KtstrError, match=r"0\.\.10"):
        AttachPolicy(retries=-1, transient=("x",))
    with pytest.raises(KtstrError, match="pattern"):
        AttachPolicy(retries=1, transient=("(",))


def test_attach_policy_survives_with_args_and_reaches_the_guest_request() -> None:
    from ktstr.scheduler import BUILTIN
    from ktstr.wire.request import RunRequest, SchedulerSpec

    sched = BUILTIN["scx_central"].with_args("-v")
    assert sched.attach == BUILTIN["scx_central"].attach
    req = RunRequest(scheduler=SchedulerSpec(binary="/x", attach_retries=sched.attach.retries,
                                             attach_transient=list(sched.attach.transient)))
    back = RunRequest.from_json(req.to_json())
    assert back.scheduler is not None
    assert back.scheduler.attach_retries == sched.attach.retries
    assert back.scheduler.attach_transient == list(sched.attach.transient)


def test_scx_central_pins_sched_exts_enable_helper_to_its_central_cpu(tmp_path) -> None:
    import subprocess

    from ktstr.guest.sched import pin_enable_helper
    from ktstr.scheduler import BUILTIN, AttachPolicy, FlagProfile

    spec = BUILTIN["scx_central"].guest_spec(Path("/x"), FlagProfile(()))
    assert spec.attach_init_cpu == 0
    assert BUILTIN["scx_simple"].guest_spec(Path("/x"), FlagProfile(())) \
        .attach_init_cpu is None
    with pytest.raises(KtstrError, match="CPU number"):
        AttachPolicy(init_cpu=-1)
    # A /proc whose one helper entry names a real task: that task gets pinned.
    child = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / str(child.pid)).mkdir()
        (tmp_path / str(child.pid) / "comm").write_text("scx_ops_enable_helper\n")
        (tmp_path / "1").mkdir()
        (tmp_path / "1" / "comm").write_text("init\n")
        (tmp_path / "self").mkdir()
        assert pin_enable_helper(0, tmp_path) == [child.pid]
        assert os.sched_getaffinity(child.pid) == {0}
    finally:
        child.kill()
        child.wait()
