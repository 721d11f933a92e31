"""One test per rule of docs/engine.md, driven with a fake clock."""

from __future__ import annotations

import pytest

from fastorch import _core
from fastorch._core import Action, Condition, Engine, Probe, Reason, Restart, State
from fastorch.errors import (
    CycleError,
    EngineError,
    TransitionError,
    UnknownServiceError,
)

S = State


def transitions(actions, sid=None):
    return [
        (a[1], S(a[2]), S(a[3]), Reason(a[4]))
        for a in actions
        if a[0] == Action.TRANSITION and (sid is None or a[1] == sid)
    ]


def kinds(actions, kind):
    return [a for a in actions if a[0] == kind]


def spawn_all(engine, actions, pid=1000):
    """Answer every SPAWN with spawned(); returns all actions seen."""
    seen = list(actions)
    queue = [a[1] for a in actions if a[0] == Action.SPAWN]
    while queue:
        sid = queue.pop(0)
        pid += 1
        more = engine.spawned(sid, pid)
        seen += more
        queue += [a[1] for a in more if a[0] == Action.SPAWN]
    return seen


def next_spawn(engine):
    """Advance deadline by deadline until a SPAWN; returns that time."""
    for _ in range(10):
        acts = engine.advance(engine.next_deadline())
        if kinds(acts, Action.SPAWN):
            spawn_all(engine, acts)
            return engine.now
    raise AssertionError("no spawn")


def no_jitter(**kw):
    kw.setdefault("backoff_jitter", 0.0)
    return kw


# -- graph -----------------------------------------------------------------


def test_levels_and_startable_follow_dependencies():
    e = Engine()
    a, b, c, d = (e.add_service(n) for n in "abcd")
    e.add_dependency(b, a)
    e.add_dependency(c, b)
    e.add_dependency(d, a)
    assert e.levels() == [[a], [b, d], [c]]
    assert e.startable() == [a]
    assert e.stop_order() == [c, b, d, a]
    assert e.affected(a) == [c, b, d]
    assert e.stop_order([b]) == [c, b]


def test_cycle_is_refused_with_its_path_and_graph_unchanged():
    e = Engine()
    a, b, c = (e.add_service(n) for n in "abc")
    e.add_dependency(a, b)
    e.add_dependency(b, c)
    with pytest.raises(CycleError) as info:
        e.add_dependency(c, a)
    assert info.value.cycle == ["c", "a", "b", "c"]
    assert e.dependencies(c) == []
    assert e.find_cycle() is None
    with pytest.raises(CycleError):
        e.add_dependency(a, a)


def test_edge_condition_is_replaced_not_duplicated():
    e = Engine()
    a, b = e.add_service("a"), e.add_service("b")
    e.add_dependency(b, a)
    e.add_dependency(b, a, Condition.READY)
    assert e.dependencies(b) == [(a, Condition.READY)]
    assert e.dependents(a) == [(b, Condition.READY)]
    assert e.remove_dependency(b, a)
    assert not e.remove_dependency(b, a)


def test_names_map_to_ids_and_ids_are_reused():
    e = Engine()
    a = e.add_service("alpha")
    b = e.add_service("βeta")
    assert e.sid("βeta") == b and e.name(b) == "βeta"
    assert "alpha" in e and "nope" not in e and 3 not in e
    e.remove_service(a)
    assert "alpha" not in e
    with pytest.raises(UnknownServiceError):
        e.sid("alpha")
    with pytest.raises(UnknownServiceError):
        e.state(a)
    assert e.add_service("gamma") == a
    assert e.names() == ["gamma", "βeta"]
    e.check_invariants()


def test_many_names_survive_rehash_and_removal():
    e = Engine()
    sids = [e.add_service(f"svc-{i}") for i in range(5000)]
    for i in range(0, 5000, 2):
        e.remove_service(sids[i])
    for i in range(1, 5000, 2):
        assert e.sid(f"svc-{i}") == sids[i]
    assert len(e) == 2500
    e.check_invariants()


