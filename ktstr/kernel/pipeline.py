"""ensure_kernel / ensure_schedulers / resolve_kernel: cache hit, or build and install."""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ktstr.errors import KtstrError
from ktstr.kernel import build as kbuild
from ktstr.kernel import cache
from ktstr.kernel.cache import BadEntry, CorruptEntry, KernelEntry
from ktstr.kernel.catalog import DEFAULT_KERNEL, fragments_dir, load_catalog
from ktstr.kernel.kconfig import load_fragment, merge_fragments, parse_config, render_fragment
from ktstr.kernel.locks import (
    exclusive_unless_shared,
    file_lock,
    hold_shared,
    lock_holders,
    release_shared,
)
from ktstr.kernel.schedulers import build_schedulers
from ktstr.kernel.source import Source, resolve_source
from ktstr.paths import cache_root

FLAVOURS: dict[str, tuple[str, ...]] = {
    "test": ("ktstr.kconfig", "scenario.kconfig"),
    "sandbox": ("ktstr.kconfig", "sandbox.kconfig"),
}
LOCAL_ID = "local"


@dataclass(frozen=True)
class ResolvedKernel:
    bzimage: Path
    entry: KernelEntry | None


@dataclass(frozen=True)
class Plan:
    """Everything that determines one build, and hence its cache key."""

    kernel_id: str
    flavour: str
    base: str
    source: Source
    requested: dict[str, str | None]
    fragment_names: tuple[str, ...]
    key: str


def _say(message: str) -> None:
    print(f"ktstr: {message}", file=sys.stderr, flush=True)


def make_plan(kernel_id: str, flavour: str, source: Path | None, base: str,
              root: Path) -> Plan:
    if flavour not in FLAVOURS:
        raise KtstrError(f"unknown flavour {flavour!r}: use one of {', '.join(FLAVOURS)}")
    if base not in kbuild.BASES:
        raise KtstrError(f"unknown base config {base!r}: use one of {', '.join(kbuild.BASES)}")
    names = FLAVOURS[flavour]
    if source is None:
        kernel = load_catalog().get(kernel_id)
        src = resolve_source(kernel, None, root)
        names = names + kernel.fragments  # version-specific fixes apply last
    else:
        kernel_id = LOCAL_ID
        src = resolve_source(None, Path(source), root)
    requested = merge_fragments(load_fragment(fragments_dir() / n) for n in names)
    # The normalized options, not the file bytes: editing a comment is not a new kernel.
    frag_digest = hashlib.sha256(render_fragment(requested).encode()).hexdigest()
    key = cache.make_key(kernel_id, flavour, base, src.digest, frag_digest)
    return Plan(kernel_id, flavour, base, src, requested, names, key)


def _load_valid(path: Path) -> KernelEntry | None:
    if not path.exists():
        return None
    try:
        return cache.load_entry(path)
    except CorruptEntry as err:
        _say(f"cache entry {path.name} is corrupt: {err}")
        return None


def _dir_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _use(path: Path) -> KernelEntry:
    """Verify the entry at `path` and hold it in use for this process's lifetime.

    The hold is taken after the check, so only processes with a valid entry
    count as users; an entry removed or replaced meanwhile is refused.
    Raises CorruptEntry.
    """
    before = _dir_id(path)
    if before is None:
        raise CorruptEntry(f"{path} is missing")
    entry = cache.load_entry(path)
    use = cache.use_lock_path(path.parent.parent, entry.key)
    if not use.parent.is_dir():  # not in a cache layout (a copied entry): nothing to hold
        return entry
    newly = hold_shared(use)
    if _dir_id(path) != before:
        if newly:
            release_shared(use)
        raise CorruptEntry(f"{path} was removed or replaced while being checked")
    return entry


def release(entry: KernelEntry) -> None:
    """Stop holding `entry` in use (clean and rebuilds may then remove it)."""
    release_shared(cache.use_lock_path(entry.path.parent.parent, entry.key))


def _cache_dir(root: Path) -> None:
    try:
        cache.kernels_dir(root).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KtstrError(f"cannot use the kernel cache {root} (set KTSTR_CACHE_DIR to a "
                         f"writable directory): {err.strerror}") from None


