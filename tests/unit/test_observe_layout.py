"""The per-kernel layout cache of the monitor's raw reads."""

from __future__ import annotations

import json
from pathlib import Path

from ktstr.observe.fastpath import KernelLayout, layout_path, load_layout, save_layout

BUILD = bytes(range(20))


def layout() -> KernelLayout:
    return KernelLayout(build_id=BUILD.hex(), rq={"nr_running": 4, "clock": 8, "curr": 16},
                        task={"pid": 100, "comm": 200, "sched_class": 300}, dsq_id=24,
                        symbols={"runqueues": 0x2DC40, "__per_cpu_offset": 0xFFFFFFFF81A4BCA0,
                                 "jiffies": 0xFFFFFFFF81E079C0},
                        classes={"fair": 0xFFFFFFFF81000000})


def test_a_saved_layout_loads_back_for_its_build_only(tmp_path: Path) -> None:
    save_layout(tmp_path, layout())
    assert load_layout(tmp_path, BUILD) == layout()
    assert load_layout(tmp_path, b"\1" * 20) is None
    assert load_layout(tmp_path, None) is None
    assert [p.name for p in (tmp_path / "observe").iterdir()] == [f"{BUILD.hex()}.json"]


def test_a_corrupt_or_foreign_layout_is_not_used(tmp_path: Path) -> None:
    path = layout_path(tmp_path, BUILD)
    path.parent.mkdir(parents=True)
    for text in ("{", "[]", json.dumps({"build_id": BUILD.hex()}),
                 json.dumps({**layout().__dict__, "version": 99}),
                 json.dumps({**layout().__dict__, "rq": {"nr_running": "4"}})):
        path.write_text(text)
        assert load_layout(tmp_path, BUILD) is None, text


def test_sched_ext_is_known_from_the_layout() -> None:
    assert not layout().sched_ext
    with_scx = KernelLayout(**{**layout().__dict__,
                               "rq": {**layout().rq, "scx.runnable_list": 40},
                               "symbols": {**layout().symbols, "scx_exit_info": 1},
                               "exit_kind": 0})
    assert with_scx.sched_ext
