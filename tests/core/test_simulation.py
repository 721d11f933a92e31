"""A simulated hour of 10,000 services, driven like the shell drives them.

The fake shell answers every SPAWN with ``spawned`` at once (a fake pid),
answers probes 5 ms later (a few services have flaky probes), lets a
signalled process exit 20 ms later, and crashes a few live processes every
simulated minute. Time jumps from one event to the next.

Checked while it runs:

- nothing enters STARTING unless every dependency condition holds in the
  states announced so far (the TRANSITION actions replayed in order);
- every exit is answered per the restart policy;
- no timer is lost: every live service with a probe sees a PROBE at least
  once per period + timeout; no service stays in BACKOFF longer than its
  maximum delay; every SIGNAL is followed by the exit;
- ``check_invariants()`` passes every simulated minute and at the end.
"""

from __future__ import annotations

import heapq
import random

from fastorch import _core
from fastorch._core import Action, Condition, Restart, State

N = 10_000
HOUR_MS = 3_600_000
MINUTE_MS = 60_000
PERIOD_MS = 30_000
TIMEOUT_MS = 1_000
BACKOFF_MAX_MS = 5_000

ALIVE = {State.RUNNING, State.READY, State.UNHEALTHY}
HOLDS = {
    Condition.STARTED: ALIVE,
    Condition.READY: {State.READY},
    Condition.COMPLETED: {State.COMPLETED},
}


def _build(rnd: random.Random, window: int = 500):
    engine = _core.Engine(now=0, seed=7)
    policy = {}
    probed = set()
    for i in range(N):
        restart = rnd.choice([Restart.ALWAYS, Restart.ON_FAILURE, Restart.NEVER])
        opts = dict(
            restart=restart,
            backoff_initial_ms=100,
            backoff_max_ms=BACKOFF_MAX_MS,
            start_limit_burst=5,
            start_limit_interval_ms=10_000,
            stop_timeout_ms=2_000,
        )
        if i % 3 == 0:
            opts["readiness"] = (1_000, PERIOD_MS, TIMEOUT_MS, 1, 3)
        if i % 7 == 0:
            opts["liveness"] = (2_000, PERIOD_MS, TIMEOUT_MS, 1, 3)
        sid = engine.add_service(f"svc{i}", **opts)
        policy[sid] = restart
        if "readiness" in opts or "liveness" in opts:
            probed.add(sid)
    # a DAG: each service needs up to two of the 500 before it
    for sid in range(1, N):
        for on in rnd.sample(
            range(max(0, sid - 500), sid), min(sid, rnd.randint(0, 2))
        ):
            engine.add_dependency(sid, on, rnd.choice([0, 0, 1]))
    return engine, policy, probed


def test_simulated_hour_of_10000_services():
    simulate_hour()


def simulate_hour(window: int = 500) -> dict:
    """Run the hour; return what was seen (``window`` 0: edges onto the
    first 1,000 services only)."""
    rnd = random.Random(2024)
    engine, policy, probed = _build(rnd, window)
    deps = {s: engine.dependencies(s) for s in engine.sids()}
    flaky = set(rnd.sample(sorted(probed), len(probed) // 20))

    shadow = [State.STOPPED] * N
    pids = 1000
    later: list[tuple[int, int, tuple]] = []  # (at, order, event)
    order = 0
    last_probe = {}
    signalled: dict[int, int] = {}
    seen = {"starting": 0, "exits": 0, "probes": 0, "kills": 0}

    def push(at, ev):
        nonlocal order
        order += 1
        heapq.heappush(later, (at, order, ev))

    def run(actions):
        nonlocal pids
        todo = list(actions)
        while todo:
            a = todo.pop(0)
            kind, sid = a[0], a[1]
            now = engine.now
            if kind == Action.TRANSITION:
                frm, to = a[2], a[3]
                assert shadow[sid] == frm, (sid, shadow[sid], a)
                shadow[sid] = State(to)
                if to == State.STARTING:
                    seen["starting"] += 1
                    for on, cond in deps[sid]:
                        assert shadow[on] in HOLDS[cond], (sid, on, cond, shadow[on])
            elif kind == Action.SPAWN:
                pids += 1
                todo.extend(engine.spawned(sid, pids))
            elif kind == Action.PROBE:
                seen["probes"] += 1
                last_probe[sid] = now
                ok = rnd.random() > (0.5 if sid in flaky else 0.002)
                push(now + 5, ("probe", sid, a[2], a[3], ok))
            elif kind == Action.SIGNAL:
                signalled[sid] = now
                push(now + 20, ("exit", sid, -a[2], engine.info(sid).pid))
            elif kind == Action.KILL:
                seen["kills"] += 1

    run(engine.start_all())
    next_minute = MINUTE_MS
    while True:
        nd = engine.next_deadline()
        at = min(x for x in (nd, later[0][0] if later else None, next_minute) if x)
        if at > HOUR_MS:
            break
        run(engine.advance(max(at, engine.now)))
        while later and later[0][0] <= engine.now:
            _, _, ev = heapq.heappop(later)
            if ev[0] == "probe":
                run(engine.probe_result(*ev[1:]))
            elif engine.info(ev[1]).pid == ev[3]:
                _exit(engine, run, policy, shadow, signalled, seen, ev[1], ev[2])
        if engine.now >= next_minute:
            next_minute += MINUTE_MS
            _crash_some(engine, rnd, run, policy, shadow, signalled, seen)
            _check_timers(engine, shadow, probed, last_probe, signalled)
            engine.check_invariants()

    engine.check_invariants()
    counts = engine.count_by_state()
    assert sum(counts) == N
    assert seen["exits"] > 1000 and seen["probes"] > 50_000, seen
    assert counts[State.BACKOFF] + counts[State.FAILED] < N // 2, counts
    return dict(seen, counts=counts)


def _exit(engine, run, policy, shadow, signalled, seen, sid, status):
    was = shadow[sid]
    seen["exits"] += 1
    signalled.pop(sid, None)
    out = engine.exited(sid, status)
    run(out)
    to = shadow[sid]
    if was == State.STOPPING:
        return
    # an unrequested exit follows the restart policy
    if policy[sid] == Restart.NEVER or (
        policy[sid] == Restart.ON_FAILURE and status == 0
    ):
        assert to in (State.COMPLETED, State.FAILED, State.STOPPED), (sid, out)
    else:
        assert to in (
            State.BACKOFF,
            State.STARTING,
            State.WAITING,
            State.RUNNING,
            State.READY,
            State.FAILED,
        ), (sid, out)
        if to == State.FAILED:
            assert out[-1][4] == _core.Reason.START_LIMIT, out


def _crash_some(engine, rnd, run, policy, shadow, signalled, seen):
    alive = [s for s in range(N) if shadow[s] in ALIVE]
    for sid in rnd.sample(alive, min(len(alive), 50)):
        if shadow[sid] in ALIVE:
            _exit(
                engine,
                run,
                policy,
                shadow,
                signalled,
                seen,
                sid,
                rnd.choice([0, 1, 2, -9, -11]),
            )


def _check_timers(engine, shadow, probed, last_probe, signalled):
    now = engine.now
    for sid in probed:
        if shadow[sid] in ALIVE:
            info = engine.info(sid)
            since = max(info.spawned_at_ms, last_probe.get(sid, 0))
            assert now - since <= PERIOD_MS + TIMEOUT_MS + 2_000, (sid, info)
    for sid in range(N):
        if shadow[sid] == State.BACKOFF:
            assert now - engine.info(sid).last_transition_ms <= BACKOFF_MAX_MS
    for sid, at in signalled.items():
        assert now - at <= 20, (sid, at)