def test_bad_input_raises_package_errors():
    e = Engine()
    a = e.add_service("a")
    with pytest.raises(EngineError):
        e.add_service("a")
    with pytest.raises(EngineError):
        e.add_service("")
    with pytest.raises(EngineError):
        e.add_service("b", backoff_initial_ms=-1)
    with pytest.raises(EngineError):
        e.add_service("b", stop_timeout_ms=31 * 24 * 3600 * 1000)
    with pytest.raises(EngineError):
        e.add_service("b", readiness=(0, 1000, 1000, 0, 3))
    with pytest.raises(EngineError):
        e.add_service("b", readiness=(0, 1000))
    with pytest.raises(EngineError):
        e.add_service("b", backoff_factor=0.5)
    with pytest.raises(EngineError):
        e.add_service("b", success_codes=[300])
    with pytest.raises(EngineError):
        e.add_service("b", no_such_option=1)
    with pytest.raises(UnknownServiceError):
        e.add_dependency(a, 99)
    with pytest.raises(UnknownServiceError):
        e.start(99)
    with pytest.raises(EngineError):
        e.add_dependency(a, a, 7)
    assert len(e) == 1
    e.check_invariants()


def test_time_never_goes_backwards():
    e = Engine(now=1000)
    with pytest.raises(EngineError):
        e.advance(999)
    assert e.now == 1000


# -- start and readiness -----------------------------------------------------


def test_dependent_waits_until_dependency_is_ready():
    e = Engine()
    db = e.add_service("db", ready_notify=True)
    web = e.add_service("web")
    e.add_dependency(web, db, Condition.READY)
    acts = e.start(web)
    assert kinds(acts, Action.SPAWN) == [(Action.SPAWN, db)]
    assert e.state(web) == S.WAITING
    acts = e.spawned(db, 10)
    assert e.state(db) == S.RUNNING and not kinds(acts, Action.SPAWN)
    acts = e.notify_ready(db)
    assert transitions(acts) == [
        (db, S.RUNNING, S.READY, Reason.NOTIFY_READY),
        (web, S.WAITING, S.STARTING, Reason.DEPENDENCIES_MET),
    ]
    assert kinds(acts, Action.SPAWN) == [(Action.SPAWN, web)]


def test_independent_services_start_together():
    e = Engine()
    sids = [e.add_service(f"s{i}") for i in range(5)]
    acts = e.start_all()
    assert sorted(a[1] for a in kinds(acts, Action.SPAWN)) == sids


def test_oneshot_completion_gates_dependent():
    e = Engine()
    mig = e.add_service("migrate", oneshot=True)
    web = e.add_service("web")
    e.add_dependency(web, mig, Condition.COMPLETED)
    spawn_all(e, e.start_all())
    assert e.state(mig) == S.RUNNING and e.state(web) == S.WAITING
    acts = e.exited(mig, 0)
    assert e.state(mig) == S.COMPLETED
    assert kinds(acts, Action.SPAWN) == [(Action.SPAWN, web)]
    # start_all again does not re-run a completed oneshot
    assert not kinds(e.start_all(), Action.SPAWN)
    # a start naming it does
    assert kinds(e.start(mig), Action.SPAWN) == [(Action.SPAWN, mig)]


def test_failed_oneshot_does_not_release_dependent():
    e = Engine()
    mig = e.add_service("migrate", oneshot=True, restart=Restart.NEVER)
    web = e.add_service("web")
    e.add_dependency(web, mig, Condition.COMPLETED)
    spawn_all(e, e.start_all())
    acts = e.exited(mig, 3)
    assert e.state(mig) == S.FAILED and e.state(web) == S.WAITING
    assert not kinds(acts, Action.SPAWN)
    assert e.info(mig).last_exit == 3


