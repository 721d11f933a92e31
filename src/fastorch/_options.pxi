# The options of a service, checked and normalised into the key that
# services with equal options share (included by _core.pyx).

_OPTION_NAMES = frozenset((
    "oneshot", "autostart", "restart", "success_codes", "backoff_initial_ms",
    "backoff_factor", "backoff_max_ms", "backoff_jitter", "backoff_reset_ms",
    "start_limit_burst", "start_limit_interval_ms", "stop_signal",
    "stop_timeout_ms", "start_timeout_ms", "ready_notify", "watchdog_ms",
    "readiness", "liveness",
))

_DEFAULTS = {
    "oneshot": False,
    "autostart": True,
    "restart": 1,
    "success_codes": (0,),
    "backoff_initial_ms": 100,
    "backoff_factor": 2.0,
    "backoff_max_ms": 30_000,
    "backoff_jitter": 0.1,
    "backoff_reset_ms": 60_000,
    "start_limit_burst": 5,
    "start_limit_interval_ms": 10_000,
    "stop_signal": 15,
    "stop_timeout_ms": 10_000,
    "start_timeout_ms": 0,
    "ready_notify": False,
    "watchdog_ms": 0,
    "readiness": None,
    "liveness": None,
}


def _duration(str what, object value, int64_t low=0):
    if isinstance(value, bool) or not isinstance(value, int):
        raise EngineError(f"{what} must be an integer of ms, got {value!r}")
    if value < low or value > _MAX_DURATION:
        raise EngineError(
            f"{what} must be {low}..{_MAX_DURATION} ms, got {value!r}")
    return value


def _count(str what, object value, int low, int high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise EngineError(f"{what} must be an integer, got {value!r}")
    if value < low or value > high:
        raise EngineError(f"{what} must be {low}..{high}, got {value!r}")
    return value


def _probe_key(str what, object spec):
    if spec is None:
        return None
    try:
        delay, period, timeout, success, failure = spec
    except (TypeError, ValueError):
        raise EngineError(
            f"{what} must be (initial_delay_ms, period_ms, timeout_ms, "
            f"success_threshold, failure_threshold), got {spec!r}") from None
    return (
        _duration(what + ".initial_delay_ms", delay),
        _duration(what + ".period_ms", period, 1),
        _duration(what + ".timeout_ms", timeout, 1),
        _count(what + ".success_threshold", success, 1, 255),
        _count(what + ".failure_threshold", failure, 1, 255),
    )


def _spec_key(dict options):
    """Validate options; returns a hashable, normalised key."""
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise EngineError(f"unknown option {sorted(unknown)[0]!r}")
    o = dict(_DEFAULTS)
    o.update(options)
    factor = o["backoff_factor"]
    jitter = o["backoff_jitter"]
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) \
            or not 1.0 <= factor <= 100.0:
        raise EngineError(f"backoff_factor must be 1..100, got {factor!r}")
    if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) \
            or not 0.0 <= jitter <= 1.0:
        raise EngineError(f"backoff_jitter must be 0..1, got {jitter!r}")
    codes = o["success_codes"]
    try:
        codes = tuple(sorted({
            _count("success_codes[]", c, 0, 255) for c in codes}))
    except TypeError:
        raise EngineError(
            f"success_codes must be a list of exit codes, got {codes!r}"
        ) from None
    initial = _duration("backoff_initial_ms", o["backoff_initial_ms"])
    maximum = _duration("backoff_max_ms", o["backoff_max_ms"])
    if maximum < initial:
        raise EngineError(
            f"backoff_max_ms ({maximum!r}) is below backoff_initial_ms "
            f"({initial!r})")
    return (
        bool(o["oneshot"]),
        bool(o["autostart"]),
        _count("restart", int(o["restart"]), 0, 2),
        codes,
        initial,
        float(factor),
        maximum,
        float(jitter),
        _duration("backoff_reset_ms", o["backoff_reset_ms"]),
        _count("start_limit_burst", o["start_limit_burst"], 0, 65535),
        _duration("start_limit_interval_ms", o["start_limit_interval_ms"]),
        _count("stop_signal", int(o["stop_signal"]), 1, 64),
        _duration("stop_timeout_ms", o["stop_timeout_ms"]),
        _duration("start_timeout_ms", o["start_timeout_ms"]),
        bool(o["ready_notify"]),
        _duration("watchdog_ms", o["watchdog_ms"]),
        _probe_key("readiness", o["readiness"]),
        _probe_key("liveness", o["liveness"]),
    )
