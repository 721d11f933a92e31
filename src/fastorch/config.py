"""Load fastorch's TOML configuration into typed, validated structs.

A file has three tables: ``[supervisor]`` (fastorch itself), ``[defaults]``
(service keys every service inherits) and ``[services.<name>]``. Loading
either returns a :class:`Config` or raises one :class:`ConfigError` that
lists every problem found, each with its dotted path and a reason::

    services.web.readiness.interval: expected a duration like "5s", got "5 seconds"
    services.api.depends_on.db2: unknown service 'db2'

msgspec checks the types. It stops at the first error inside a struct, so
when a table fails, a second pass converts it field by field to find the
rest. Each service table is checked on its own: one bad service never hides
another one's problems.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import re
import resource
import shlex
import signal
import tomllib
import types
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from fastorch.errors import ConfigError, CycleError

__all__ = [
    "Config",
    "ConfigDiff",
    "Duration",
    "LogConfig",
    "ProbeConfig",
    "ServiceConfig",
    "Size",
    "SupervisorConfig",
    "condition_value",
    "diff",
    "engine_options",
    "levels",
    "load",
    "loads",
    "parse_service",
    "parse_duration",
    "parse_size",
    "to_dot",
    "with_service",
    "without_service",
]

logger = logging.getLogger(__name__)

try:
    from fastorch._core import MAX_DURATION_MS
except ImportError:  # the compiled core is not built (docs, linting)
    MAX_DURATION_MS = 30 * 86_400_000

Problems = list[tuple[str, str]]
_T = TypeVar("_T", bound=Struct)

_DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_DURATION = re.compile(r"(?:\d+(?:ms|s|m|h|d))+")
_SIZE = re.compile(r"(\d+)([kmgt]i?b|b)", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_OCTAL = re.compile(r"0?o?([0-7]{1,4})")
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_ENV_NAME = re.compile(r"[^=\0]+")
_ENV_LINE = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*)")
_TOML_WHERE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_MSGSPEC_WHERE = re.compile(r" - at `\$(.*)`$")

_RlimitName = Literal[
    "nofile", "nproc", "core", "memlock", "stack", "as", "fsize", "cpu", "data"
]
RLIMIT_NAMES = frozenset(get_args(_RlimitName))
RLIM_INFINITY = resource.RLIM_INFINITY


# -- value types ---------------------------------------------------------------
#
# Each is an int subclass that msgspec hands to ``_dec_hook``: the string
# forms are parsed there, so a bad value gets our reason and msgspec's path.


class Duration(int):
    """Milliseconds, written ``"250ms"``, ``"30s"``, ``"5m"``, ``"1h30m"``."""


class Size(int):
    """Bytes, written ``"10MiB"``, ``"500KB"`` or as a plain integer."""


class Octal(int):
    """File mode bits, written as an octal string such as ``"022"``."""


class SignalNumber(int):
    """A signal, written ``"SIGTERM"``, ``"TERM"`` or as its number."""


def parse_duration(text: object) -> int:
    """Return the milliseconds of a duration such as ``"1m30s"``.

    Raises:
        ValueError: not a duration string, or over 30 days.
    """
    if not isinstance(text, str) or not _DURATION.fullmatch(text):
        raise ValueError(f'expected a duration like "5s", got {_show(text)}')
    ms = sum(int(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))
    if ms > MAX_DURATION_MS:
        raise ValueError(f"duration {_show(text)} is longer than 30 days")
    return ms


def parse_size(value: object) -> int:
    """Return the bytes of a size such as ``"10MiB"`` (or a plain integer).

    Raises:
        ValueError: not a size.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f'expected a size like "10MiB", got {_show(value)}')
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]


def _parse_octal(value: object) -> int:
    match = _OCTAL.fullmatch(value) if isinstance(value, str) else None
    if match is None or int(match[1], 8) > 0o777:
        raise ValueError(f'expected an octal string like "022", got {_show(value)}')
    return int(match[1], 8)


def _parse_signal(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value in signal.valid_signals():
            return value
    elif isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal.Signals, name, None)
        if isinstance(sig, signal.Signals):
            return int(sig)
    raise ValueError(
        f'expected a signal like "SIGTERM" or a number, got {_show(value)}'
    )


_PARSERS = {
    Duration: lambda v: Duration(parse_duration(v)),
    Size: lambda v: Size(parse_size(v)),
    Octal: lambda v: Octal(_parse_octal(v)),
    SignalNumber: lambda v: SignalNumber(_parse_signal(v)),
}


def _dec_hook(tp: type, value: object) -> object:
    parser = _PARSERS.get(tp)
    if parser is None:
        raise NotImplementedError(tp)
    return parser(value)


# -- the result: what the rest of fastorch reads -------------------------------


class ProbeConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """A readiness or liveness probe; durations in milliseconds."""

    kind: Literal["http", "tcp", "exec"]
    target: str | list[str]  # url, "host:port", or a command
    status_min: int = 200
    status_max: int = 399
    headers: dict[str, str] = {}
    initial_delay_ms: int = 0
    interval_ms: int = 10_000
    timeout_ms: int = 1000
    success_threshold: int = 1
    failure_threshold: int = 3

    def spec(self) -> tuple[int, int, int, int, int]:
        """The engine's probe spec: delay, period, timeout, thresholds."""
        return (
            self.initial_delay_ms,
            self.interval_ms,
            self.timeout_ms,
            self.success_threshold,
            self.failure_threshold,
        )


class LogConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Where a service's output goes; ``max_size`` in bytes (0: no rotation)."""

    destination: Literal["journal", "file", "inherit", "null"] = "journal"
    dir: str = "/var/log/fastorch"
    max_size: int = 10 * 2**20
    keep: int = 5
    tail_lines: int = 200


class ServiceConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """One service (one instance of a table), defaults applied."""

    name: str
    group_name: str  # the table's name: "worker" for "worker@2"
    instance: int  # 1..N for instances, 0 for a single service
    command: list[str]
    cwd: str
    env: dict[str, str] = {}
    user: str | None = None
    group: str | None = None
    umask: int | None = None
    rlimits: dict[str, tuple[int, int]] = {}
    oneshot: bool = False
    autostart: bool = True
    restart: Literal["always", "on-failure", "never"] = "on-failure"
    success_exit_codes: tuple[int, ...] = (0,)
    backoff_initial_ms: int = 100
    backoff_factor: float = 2.0
    backoff_max_ms: int = 30_000
    backoff_jitter: float = 0.1
    backoff_reset_ms: int = 60_000
    start_limit_burst: int = 5
    start_limit_interval_ms: int = 10_000
    stop_signal: int = int(signal.SIGTERM)
    stop_timeout_ms: int = 10_000
    start_timeout_ms: int = 0
    notify: bool = False
    watchdog_ms: int = 0
    depends_on: tuple[tuple[str, str], ...] = ()  # (name, condition)
    readiness: ProbeConfig | None = None
    liveness: ProbeConfig | None = None
    logs: LogConfig = LogConfig()


class SupervisorConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Settings of fastorch itself; paths absolute, durations in ms."""

    runtime_dir: str
    api_socket: str
    drop_in_dir: str
    api_socket_mode: int = 0o660
    api_socket_owner: str | None = None
    api_socket_group: str | None = None
    api_tcp: tuple[str, int] | None = None  # (host, port)
    api_token_file: str | None = None
    metrics_without_token: bool = False
    ready_when: Literal["settled", "started"] = "settled"
    status_interval_ms: int = 1000
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"


class Config(Struct, frozen=True):
    """A whole validated configuration.

    ``services`` is keyed by expanded name (``worker@1``) in file order;
    ``groups`` maps each table name to its instance names; ``source`` is
    the TOML as read.
    """

    path: str
    base_dir: str
    supervisor: SupervisorConfig
    services: dict[str, ServiceConfig]
    groups: dict[str, tuple[str, ...]]
    source: dict[str, Any]


class ConfigDiff(Struct, frozen=True):
    """What a reload changes, as lists of expanded service names."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]


# -- the input: TOML-shaped tables ---------------------------------------------

_Threshold = Annotated[int, Meta(ge=1, le=255)]  # the engine counts in 8 bits
_Count = Annotated[int, Meta(ge=0)]
_ExitCode = Annotated[int, Meta(ge=0, le=255)]
_Status = Annotated[int, Meta(ge=100, le=599)]
# XXX: no Meta(ge=0) here: msgspec 0.23.0 corrupts memory (free(): invalid
# pointer at the next collection) for a union of a constrained int, a
# Literal and a tuple of them; _check_table tests the sign instead.
_Limit = int | Literal["infinity"]
_Condition = Literal["started", "ready", "completed"]