def test_readiness_thresholds_and_unhealthy_state():
    e = Engine()
    s = e.add_service("s", readiness=(500, 1000, 200, 2, 2))
    spawn_all(e, e.start(s))
    assert e.advance(499) == []
    probe = e.advance(500)
    assert probe == [(Action.PROBE, s, Probe.READINESS, 1)]
    acts = e.probe_result(s, Probe.READINESS, 1, True)
    assert e.state(s) == S.RUNNING and not transitions(acts)
    assert e.advance(1499) == []
    assert e.advance(1500) == [(Action.PROBE, s, 0, 2)]
    e.advance(1510)
    acts = e.probe_result(s, 0, 2, True)
    assert transitions(acts) == [(s, S.RUNNING, S.READY, Reason.PROBE_READY)]
    # two failures close the gate: READY -> UNHEALTHY, no restart
    for t, seq in ((2500, 3), (3500, 4)):
        assert e.advance(t) == [(Action.PROBE, s, 0, seq)]
        acts = e.probe_result(s, 0, seq, False)
    assert transitions(acts) == [(s, S.READY, S.UNHEALTHY, Reason.PROBE_FAILED)]
    assert not kinds(acts, Action.SIGNAL)
    for t, seq in ((4500, 5), (5500, 6)):
        e.advance(t)
        acts = e.probe_result(s, 0, seq, True)
    assert transitions(acts) == [(s, S.UNHEALTHY, S.READY, Reason.PROBE_READY)]
    assert e.info(s).probe_failures_total == 2


def test_probe_timeout_counts_as_failure_and_cancels_the_run():
    e = Engine()
    s = e.add_service("s", liveness=(0, 1000, 300, 1, 1), backoff_jitter=0.0)
    spawn_all(e, e.start(s))
    assert e.advance(0) == [(Action.PROBE, s, Probe.LIVENESS, 1)]
    acts = e.advance(300)
    assert acts[0] == (Action.CANCEL_PROBE, s, Probe.LIVENESS, 1)
    assert transitions(acts) == [(s, S.READY, S.STOPPING, Reason.LIVENESS_FAILED)]
    assert (Action.SIGNAL, s, 15) in acts
    # a late result for the cancelled run is ignored
    assert e.probe_result(s, Probe.LIVENESS, 1, True) == []


def test_unhealthy_liveness_restarts_per_policy():
    e = Engine()
    s = e.add_service("s", liveness=(0, 1000, 500, 1, 2), **no_jitter())
    spawn_all(e, e.start(s))
    e.advance(0)
    e.probe_result(s, 1, 1, False)
    assert e.state(s) == S.READY
    e.advance(1000)
    acts = e.probe_result(s, 1, 2, False)
    assert e.state(s) == S.STOPPING and (Action.SIGNAL, s, 15) in acts
    acts = e.exited(s, 0)  # exit code 0 still counts as a failure
    assert transitions(acts) == [(s, S.STOPPING, S.BACKOFF, Reason.EXITED)]
    assert e.info(s).restarts == 1


def test_notify_ready_gates_and_is_ignored_without_process():
    e = Engine()
    s = e.add_service("s", ready_notify=True)
    assert e.notify_ready(s) == []
    spawn_all(e, e.start(s))
    assert e.state(s) == S.RUNNING
    e.notify_ready(s)
    assert e.state(s) == S.READY


def test_notify_and_probe_gates_both_needed():
    e = Engine()
    s = e.add_service("s", ready_notify=True, readiness=(0, 1000, 100, 1, 1))
    spawn_all(e, e.start(s))
    e.advance(0)
    e.probe_result(s, 0, 1, True)
    assert e.state(s) == S.RUNNING
    e.notify_ready(s)
    assert e.state(s) == S.READY


