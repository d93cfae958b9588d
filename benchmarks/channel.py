"""Result-channel throughput.

In-process: the guest's WindowWriter and the host's ResultChannel device on a
real GuestMemory, the doorbell a direct call (what framing, CRC32, JSON and the
copies cost, without VM exits). With ``--kernel``: a guest scenario (this file)
sends ``--mb`` MB through the RAM-window channel and through COM2, and we
report guest-side MB/s for both (needs a usable KVM).

    python benchmarks/channel.py [--mb 10] [--kernel BZIMAGE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def send(ctx: Any) -> dict[str, Any]:
    """Guest scenario: send ctx.args['mb'] MB as reports of 1 MB of text each."""
    mb = int(ctx.args.get("mb", 10))
    chunk = os.urandom(CHUNK // 2).hex()
    t = time.monotonic()
    for i in range(mb):
        ctx.report({"i": i, "blob": chunk})
    elapsed = time.monotonic() - t
    return {"mb": mb, "seconds": elapsed, "mb_per_s": mb / elapsed, "chunk_head": chunk[:64]}


def in_process(mb: int) -> dict[str, Any]:
    from ktstr.guest.channel import WindowWriter
    from ktstr.vmm.devices.channel import DEFAULT_WINDOW, ResultChannel
    from ktstr.vmm.memory import GuestMemory
    from ktstr.wire.frame import encode_message

    mem = GuestMemory([(0, 64 << 20)])
    try:
        dev = ResultChannel()
        dev.bind(mem, 32 << 20)
        writer = WindowWriter(mem.view(32 << 20, DEFAULT_WINDOW),
                              lambda: dev.pio_write(dev.port, b"\x01"))
        chunk = os.urandom(CHUNK // 2).hex()
        t = time.perf_counter()
        for i in range(mb):
            writer.send_bytes(encode_message({"type": "report", "data": {"i": i, "blob": chunk}}))
        elapsed = time.perf_counter() - t
        assert dev.finish() == [] and len(dev.messages) == mb
        assert all(m.body["data"]["blob"] == chunk for m in dev.messages)
        return {"mb": mb, "seconds": round(elapsed, 3), "mb_per_s": round(mb / elapsed, 1),
                "frames": dev.frames}
    finally:
        mem.close()


def in_vm(kernel: Path, mb: int, channel: str) -> dict[str, Any]:
    from ktstr.runner import GuestRequest, run_guest

    run = run_guest(GuestRequest(kernel, scenario="bench_channel:send",
                                 test_file=Path(__file__).resolve(), args={"mb": mb},
                                 channel=channel, timeout=600, memory_mb=1024))
    if not run.ok:
        raise SystemExit(f"{channel}: {run.summary()}")
    assert run.result is not None
    head = run.result["chunk_head"]
    intact = len(run.reports) == mb and all(
        r["blob"].startswith(head) and len(r["blob"]) == CHUNK for r in run.reports)
    return {"channel": channel, "mb": mb, "guest_seconds": round(run.result["seconds"], 3),
            "mb_per_s": round(run.result["mb_per_s"], 1), "intact": intact,
            "boot_to_scenario_s": round(run.timings.get("scenario_start", float("nan")), 3)}


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=10)
    ap.add_argument("--kernel", type=Path, default=None)
    ap.add_argument("--serial-mb", type=int, default=1, help="MB for the (slow) COM2 run")
    args = ap.parse_args()
    out: dict[str, Any] = {"in_process": in_process(args.mb)}
    if args.kernel:
        out["vm_mem"] = in_vm(args.kernel, args.mb, "mem")
        out["vm_serial"] = in_vm(args.kernel, args.serial_mb, "serial")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
