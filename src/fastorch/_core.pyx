# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""The compiled core of fastorch: dependency graph, timer wheel and state
machine of every service, as one sans-I/O engine.

Events go in (requests, process events, probe results, time), actions come
out (spawn, signal, kill, probe, transition). Time is an integer count of
milliseconds passed in by the caller; nothing here reads a clock or does
I/O. The rules are written down in docs/engine.md.
"""

from enum import IntEnum

from libc.math cimport pow
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8

from fastorch.errors import CycleError, EngineError, TransitionError
from fastorch.errors import UnknownServiceError

cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil
    int __builtin_clzll(unsigned long long) nogil

# A debug build (FASTORCH_DEBUG=1 python setup.py build_ext, see setup.py)
# checks every invariant after every event; a normal build compiles the
# check away.
cdef extern from *:
    """
    #ifndef FASTORCH_DEBUG
    #define FASTORCH_DEBUG 0
    #endif
    """
    const bint FASTORCH_DEBUG


# ---------------------------------------------------------------------------
# Public enums. Inside, the same values are plain C integers.

class State(IntEnum):
    STOPPED = 0
    WAITING = 1
    STARTING = 2
    RUNNING = 3
    READY = 4
    UNHEALTHY = 5
    STOPPING = 6
    COMPLETED = 7
    BACKOFF = 8
    FAILED = 9


class Condition(IntEnum):
    STARTED = 0
    READY = 1
    COMPLETED = 2


class Restart(IntEnum):
    NEVER = 0
    ON_FAILURE = 1
    ALWAYS = 2


class Probe(IntEnum):
    READINESS = 0
    LIVENESS = 1


class Action(IntEnum):
    SPAWN = 0
    SIGNAL = 1
    KILL = 2
    PROBE = 3
    CANCEL_PROBE = 4
    TRANSITION = 5


class Reason(IntEnum):
    START_REQUESTED = 0
    DEPENDENCIES_MET = 1
    SPAWNED = 2
    SPAWN_FAILED = 3
    PROBE_READY = 4
    NOTIFY_READY = 5
    PROBE_FAILED = 6
    EXITED = 7
    RESTARTING = 8
    BACKOFF_ELAPSED = 9
    START_LIMIT = 10
    STOP_REQUESTED = 11
    STOPPED = 12
    LIVENESS_FAILED = 13
    WATCHDOG = 14
    START_TIMEOUT = 15
    RESTART_REQUESTED = 16
    DEPENDENCY_LOST = 17


cdef enum:
    ST_STOPPED = 0
    ST_WAITING = 1
    ST_STARTING = 2
    ST_RUNNING = 3
    ST_READY = 4
    ST_UNHEALTHY = 5
    ST_STOPPING = 6
    ST_COMPLETED = 7
    ST_BACKOFF = 8
    ST_FAILED = 9
    N_STATES = 10
    ST_FREE = 255

cdef enum:
    C_STARTED = 0
    C_READY = 1
    C_COMPLETED = 2

cdef enum:
    R_NEVER = 0
    R_ON_FAILURE = 1
    R_ALWAYS = 2

cdef enum:
    A_SPAWN = 0
    A_SIGNAL = 1
    A_KILL = 2
    A_PROBE = 3
    A_CANCEL_PROBE = 4
    A_TRANSITION = 5

cdef enum:
    RS_START_REQUESTED = 0
    RS_DEPENDENCIES_MET = 1
    RS_SPAWNED = 2
    RS_SPAWN_FAILED = 3
    RS_PROBE_READY = 4
    RS_NOTIFY_READY = 5
    RS_PROBE_FAILED = 6
    RS_EXITED = 7
    RS_RESTARTING = 8
    RS_BACKOFF_ELAPSED = 9
    RS_START_LIMIT = 10
    RS_STOP_REQUESTED = 11
    RS_STOPPED = 12
    RS_LIVENESS_FAILED = 13
    RS_WATCHDOG = 14
    RS_START_TIMEOUT = 15
    RS_RESTART_REQUESTED = 16
    RS_DEPENDENCY_LOST = 17

# Service flags.
cdef enum:
    F_WANTED = 1
    F_STOP_PENDING = 2
    F_FAIL_ON_EXIT = 4
    F_GATE_NOTIFY = 8
    F_GATE_PROBE = 16
    F_INFLIGHT = 32               # readiness; << probe for the other
    F_HAS_EXITED = 128

# Spec flags.
cdef enum:
    SF_ONESHOT = 1
    SF_AUTOSTART = 2
    SF_READY_NOTIFY = 4
    SF_PROBE = 8                  # readiness; << probe for the other

# What a service's timer is for; stored in the low bits of its payload.
cdef enum:
    K_BACKOFF = 0
    K_STOP = 1
    K_START_TIMEOUT = 2
    K_PROBE = 3                   # readiness; + probe for the other
    K_WATCHDOG = 5
    K_BITS = 3

MAX_DURATION_MS = 30 * 24 * 3600 * 1000
cdef int64_t _MAX_DURATION = 30 * 24 * 3600 * 1000

_STATE_NAMES = [s.name.lower() for s in State]


# ---------------------------------------------------------------------------
# The transition table: the one authority on which state may follow which.

cdef uint8_t _ALLOWED[N_STATES][N_STATES]


cdef void _allow(int frm, tuple tos) noexcept:
    cdef object to
    for to in tos:
        _ALLOWED[frm][<int>to] = 1


cdef void _init_table() noexcept:
    memset(_ALLOWED, 0, sizeof(_ALLOWED))
    _allow(ST_STOPPED, (ST_WAITING, ST_STARTING))
    _allow(ST_WAITING, (ST_STARTING, ST_STOPPED))
    _allow(ST_STARTING, (ST_RUNNING, ST_READY, ST_FAILED))
    cdef tuple alive_exits = (
        ST_STOPPING, ST_COMPLETED, ST_BACKOFF, ST_FAILED, ST_STARTING,
        ST_WAITING, ST_STOPPED,
    )
    _allow(ST_RUNNING, (ST_READY,) + alive_exits)
    _allow(ST_READY, (ST_UNHEALTHY,) + alive_exits)
    _allow(ST_UNHEALTHY, (ST_READY,) + alive_exits)
    _allow(ST_STOPPING, (
        ST_STOPPED, ST_WAITING, ST_STARTING, ST_BACKOFF, ST_FAILED,
        ST_COMPLETED,
    ))
    _allow(ST_COMPLETED, (ST_STOPPED, ST_WAITING, ST_STARTING))
    _allow(ST_BACKOFF, (ST_STARTING, ST_WAITING, ST_STOPPED))
    _allow(ST_FAILED, (ST_STOPPED, ST_WAITING, ST_STARTING))


_init_table()


cdef inline int64_t _run_end(int64_t due, int64_t now,
                             int64_t timeout) noexcept:
    """When a probe run that was due at ``due`` times out.

    The run counts from when it was due, not from when the timer was
    served, so a late wake-up does not shift every later run of the
    service (services would drift into step and wake together). A run
    served later than its whole timeout starts its clock now.
    """
    if due + timeout > now:
        return due + timeout
    return now + timeout


cdef inline bint _has_process(uint8_t st) noexcept:
    # STARTING counts: a SPAWN is out and its pid is on the way.
    return ST_STARTING <= st <= ST_STOPPING


cdef inline bint _is_alive(uint8_t st) noexcept:
    return ST_RUNNING <= st <= ST_UNHEALTHY


cdef inline bint _is_inactive(uint8_t st) noexcept:
    return st == ST_STOPPED or st == ST_COMPLETED or st == ST_FAILED


include "_wheel.pxi"


# ---------------------------------------------------------------------------
# Engine state, in flat C arrays indexed by sid.

cdef struct Spec:
    uint64_t success_codes[4]     # bitmap of exit codes 0..255
    uint32_t backoff_initial
    uint32_t backoff_max
    uint32_t backoff_reset
    uint32_t limit_interval
    uint32_t stop_timeout
    uint32_t start_timeout
    uint32_t watchdog
    uint32_t probe_delay[2]       # indexed by Probe
    uint32_t probe_period[2]
    uint32_t probe_timeout[2]
    double backoff_factor
    double backoff_jitter
    uint16_t limit_burst
    uint16_t ready_success
    uint16_t probe_failure[2]
    uint8_t restart
    uint8_t stop_signal
    uint8_t flags


cdef struct Svc:
    int64_t last_transition
    int64_t spawned_at
    int64_t window_start
    int32_t pid
    int32_t last_exit
    uint32_t restarts
    uint32_t spec
    uint32_t probe_failures
    int32_t t_life                # backoff, stop or start timeout
    int32_t t_probe[2]            # next run, or the run's timeout
    int32_t t_watchdog
    int32_t deps                  # first edge where this is the dependent
    int32_t rdeps                 # first edge where this is the dependency
    uint32_t name_off
    uint16_t name_len
    uint16_t starts               # in the start-limit window
    uint16_t seq[2]               # of the latest run, per probe
    uint16_t flags
    uint8_t ready_ok              # consecutive; thresholds are <= 255
    uint8_t fails[2]              # consecutive, per probe
    uint8_t state
    uint8_t backoff_count
    uint8_t reason


# An edge is 16 bytes: the condition shares a word with the dependency's
# sid (sids stay below 2**29), a C bitfield Cython cannot declare itself.
cdef extern from *:
    """
    typedef struct {
        int32_t dep : 30;     /* the service depended on */
        uint32_t cond : 2;
        int32_t owner;        /* the dependent */
        int32_t next_dep;     /* next edge of owner's dependencies */
        int32_t next_rdep;    /* next edge of dep's dependents */
    } fastorch_edge;
    """
    ctypedef struct Edge "fastorch_edge":
        int32_t dep
        uint8_t cond
        int32_t owner
        int32_t next_dep
        int32_t next_rdep

cdef int32_t _MAX_SERVICES = (1 << 29) - 1


cdef enum:
    HASH_EMPTY = -1
    HASH_TOMB = -2


cdef inline uint64_t _fnv1a(const char* s, Py_ssize_t n) noexcept:
    cdef uint64_t h = 1469598103934665603ULL
    cdef Py_ssize_t i
    for i in range(n):
        h ^= <uint8_t>s[i]
        h *= 1099511628211ULL
    return h


class ServiceInfo:
    """A snapshot of one service's counters."""

    __slots__ = (
        "sid", "name", "state", "pid", "restarts", "last_exit",
        "readiness_failures", "liveness_failures", "probe_failures_total",
        "last_transition_ms", "spawned_at_ms", "is_wanted", "is_ready",
        "reason",
    )

    def __init__(self, **fields):
        for key, value in fields.items():
            setattr(self, key, value)

    def __repr__(self):
        return (f"ServiceInfo(name={self.name!r}, state={self.state.name}, "
                f"pid={self.pid}, restarts={self.restarts})")