def test_watchdog_expiry_restarts_and_pings_push_it_back():
    e = Engine()
    s = e.add_service("s", watchdog_ms=1000, **no_jitter())
    spawn_all(e, e.start(s))
    e.advance(900)
    e.notify_watchdog(s)
    assert e.advance(1800) == []
    acts = e.advance(1900)
    assert transitions(acts) == [(s, S.READY, S.STOPPING, Reason.WATCHDOG)]
    # WATCHDOG_USEC from the child changes the interval
    e.exited(s, -6)
    spawn_all(e, e.advance(2000))
    e.set_watchdog(s, 5000)
    assert e.advance(6999) == []
    assert e.state(s) == S.READY


def test_start_timeout_stops_a_service_that_never_gets_ready():
    e = Engine()
    s = e.add_service("s", ready_notify=True, start_timeout_ms=2000)
    spawn_all(e, e.start(s))
    acts = e.advance(2000)
    assert transitions(acts) == [(s, S.RUNNING, S.STOPPING, Reason.START_TIMEOUT)]


# -- exits, restarts, backoff, start limit -----------------------------------


def test_backoff_grows_exponentially_and_caps():
    e = Engine()
    s = e.add_service(
        "s",
        backoff_initial_ms=100,
        backoff_factor=2.0,
        backoff_max_ms=500,
        start_limit_burst=0,
        **no_jitter(),
    )
    spawn_all(e, e.start(s))
    delays = []
    for _ in range(5):
        e.exited(s, 1)
        t0 = e.now
        assert e.state(s) == S.BACKOFF
        deadline = e.next_deadline()
        acts = e.advance(deadline)
        if not kinds(acts, Action.SPAWN):  # coarse slot: advance again
            acts = e.advance(e.next_deadline())
        delays.append(e.now - t0)
        spawn_all(e, acts)
    assert delays == [100, 200, 400, 500, 500]


def test_backoff_resets_after_stable_uptime():
    e = Engine()
    s = e.add_service("s", backoff_reset_ms=10_000, **no_jitter())
    spawn_all(e, e.start(s))
    e.exited(s, 1)
    spawn_all(e, e.advance(100))
    e.exited(s, 1)
    assert next_spawn(e) == 300  # second delay: 200 ms
    e.advance(20_000)
    e.exited(s, 1)
    assert next_spawn(e) == 20_100  # back to the initial delay


def test_jitter_is_seeded_and_bounded():
    def delay(seed):
        e = Engine(seed=seed)
        s = e.add_service("s", backoff_initial_ms=10_000, backoff_jitter=0.5)
        spawn_all(e, e.start(s))
        e.exited(s, 1)
        t = e.next_deadline()
        while True:
            acts = e.advance(t)
            if kinds(acts, Action.SPAWN):
                return t
            t = e.next_deadline()

    assert delay(7) == delay(7)
    values = {delay(seed) for seed in range(20)}
    assert len(values) > 10
    assert all(5000 < v <= 10_000 for v in values)


def test_start_limit_then_failed_until_explicit_start():
    e = Engine()
    s = e.add_service(
        "s",
        backoff_initial_ms=0,
        start_limit_burst=3,
        start_limit_interval_ms=10_000,
    )
    spawn_all(e, e.start(s))
    for _ in range(2):
        spawn_all(e, e.exited(s, 1))
    acts = e.exited(s, 1)
    assert transitions(acts) == [(s, S.READY, S.FAILED, Reason.START_LIMIT)]
    assert e.advance(60_000) == []
    acts = e.start(s)
    assert kinds(acts, Action.SPAWN) == [(Action.SPAWN, s)]


def test_start_limit_window_slides_after_interval():
    e = Engine()
    s = e.add_service(
        "s", backoff_initial_ms=0, start_limit_burst=2, start_limit_interval_ms=1000
    )
    spawn_all(e, e.start(s))
    for t in (2000, 4000, 6000):
        e.advance(t)
        spawn_all(e, e.exited(s, 1))
        assert e.state(s) == S.READY