def _clear_for_build(root: Path, key: str) -> None:
    """Remove a corrupt entry and leftovers of `key` (caller holds the key's build lock)."""
    path = cache.kernels_dir(root) / key
    use = cache.use_lock_path(root, key)
    with exclusive_unless_shared(use) as unused:
        if not unused and path.exists():
            raise KtstrError(
                f"cache entry {key} is corrupt but {cache.in_use_message(lock_holders(use))}: "
                "it is rebuilt once that process ends"
            )
        cache.remove_leftovers(root, key)
        cache.discard(path)


def ensure_kernel(kernel_id: str = DEFAULT_KERNEL, *, flavour: str = "test",
                  source: Path | None = None, base: str = "tinyconfig",
                  schedulers: bool = True) -> KernelEntry:
    """The cached kernel for (id or source, flavour, base), building it if needed.

    For a sched_ext kernel the example schedulers are built too (unless
    schedulers=False). Concurrent callers of one key build it once: the
    others wait on the key's lock and then find the entry. The entry is held
    in use until this process exits (or `release(entry)`): another process's
    clean or rebuild leaves it alone meanwhile.
    """
    root = cache_root()
    _cache_dir(root)
    plan = make_plan(kernel_id, flavour, source, base, root)
    path = cache.kernels_dir(root) / plan.key
    try:
        entry: KernelEntry | None = _use(path)
    except CorruptEntry:
        entry = None  # looked at again, and reported, under the build lock
    if entry is not None and not _needs_schedulers(entry, schedulers):
        return entry
    lock = cache.lock_path(root, plan.key)
    with file_lock(lock, blocking=False) as free:
        if not free:
            _say(f"waiting for another process building {plan.key}")
    with file_lock(lock):
        entry = _load_valid(path)
        if entry is None:
            _clear_for_build(root, plan.key)
            entry = _build(plan, root)
        if _needs_schedulers(entry, schedulers):
            entry = _build_schedulers_locked(entry, root)
        hold_shared(cache.use_lock_path(root, plan.key))  # no cleaner can run: we hold the lock
    return entry


def _needs_schedulers(entry: KernelEntry, wanted: bool) -> bool:
    return wanted and entry.sched_ext and not entry.schedulers


def _build(plan: Plan, root: Path) -> KernelEntry:
    label = f"{plan.kernel_id} {plan.flavour} kernel"
    out = root / "build" / plan.key
    log = out / "ktstr-build.log"
    out.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    phases: dict[str, float] = {}
    start = time.monotonic()
    _say(f"building {label} from {plan.source.description} (log: {log})")

    t = time.monotonic()
    src = plan.source.materialize(root)
    phases["source"] = time.monotonic() - t

    t = time.monotonic()
    result = kbuild.configure(src, out, plan.base, plan.requested, log)
    result.raise_if_dropped(f"{label} ({plan.source.description})")
    if result.unavailable:
        names = ", ".join(f"CONFIG_{n}" for n in result.unavailable)
        _say(f"not available in this kernel ({plan.kernel_id}), skipped: {names}")
    phases["configure"] = time.monotonic() - t

    phases["make"], phases["make_cpu"] = kbuild.build_bzimage(src, out, log, base=plan.base,
                                                              label=label)

    t = time.monotonic()
    version = kbuild.kernelrelease(src, out)
    values = parse_config((out / ".config").read_text())
    features = {
        "sched_ext": values.get("SCHED_CLASS_EXT") == "y",
        "btf": values.get("DEBUG_INFO_BTF") == "y",
        "kvm": values.get("KVM") == "y",
        "9p": values.get("9P_FS") == "y",
    }
    files = {name: out / rel for name, rel in cache.ARTIFACTS.items()}
    metadata: dict[str, object] = {
        "id": plan.kernel_id, "flavour": plan.flavour, "base_config": plan.base,
        "version": version, "source": plan.source.description,
        "source_digest": plan.source.digest, "source_tree": str(src),
        "fragments": list(plan.fragment_names), "features": features,
        "unavailable_options": result.unavailable, "build_log": str(log),
        "built_at": time.time(),
    }
    phases["kernelrelease"] = time.monotonic() - t
    metadata["phases"] = {k: round(v, 1) for k, v in phases.items()}
    metadata["build_seconds"] = round(time.monotonic() - start, 1)
    entry = cache.install_entry(root, plan.key, files, metadata)
    _say(f"built {label} {version} in {time.monotonic() - start:.0f} s "
         f"(make {phases['make']:.0f} s) -> {entry.path}")
    return entry


