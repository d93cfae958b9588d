"""What each message the guest sends looks like, checked before the host uses one.

The guest builds these messages (:mod:`ktstr.guest.init`, :mod:`ktstr.guest.context`)
and the host reads them (:func:`ktstr.runner.collect`, the channel's handlers). To
the host a message is hostile: a field of the wrong type would otherwise surface as
an AttributeError or TypeError somewhere in the classification. So every type has a
table of fields, and :func:`validate_message` names the first one that is wrong.

Shared by host and guest, so stdlib only. A type not listed here is accepted (it is
kept in ``GuestRun.messages`` but the host does not use it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

NUMBER = (int, float)
NULL = type(None)


@dataclass(frozen=True)
class Field:
    types: tuple[type, ...]
    required: bool = True
    items: tuple[type, ...] = ()
    """For a list: the types its elements may have (empty: any)."""
    fields: Mapping[str, Field] | None = None
    """For an object: its own fields, checked the same way."""


def req(*types: type, items: tuple[type, ...] = (),
        fields: Mapping[str, Field] | None = None) -> Field:
    return Field(types, True, items, fields)


def opt(*types: type, items: tuple[type, ...] = (),
        fields: Mapping[str, Field] | None = None) -> Field:
    return Field(types, False, items, fields)


STARTUP_STEPS = {
    "hello": ("mounts", "channel"),
    "scenario_start": ("request", "attach", "disks", "import", "setup"),
}
"""The guest init's start-up steps each message reports (``steps``: seconds each took), in
the order the init takes them."""


def _steps(kind: str) -> Field:
    return opt(dict, fields={name: opt(*NUMBER) for name in STARTUP_STEPS[kind]})


SCHEMAS: dict[str, dict[str, Field]] = {
    "hello": {"uptime": opt(*NUMBER), "kernel": opt(str), "steps": _steps("hello")},
    "sched_attached": {"state": opt(dict), "uptime": opt(*NUMBER)},
    "poke": {"gpa": req(int), "data": req(str), "what": opt(str)},
    "warning": {"text": req(str)},
    "log": {"text": req(str)},
    "scenario_start": {"uptime": opt(*NUMBER), "steps": _steps("scenario_start")},
    "scenario_end": {"uptime": opt(*NUMBER)},
    "sched_samples": {"samples": req(list, items=(dict,))},
    "sched_exit": {  # ktstr.guest.sched.ExitReport
        "exit_status": req(int, NULL),
        "stopped_by": req(str),
        "state_after": req(str),
        "clean_unregister": req(bool),
        "disabled": req(list, items=(dict,)),
        "kernel_lines": req(list, items=(str,)),
        "log_tail": req(str),
    },
    "result": {"value": req(dict, NULL)},
    "report": {"data": req(dict)},
    "shell": {"exit_code": req(int), "stdout": opt(str), "stderr": opt(str)},
    "failure": {
        "kind": req(str),
        "message": req(str),
        "traceback": opt(str),
        "details": opt(dict, fields={"log_tail": opt(str)}),
    },
    "end": {"exit_code": req(int), "uptime": opt(*NUMBER)},
    # ktstr.guest.trace: the trace, zlib-compressed, base64, in order; then what it holds
    "trace_chunk": {"seq": req(int), "data": req(str)},
    "trace_info": {
        "events": req(list, items=(str,)),
        "missing": req(list, items=(str,)),
        "kprobes": req(list, items=(str,)),
        "kprobe_problems": req(list, items=(str,)),
        "buffer_kb": req(int),
        "bytes": req(int),
        "chunks": req(int),
        "overruns": opt(dict),
        "error": opt(str, NULL),
    },
}


def _name(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is NULL else t.__name__ for t in types)


def _is(value: object, types: tuple[type, ...]) -> bool:
    # JSON true/false are Python bools, which are ints: an int field must not take them.
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


def _check(kind: str, body: Mapping[str, Any], schema: Mapping[str, Field],
           prefix: str = "") -> str | None:
    for name, spec in schema.items():
        path = prefix + name
        if name not in body:
            if spec.required:
                return f"message {kind}: field {path!r} is missing"
            continue
        value = body[name]
        if not _is(value, spec.types):
            return (f"message {kind}: field {path!r} is {type(value).__name__}, "
                    f"expected {_name(spec.types)}")
        if spec.items and isinstance(value, list):
            for i, item in enumerate(value):
                if not _is(item, spec.items):
                    return (f"message {kind}: field '{path}[{i}]' is {type(item).__name__}, "
                            f"expected {_name(spec.items)}")
        if spec.fields is not None and isinstance(value, dict):
            problem = _check(kind, value, spec.fields, path + ".")
            if problem is not None:
                return problem
    return None


def validate_message(body: object) -> str | None:
    """None if ``body`` is a message the host may use as it is, else what is wrong."""
    if not isinstance(body, dict):
        return f"message is a {type(body).__name__}, not a JSON object"
    kind = body.get("type")
    if not isinstance(kind, str):
        return "message has no string 'type'"
    schema = SCHEMAS.get(kind)
    if schema is None:
        return None
    return _check(kind, body, schema)