def test_restart_policies():
    for policy, status, expected in [
        (Restart.NEVER, 1, S.FAILED),
        (Restart.NEVER, 0, S.COMPLETED),
        (Restart.ON_FAILURE, 0, S.COMPLETED),
        (Restart.ON_FAILURE, 1, S.BACKOFF),
        (Restart.ON_FAILURE, -9, S.BACKOFF),
        (Restart.ALWAYS, 0, S.BACKOFF),
    ]:
        e = Engine()
        s = e.add_service("s", restart=policy)
        spawn_all(e, e.start(s))
        e.exited(s, status)
        assert e.state(s) == expected, (policy, status)


def test_success_codes_are_configurable():
    e = Engine()
    s = e.add_service("s", success_codes=[0, 3])
    spawn_all(e, e.start(s))
    e.exited(s, 3)
    assert e.state(s) == S.COMPLETED


def test_zero_delay_restart_spawns_in_the_same_call():
    e = Engine()
    s = e.add_service("s", backoff_initial_ms=0)
    spawn_all(e, e.start(s))
    acts = e.exited(s, 1)
    assert transitions(acts) == [(s, S.READY, S.STARTING, Reason.RESTARTING)]
    assert kinds(acts, Action.SPAWN) == [(Action.SPAWN, s)]


def test_spawn_failure_fails_only_that_service():
    e = Engine()
    bad, good = e.add_service("bad"), e.add_service("good")
    acts = e.start_all()
    e.spawned(good, 5)
    acts = e.spawn_failed(bad)
    assert transitions(acts) == [(bad, S.STARTING, S.FAILED, Reason.SPAWN_FAILED)]
    assert e.state(good) == S.READY


def test_crashing_dependency_does_not_stop_running_dependents():
    e = Engine()
    db, web = e.add_service("db", **no_jitter()), e.add_service("web")
    e.add_dependency(web, db)
    spawn_all(e, e.start_all())
    acts = e.exited(db, 1)
    assert transitions(acts) == [(db, S.READY, S.BACKOFF, Reason.EXITED)]
    assert e.state(web) == S.READY


# -- stop and restart --------------------------------------------------------


def test_dependents_stop_before_dependency():
    e = Engine()
    db, web, api = (
        e.add_service(n, stop_timeout_ms=5000) for n in ("db", "web", "api")
    )
    e.add_dependency(web, db)
    e.add_dependency(api, web)
    spawn_all(e, e.start_all())
    acts = e.stop(db)
    assert kinds(acts, Action.SIGNAL) == [(Action.SIGNAL, api, 15)]
    acts = e.exited(api, -15)
    assert kinds(acts, Action.SIGNAL) == [(Action.SIGNAL, web, 15)]
    acts = e.exited(web, -15)
    assert kinds(acts, Action.SIGNAL) == [(Action.SIGNAL, db, 15)]
    e.exited(db, 0)
    assert {e.state(s) for s in (db, web, api)} == {S.STOPPED}
    assert not e.is_active()
    assert e.pending_timers() == 0


def test_stop_timeout_escalates_to_kill():
    e = Engine()
    s = e.add_service("s", stop_signal=2, stop_timeout_ms=3000)
    spawn_all(e, e.start(s))
    e.advance(100)
    assert (Action.SIGNAL, s, 2) in e.stop(s)
    assert e.advance(3099) == []
    assert e.advance(3100) == [(Action.KILL, s)]
    e.exited(s, -9)
    assert e.state(s) == S.STOPPED


def test_stop_during_starting_signals_once_spawned():
    e = Engine()
    s = e.add_service("s")
    e.start(s)
    assert not kinds(e.stop(s), Action.SIGNAL)
    acts = e.spawned(s, 42)
    assert kinds(acts, Action.SIGNAL) == [(Action.SIGNAL, s, 15)]