def ensure_schedulers(entry: KernelEntry) -> dict[str, Path]:
    """The sched_ext example schedulers built against `entry`'s kernel."""
    if not entry.sched_ext:
        raise KtstrError(
            f"kernel {entry.id} ({entry.version}) has no sched_ext (CONFIG_SCHED_CLASS_EXT "
            "unset): the sched_ext schedulers need a 6.12+ kernel, e.g. ktstr kernel build 6.12"
        )
    root = entry.path.parent.parent
    with file_lock(cache.lock_path(root, entry.key)):
        try:
            current = cache.load_entry(entry.path)
        except CorruptEntry as err:
            raise KtstrError(f"cache entry {entry.key} is corrupt ({err}): rebuild it with "
                             f"`ktstr kernel build {entry.id}`") from None
        if not current.schedulers:
            current = _build_schedulers_locked(current, root)
        hold_shared(cache.use_lock_path(root, entry.key))
    return current.schedulers


def _build_schedulers_locked(entry: KernelEntry, root: Path) -> KernelEntry:
    src = Path(cache.read_metadata(entry.path).source_tree or "")
    if not src.is_absolute() or not (src / "Makefile").is_file():
        raise KtstrError(f"the source tree of {entry.key} ({src}) is gone: "
                         f"rebuild it with `ktstr kernel build {entry.id}`")
    work = root / "build" / entry.key / "sched_ext"
    start = time.monotonic()
    binaries = build_schedulers(src, entry.vmlinux, work, work / "build.log")
    entry = cache.install_schedulers(entry, binaries)
    _say(f"built {len(binaries)} sched_ext schedulers in {time.monotonic() - start:.0f} s")
    meta = cache.read_metadata(entry.path)
    phases = dict(meta.phases, schedulers=round(time.monotonic() - start, 1))
    cache.write_json_atomic(entry.path / "metadata.json", dict(meta.raw, phases=phases))
    return entry


def _validated_bzimage(path: Path) -> Path:
    """``path`` if it is a bootable bzImage (64-bit entry); else a one-line KtstrError."""
    from ktstr.bzimage import load_bzimage

    load_bzimage(path)
    return path.resolve()


def resolve_kernel(spec: str, flavour: str = "test") -> ResolvedKernel:
    """A catalog id (built if needed), a bzImage file, a build tree or a cache entry."""
    catalog = load_catalog()
    if spec in catalog.kernels:
        entry = ensure_kernel(spec, flavour=flavour)
        return ResolvedKernel(entry.bzimage, entry)
    path = Path(spec).expanduser()
    if path.is_file():
        image = _validated_bzimage(path)
        if image.name == "bzImage" and (image.parent / "metadata.json").is_file():
            # A cache entry's bzImage: held like the entry, if the entry is sound.
            with contextlib.suppress(CorruptEntry):
                return ResolvedKernel(image, _use(image.parent))
        return ResolvedKernel(image, None)
    if path.is_dir():
        if (path / "metadata.json").is_file():
            try:
                entry = _use(path.resolve())
            except CorruptEntry as err:
                raise KtstrError(f"kernel cache entry {path} is corrupt: {err}") from None
            return ResolvedKernel(entry.bzimage, entry)
        image = path / "arch" / "x86" / "boot" / "bzImage"
        if image.is_file():
            return ResolvedKernel(_validated_bzimage(image), None)
        raise KtstrError(f"{path} has no arch/x86/boot/bzImage: build it first "
                         f"(or use `ktstr kernel build --source {path}`)")
    if "/" in spec or spec.endswith("bzImage"):
        raise KtstrError(f"kernel {spec}: no such file; pass a bzImage path or a catalog id")
    raise KtstrError(
        f"kernel {spec!r} is neither a catalog id ({', '.join(sorted(catalog.kernels))}) "
        "nor an existing bzImage or kernel build tree"
    )


def list_entries() -> list[KernelEntry]:
    return cache.list_entries(cache_root())


def scan_entries() -> tuple[list[KernelEntry], list[BadEntry]]:
    return cache.scan_entries(cache_root())


def clean(keep: int = 0) -> list[Path]:
    removed = cache.clean(cache_root(), keep)
    return removed


__all__ = ["ResolvedKernel", "clean", "ensure_kernel", "ensure_schedulers", "list_entries",
           "release", "resolve_kernel", "scan_entries"]