class _Table(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class _RawProbe(_Table):
    http: str | UnsetType = UNSET
    tcp: str | UnsetType = UNSET
    exec: list[str] | str | UnsetType = UNSET
    status: tuple[_Status, _Status] | UnsetType = UNSET
    headers: dict[str, str] | UnsetType = UNSET
    initial_delay: Duration = Duration(0)
    interval: Duration = Duration(10_000)
    timeout: Duration = Duration(1000)
    success_threshold: _Threshold = 1
    failure_threshold: _Threshold = 3


class _RawBackoff(_Table):
    initial: Duration | UnsetType = UNSET
    factor: Annotated[float, Meta(ge=1.0, le=100.0)] | UnsetType = UNSET
    max: Duration | UnsetType = UNSET
    jitter: Annotated[float, Meta(ge=0.0, le=1.0)] | UnsetType = UNSET
    reset_after: Duration | UnsetType = UNSET


class _RawStartLimit(_Table):
    burst: Annotated[int, Meta(ge=0, le=65535)] | UnsetType = UNSET
    interval: Duration | UnsetType = UNSET


class _RawLogs(_Table):
    destination: Literal["journal", "file", "inherit", "null"] | UnsetType = UNSET
    dir: str | UnsetType = UNSET
    max_size: Size | UnsetType = UNSET
    keep: _Count | UnsetType = UNSET
    tail_lines: _Count | UnsetType = UNSET


class _RawDefaults(_Table):
    cwd: str | UnsetType = UNSET
    env: dict[str, str | int] | UnsetType = UNSET
    env_file: str | UnsetType = UNSET
    user: str | UnsetType = UNSET
    group: str | UnsetType = UNSET
    umask: Octal | UnsetType = UNSET
    rlimits: dict[_RlimitName, _Limit | tuple[_Limit, _Limit]] | UnsetType = UNSET
    oneshot: bool | UnsetType = UNSET
    autostart: bool | UnsetType = UNSET
    restart: Literal["always", "on-failure", "never"] | UnsetType = UNSET
    success_exit_codes: list[_ExitCode] | UnsetType = UNSET
    backoff: _RawBackoff | UnsetType = UNSET
    start_limit: _RawStartLimit | UnsetType = UNSET
    stop_signal: SignalNumber | UnsetType = UNSET
    stop_timeout: Duration | UnsetType = UNSET
    start_timeout: Duration | UnsetType = UNSET
    notify: bool | UnsetType = UNSET
    watchdog: Duration | UnsetType = UNSET
    readiness: _RawProbe | UnsetType = UNSET
    liveness: _RawProbe | UnsetType = UNSET
    logs: _RawLogs | UnsetType = UNSET


class _RawService(_RawDefaults, kw_only=True):
    command: list[str] | str
    depends_on: list[str] | dict[str, _Condition] | UnsetType = UNSET
    instances: Annotated[int, Meta(ge=1, le=100_000)] = 1


class _RawSupervisor(_Table):
    api_socket: str | UnsetType = UNSET
    api_socket_mode: Octal = Octal(0o660)
    api_socket_owner: str = ""
    api_socket_group: str = ""
    api_tcp: str = ""
    api_token_file: str = ""
    metrics_without_token: bool = False
    ready_when: Literal["settled", "started"] = "settled"
    status_interval: Duration = Duration(1000)
    drop_in_dir: str = ""
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"


class _RawFile(_Table):
    supervisor: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    services: dict[str, Any] = {}  # each table is converted on its own


_SERVICE_ONLY = ("command", "depends_on", "instances")
_SUBTABLES = {
    "backoff": _RawBackoff,
    "start_limit": _RawStartLimit,
    "logs": _RawLogs,
}


# -- converting with every problem reported ------------------------------------


def _show(value: object) -> str:
    """A value as the user wrote it, cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "array": "an array",
    "object": "a table",
    "null": "nothing",
    "list": "an array",
    "tuple": "an array",
    "dict": "a table",
}


def _reason(message: str, tp: Any, value: object) -> tuple[str, str]:
    """Turn a msgspec message into (sub-path, reason) in our words."""
    sub = ""
    match = _MSGSPEC_WHERE.search(message)
    if match:
        sub = match[1]
        message = message[: match.start()]
    if message.startswith("Invalid enum value") and not sub:
        return sub, f"expected {_describe(tp)}, got {_show(value)}"
    if message.startswith("Expected `"):
        # "Expected `str | array`, got `int`" or "Expected `int` >= 1"
        expected = message[len("Expected ") :].split(", got ")[0]
        expected = re.sub(
            r"`([^`]*)`",
            lambda m: " or ".join(
                _TYPE_WORDS.get(w.strip(), w.strip()) for w in m[1].split("|")
            ),
            expected,
        )
        return sub, f"expected {expected}, got {_show(value)}"
    return sub, message[:1].lower() + message[1:].replace("`", "'")


def _describe(tp: Any) -> str:
    """``one of "a", "b"`` or ``an integer or "infinity"``: what *tp* takes."""
    words: list[str] = []
    choices: list[str] = []
    for arm in _arms(tp):
        if get_origin(arm) is Literal:
            choices.extend(f'"{c}"' for c in get_args(arm))
        else:
            origin = get_origin(arm) or arm
            name = getattr(origin, "__name__", str(origin))
            words.append(_TYPE_WORDS.get(name, name))
    if not words and len(choices) > 1:
        return "one of " + ", ".join(choices)
    items = words + choices
    return " or ".join([", ".join(items[:-1]), items[-1]] if len(items) > 2 else items)


def _arms(tp: Any) -> tuple[Any, ...]:
    """The alternatives of a union (without UNSET), metadata stripped."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        arms: list[Any] = []
        for arm in get_args(tp):
            if arm is not UnsetType:
                arms.extend(_arms(arm))
        return tuple(arms)
    return (tp,)


def _collect(value: object, tp: Any, path: str, problems: Problems) -> None:
    """Convert *value* piece by piece, adding a problem per bad leaf."""
    arms = _arms(tp)
    if isinstance(value, dict):
        for arm in arms:
            if isinstance(arm, type) and issubclass(arm, Struct):
                _collect_struct(value, arm, path, problems)
                return
        for arm in arms:
            if get_origin(arm) is dict:
                key_tp, item_tp = get_args(arm)
                for key, item in value.items():
                    if key_tp is not str:
                        try:
                            msgspec.convert(key, key_tp)
                        except msgspec.ValidationError:
                            reason = f"unknown key, expected {_describe(key_tp)}"
                            problems.append((_join(path, key), reason))
                            continue
                    _collect(item, item_tp, _join(path, key), problems)
                return
    if isinstance(value, list):
        for arm in arms:
            if get_origin(arm) is list:
                item_tp = get_args(arm)[0]
                for i, item in enumerate(value):
                    _collect(item, item_tp, _join(path, i), problems)
                return
    try:
        msgspec.convert(value, tp, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        sub, reason = _reason(str(exc), tp, value)
        problems.append((path + sub, reason))


def _collect_struct(
    table: dict[str, Any], tp: type[Struct], path: str, problems: Problems
) -> None:
    fields = {f.encode_name: f for f in msgspec.structs.fields(tp)}
    for key, item in table.items():
        info = fields.get(key)
        if info is None:
            problems.append((_join(path, key), "unknown key"))
        else:
            _collect(item, info.type, _join(path, key), problems)
    for key, info in fields.items():
        if info.required and key not in table:
            problems.append((_join(path, key), "missing required key"))


def _convert(table: Any, tp: type[_T], path: str, problems: Problems) -> _T | None:
    """Convert *table*; on failure add every problem and return what is valid.

    The result then holds the valid keys only (``None`` when even that
    fails), so semantic checks can still run on them.
    """
    try:
        return msgspec.convert(table, tp, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        first = str(exc)
    before = len(problems)
    _collect(table, tp, path, problems)
    if len(problems) == before:  # the second pass should always find it
        sub, reason = _reason(first, tp, table)
        problems.append((path + sub, reason))
    if not isinstance(table, dict):
        return None
    bad = {_first_key(p, path) for p, _ in problems[before:]}
    valid = {k: v for k, v in table.items() if k not in bad}
    try:
        return msgspec.convert(valid, tp, dec_hook=_dec_hook)
    except msgspec.ValidationError:
        return None


def _first_key(problem_path: str, path: str) -> str:
    rest = problem_path[len(path) :].lstrip(".")
    return re.split(r"[.\[]", rest, maxsplit=1)[0]


# -- semantic checks -----------------------------------------------------------


@lru_cache(maxsize=1024)
def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@lru_cache(maxsize=1024)
def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _split_command(
    command: str | list[str], path: str, problems: Problems
) -> list[str]:
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            problems.append((path, f"cannot split command: {exc}"))
            return []
    else:
        argv = list(command)
    if not argv or not argv[0]:
        problems.append((path, "command is empty"))
        return []
    return argv


def _parse_host_port(text: str) -> tuple[str, int] | None:
    """``"127.0.0.1:80"`` or ``"[::1]:80"`` as (host, port), else None."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            return None
        host = host[1:-1]
    elif ":" in host:
        return None
    return host, int(port)


@dataclass
class _Context:
    """Per-load state: where relative paths start, files read once."""

    base_dir: str
    env_files: dict[str, dict[str, str] | str] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    dirs: dict[str, bool] = field(default_factory=dict)

    def resolve(self, text: str) -> str:
        """*text* as an absolute path; symlinks are kept as written."""
        path = self.paths.get(text)
        if path is None:
            joined = os.path.join(self.base_dir, os.path.expanduser(text))
            path = self.paths[text] = os.path.normpath(joined)
        return path

    def is_dir(self, text: str) -> bool:
        path = self.resolve(text)
        found = self.dirs.get(path)
        if found is None:
            found = self.dirs[path] = os.path.isdir(path)
        return found

    def read_env_file(self, text: str) -> dict[str, str] | str:
        """The file's variables, or the reason it cannot be used."""
        path = self.resolve(text)
        cached = self.env_files.get(path)
        if cached is None:
            cached = self.env_files[path] = _read_env_file(path)
        return cached


def _read_env_file(path: str) -> dict[str, str] | str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        return f"cannot read {path!r}: {reason}"
    env = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(line)
        if match is None:
            return f"{path!r} line {number}: expected NAME=value"
        value = match[2]
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[match[1]] = value
    return env


def _check_probe(probe: _RawProbe, path: str, problems: Problems) -> None:
    kinds = [k for k in ("http", "tcp", "exec") if getattr(probe, k) is not UNSET]
    if len(kinds) != 1:
        got = ", ".join(kinds) if kinds else "none"
        problems.append((path, f"expected exactly one of http, tcp, exec, got {got}"))
    if probe.http is not UNSET:
        url = urllib.parse.urlsplit(probe.http)
        if url.scheme not in ("http", "https") or not url.hostname:
            problems.append(
                (
                    path + ".http",
                    f"expected an http:// or https:// url, got {_show(probe.http)}",
                )
            )
        else:
            try:
                url.port  # noqa: B018 -- raises on a bad port
            except ValueError:
                problems.append((path + ".http", f"bad port in {_show(probe.http)}"))
    elif probe.status is not UNSET or probe.headers is not UNSET:
        key = "status" if probe.status is not UNSET else "headers"
        problems.append((_join(path, key), "only allowed with an http probe"))
    if probe.tcp is not UNSET and _parse_host_port(probe.tcp) is None:
        problems.append(
            (path + ".tcp", f'expected "host:port", got {_show(probe.tcp)}')
        )
    if probe.exec is not UNSET:
        _split_command(probe.exec, path + ".exec", problems)
    if probe.status is not UNSET and probe.status[0] > probe.status[1]:
        problems.append((path + ".status", "expected [min, max] with min <= max"))
    if probe.interval == 0:
        problems.append((path + ".interval", "must be longer than 0s"))
    if probe.timeout == 0:
        problems.append((path + ".timeout", "must be longer than 0s"))


def _check_table(
    raw: _RawDefaults, path: str, ctx: _Context, problems: Problems
) -> None:
    """Checks msgspec cannot make, for a service table or ``[defaults]``."""
    if raw.cwd is not UNSET and not ctx.is_dir(raw.cwd):
        where = ctx.resolve(raw.cwd)
        problems.append((path + ".cwd", f"no such directory: {where!r}"))
    if raw.env_file is not UNSET:
        env = ctx.read_env_file(raw.env_file)
        if isinstance(env, str):
            problems.append((path + ".env_file", env))
    if raw.env is not UNSET:
        for key, value in raw.env.items():
            if not _ENV_NAME.fullmatch(key):
                problems.append((_join(path + ".env", key), "invalid variable name"))
            elif isinstance(value, str) and "\0" in value:
                problems.append((_join(path + ".env", key), "contains a NUL byte"))
    if raw.user is not UNSET and not _user_exists(raw.user):
        problems.append((path + ".user", f"unknown user {raw.user!r}"))
    if raw.group is not UNSET and not _group_exists(raw.group):
        problems.append((path + ".group", f"unknown group {raw.group!r}"))
    if raw.rlimits is not UNSET:
        for name, limit in raw.rlimits.items():
            where = _join(path + ".rlimits", name)
            pair = limit if isinstance(limit, tuple) else (limit,)
            if any(isinstance(v, int) and v < 0 for v in pair):
                problems.append((where, "a limit cannot be negative"))
                continue
            soft, hard = _limit_pair(limit)
            if hard != RLIM_INFINITY and (soft == RLIM_INFINITY or soft > hard):
                problems.append((where, "soft limit above the hard limit"))
    for key in ("readiness", "liveness"):
        probe = getattr(raw, key)
        if probe is not UNSET:
            _check_probe(probe, _join(path, key), problems)


def _check_merged(
    raw: _RawDefaults, defaults: _RawDefaults, path: str, problems: Problems
) -> None:
    """Checks that need a service's keys merged over ``[defaults]``."""
    initial = int(_or(_pick_sub(raw, defaults, "backoff", "initial"), 100))
    maximum = int(_or(_pick_sub(raw, defaults, "backoff", "max"), 30_000))
    if maximum < initial:
        problems.append(
            (
                path + ".backoff.max",
                f"{maximum} ms is below backoff.initial ({initial} ms)",
            )
        )


def _limit_pair(value: int | str | tuple[int | str, int | str]) -> tuple[int, int]:
    def one(v: int | str) -> int:
        return RLIM_INFINITY if v == "infinity" else int(v)

    if isinstance(value, tuple):
        return one(value[0]), one(value[1])
    return one(value), one(value)


# -- building services ---------------------------------------------------------


def _pick(service: _RawDefaults, defaults: _RawDefaults, key: str) -> Any:
    value = getattr(service, key)
    return getattr(defaults, key) if value is UNSET else value


def _pick_sub(service: _RawDefaults, defaults: _RawDefaults, key: str, sub: str) -> Any:
    for raw in (service, defaults):
        table = getattr(raw, key)
        if table is not UNSET and getattr(table, sub) is not UNSET:
            return getattr(table, sub)
    return UNSET


def _or(value: Any, default: Any) -> Any:
    return default if value is UNSET else value


def _probe(raw: _RawProbe | UnsetType, ctx: _Context) -> ProbeConfig | None:
    if raw is UNSET:
        return None
    status = (200, 399) if raw.status is UNSET else raw.status
    kind: Literal["http", "tcp", "exec"]
    target: str | list[str]
    if raw.http is not UNSET:
        kind, target = "http", raw.http
    elif raw.tcp is not UNSET:
        kind, target = "tcp", raw.tcp
    else:
        assert raw.exec is not UNSET
        kind = "exec"
        target = shlex.split(raw.exec) if isinstance(raw.exec, str) else raw.exec
    return ProbeConfig(
        kind=kind,
        target=target,
        status_min=status[0],
        status_max=status[1],
        headers={} if raw.headers is UNSET else dict(raw.headers),
        initial_delay_ms=int(raw.initial_delay),
        interval_ms=int(raw.interval),
        timeout_ms=int(raw.timeout),
        success_threshold=raw.success_threshold,
        failure_threshold=raw.failure_threshold,
    )


def _default_log_dir() -> str:
    if os.geteuid() == 0:
        return "/var/log/fastorch"
    return f"/tmp/fastorch-{os.getuid()}/log"


def _build(
    name: str,
    raw: _RawService,
    defaults: _RawDefaults,
    depends_on: tuple[tuple[str, str], ...],
    ctx: _Context,
) -> list[ServiceConfig]:
    """The service's instances; *raw* and *defaults* are already checked."""

    def pick(key: str, default: Any = UNSET) -> Any:
        return _or(_pick(raw, defaults, key), default)

    def sub(key: str, subkey: str, default: Any) -> Any:
        return _or(_pick_sub(raw, defaults, key, subkey), default)

    env: dict[str, str] = {}
    env_file = pick("env_file")
    if env_file is not UNSET:
        env.update(ctx.read_env_file(env_file))  # type: ignore[arg-type]
    for variables in (defaults.env, raw.env):
        if variables is not UNSET:
            env.update({k: str(v) for k, v in variables.items()})
    rlimits = {}
    for limits in (defaults.rlimits, raw.rlimits):
        if limits is not UNSET:
            rlimits.update({k: _limit_pair(v) for k, v in limits.items()})
    log_dir = sub("logs", "dir", UNSET)
    logs = LogConfig(
        destination=sub("logs", "destination", "journal"),
        dir=_default_log_dir() if log_dir is UNSET else ctx.resolve(log_dir),
        max_size=int(sub("logs", "max_size", 10 * 2**20)),
        keep=sub("logs", "keep", 5),
        tail_lines=sub("logs", "tail_lines", 200),
    )
    umask = pick("umask", None)
    common: dict[str, Any] = dict(
        group_name=name,
        command=_split_command(raw.command, "", []),
        cwd=ctx.resolve(pick("cwd", ".")),
        user=pick("user", None),
        group=pick("group", None),
        umask=None if umask is None else int(umask),
        rlimits=rlimits,
        oneshot=pick("oneshot", False),
        autostart=pick("autostart", True),
        restart=pick("restart", "on-failure"),
        success_exit_codes=tuple(pick("success_exit_codes", (0,))),
        backoff_initial_ms=int(sub("backoff", "initial", 100)),
        backoff_factor=float(sub("backoff", "factor", 2.0)),
        backoff_max_ms=int(sub("backoff", "max", 30_000)),
        backoff_jitter=float(sub("backoff", "jitter", 0.1)),
        backoff_reset_ms=int(sub("backoff", "reset_after", 60_000)),
        start_limit_burst=sub("start_limit", "burst", 5),
        start_limit_interval_ms=int(sub("start_limit", "interval", 10_000)),
        stop_signal=int(pick("stop_signal", signal.SIGTERM)),
        stop_timeout_ms=int(pick("stop_timeout", 10_000)),
        start_timeout_ms=int(pick("start_timeout", 0)),
        notify=pick("notify", False),
        watchdog_ms=int(pick("watchdog", 0)),
        depends_on=depends_on,
        readiness=_probe(pick("readiness"), ctx),
        liveness=_probe(pick("liveness"), ctx),
        logs=logs,
    )
    if raw.instances == 1:
        return [ServiceConfig(name=name, instance=0, env=env, **common)]
    return [
        ServiceConfig(
            name=f"{name}@{i}",
            instance=i,
            env={**env, "FASTORCH_INSTANCE": str(i)},
            **common,
        )
        for i in range(1, raw.instances + 1)
    ]


def _dependencies(raw: _RawService) -> list[tuple[str, str]]:
    if raw.depends_on is UNSET:
        return []
    if isinstance(raw.depends_on, list):
        return [(name, "started") for name in raw.depends_on]
    return list(raw.depends_on.items())


def _find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles = []

    # Iterative Tarjan: thousands of services would overflow recursion.
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        cycles.append(_cycle_in(node, set(component), graph))
    return cycles


def _cycle_in(start: str, members: set[str], graph: dict[str, list[str]]) -> list[str]:
    """A shortest cycle through *start* inside one component (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in graph[node]:
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt in members and nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError("a component without a cycle")


# -- the whole file ------------------------------------------------------------


def _runtime_dir() -> str:
    env = os.environ.get("FASTORCH_RUNTIME_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/run/fastorch"
    return f"/tmp/fastorch-{os.getuid()}"


def _supervisor(
    table: dict[str, Any], path: str, ctx: _Context, problems: Problems
) -> SupervisorConfig | None:
    raw = _convert(table, _RawSupervisor, "supervisor", problems)
    if raw is None:
        return None
    runtime_dir = _runtime_dir()
    socket = raw.api_socket
    api_socket = (
        os.path.join(runtime_dir, "api.sock")
        if socket is UNSET
        else ctx.resolve(socket)
    )
    tcp = None
    if raw.api_tcp:
        tcp = _parse_host_port(raw.api_tcp)
        if tcp is None:
            problems.append(
                (
                    "supervisor.api_tcp",
                    f'expected "host:port", got {_show(raw.api_tcp)}',
                )
            )
    token_file = ctx.resolve(raw.api_token_file) if raw.api_token_file else None
    if raw.api_tcp and token_file is None:
        problems.append(("supervisor.api_token_file", "required with api_tcp"))
    elif token_file is not None and not os.access(token_file, os.R_OK):
        problems.append(("supervisor.api_token_file", f"cannot read {token_file!r}"))
    if raw.api_socket_owner and not _user_exists(raw.api_socket_owner):
        problems.append(
            ("supervisor.api_socket_owner", f"unknown user {raw.api_socket_owner!r}")
        )
    if raw.api_socket_group and not _group_exists(raw.api_socket_group):
        problems.append(
            ("supervisor.api_socket_group", f"unknown group {raw.api_socket_group!r}")
        )
    stem = Path(path).stem if not path.startswith("<") else "fastorch"
    drop_in = raw.drop_in_dir or f"{stem}.d"
    return SupervisorConfig(
        runtime_dir=runtime_dir,
        api_socket=api_socket,
        drop_in_dir=ctx.resolve(drop_in),
        api_socket_mode=int(raw.api_socket_mode),
        api_socket_owner=raw.api_socket_owner or None,
        api_socket_group=raw.api_socket_group or None,
        api_tcp=tcp,
        api_token_file=token_file,
        metrics_without_token=raw.metrics_without_token,
        ready_when=raw.ready_when,
        status_interval_ms=int(raw.status_interval),
        log_level=raw.log_level,
    )


def _defaults(table: dict[str, Any], ctx: _Context, problems: Problems) -> _RawDefaults:
    allowed = dict(table)
    for key in _SERVICE_ONLY:
        if key in allowed:
            del allowed[key]
            problems.append((f"defaults.{key}", "only allowed in a service table"))
    raw = _convert(allowed, _RawDefaults, "defaults", problems)
    if raw is None:
        return _RawDefaults()
    _check_table(raw, "defaults", ctx, problems)
    return raw


def _from_source(source: dict[str, Any], path: str, base_dir: str) -> Config:
    """Validate a parsed TOML document; raise every problem at once."""
    problems: Problems = []
    ctx = _Context(base_dir)

    top = _convert(source, _RawFile, "", problems)
    if top is None:
        raise ConfigError(problems)
    supervisor = _supervisor(top.supervisor, path, ctx, problems)
    defaults = _defaults(top.defaults, ctx, problems)

    # Each service alone, so that one bad table hides nothing of another.
    raws: dict[str, _RawService] = {}
    for name, table in top.services.items():
        if not _SERVICE_NAME.fullmatch(name):
            where = f"services.{json.dumps(name)}"
            problems.append(
                (where, "a name is letters, digits, '_' and '-', at most 100")
            )
            continue
        where = f"services.{name}"
        raw = _convert(table, _RawService, where, problems)
        if raw is not None:
            _check_table(raw, where, ctx, problems)
            _split_command(raw.command, where + ".command", problems)
            raws[name] = raw

    for name, raw in raws.items():
        _check_merged(raw, defaults, f"services.{name}", problems)

    groups = _groups(top.services, raws)
    edges = _check_dependencies(raws, groups, problems)
    cycles = _find_cycles(
        {name: [_group_of(d) for d, _ in deps] for name, deps in edges.items()}
    )
    for cycle in cycles:
        problems.append(
            (
                f"services.{cycle[0]}.depends_on",
                "dependency cycle: " + " -> ".join(cycle),
            )
        )
    if problems:
        if len(cycles) == 1 and len(problems) == 1:
            raise CycleError(cycles[0], problems[0][0])
        raise ConfigError(problems)

    services: dict[str, ServiceConfig] = {}
    for name, raw in raws.items():
        # One edge per instance; the engine takes one edge per pair, so a
        # name given twice ("worker" and "worker@1") keeps its first condition.
        expanded: dict[str, str] = {}
        for target, condition in edges[name]:
            for member in groups.get(target, (target,)):
                expanded.setdefault(member, condition)
        for svc in _build(name, raw, defaults, tuple(expanded.items()), ctx):
            services[svc.name] = svc
    assert supervisor is not None
    logger.debug("config %s: %d services", path, len(services))
    return Config(
        path=path,
        base_dir=base_dir,
        supervisor=supervisor,
        services=services,
        groups=groups,
        source=source,
    )


def _group_of(name: str) -> str:
    return name.partition("@")[0]


def _groups(
    tables: dict[str, Any], raws: dict[str, _RawService]
) -> dict[str, tuple[str, ...]]:
    groups: dict[str, tuple[str, ...]] = {}
    for name in tables:
        raw = raws.get(name)
        count = 1 if raw is None else raw.instances
        if count == 1:
            groups[name] = (name,)
        else:
            groups[name] = tuple(f"{name}@{i}" for i in range(1, count + 1))
    return groups


def _check_dependencies(
    raws: dict[str, _RawService],
    groups: dict[str, tuple[str, ...]],
    problems: Problems,
) -> dict[str, list[tuple[str, str]]]:
    """Each service's known (target, condition) pairs; unknown ones reported."""
    known = set(groups)
    for members in groups.values():
        known.update(members)
    edges = {}
    for name, raw in raws.items():
        good = []
        for target, condition in _dependencies(raw):
            if target in known:
                good.append((target, condition))
            else:
                problems.append(
                    (
                        f"services.{name}.depends_on.{target}",
                        f"unknown service {target!r}",
                    )
                )
        edges[name] = good
    return edges


# -- public API ----------------------------------------------------------------


def loads(text: str, path: str = "<string>", base_dir: str | None = None) -> Config:
    """Parse and validate a configuration from TOML text.

    Relative paths (cwd, env_file, logs.dir, ...) start at *base_dir*,
    by default the directory of *path*, or the working directory.

    Raises:
        ConfigError: every problem found, each with its dotted path.
        CycleError: the only problem is one dependency cycle.
    """
    try:
        source = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_WHERE.search(message)
        if match:
            message = message[: match.start()]
            where = f"{path}:{match[1]}:{match[2]}"
            reason = f"TOML syntax error at line {match[1]}, column {match[2]}: "
        else:
            where, reason = path, "TOML syntax error: "
        raise ConfigError(
            [(where, reason + message[:1].lower() + message[1:])]
        ) from exc
    if base_dir is None:
        base_dir = os.getcwd() if path.startswith("<") else os.path.dirname(path) or "."
    return _from_source(source, path, os.path.abspath(base_dir))


def load(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the configuration file at *path*.

    Raises:
        ConfigError: the file cannot be read, or every problem found in it.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError([(path, f"cannot read: {exc.strerror}")]) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([(path, f"not UTF-8: {exc}")]) from exc
    return loads(text, path=os.path.abspath(path))


def with_service(config: Config, name: str, table: dict[str, Any]) -> Config:
    """A new Config with service table *name* added or replaced.

    The whole definition is validated again, so the new table's
    dependencies and any cycle it closes are checked.

    Raises:
        ConfigError: problems of the new table (``services.<name>.<key>``).
    """
    source = dict(config.source)
    source["services"] = {**source.get("services", {}), name: table}
    return _from_source(source, config.path, config.base_dir)


def without_service(config: Config, name: str) -> Config:
    """A new Config without service table *name*.

    Raises:
        ConfigError: another service still depends on it.
    """
    source = dict(config.source)
    services = dict(source.get("services", {}))
    services.pop(name, None)
    source["services"] = services
    return _from_source(source, config.path, config.base_dir)


def parse_service(
    name: str, table: dict[str, Any], config: Config
) -> list[ServiceConfig]:
    """Validate one service table against *config*: its instances, expanded.

    Defaults of *config* apply; ``depends_on`` must name services of
    *config* (or *name* itself, by its instances), and must not close a cycle.

    Raises:
        ConfigError: every problem, with paths ``services.<name>.<key>``.
    """
    new = with_service(config, name, table)
    return [new.services[member] for member in new.groups[name]]


def engine_options(svc: ServiceConfig) -> dict[str, Any]:
    """Keyword arguments of ``Engine.add_service`` / ``Engine.configure``."""
    return {
        "oneshot": svc.oneshot,
        "autostart": svc.autostart,
        "restart": _restart_value(svc.restart),
        "success_codes": svc.success_exit_codes,
        "backoff_initial_ms": svc.backoff_initial_ms,
        "backoff_factor": svc.backoff_factor,
        "backoff_max_ms": svc.backoff_max_ms,
        "backoff_jitter": svc.backoff_jitter,
        "backoff_reset_ms": svc.backoff_reset_ms,
        "start_limit_burst": svc.start_limit_burst,
        "start_limit_interval_ms": svc.start_limit_interval_ms,
        "stop_signal": svc.stop_signal,
        "stop_timeout_ms": svc.stop_timeout_ms,
        "start_timeout_ms": svc.start_timeout_ms,
        "ready_notify": svc.notify,
        "watchdog_ms": svc.watchdog_ms,
        "readiness": None if svc.readiness is None else svc.readiness.spec(),
        "liveness": None if svc.liveness is None else svc.liveness.spec(),
    }


_RESTART = {"never": 0, "on-failure": 1, "always": 2}


def _restart_value(restart: str) -> int:
    try:
        from fastorch._core import Restart
    except ImportError:
        return _RESTART[restart]
    return Restart(_RESTART[restart])


def condition_value(condition: str) -> int:
    """``"started"``/``"ready"``/``"completed"`` as ``_core.Condition``."""
    return ("started", "ready", "completed").index(condition)


def diff(old: Config, new: Config) -> ConfigDiff:
    """Compare two configs by expanded service name.

    A service is changed when anything in its ServiceConfig differs.
    """
    added, changed, unchanged = [], [], []
    for name, svc in new.services.items():
        before = old.services.get(name)
        if before is None:
            added.append(name)
        elif before == svc:
            unchanged.append(name)
        else:
            changed.append(name)
    removed = [name for name in old.services if name not in new.services]
    return ConfigDiff(added, removed, changed, unchanged)


def levels(config: Config) -> list[list[str]]:
    """Start levels: level 0 depends on nothing, level k on lower levels."""
    level: dict[str, int] = {}
    for name in _topological(config.services):
        deps = config.services[name].depends_on
        level[name] = 1 + max((level[d] for d, _ in deps), default=-1)
    result: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for name in config.services:  # file order inside each level
        result[level[name]].append(name)
    return result


def _topological(services: dict[str, ServiceConfig]) -> Iterable[str]:
    waiting = {name: len(svc.depends_on) for name, svc in services.items()}
    dependents: dict[str, list[str]] = {name: [] for name in services}
    for name, svc in services.items():
        for dep, _ in svc.depends_on:
            dependents[dep].append(name)
    ready = [name for name, count in waiting.items() if count == 0]
    while ready:
        name = ready.pop()
        yield name
        for dependent in dependents[name]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                ready.append(dependent)


def to_dot(config: Config) -> str:
    """The dependency graph in Graphviz DOT; an edge points at the dependency."""
    lines = ["digraph fastorch {", "  rankdir=LR;", "  node [shape=box];"]
    for name, svc in config.services.items():
        style = ' [style="rounded,dashed"]' if svc.oneshot else ""
        lines.append(f"  {json.dumps(name)}{style};")
    for name, svc in config.services.items():
        for dep, condition in svc.depends_on:
            edge = f"{json.dumps(name)} -> {json.dumps(dep)}"
            lines.append(f"  {edge} [label={json.dumps(condition)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