def test_stop_of_waiting_and_backoff_is_immediate():
    e = Engine()
    db = e.add_service("db", ready_notify=True, **no_jitter())
    web = e.add_service("web")
    e.add_dependency(web, db, Condition.READY)
    spawn_all(e, e.start_all())
    acts = e.stop(web)
    assert transitions(acts) == [(web, S.WAITING, S.STOPPED, Reason.STOP_REQUESTED)]
    e.exited(db, 1)
    assert e.state(db) == S.BACKOFF
    e.stop(db)
    assert e.state(db) == S.STOPPED and e.pending_timers() == 0


def test_restart_brings_dependents_back_after_dependency():
    e = Engine()
    db, web = e.add_service("db"), e.add_service("web")
    e.add_dependency(web, db)
    spawn_all(e, e.start_all())
    acts = e.restart(db)
    assert kinds(acts, Action.SIGNAL) == [(Action.SIGNAL, web, 15)]
    acts = e.exited(web, -15)
    # web must not come back while db is on its way down
    assert transitions(acts, web) == [(web, S.STOPPING, S.WAITING, Reason.RESTARTING)]
    assert kinds(acts, Action.SIGNAL) == [(Action.SIGNAL, db, 15)]
    acts = e.exited(db, -15)
    assert kinds(acts, Action.SPAWN) == [(Action.SPAWN, db)]
    acts = e.spawned(db, 77)
    assert kinds(acts, Action.SPAWN) == [(Action.SPAWN, web)]
    e.spawned(web, 78)
    assert e.state(db) == e.state(web) == S.READY


def test_start_pulls_in_dependencies():
    e = Engine()
    db = e.add_service("db", autostart=False)
    web = e.add_service("web", autostart=False)
    e.add_dependency(web, db)
    acts = e.start(web)
    assert kinds(acts, Action.SPAWN) == [(Action.SPAWN, db)]
    assert e.state(web) == S.WAITING


def test_start_cuts_backoff_short():
    e = Engine()
    s = e.add_service("s", backoff_initial_ms=60_000, backoff_max_ms=60_000)
    spawn_all(e, e.start(s))
    e.exited(s, 1)
    acts = e.start(s)
    assert transitions(acts) == [(s, S.BACKOFF, S.STARTING, Reason.START_REQUESTED)]
    assert e.pending_timers() == 0


def test_exit_of_unwanted_process_while_waiting_to_stop():
    e = Engine()
    db, web = e.add_service("db"), e.add_service("web")
    e.add_dependency(web, db)
    spawn_all(e, e.start_all())
    e.stop(db)  # web signalled, db waits
    acts = e.exited(db, 1)  # db dies on its own meanwhile
    assert transitions(acts) == [(db, S.READY, S.STOPPED, Reason.EXITED)]
    e.exited(web, -15)
    assert not e.is_active()


def test_events_in_the_wrong_state_raise_transition_error():
    e = Engine()
    s = e.add_service("s")
    with pytest.raises(TransitionError, match="'s'.*spawned.*stopped"):
        e.spawned(s, 1)
    with pytest.raises(TransitionError):
        e.exited(s, 0)
    with pytest.raises(TransitionError):
        e.spawn_failed(s)
    e.check_invariants()


def test_remove_needs_an_inactive_service():
    e = Engine()
    s = e.add_service("s")
    spawn_all(e, e.start(s))
    with pytest.raises(EngineError, match="stop it"):
        e.remove_service(s)
    e.stop(s)
    e.exited(s, 0)
    e.remove_service(s)
    assert len(e) == 0


def test_configure_applies_from_next_spawn():
    e = Engine()
    s = e.add_service("s", stop_signal=15)
    e.configure(s, stop_signal=2)
    spawn_all(e, e.start(s))
    assert (Action.SIGNAL, s, 2) in e.stop(s)
    assert e.options(s)["stop_signal"] == 2