include "_options.pxi"


cdef class Engine:
    """Graph, timer wheel and state machine of every service.

    Args:
        now: the starting time, in ms.
        seed: seeds the backoff jitter, so a run replays exactly.
        tick_ms: width of the timer wheel's finest slot.
    """

    cdef TimerWheel _wheel
    cdef Svc* _svcs
    cdef int32_t _cap
    cdef int32_t _top             # sids in use are below this
    cdef int32_t _free_sid
    cdef int32_t _n
    cdef Spec* _specs
    cdef int32_t _nspecs
    cdef int32_t _spec_cap
    cdef dict _spec_ids
    cdef list _spec_keys
    cdef Edge* _edges
    cdef int32_t _edge_cap
    cdef int32_t _free_edge
    cdef int32_t _nedges
    cdef char* _arena
    cdef uint32_t _arena_len
    cdef uint32_t _arena_cap
    cdef int32_t* _hash
    cdef int32_t _hash_cap
    cdef int32_t _hash_used       # live + tombstones
    cdef uint32_t* _mark
    cdef uint32_t _epoch
    cdef uint64_t _rng
    cdef int64_t _counts[N_STATES]
    cdef list _out
    cdef dict _watchdog           # sid -> ms, set by WATCHDOG_USEC=

    def __cinit__(self, int64_t now=0, uint64_t seed=0, int64_t tick_ms=1):
        self._wheel = TimerWheel(now, tick_ms)
        self._svcs = NULL
        self._cap = 0
        self._top = 0
        self._free_sid = -1
        self._n = 0
        self._specs = NULL
        self._nspecs = 0
        self._spec_cap = 0
        self._spec_ids = {}
        self._spec_keys = []
        self._edges = NULL
        self._edge_cap = 0
        self._free_edge = -1
        self._nedges = 0
        self._arena = NULL
        self._arena_len = 0
        self._arena_cap = 0
        self._hash = NULL
        self._hash_cap = 0
        self._hash_used = 0
        self._mark = NULL
        self._epoch = 0
        # splitmix64 of the seed, so seed 0 is a fine seed too.
        self._rng = seed + 0x9E3779B97F4A7C15ULL
        self._rng = (self._rng ^ (self._rng >> 30)) * 0xBF58476D1CE4E5B9ULL
        self._rng = (self._rng ^ (self._rng >> 27)) * 0x94D049BB133111EBULL
        self._rng ^= self._rng >> 31
        if self._rng == 0:
            self._rng = 1
        memset(self._counts, 0, sizeof(self._counts))
        self._out = []
        self._watchdog = {}
        self._rehash(64)

    def __dealloc__(self):
        PyMem_Free(self._svcs)
        PyMem_Free(self._specs)
        PyMem_Free(self._edges)
        PyMem_Free(self._arena)
        PyMem_Free(self._hash)
        PyMem_Free(self._mark)

    # -- memory -------------------------------------------------------------

    cdef int _grow_svcs(self, int32_t want=0) except -1:
        # Grow by half: a fleet's arrays are long-lived, and doubling would
        # leave up to half of them unused for good.
        cdef int32_t cap = self._cap + (self._cap >> 1) if self._cap else 64
        if cap < want:
            cap = want
        cdef Svc* s = <Svc*>PyMem_Realloc(self._svcs, cap * sizeof(Svc))
        if s == NULL:
            raise MemoryError()
        self._svcs = s
        cdef uint32_t* m = <uint32_t*>PyMem_Realloc(
            self._mark, cap * sizeof(uint32_t))
        if m == NULL:
            raise MemoryError()
        memset(m + self._cap, 0, (cap - self._cap) * sizeof(uint32_t))
        self._mark = m
        self._cap = cap
        return 0

    cdef int _grow_edges(self, int32_t want) except -1:
        cdef int32_t cap = self._edge_cap + (self._edge_cap >> 1)
        cdef int32_t i
        cdef Edge* e
        if cap < 64:
            cap = 64
        if cap < want:
            cap = want
        e = <Edge*>PyMem_Realloc(self._edges, cap * sizeof(Edge))
        if e == NULL:
            raise MemoryError()
        self._edges = e
        for i in range(cap - 1, self._edge_cap - 1, -1):
            e[i].next_dep = self._free_edge
            e[i].owner = -1
            self._free_edge = i
        self._edge_cap = cap
        return 0

    cdef int32_t _new_edge(self) except -1:
        cdef int32_t i
        if self._free_edge < 0:
            self._grow_edges(0)
        i = self._free_edge
        self._free_edge = self._edges[i].next_dep
        self._nedges += 1
        return i

    cdef void _free_edge_slot(self, int32_t e) noexcept:
        self._edges[e].owner = -1
        self._edges[e].next_dep = self._free_edge
        self._free_edge = e
        self._nedges -= 1

    cdef uint32_t _next_epoch(self) noexcept:
        # Marks are stamped with an epoch, so a traversal never clears them.
        self._epoch += 1
        if self._epoch == 0:
            memset(self._mark, 0, self._cap * sizeof(uint32_t))
            self._epoch = 1
        return self._epoch

    # -- names --------------------------------------------------------------

    cdef int _rehash(self, int32_t cap) except -1:
        cdef int32_t* table = <int32_t*>PyMem_Malloc(cap * sizeof(int32_t))
        cdef int32_t i, sid
        cdef uint64_t h
        if table == NULL:
            raise MemoryError()
        for i in range(cap):
            table[i] = HASH_EMPTY
        for sid in range(self._top):
            if self._svcs[sid].state == ST_FREE:
                continue
            h = _fnv1a(self._arena + self._svcs[sid].name_off,
                       self._svcs[sid].name_len)
            i = <int32_t>(h & (cap - 1))
            while table[i] != HASH_EMPTY:
                i = (i + 1) & (cap - 1)
            table[i] = sid
        PyMem_Free(self._hash)
        self._hash = table
        self._hash_cap = cap
        self._hash_used = self._n
        return 0

    cdef int32_t _lookup(self, const char* s, Py_ssize_t n,
                         int32_t* slot_out) noexcept:
        """sid of a name, or -1; ``slot_out`` gets the slot to insert at."""
        cdef uint64_t h = _fnv1a(s, n)
        cdef int32_t mask = self._hash_cap - 1
        cdef int32_t i = <int32_t>(h & mask)
        cdef int32_t sid, tomb = -1
        cdef Svc* v
        while True:
            sid = self._hash[i]
            if sid == HASH_EMPTY:
                slot_out[0] = tomb if tomb >= 0 else i
                return -1
            if sid == HASH_TOMB:
                if tomb < 0:
                    tomb = i
            else:
                v = &self._svcs[sid]
                if v.name_len == n and memcmp(
                        self._arena + v.name_off, s, n) == 0:
                    slot_out[0] = i
                    return sid
            i = (i + 1) & mask

    cdef int32_t _sid_of(self, object name) except -2:
        cdef Py_ssize_t n
        cdef const char* s
        cdef int32_t slot
        if not isinstance(name, str):
            raise UnknownServiceError(f"service names are str, got {name!r}")
        s = PyUnicode_AsUTF8AndSize(name, &n)
        return self._lookup(s, n, &slot)

    cdef inline int _check(self, int32_t sid) except -1:
        if sid < 0 or sid >= self._top or self._svcs[sid].state == ST_FREE:
            raise UnknownServiceError(f"unknown service id {sid!r}")
        return 0

    cdef str _name(self, int32_t sid):
        cdef Svc* v = &self._svcs[sid]
        return PyUnicode_DecodeUTF8(
            self._arena + v.name_off, v.name_len, NULL)

    cdef int _store_name(self, const char* s, Py_ssize_t n,
                         int32_t sid) except -1:
        cdef uint32_t cap
        cdef char* a
        if self._arena_len + n > self._arena_cap:
            cap = self._arena_cap * 2 if self._arena_cap else 4096
            while cap < self._arena_len + n:
                cap *= 2
            a = <char*>PyMem_Realloc(self._arena, cap)
            if a == NULL:
                raise MemoryError()
            self._arena = a
            self._arena_cap = cap
        memcpy(self._arena + self._arena_len, s, n)
        self._svcs[sid].name_off = self._arena_len
        self._svcs[sid].name_len = <uint16_t>n
        self._arena_len += <uint32_t>n
        return 0

    # -- specs --------------------------------------------------------------

    cdef uint32_t _intern_spec(self, tuple key) except? 0xFFFFFFFF:
        """Services with equal options share one Spec."""
        cdef object found = self._spec_ids.get(key)
        cdef Spec* sp
        cdef int32_t cap
        cdef object code
        if found is not None:
            return found
        if self._nspecs == self._spec_cap:
            cap = self._spec_cap * 2 if self._spec_cap else 8
            sp = <Spec*>PyMem_Realloc(self._specs, cap * sizeof(Spec))
            if sp == NULL:
                raise MemoryError()
            self._specs = sp
            self._spec_cap = cap
        sp = &self._specs[self._nspecs]
        memset(sp, 0, sizeof(Spec))
        (oneshot, autostart, restart, codes, initial, factor, maximum,
         jitter, reset, burst, interval, stop_signal, stop_timeout,
         start_timeout, ready_notify, watchdog, readiness, liveness) = key
        sp.flags = ((SF_ONESHOT if oneshot else 0)
                    | (SF_AUTOSTART if autostart else 0)
                    | (SF_READY_NOTIFY if ready_notify else 0))
        sp.restart = restart
        for code in codes:
            sp.success_codes[<int>code >> 6] |= (
                (<uint64_t>1) << (<int>code & 63))
        sp.backoff_initial = initial
        sp.backoff_factor = factor
        sp.backoff_max = maximum
        sp.backoff_jitter = jitter
        sp.backoff_reset = reset
        sp.limit_burst = burst
        sp.limit_interval = interval
        sp.stop_signal = stop_signal
        sp.stop_timeout = stop_timeout
        sp.start_timeout = start_timeout
        sp.watchdog = watchdog
        cdef int probe
        for probe, probe_key in enumerate((readiness, liveness)):
            if probe_key is None:
                continue
            sp.flags |= SF_PROBE << probe
            (sp.probe_delay[probe], sp.probe_period[probe],
             sp.probe_timeout[probe], success,
             sp.probe_failure[probe]) = probe_key
            if probe == 0:
                sp.ready_success = success
        self._spec_ids[key] = self._nspecs
        self._spec_keys.append(key)
        self._nspecs += 1
        return self._nspecs - 1

    # -- services and edges -------------------------------------------------

    def add_service(self, name, **options):
        """Add a service in STOPPED; returns its sid.

        Options are those of docs/engine.md (``oneshot``, ``restart``,
        ``backoff_initial_ms``, ``readiness``, ...); durations in ms.

        Raises:
            EngineError: a bad option, or the name is taken.
        """
        return self._add(name, self._intern_spec(_spec_key(options)))

    cdef int32_t _add(self, object name, uint32_t spec) except -1:
        cdef Py_ssize_t n
        cdef const char* s
        cdef int32_t slot, sid
        cdef Svc* v
        if not isinstance(name, str) or not name:
            raise EngineError(f"a service name is a non-empty str, got {name!r}")
        s = PyUnicode_AsUTF8AndSize(name, &n)
        if n > 65535:
            raise EngineError("a service name is at most 65535 bytes")
        if self._lookup(s, n, &slot) >= 0:
            raise EngineError(f"service {name!r} exists already")
        if self._free_sid >= 0:
            sid = self._free_sid
            self._free_sid = self._svcs[sid].deps
        else:
            if self._top >= _MAX_SERVICES:
                raise EngineError(f"at most {_MAX_SERVICES} services")
            if self._top == self._cap:
                self._grow_svcs()
            sid = self._top
            self._top += 1
        v = &self._svcs[sid]
        memset(v, 0, sizeof(Svc))
        v.spec = spec
        v.deps = -1
        v.rdeps = -1
        v.t_life = v.t_probe[0] = v.t_probe[1] = v.t_watchdog = -1
        v.state = ST_STOPPED
        v.last_transition = self._wheel._now_ms
        self._store_name(s, n, sid)
        if self._hash[slot] == HASH_EMPTY:
            self._hash_used += 1
        self._hash[slot] = sid
        self._n += 1
        self._counts[ST_STOPPED] += 1
        if self._hash_used * 2 > self._hash_cap:
            self._rehash(self._hash_cap * 2 if self._n * 4 > self._hash_cap
                         else self._hash_cap)
        return sid

    def configure(self, int32_t sid, **options):
        """Replace a service's options; they apply from its next spawn
        (the watchdog interval at once)."""
        self._check(sid)
        self._svcs[sid].spec = self._intern_spec(_spec_key(options))

    def options(self, int32_t sid):
        """The options a service was given, as a dict."""
        self._check(sid)
        key = self._spec_keys[self._svcs[sid].spec]
        return dict(zip((
            "oneshot", "autostart", "restart", "success_codes",
            "backoff_initial_ms", "backoff_factor", "backoff_max_ms",
            "backoff_jitter", "backoff_reset_ms", "start_limit_burst",
            "start_limit_interval_ms", "stop_signal", "stop_timeout_ms",
            "start_timeout_ms", "ready_notify", "watchdog_ms", "readiness",
            "liveness"), key))

    def remove_service(self, int32_t sid):
        """Remove an inactive service and its edges.

        Raises:
            EngineError: the service is not STOPPED, COMPLETED or FAILED.
        """
        self._check(sid)
        cdef Svc* v = &self._svcs[sid]
        cdef int32_t e, nxt, slot
        if not _is_inactive(v.state):
            raise EngineError(
                f"service {self._name(sid)!r} is "
                f"{_STATE_NAMES[v.state]}: stop it before removing it")
        e = v.deps
        while e >= 0:
            nxt = self._edges[e].next_dep
            self._unlink_rdep(e)
            self._free_edge_slot(e)
            e = nxt
        e = v.rdeps
        while e >= 0:
            nxt = self._edges[e].next_rdep
            self._unlink_dep(e)
            self._free_edge_slot(e)
            e = nxt
        self._lookup(self._arena + v.name_off, v.name_len, &slot)
        self._hash[slot] = HASH_TOMB
        self._counts[v.state] -= 1
        self._watchdog.pop(sid, None)
        v.state = ST_FREE
        v.deps = self._free_sid
        self._free_sid = sid
        self._n -= 1

    cdef void _unlink_dep(self, int32_t edge) noexcept:
        """Take ``edge`` out of its owner's dependency list."""
        cdef int32_t owner = self._edges[edge].owner
        cdef int32_t* link = &self._svcs[owner].deps
        while link[0] != edge:
            link = &self._edges[link[0]].next_dep
        link[0] = self._edges[edge].next_dep

    cdef void _unlink_rdep(self, int32_t edge) noexcept:
        """Take ``edge`` out of its dependency's dependents list."""
        cdef int32_t dep = self._edges[edge].dep
        cdef int32_t* link = &self._svcs[dep].rdeps
        while link[0] != edge:
            link = &self._edges[link[0]].next_rdep
        link[0] = self._edges[edge].next_rdep

    cdef int32_t _find_edge(self, int32_t sid, int32_t on) noexcept:
        cdef int32_t e = self._svcs[sid].deps
        while e >= 0:
            if self._edges[e].dep == on:
                return e
            e = self._edges[e].next_dep
        return -1

    def add_dependency(self, int32_t sid, int32_t on, int condition=0):
        """Make ``sid`` depend on ``on`` under ``condition``.

        An existing edge gets the new condition.

        Raises:
            CycleError: the edge would close a cycle; nothing is changed.
        """
        self._check(sid)
        self._check(on)
        if condition < C_STARTED or condition > C_COMPLETED:
            raise EngineError(f"unknown condition {condition!r}")
        cdef int32_t e = self._find_edge(sid, on)
        if e >= 0:
            self._edges[e].cond = <uint8_t>condition
            return
        cdef list path = self._path(on, sid)
        if path is not None:
            names = [self._name(sid)] + [self._name(x) for x in path]
            raise CycleError(names)
        e = self._new_edge()
        self._edges[e].dep = on
        self._edges[e].owner = sid
        self._edges[e].cond = <uint8_t>condition
        self._edges[e].next_dep = self._svcs[sid].deps
        self._svcs[sid].deps = e
        self._edges[e].next_rdep = self._svcs[on].rdeps
        self._svcs[on].rdeps = e

    cdef list _path(self, int32_t start, int32_t goal):
        """A dependency path start -> ... -> goal, or None (iterative DFS
        on C arrays: this runs for every edge added)."""
        cdef uint32_t epoch = self._next_epoch()
        cdef int32_t* stack = <int32_t*>PyMem_Malloc(
            (2 * self._top + 1) * sizeof(int32_t))
        cdef int32_t* parent
        cdef int32_t top = 0, x, e, d
        cdef list path
        if stack == NULL:
            raise MemoryError()
        # NB: parent[] is read only for marked ids, so it needs no init.
        parent = stack + self._top
        try:
            self._mark[start] = epoch
            parent[start] = -1
            stack[top] = start
            top += 1
            while top:
                top -= 1
                x = stack[top]
                if x == goal:
                    path = []
                    while x != -1:
                        path.append(x)
                        x = parent[x]
                    path.reverse()
                    return path
                e = self._svcs[x].deps
                while e >= 0:
                    d = self._edges[e].dep
                    if self._mark[d] != epoch:
                        self._mark[d] = epoch
                        parent[d] = x
                        stack[top] = d
                        top += 1
                    e = self._edges[e].next_dep
            return None
        finally:
            PyMem_Free(stack)

    def add_dependencies(self, edges):
        """Add many edges ``(sid, on, condition)`` with one cycle check.

        All or nothing: when the edges close a cycle, or one of them is
        invalid, none is added.

        Raises:
            CycleError: with one cycle's path.
        """
        cdef list items = list(edges)
        cdef Py_ssize_t n = len(items), i, count = 0
        cdef int32_t* added = <int32_t*>PyMem_Malloc(
            (n + 1) * sizeof(int32_t))
        cdef int32_t* order
        cdef int32_t sid, on, e
        cdef int cond
        cdef bint ok = False
        if added == NULL:
            raise MemoryError()
        if self._nedges + n > self._edge_cap:
            self._grow_edges(self._nedges + n)
        try:
            for i in range(n):
                sid, on, cond = items[i]
                self._check(sid)
                self._check(on)
                if cond < C_STARTED or cond > C_COMPLETED:
                    raise EngineError(f"unknown condition {cond!r}")
                if sid == on:
                    raise CycleError([self._name(sid), self._name(sid)])
                e = self._find_edge(sid, on)
                if e >= 0:
                    self._edges[e].cond = <uint8_t>cond
                    continue
                e = self._new_edge()
                self._edges[e].dep = on
                self._edges[e].owner = sid
                self._edges[e].cond = <uint8_t>cond
                self._edges[e].next_dep = self._svcs[sid].deps
                self._svcs[sid].deps = e
                self._edges[e].next_rdep = self._svcs[on].rdeps
                self._svcs[on].rdeps = e
                added[count] = e
                count += 1
            order = <int32_t*>PyMem_Malloc((self._top + 1) * sizeof(int32_t))
            if order == NULL:
                raise MemoryError()
            try:
                ok = self._topo_c(order) == self._n
            finally:
                PyMem_Free(order)
            if not ok:
                raise CycleError(self.find_cycle())
        finally:
            if not ok:
                # Undo in reverse: each edge is at the head of its lists.
                for i in range(count - 1, -1, -1):
                    e = added[i]
                    self._unlink_dep(e)
                    self._unlink_rdep(e)
                    self._free_edge_slot(e)
            PyMem_Free(added)

    def add_services(self, names, **options):
        """Add many services with the same options; returns their sids."""
        cdef list out = []
        cdef uint32_t spec = self._intern_spec(_spec_key(options))
        if not isinstance(names, (list, tuple)):
            names = list(names)
        # Room for all at once: a config load knows its size.
        if self._free_sid < 0 and self._top + len(names) > self._cap:
            self._grow_svcs(self._top + len(names))
        for name in names:
            out.append(self._add(name, spec))
        return out

    def remove_dependency(self, int32_t sid, int32_t on):
        """Remove the edge; False if there was none. A WAITING service
        whose remaining conditions hold is started (the returned actions
        are lost: call ``start`` to see them)."""
        self._check(sid)
        self._check(on)
        cdef int32_t e = self._find_edge(sid, on)
        if e < 0:
            return False
        self._unlink_dep(e)
        self._unlink_rdep(e)
        self._free_edge_slot(e)
        return True

    def sid(self, name):
        """The sid of a name.

        Raises:
            UnknownServiceError: no such service.
        """
        cdef int32_t sid = self._sid_of(name)
        if sid < 0:
            raise UnknownServiceError(f"unknown service {name!r}")
        return sid

    def name(self, int32_t sid):
        """The name of a sid."""
        self._check(sid)
        return self._name(sid)

    def names(self):
        """Every service name, by sid."""
        return [self._name(s) for s in range(self._top)
                if self._svcs[s].state != ST_FREE]

    def sids(self):
        """Every sid in use, ascending."""
        return [s for s in range(self._top) if self._svcs[s].state != ST_FREE]

    def __len__(self):
        return self._n

    def __contains__(self, name):
        return isinstance(name, str) and self._sid_of(name) >= 0

    # -- graph queries ------------------------------------------------------

    def dependencies(self, int32_t sid):
        """``[(on, Condition)]`` of a service."""
        self._check(sid)
        cdef list out = []
        cdef int32_t e = self._svcs[sid].deps
        while e >= 0:
            out.append((self._edges[e].dep, Condition(self._edges[e].cond)))
            e = self._edges[e].next_dep
        out.reverse()
        return out

    def dependents(self, int32_t sid):
        """``[(dependent, Condition)]`` of a service."""
        self._check(sid)
        cdef list out = []
        cdef int32_t e = self._svcs[sid].rdeps
        while e >= 0:
            out.append((self._edges[e].owner,
                        Condition(self._edges[e].cond)))
            e = self._edges[e].next_rdep
        out.reverse()
        return out

    def find_cycle(self):
        """A cycle as names (first repeated at the end), or None.

        ``add_dependency`` refuses edges that close a cycle, so this finds
        one only if that guard were broken; it is the graph's self-check.
        """
        cdef list order = self._topo()
        if len(order) == self._n:
            return None
        cdef set left = set(self.sids()) - set(order)
        cdef int32_t x = min(left), e
        cdef list seen = []
        cdef dict at = {}
        while x not in at:
            at[x] = len(seen)
            seen.append(x)
            e = self._svcs[x].deps
            while e >= 0 and self._edges[e].dep not in left:
                e = self._edges[e].next_dep
            x = self._edges[e].dep
        cyc = seen[at[x]:] + [x]
        return [self._name(s) for s in cyc]

    cdef int32_t _topo_c(self, int32_t* order) except -1:
        """Kahn's order (dependencies first) into ``order``, which holds
        ``_top`` ids; returns how many were ordered (fewer than the number
        of services means a cycle)."""
        cdef int32_t s, e, d, head = 0, tail = 0
        cdef uint32_t* indeg = self._mark
        # NB: borrows the mark array as in-degree counts and clears it
        # after; the queue is ``order`` itself.
        for s in range(self._top):
            indeg[s] = 0
            if self._svcs[s].state == ST_FREE:
                continue
            e = self._svcs[s].deps
            while e >= 0:
                indeg[s] += 1
                e = self._edges[e].next_dep
        for s in range(self._top):
            if self._svcs[s].state != ST_FREE and indeg[s] == 0:
                order[tail] = s
                tail += 1
        while head < tail:
            s = order[head]
            head += 1
            e = self._svcs[s].rdeps
            while e >= 0:
                d = self._edges[e].owner
                indeg[d] -= 1
                if indeg[d] == 0:
                    order[tail] = d
                    tail += 1
                e = self._edges[e].next_rdep
        self._reset_marks()
        return tail

    cdef list _topo(self):
        """Kahn's order of every service (dependencies first)."""
        cdef int32_t* order = <int32_t*>PyMem_Malloc(
            (self._top + 1) * sizeof(int32_t))
        cdef int32_t n, i
        if order == NULL:
            raise MemoryError()
        try:
            n = self._topo_c(order)
            return [order[i] for i in range(n)]
        finally:
            PyMem_Free(order)

    cdef void _reset_marks(self) noexcept:
        memset(self._mark, 0, self._cap * sizeof(uint32_t))
        self._epoch = 0

    cdef int32_t* _levels_array(self) except NULL:
        """Level of every sid (-1 for free slots); caller frees."""
        cdef int32_t* level = <int32_t*>PyMem_Malloc(
            (2 * self._top + 1) * sizeof(int32_t))
        cdef int32_t* order
        cdef int32_t s, e, d, lv, i, n
        if level == NULL:
            raise MemoryError()
        order = level + self._top
        n = self._topo_c(order)
        for s in range(self._top):
            level[s] = -1
        for i in range(n):
            s = order[i]
            lv = 0
            e = self._svcs[s].deps
            while e >= 0:
                d = self._edges[e].dep
                if level[d] + 1 > lv:
                    lv = level[d] + 1
                e = self._edges[e].next_dep
            level[s] = lv
        return level

    def levels(self):
        """Topological levels: level 0 has no dependencies; sids ascending
        within a level."""
        cdef int32_t* level = self._levels_array()
        cdef list out = []
        cdef int32_t s, lv
        try:
            for s in range(self._top):
                lv = level[s]
                if lv < 0:
                    continue
                while len(out) <= lv:
                    out.append([])
                out[lv].append(s)
        finally:
            PyMem_Free(level)
        return out

    cdef bint _deps_hold(self, int32_t sid) noexcept:
        cdef int32_t e = self._svcs[sid].deps
        while e >= 0:
            if not self._holds(self._edges[e].dep, self._edges[e].cond):
                return False
            e = self._edges[e].next_dep
        return True

    cdef inline bint _holds(self, int32_t on, uint8_t cond) noexcept:
        cdef uint8_t st = self._svcs[on].state
        cdef bint oneshot_done
        if self._svcs[on].flags & F_STOP_PENDING:
            # On its way down: nothing new may start on top of it.
            return False
        oneshot_done = (
            st == ST_COMPLETED
            and self._specs[self._svcs[on].spec].flags & SF_ONESHOT)
        if cond == C_STARTED:
            return _is_alive(st) or oneshot_done
        if cond == C_READY:
            return st == ST_READY or oneshot_done
        return st == ST_COMPLETED

    def condition_holds(self, int32_t on, int condition):
        """Whether ``condition`` on service ``on`` holds now."""
        self._check(on)
        return self._holds(on, <uint8_t>condition)

    def startable(self):
        """Services in STOPPED or WAITING whose conditions all hold."""
        cdef int32_t s
        cdef uint8_t st
        cdef list out = []
        for s in range(self._top):
            st = self._svcs[s].state
            if (st == ST_STOPPED or st == ST_WAITING) and self._deps_hold(s):
                out.append(s)
        return out

    cdef list _dependents_closure(self, object sids, bint ordered):
        """The given sids and everything that transitively depends on them;
        when ``ordered``, in stop order (every service before its
        dependencies, by topological level: an O(n) extra)."""
        cdef uint32_t epoch = self._next_epoch()
        cdef list stack = []
        cdef list found = []
        cdef int32_t x, e, y
        for x in sids:
            self._check(x)
            if self._mark[x] != epoch:
                self._mark[x] = epoch
                stack.append(x)
        while stack:
            x = stack.pop()
            found.append(x)
            e = self._svcs[x].rdeps
            while e >= 0:
                y = self._edges[e].owner
                if self._mark[y] != epoch:
                    self._mark[y] = epoch
                    stack.append(y)
                e = self._edges[e].next_rdep
        if not ordered:
            return found
        cdef int32_t* level = self._levels_array()
        cdef list keyed
        try:
            keyed = [(-level[<int32_t>x], x) for x in found]
        finally:
            PyMem_Free(level)
        keyed.sort()
        return [k[1] for k in keyed]

    cdef list _deps_first(self, list sids):
        """The sids and their transitive dependencies, each after all of
        its dependencies (a depth-first post-order: O(what it visits))."""
        cdef uint32_t epoch = self._next_epoch()
        cdef int32_t* node = <int32_t*>PyMem_Malloc(
            (2 * self._top + 1) * sizeof(int32_t))
        cdef int32_t* cursor
        cdef int32_t top, x, e, d
        cdef list out = []
        if node == NULL:
            raise MemoryError()
        cursor = node + self._top
        try:
            for x in sids:
                self._check(x)
                if self._mark[x] == epoch:
                    continue
                self._mark[x] = epoch
                node[0] = x
                cursor[0] = self._svcs[x].deps
                top = 1
                while top:
                    e = cursor[top - 1]
                    if e < 0:
                        top -= 1
                        out.append(node[top])
                        continue
                    cursor[top - 1] = self._edges[e].next_dep
                    d = self._edges[e].dep
                    if self._mark[d] != epoch:
                        self._mark[d] = epoch
                        node[top] = d
                        cursor[top] = self._svcs[d].deps
                        top += 1
            return out
        finally:
            PyMem_Free(node)

    def stop_order(self, sids=None):
        """The services and all their transitive dependents, each listed
        before its dependencies. None means every service."""
        if sids is None:
            sids = self.sids()
        return self._dependents_closure(sids, True)

    def affected(self, int32_t sid):
        """Transitive dependents of ``sid``, in stop order."""
        cdef list order = self._dependents_closure((sid,), True)
        order.remove(sid)
        return order

    # -- transitions --------------------------------------------------------

    cdef inline list _done(self):
        """The actions of the event just handled."""
        if FASTORCH_DEBUG:
            self.check_invariants()
        return self._out

    cdef int _set(self, int32_t sid, uint8_t to, uint8_t reason) except -1:
        cdef Svc* v = &self._svcs[sid]
        cdef uint8_t frm = v.state
        if not _ALLOWED[frm][to]:
            raise TransitionError(self._name(sid), _STATE_NAMES[frm],
                                  "-> " + _STATE_NAMES[to])
        v.state = to
        v.reason = reason
        v.last_transition = self._wheel._now_ms
        self._counts[frm] -= 1
        self._counts[to] += 1
        self._out.append((A_TRANSITION, sid, frm, to, reason))
        self._after(sid, frm, to)
        return 0

    cdef int _after(self, int32_t sid, uint8_t frm, uint8_t to) except -1:
        """What a state change means for the neighbours."""
        cdef int32_t e, other
        cdef Svc* o
        if _is_alive(to) or to == ST_COMPLETED:
            self._wake_dependents(sid)
        # A dependent went away: dependencies waiting to stop may go now.
        if _has_process(frm) and not _has_process(to):
            e = self._svcs[sid].deps
            while e >= 0:
                other = self._edges[e].dep
                o = &self._svcs[other]
                if o.flags & F_STOP_PENDING:
                    self._try_stop(other)
                e = self._edges[e].next_dep
        return 0

    cdef int _wake_dependents(self, int32_t sid) except -1:
        """Start the WAITING dependents whose conditions now all hold."""
        cdef int32_t e = self._svcs[sid].rdeps, other
        while e >= 0:
            other = self._edges[e].owner
            if (self._svcs[other].state == ST_WAITING
                    and self._deps_hold(other)):
                # WAITING -> STARTING: dependencies met
                self._spawn(other, RS_DEPENDENCIES_MET)
            e = self._edges[e].next_rdep
        return 0

    cdef int _spawn(self, int32_t sid, uint8_t reason) except -1:
        cdef Svc* v = &self._svcs[sid]
        cdef Spec* sp = &self._specs[v.spec]
        cdef int64_t now = self._wheel._now_ms
        if v.starts == 0 or now - v.window_start > sp.limit_interval:
            v.window_start = now
            v.starts = 1
        elif v.starts < 65535:
            v.starts += 1
        self._set(sid, ST_STARTING, reason)
        self._out.append((A_SPAWN, sid))
        return 0

    cdef inline int32_t _arm(self, int32_t sid, int kind,
                             int64_t at) except -1:
        return self._wheel._add(at, (<uint32_t>sid << K_BITS) | kind)

    cdef inline void _disarm(self, int32_t* timer) noexcept:
        if timer[0] >= 0:
            self._wheel._remove(timer[0])
            timer[0] = -1

    cdef int _quiet(self, int32_t sid) except -1:
        """Cancel the service's probes, watchdog and lifecycle timer."""
        cdef Svc* v = &self._svcs[sid]
        self._disarm(&v.t_life)
        self._disarm(&v.t_probe[0])
        self._disarm(&v.t_probe[1])
        self._disarm(&v.t_watchdog)
        cdef int probe
        for probe in range(2):
            if v.flags & (F_INFLIGHT << probe):
                self._out.append((A_CANCEL_PROBE, sid, probe, v.seq[probe]))
        v.flags &= ~(F_INFLIGHT | (F_INFLIGHT << 1))
        return 0

    cdef int _begin_stop(self, int32_t sid, uint8_t reason) except -1:
        cdef Svc* v = &self._svcs[sid]
        cdef Spec* sp = &self._specs[v.spec]
        v.flags &= ~F_STOP_PENDING
        self._quiet(sid)
        # RUNNING/READY/UNHEALTHY -> STOPPING: stop requested or unhealthy
        self._set(sid, ST_STOPPING, reason)
        self._out.append((A_SIGNAL, sid, sp.stop_signal))
        v.t_life = self._arm(sid, K_STOP,
                             self._wheel._now_ms + sp.stop_timeout)
        return 0

    cdef int _try_stop(self, int32_t sid) except -1:
        """Signal a service waiting to stop once no dependent runs."""
        cdef Svc* v = &self._svcs[sid]
        cdef int32_t e
        if not (v.flags & F_STOP_PENDING) or not _is_alive(v.state):
            return 0
        e = v.rdeps
        while e >= 0:
            if _has_process(self._svcs[self._edges[e].owner].state):
                return 0
            e = self._edges[e].next_rdep
        self._begin_stop(
            sid, RS_STOP_REQUESTED if not (v.flags & F_WANTED)
            else RS_RESTART_REQUESTED)
        return 0

    cdef int _fail_stop(self, int32_t sid, uint8_t reason) except -1:
        """Stop a live service whose exit then counts as a failure."""
        self._svcs[sid].flags |= F_FAIL_ON_EXIT
        self._begin_stop(sid, reason)
        return 0

    cdef int _enter(self, int32_t sid, uint8_t reason) except -1:
        """A wanted service with no process: start it or let it wait."""
        if self._deps_hold(sid):
            self._spawn(sid, reason)
        else:
            self._set(sid, ST_WAITING,
                      RS_DEPENDENCY_LOST if reason == RS_BACKOFF_ELAPSED
                      else reason)
        return 0

    cdef double _random(self) noexcept:
        # xorshift64*: small, fast and seeded, so a run replays exactly.
        cdef uint64_t x = self._rng
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        self._rng = x
        return <double>((x * 0x2545F4914F6CDD1DULL) >> 11) / 9007199254740992.0

    cdef int _restart_path(self, int32_t sid) except -1:
        cdef Svc* v = &self._svcs[sid]
        cdef Spec* sp = &self._specs[v.spec]
        cdef int64_t now = self._wheel._now_ms
        cdef double delay
        if now - v.spawned_at >= sp.backoff_reset:
            v.backoff_count = 0
        if (sp.limit_burst and v.starts >= sp.limit_burst
                and now - v.window_start <= sp.limit_interval):
            v.flags &= ~F_WANTED
            # -> FAILED: start limit hit
            self._set(sid, ST_FAILED, RS_START_LIMIT)
            return 0
        delay = sp.backoff_initial * pow(sp.backoff_factor, v.backoff_count)
        if delay > sp.backoff_max:
            delay = sp.backoff_max
        if sp.backoff_jitter > 0:
            delay *= 1.0 - sp.backoff_jitter * self._random()
        if v.backoff_count < 255:
            v.backoff_count += 1
        v.restarts += 1
        if <int64_t>delay <= 0:
            # -> STARTING: no delay
            self._enter(sid, RS_RESTARTING)
        else:
            # -> BACKOFF: wait out the delay
            self._set(sid, ST_BACKOFF, RS_EXITED)
            v.t_life = self._arm(sid, K_BACKOFF, now + <int64_t>delay)
        return 0

    cdef inline bint _code_ok(self, Spec* sp, int32_t status) noexcept:
        if status < 0 or status > 255:
            return False
        return (sp.success_codes[status >> 6] >> (status & 63)) & 1

    cdef int _update_ready(self, int32_t sid, uint8_t reason) except -1:
        cdef Svc* v = &self._svcs[sid]
        cdef Spec* sp = &self._specs[v.spec]
        cdef bint is_open = (
            (not (sp.flags & SF_READY_NOTIFY) or v.flags & F_GATE_NOTIFY)
            and (not (sp.flags & SF_PROBE) or v.flags & F_GATE_PROBE))
        if sp.flags & SF_ONESHOT:
            return 0
        if is_open and v.state == ST_RUNNING:
            self._disarm(&v.t_life)
            # RUNNING -> READY: every gate open
            self._set(sid, ST_READY, reason)
        elif is_open and v.state == ST_UNHEALTHY:
            # UNHEALTHY -> READY: readiness probe passes again
            self._set(sid, ST_READY, RS_PROBE_READY)
        elif not is_open and v.state == ST_READY:
            # READY -> UNHEALTHY: readiness probe fails
            self._set(sid, ST_UNHEALTHY, RS_PROBE_FAILED)
        return 0

    # -- requests -----------------------------------------------------------

    cdef list _sid_list(self, object sids):
        cdef list out
        if isinstance(sids, int):
            out = [sids]
        else:
            out = list(sids)
        for x in out:
            self._check(x)
        return out

    cdef int _start_one(self, int32_t sid, bint named) except -1:
        cdef Svc* v = &self._svcs[sid]
        cdef uint8_t st = v.state
        cdef bint was_stopping = v.flags & F_STOP_PENDING
        v.flags |= F_WANTED
        v.flags &= ~F_STOP_PENDING
        if st == ST_STOPPED or st == ST_FAILED or (
                named and (st == ST_COMPLETED or st == ST_BACKOFF)):
            # A start is a fresh start: the start-limit window and the
            # backoff count begin again.
            v.starts = 0
            v.backoff_count = 0
            self._disarm(&v.t_life)
            # STOPPED/COMPLETED/FAILED/BACKOFF -> STARTING or WAITING
            self._enter(sid, RS_START_REQUESTED)
        elif was_stopping and _is_alive(st):
            # The stop it cancels had held its dependents back.
            self._wake_dependents(sid)
        return 0

    cdef list _run_start(self, list sids, bint all_named):
        cdef set named = set(sids)
        cdef int32_t x
        self._out = []
        for x in self._deps_first(sids):
            self._start_one(x, all_named or x in named)
        return self._done()

    def start(self, sids):
        """Start services (an sid or an iterable) and, transitively, the
        dependencies they need."""
        return self._run_start(self._sid_list(sids), False)

    def start_all(self):
        """Start every autostart service (completed oneshots stay done)."""
        cdef list sids = [
            s for s in range(self._top)
            if self._svcs[s].state != ST_FREE
            and self._specs[self._svcs[s].spec].flags & SF_AUTOSTART]
        cdef int32_t x
        self._out = []
        for x in self._deps_first(sids):
            if self._svcs[x].state != ST_COMPLETED:
                self._start_one(x, False)
        return self._done()

    cdef list _run_stop(self, list sids, bint keep):
        cdef int32_t x
        cdef Svc* v
        cdef uint8_t st
        cdef list order = self._dependents_closure(sids, False)
        cdef set named = set(sids)
        self._out = []
        for x in order:
            v = &self._svcs[x]
            st = v.state
            if keep:
                if not (v.flags & F_WANTED or x in named):
                    continue
                v.flags |= F_WANTED
                if not _has_process(st):
                    if x in named:
                        self._start_one(x, True)
                    continue
            else:
                v.flags &= ~F_WANTED
            if st == ST_WAITING or st == ST_BACKOFF:
                self._disarm(&v.t_life)
                # WAITING/BACKOFF -> STOPPED: stop requested
                self._set(x, ST_STOPPED, RS_STOP_REQUESTED)
            elif st == ST_COMPLETED or st == ST_FAILED:
                # COMPLETED/FAILED -> STOPPED: stop requested
                self._set(x, ST_STOPPED, RS_STOP_REQUESTED)
            elif st == ST_STARTING or _is_alive(st):
                v.flags |= F_STOP_PENDING
                self._try_stop(x)
        return self._done()

    def stop(self, sids):
        """Stop services and everything that depends on them, dependents
        first."""
        return self._run_stop(self._sid_list(sids), False)

    def stop_all(self):
        """Stop every service, dependents first."""
        return self._run_stop(self.sids(), False)

    def restart(self, sids):
        """Stop services and their active dependents, then start them
        again as their conditions come to hold."""
        return self._run_stop(self._sid_list(sids), True)

    # -- process and probe events -------------------------------------------

    def spawned(self, int32_t sid, int32_t pid):
        """The process of a STARTING service exists with ``pid``."""
        self._check(sid)
        cdef Svc* v = &self._svcs[sid]
        cdef Spec* sp = &self._specs[v.spec]
        cdef int64_t now = self._wheel._now_ms
        cdef bint gated
        cdef uint32_t wd
        if v.state != ST_STARTING:
            raise TransitionError(self._name(sid), _STATE_NAMES[v.state],
                                  "spawned")
        self._out = []
        v.pid = pid
        v.spawned_at = now
        v.ready_ok = v.fails[0] = v.fails[1] = 0
        v.flags &= ~(F_GATE_NOTIFY | F_GATE_PROBE | F_FAIL_ON_EXIT)
        cdef int probe
        for probe in range(2):
            if sp.flags & (SF_PROBE << probe):
                v.t_probe[probe] = self._arm(
                    sid, K_PROBE + probe, now + sp.probe_delay[probe])
        # WATCHDOG_USEC= from a previous process does not carry over,
        # as under systemd.
        self._watchdog.pop(sid, None)
        wd = sp.watchdog
        if wd:
            v.t_watchdog = self._arm(sid, K_WATCHDOG, now + wd)
        gated = sp.flags & (SF_ONESHOT | SF_PROBE | SF_READY_NOTIFY)
        if gated and sp.start_timeout:
            v.t_life = self._arm(sid, K_START_TIMEOUT, now + sp.start_timeout)
        # STARTING -> RUNNING or READY: process spawned
        self._set(sid, ST_RUNNING if gated else ST_READY, RS_SPAWNED)
        if not (v.flags & F_WANTED):
            v.flags |= F_STOP_PENDING
        if v.flags & F_STOP_PENDING:
            self._try_stop(sid)
        return self._done()

    def spawn_failed(self, int32_t sid):
        """The process of a STARTING service could not be started."""
        self._check(sid)
        cdef Svc* v = &self._svcs[sid]
        if v.state != ST_STARTING:
            raise TransitionError(self._name(sid), _STATE_NAMES[v.state],
                                  "spawn_failed")
        self._out = []
        v.flags &= ~(F_WANTED | F_STOP_PENDING)
        # STARTING -> FAILED: spawn failed
        self._set(sid, ST_FAILED, RS_SPAWN_FAILED)
        return self._done()

    def exited(self, int32_t sid, int32_t status):
        """The process exited; ``status`` is its code, or -signo."""
        self._check(sid)
        cdef Svc* v = &self._svcs[sid]
        cdef Spec* sp = &self._specs[v.spec]
        cdef uint8_t st = v.state
        cdef bint failed_stop, success
        if not (_is_alive(st) or st == ST_STOPPING):
            raise TransitionError(self._name(sid), _STATE_NAMES[st],
                                  "exited")
        self._out = []
        v.pid = 0
        v.last_exit = status
        v.flags |= F_HAS_EXITED
        self._quiet(sid)
        failed_stop = v.flags & F_FAIL_ON_EXIT
        v.flags &= ~(F_FAIL_ON_EXIT | F_STOP_PENDING)
        if not (v.flags & F_WANTED):
            # -> STOPPED: stopped as asked (or died while waiting to stop)
            self._set(sid, ST_STOPPED,
                      RS_STOPPED if st == ST_STOPPING else RS_EXITED)
        elif st == ST_STOPPING and not failed_stop:
            # STOPPING -> STARTING or WAITING: restart requested
            self._enter(sid, RS_RESTARTING)
        else:
            success = not failed_stop and self._code_ok(sp, status)
            if success and sp.flags & SF_ONESHOT:
                # -> COMPLETED: oneshot done
                self._set(sid, ST_COMPLETED, RS_EXITED)
            elif sp.restart == R_ALWAYS or (
                    sp.restart == R_ON_FAILURE and not success):
                self._restart_path(sid)
            elif success:
                # -> COMPLETED: exited cleanly, not restarted
                self._set(sid, ST_COMPLETED, RS_EXITED)
            else:
                v.flags &= ~F_WANTED
                # -> FAILED: policy gives up
                self._set(sid, ST_FAILED, RS_EXITED)
        return self._done()

    def probe_result(self, int32_t sid, int probe, int32_t seq, ok):
        """A probe run finished; stale results (old seq) are ignored."""
        self._check(sid)
        cdef Svc* v = &self._svcs[sid]
        cdef int32_t t
        cdef int64_t started
        if probe != 0 and probe != 1:
            raise EngineError(f"unknown probe {probe!r}")
        self._out = []
        if not (v.flags & (F_INFLIGHT << probe)) or seq != v.seq[probe]:
            return self._done()
        # The run's timeout timer says when it started: due + timeout.
        t = v.t_probe[probe]
        v.t_probe[probe] = -1
        started = (self._wheel._timers[t].deadline * self._wheel._tick_ms
                   - self._specs[v.spec].probe_timeout[probe])
        self._wheel._remove(t)
        self._probe_done(sid, probe, bool(ok), started)
        return self._done()

    cdef int _probe_done(self, int32_t sid, int probe, bint ok,
                         int64_t started) except -1:
        cdef Svc* v = &self._svcs[sid]
        cdef Spec* sp = &self._specs[v.spec]
        cdef int64_t now = self._wheel._now_ms
        cdef int64_t nxt = started + sp.probe_period[probe]
        cdef bint failed_out
        v.flags &= ~(F_INFLIGHT << probe)
        v.t_probe[probe] = self._arm(sid, K_PROBE + probe,
                                     nxt if nxt > now else now)
        if ok:
            v.fails[probe] = 0
        else:
            v.probe_failures += 1
            if v.fails[probe] < 255:
                v.fails[probe] += 1
        failed_out = v.fails[probe] >= sp.probe_failure[probe]
        if probe == 1:
            if failed_out:
                self._fail_stop(sid, RS_LIVENESS_FAILED)
            return 0
        # Readiness opens its gate after success_threshold passes in a row
        # and closes it after failure_threshold failures in a row.
        if ok:
            if v.ready_ok < 255:
                v.ready_ok += 1
            if v.ready_ok >= sp.ready_success:
                v.flags |= F_GATE_PROBE
        else:
            v.ready_ok = 0
            if failed_out:
                v.flags &= ~F_GATE_PROBE
        self._update_ready(sid, RS_PROBE_READY)
        return 0

    def notify_ready(self, int32_t sid):
        """READY=1 from the child; ignored unless it has a process."""
        self._check(sid)
        cdef Svc* v = &self._svcs[sid]
        self._out = []
        if _is_alive(v.state) and (
                self._specs[v.spec].flags & SF_READY_NOTIFY):
            v.flags |= F_GATE_NOTIFY
            self._update_ready(sid, RS_NOTIFY_READY)
        return self._done()

    def notify_watchdog(self, int32_t sid):
        """WATCHDOG=1 from the child: push the watchdog deadline back."""
        self._check(sid)
        cdef Svc* v = &self._svcs[sid]
        cdef uint32_t wd
        self._out = []
        if v.t_watchdog >= 0 and _is_alive(v.state):
            wd = self._watchdog.get(sid, self._specs[v.spec].watchdog)
            self._wheel._remove(v.t_watchdog)
            v.t_watchdog = self._arm(sid, K_WATCHDOG,
                                     self._wheel._now_ms + wd)
        return self._done()

    def set_watchdog(self, int32_t sid, int64_t watchdog_ms):
        """WATCHDOG_USEC= from the child: a new interval, armed now."""
        self._check(sid)
        _duration("watchdog_ms", watchdog_ms)
        cdef Svc* v = &self._svcs[sid]
        self._out = []
        # A per-service override is rare: a dict, not a field of every Svc.
        if watchdog_ms:
            self._watchdog[sid] = watchdog_ms
        else:
            self._watchdog.pop(sid, None)
        if _is_alive(v.state):
            self._disarm(&v.t_watchdog)
            if watchdog_ms:
                v.t_watchdog = self._arm(sid, K_WATCHDOG,
                                         self._wheel._now_ms + watchdog_ms)
        return self._done()

    def advance(self, int64_t now):
        """Move time to ``now`` (ms) and act on every timer due."""
        self._wheel._set_now(now)
        self._out = []
        cdef int32_t idx
        cdef uint32_t payload
        cdef int64_t deadline
        while True:
            idx = self._wheel._pop(now)
            if idx < 0:
                return self._done()
            payload = self._wheel._timers[idx].payload
            deadline = (self._wheel._timers[idx].deadline
                        * self._wheel._tick_ms)
            self._wheel._release(idx)
            self._fire(<int32_t>(payload >> K_BITS),
                       payload & ((1 << K_BITS) - 1), deadline)

    cdef int _fire(self, int32_t sid, uint32_t kind,
                   int64_t deadline) except -1:
        cdef Svc* v = &self._svcs[sid]
        cdef Spec* sp = &self._specs[v.spec]
        cdef int64_t now = self._wheel._now_ms
        cdef int probe
        cdef int64_t timeout
        if kind == K_BACKOFF:
            v.t_life = -1
            # BACKOFF -> STARTING: delay elapsed (WAITING if a condition
            # no longer holds)
            self._enter(sid, RS_BACKOFF_ELAPSED)
        elif kind == K_STOP:
            v.t_life = -1
            self._out.append((A_KILL, sid))
        elif kind == K_START_TIMEOUT:
            v.t_life = -1
            if v.state == ST_RUNNING:
                self._fail_stop(sid, RS_START_TIMEOUT)
        elif kind == K_WATCHDOG:
            v.t_watchdog = -1
            self._fail_stop(sid, RS_WATCHDOG)
        elif kind == K_PROBE or kind == K_PROBE + 1:
            probe = kind - K_PROBE
            timeout = sp.probe_timeout[probe]
            v.t_probe[probe] = -1
            if v.flags & (F_INFLIGHT << probe):
                # The run's timeout: a failure, and the run is called off.
                self._out.append((A_CANCEL_PROBE, sid, probe, v.seq[probe]))
                self._probe_done(sid, probe, False, deadline - timeout)
            else:
                # The run is due.
                v.seq[probe] += 1
                v.flags |= F_INFLIGHT << probe
                v.t_probe[probe] = self._arm(
                    sid, kind, _run_end(deadline, now, timeout))
                self._out.append((A_PROBE, sid, probe, v.seq[probe]))
        return 0

    def next_deadline(self):
        """When ``advance`` should next be called, in ms, or None."""
        cdef int64_t at = self._wheel._next_deadline()
        return None if at < 0 else at

    @property
    def now(self):
        """The engine's time, in ms."""
        return self._wheel._now_ms

    # -- reading ------------------------------------------------------------

    def state(self, int32_t sid):
        """The State of a service."""
        self._check(sid)
        return State(self._svcs[sid].state)

    def info(self, int32_t sid):
        """A ServiceInfo snapshot of one service."""
        self._check(sid)
        cdef Svc* v = &self._svcs[sid]
        return ServiceInfo(
            sid=sid,
            name=self._name(sid),
            state=State(v.state),
            pid=v.pid,
            restarts=v.restarts,
            last_exit=v.last_exit if v.flags & F_HAS_EXITED else None,
            readiness_failures=v.fails[0],
            liveness_failures=v.fails[1],
            probe_failures_total=v.probe_failures,
            last_transition_ms=v.last_transition,
            spawned_at_ms=v.spawned_at,
            is_wanted=bool(v.flags & F_WANTED),
            is_ready=v.state == ST_READY or (
                v.state == ST_COMPLETED
                and bool(self._specs[v.spec].flags & SF_ONESHOT)),
            reason=Reason(v.reason),
        )

    def states(self):
        """One byte per sid up to the highest in use: its State, 255 for
        a free id."""
        cdef bytearray out = bytearray(self._top)
        cdef int32_t s
        for s in range(self._top):
            out[s] = self._svcs[s].state
        return bytes(out)

    def counters(self, int32_t sid):
        """``(state, pid, restarts, last_exit, probe_failures,
        last_transition_ms)`` as plain ints: the cheap read for metrics."""
        self._check(sid)
        cdef Svc* v = &self._svcs[sid]
        return (v.state, v.pid, v.restarts, v.last_exit, v.probe_failures,
                v.last_transition)

    def count_by_state(self):
        """How many services are in each State, indexed by State."""
        return [self._counts[i] for i in range(N_STATES)]

    def is_active(self):
        """Whether any service is in an active state."""
        return (self._counts[ST_STOPPED] + self._counts[ST_COMPLETED]
                + self._counts[ST_FAILED]) != self._n

    def pending_timers(self):
        """How many timers are scheduled."""
        return self._wheel._count

    def memory_bytes(self):
        """Bytes of C memory the engine holds (arrays, names, wheel)."""
        return (self._cap * (sizeof(Svc) + sizeof(uint32_t))
                + self._spec_cap * sizeof(Spec)
                + self._edge_cap * sizeof(Edge)
                + self._arena_cap
                + self._hash_cap * sizeof(int32_t)
                + self._wheel._cap * sizeof(Timer))

    def check_invariants(self):
        """Check the engine's internal consistency.

        Raises:
            EngineError: naming the first broken invariant.
        """
        cdef int32_t s, e, n = 0, t
        cdef int64_t counts[N_STATES]
        cdef Svc* v
        cdef int32_t timers = 0
        memset(counts, 0, sizeof(counts))
        for s in range(self._top):
            v = &self._svcs[s]
            if v.state == ST_FREE:
                continue
            n += 1
            counts[v.state] += 1
            if self._sid_of(self._name(s)) != s:
                raise EngineError(f"sid {s}: name lookup is broken")
            for t in (v.t_life, v.t_probe[0], v.t_probe[1], v.t_watchdog):
                if t >= 0:
                    timers += 1
                    if self._wheel._timers[t].slot == SLOT_NONE or (
                            self._wheel._timers[t].payload >> K_BITS) != s:
                        raise EngineError(f"sid {s}: stale timer {t}")
            if not _has_process(v.state) and v.state != ST_BACKOFF and (
                    v.t_life >= 0 or v.t_probe[0] >= 0 or v.t_probe[1] >= 0
                    or v.t_watchdog >= 0):
                raise EngineError(
                    f"sid {s}: timer armed in {_STATE_NAMES[v.state]}")
            if v.state == ST_BACKOFF and v.t_life < 0:
                raise EngineError(f"sid {s}: backoff without a timer")
            if v.state == ST_STOPPING and (
                    v.t_probe[0] >= 0 or v.t_probe[1] >= 0
                    or v.t_watchdog >= 0):
                raise EngineError(f"sid {s}: probes armed while stopping")
            if (_is_alive(v.state) or v.state == ST_STOPPING) and v.pid <= 0:
                raise EngineError(f"sid {s}: alive without a pid")
            if v.state == ST_WAITING and not (v.flags & F_WANTED):
                raise EngineError(f"sid {s}: waiting but not wanted")
            if v.state == ST_WAITING and self._deps_hold(s):
                raise EngineError(f"sid {s}: waiting with conditions met")
            e = v.deps
            while e >= 0:
                if self._edges[e].owner != s:
                    raise EngineError(f"sid {s}: edge {e} has another owner")
                e = self._edges[e].next_dep
        if n != self._n:
            raise EngineError(f"{n} services, counted {self._n}")
        for s in range(N_STATES):
            if counts[s] != self._counts[s]:
                raise EngineError(f"state {s}: count is off")
        if timers != self._wheel._count:
            raise EngineError(
                f"{self._wheel._count} timers scheduled, {timers} owned")
        if self.find_cycle() is not None:
            raise EngineError("the graph has a cycle")