def test_counters_and_info():
    e = Engine(now=5)
    s = e.add_service("s", backoff_initial_ms=0)
    spawn_all(e, e.start(s))
    e.advance(50)
    spawn_all(e, e.exited(s, 2))
    info = e.info(s)
    assert info.restarts == 1 and info.last_exit == 2
    assert info.state == S.READY and info.pid > 0
    assert info.last_transition_ms == 50 and info.spawned_at_ms == 50
    assert e.count_by_state()[S.READY] == 1
    assert e.states() == bytes([S.READY])
    assert e.counters(s)[:3] == (S.READY, info.pid, 1)


def test_stub_names_match_the_module():
    import pathlib

    stub = pathlib.Path(_core.__file__).with_name("_core.pyi")
    if not stub.exists():
        stub = pathlib.Path(__file__).parents[2] / "src/fastorch/_core.pyi"
    text = stub.read_text()
    public = {n for n in dir(_core) if not n.startswith("_")} - {
        "IntEnum",
        "CycleError",
        "EngineError",
        "TransitionError",
        "UnknownServiceError",
    }
    for name in public:
        assert f"class {name}" in text or f"{name}:" in text, name
    for meth in (m for m in dir(Engine) if not m.startswith("_")):
        assert f"def {meth}(" in text, meth


def test_bulk_edges_are_all_or_nothing():
    e = Engine()
    a, b, c = e.add_services(["a", "b", "c"], oneshot=True)
    assert e.options(a)["oneshot"] and e.sid("c") == c
    e.add_dependencies([(b, a, Condition.STARTED), (c, b, Condition.READY)])
    assert e.levels() == [[a], [b], [c]]
    with pytest.raises(CycleError) as info:
        e.add_dependencies([(a, c, 0), (a, b, 0)])
    assert info.value.cycle[0] == info.value.cycle[-1]
    assert e.dependencies(a) == []
    assert e.dependencies(c) == [(b, Condition.READY)]
    e.check_invariants()


def test_start_in_backoff_is_a_fresh_start():
    e = Engine()
    s = e.add_service(
        "s",
        restart=Restart.ALWAYS,
        backoff_initial_ms=10,
        start_limit_burst=2,
        backoff_jitter=0.0,
    )
    spawn_all(e, e.start(s))
    e.exited(s, 0)
    spawn_all(e, e.start(s))
    e.exited(s, 0)
    assert e.state(s) == S.BACKOFF


def test_watchdog_usec_holds_for_the_current_process_only():
    e = Engine()
    s = e.add_service("s", watchdog_ms=1000, backoff_initial_ms=0)
    spawn_all(e, e.start(s))
    e.set_watchdog(s, 5000)
    assert e.advance(1500) == []
    spawn_all(e, e.exited(s, 1))
    acts = e.advance(2500)  # the new process is back on 1 s
    assert transitions(acts) == [(s, S.READY, S.STOPPING, Reason.WATCHDOG)]


def test_late_wakeup_does_not_shift_later_probe_runs():
    e = Engine()
    a = e.add_service("a", readiness=(0, 1000, 500, 1, 3))
    b = e.add_service("b", readiness=(1, 1000, 500, 1, 3))
    spawn_all(e, e.start([a, b]))
    for t in (0, 1):
        (probe,) = e.advance(t)
        e.probe_result(probe[1], 0, probe[3], True)
    # Served 1 ms late, a's run still counts from 1000: the two services
    # stay 1 ms apart instead of falling into step.
    late = e.advance(1001)
    assert sorted(p[1] for p in kinds(late, Action.PROBE)) == [a, b]
    for p in kinds(late, Action.PROBE):
        e.probe_result(p[1], 0, p[3], True)
    assert kinds(e.advance(2000), Action.PROBE) == [(Action.PROBE, a, 0, 3)]
    assert kinds(e.advance(2001), Action.PROBE) == [(Action.PROBE, b, 0, 3)]
