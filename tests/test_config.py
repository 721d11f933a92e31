"""Tests of fastorch.config: parsing, defaults, instances, every error path."""

from __future__ import annotations

import gc
import grp
import os
import pwd
import signal
import textwrap
from importlib import resources
from pathlib import Path

import pytest

from fastorch import config
from fastorch.config import (
    Config,
    ConfigError,
    CycleError,
    ServiceConfig,
    diff,
    engine_options,
    levels,
    load,
    loads,
    parse_duration,
    parse_service,
    parse_size,
    to_dot,
)

USER = pwd.getpwuid(os.getuid()).pw_name
GROUP = grp.getgrgid(os.getgid()).gr_name


def write(tmp_path: Path, text: str, name: str = "fleet.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(text: str, tmp_path: Path | None = None) -> list[tuple[str, str]]:
    base = None if tmp_path is None else str(tmp_path)
    with pytest.raises(ConfigError) as info:
        loads(textwrap.dedent(text), base_dir=base)
    return info.value.problems


def reason_at(problems: list[tuple[str, str]], path: str) -> str:
    found = [reason for p, reason in problems if p == path]
    assert found, f"no problem at {path!r} in {problems!r}"
    return found[0]


# -- good configs -------------------------------------------------------------


def test_full_service_table_parses(tmp_path: Path) -> None:
    (tmp_path / "web.env").write_text(
        "# comment\nexport FROM_FILE=1\nQUOTED='a b'\nPORT=1\n\n"
    )
    (tmp_path / "www").mkdir()
    path = write(
        tmp_path,
        f"""
        [services.web]
        command = "python3 -m http.server 'a b'"
        cwd = "www"
        env = {{ PORT = "8080", N = 3 }}
        env_file = "web.env"
        user = "{USER}"
        group = "{GROUP}"
        umask = "027"
        rlimits = {{ nofile = 4096, core = 0, stack = [1024, "infinity"] }}
        oneshot = false
        autostart = false
        restart = "always"
        success_exit_codes = [0, 3]
        start_limit = {{ burst = 0, interval = "1d" }}
        stop_signal = "INT"
        stop_timeout = "1m30s"
        start_timeout = "2s"
        notify = true
        watchdog = "20s"
        liveness = {{ tcp = "[::1]:8080" }}

        [services.web.backoff]
        initial = "250ms"
        factor = 1.5
        max = "1m"
        jitter = 0
        reset_after = "1h"

        [services.web.readiness]
        http = "http://127.0.0.1:8080/health"
        status = [200, 204]
        headers = {{ Host = "x" }}
        initial_delay = "1s"
        interval = "2s"
        timeout = "500ms"
        success_threshold = 2
        failure_threshold = 4

        [services.web.logs]
        destination = "file"
        dir = "logs"
        max_size = "1MiB"
        keep = 3
        tail_lines = 50
        """,
    )
    cfg = load(path)
    web = cfg.services["web"]

    assert cfg.path == str(path) and cfg.base_dir == str(tmp_path)
    assert web.name == web.group_name == "web" and web.instance == 0
    assert web.command == ["python3", "-m", "http.server", "a b"]
    assert web.cwd == str(tmp_path / "www")
    assert web.env == {"FROM_FILE": "1", "QUOTED": "a b", "PORT": "8080", "N": "3"}
    assert (web.user, web.group, web.umask) == (USER, GROUP, 0o027)
    assert web.rlimits == {
        "nofile": (4096, 4096),
        "core": (0, 0),
        "stack": (1024, config.RLIM_INFINITY),
    }
    assert (web.oneshot, web.autostart, web.restart) == (False, False, "always")
    assert web.success_exit_codes == (0, 3)
    assert (web.backoff_initial_ms, web.backoff_factor) == (250, 1.5)
    assert (web.backoff_max_ms, web.backoff_jitter) == (60_000, 0.0)
    assert web.backoff_reset_ms == 3_600_000
    assert (web.start_limit_burst, web.start_limit_interval_ms) == (0, 86_400_000)
    assert web.stop_signal == signal.SIGINT
    assert (web.stop_timeout_ms, web.start_timeout_ms) == (90_000, 2000)
    assert (web.notify, web.watchdog_ms) == (True, 20_000)
    ready = web.readiness
    assert ready is not None and ready.kind == "http"
    assert ready.target == "http://127.0.0.1:8080/health"
    assert (ready.status_min, ready.status_max, ready.headers) == (
        200,
        204,
        {"Host": "x"},
    )
    assert ready.spec() == (1000, 2000, 500, 2, 4)
    live = web.liveness
    assert live is not None and (live.kind, live.target) == ("tcp", "[::1]:8080")
    assert live.spec() == (0, 10_000, 1000, 1, 3)  # the Kubernetes defaults
    assert web.logs == config.LogConfig("file", str(tmp_path / "logs"), 2**20, 3, 50)


def test_minimal_service_gets_builtin_defaults() -> None:
    cfg = loads('[services.a]\ncommand = ["true"]\n', base_dir="/")
    a = cfg.services["a"]
    assert a.command == ["true"] and a.cwd == "/"
    assert a.restart == "on-failure" and a.stop_signal == signal.SIGTERM
    assert (a.stop_timeout_ms, a.start_timeout_ms, a.watchdog_ms) == (10_000, 0, 0)
    assert a.readiness is None and a.liveness is None and a.depends_on == ()
    assert a.logs.destination == "journal" and a.logs.max_size == 10 * 2**20
    assert cfg.source == {"services": {"a": {"command": ["true"]}}}


def test_exec_probe_string_is_split() -> None:
    cfg = loads(
        '[services.a]\ncommand = "x"\nreadiness = { exec = "test -e \'/tmp/a b\'" }\n'
    )
    assert cfg.services["a"].readiness.target == ["test", "-e", "/tmp/a b"]


def test_services_keep_file_order() -> None:
    text = "".join(f'[services.s{i}]\ncommand = "x"\n' for i in (3, 1, 2))
    assert list(loads(text).services) == ["s3", "s1", "s2"]


def test_demo_file_parses_and_runs_only_python() -> None:
    demo = resources.files("fastorch") / "examples" / "demo.toml"
    cfg = loads(demo.read_text(), path=str(demo))
    assert list(cfg.services) == ["migrate", "web", "worker@1", "worker@2", "flaky"]
    assert all(svc.command[0] == "python3" for svc in cfg.services.values())
    assert all(svc.logs.destination == "inherit" for svc in cfg.services.values())
    assert cfg.services["migrate"].oneshot
    assert cfg.services["web"].depends_on == (("migrate", "completed"),)
    assert cfg.services["web"].readiness.kind == "http"
    assert cfg.services["worker@2"].depends_on == (("web", "ready"),)
    assert cfg.services["flaky"].backoff_initial_ms == 1000
    assert levels(cfg) == [["migrate", "flaky"], ["web"], ["worker@1", "worker@2"]]


def test_examples_symlink_points_at_packaged_demo() -> None:
    link = Path(__file__).parent.parent / "examples" / "demo.toml"
    if not link.is_symlink():
        pytest.skip("not a source checkout: examples/demo.toml is absent")
    packaged = Path(config.__file__).parent / "examples" / "demo.toml"
    assert link.resolve() == packaged.resolve()


# -- defaults -----------------------------------------------------------------


def test_defaults_inherit_per_key_and_per_sub_key() -> None:
    cfg = loads(
        """
        [defaults]
        restart = "always"
        stop_timeout = "3s"
        env = { A = "defaults", B = "defaults" }
        rlimits = { nofile = 100, core = 0 }
        backoff = { initial = "1s", max = "5s" }
        logs = { destination = "null", keep = 9 }
        readiness = { tcp = "127.0.0.1:1", interval = "2s" }

        [services.plain]
        command = "x"

        [services.own]
        command = "x"
        restart = "never"
        env = { B = "service", C = "service" }
        rlimits = { nofile = 200 }
        backoff = { max = "7s", factor = 3.0 }
        logs = { keep = 1 }
        readiness = { exec = "true" }
        """
    )
    plain, own = cfg.services["plain"], cfg.services["own"]
    assert (plain.restart, plain.stop_timeout_ms) == ("always", 3000)
    assert plain.env == {"A": "defaults", "B": "defaults"}
    assert plain.readiness.kind == "tcp" and plain.readiness.interval_ms == 2000

    assert (own.restart, own.stop_timeout_ms) == ("never", 3000)
    assert own.env == {"A": "defaults", "B": "service", "C": "service"}
    assert own.rlimits == {"nofile": (200, 200), "core": (0, 0)}
    assert (own.backoff_initial_ms, own.backoff_max_ms) == (1000, 7000)
    assert own.backoff_factor == 3.0 and own.backoff_jitter == 0.1
    assert (own.logs.destination, own.logs.keep) == ("null", 1)
    # A probe is replaced whole: merging kinds would make two kinds at once.
    assert own.readiness.kind == "exec" and own.readiness.interval_ms == 10_000


def test_service_env_wins_over_env_file(tmp_path: Path) -> None:
    (tmp_path / "a.env").write_text('X="from file"\nY=file\n')
    cfg = loads(
        '[defaults]\nenv_file = "a.env"\n'
        '[services.a]\ncommand = "x"\nenv = { Y = "env" }\n',
        base_dir=str(tmp_path),
    )
    assert cfg.services["a"].env == {"X": "from file", "Y": "env"}


# -- instances ----------------------------------------------------------------


def test_instances_expand_with_names_env_and_dependencies() -> None:
    cfg = loads(
        """
        [services.db]
        command = "x"
        instances = 2
        [services.worker]
        command = "x"
        instances = 3
        env = { K = "v" }
        depends_on = { db = "ready" }
        [services.one]
        command = "x"
        depends_on = ["worker@2"]
        """
    )
    assert list(cfg.services) == [
        "db@1", "db@2", "worker@1", "worker@2", "worker@3", "one",
    ]  # fmt: skip
    assert cfg.groups["worker"] == ("worker@1", "worker@2", "worker@3")
    assert cfg.groups["one"] == ("one",)
    w2 = cfg.services["worker@2"]
    assert (w2.group_name, w2.instance) == ("worker", 2)
    assert w2.env == {"K": "v", "FASTORCH_INSTANCE": "2"}
    assert w2.depends_on == (("db@1", "ready"), ("db@2", "ready"))
    assert cfg.services["one"].depends_on == (("worker@2", "started"),)
    assert "FASTORCH_INSTANCE" not in cfg.services["one"].env
    assert levels(cfg) == [
        ["db@1", "db@2"], ["worker@1", "worker@2", "worker@3"], ["one"],
    ]  # fmt: skip


# -- values -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [("0s", 0), ("250ms", 250), ("30s", 30_000), ("5m", 300_000),
     ("1h", 3_600_000), ("1d", 86_400_000), ("1m30s", 90_000),
     ("30d", 2_592_000_000)],
)  # fmt: skip
def test_durations_parse_to_milliseconds(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize(
    "value", ["5 seconds", "5", 5, 1.5, "", "5S", "-1s", "1.5s", "31d", True]
)
def test_durations_are_strict(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_duration_limit_is_the_cores() -> None:
    assert parse_duration(f"{config.MAX_DURATION_MS}ms") == config.MAX_DURATION_MS
    with pytest.raises(ValueError, match="longer than 30 days"):
        parse_duration(f"{config.MAX_DURATION_MS + 1}ms")


@pytest.mark.parametrize(
    ("value", "size"),
    [("10MiB", 10 * 2**20), ("500KB", 500_000), ("1gib", 2**30), ("7B", 7), (0, 0),
     (123, 123)],
)  # fmt: skip
def test_sizes_parse_to_bytes(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["10 MegaBytes", "MiB", "-1KB", -1, 1.5, "1.5MiB"])
def test_bad_sizes_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(
    ("written", "signo"),
    [('"SIGTERM"', signal.SIGTERM), ('"TERM"', signal.SIGTERM),
     ('"sigint"', signal.SIGINT), ("9", signal.SIGKILL), ('"HUP"', signal.SIGHUP)],
)  # fmt: skip
def test_signal_forms(written: str, signo: int) -> None:
    cfg = loads(f'[services.a]\ncommand = "x"\nstop_signal = {written}\n')
    assert cfg.services["a"].stop_signal == signo


# -- errors: one per kind, each at its path -----------------------------------

ERRORS = [
    # (service table body, path under services.a, words of the reason)
    ('command = ""', "command", "command is empty"),
    ("command = []", "command", "command is empty"),
    ('command = "\'open"', "command", "no closing quotation"),
    ("command = 3", "command", "expected a string or an array, got 3"),
    ("", "command", "missing required key"),
    ('command = "x"\nfrobnicate = 1', "frobnicate", "unknown key"),
    ('command = "x"\nstop_timeout = "5 seconds"', "stop_timeout",
     'expected a duration like "5s", got "5 seconds"'),
    ('command = "x"\nstop_timeout = 5', "stop_timeout", "got 5"),
    ('command = "x"\nwatchdog = "31d"', "watchdog", "longer than 30 days"),
    ('command = "x"\nrestart = "sometimes"', "restart",
     'expected one of "always", "on-failure", "never", got "sometimes"'),
    ('command = "x"\ndepends_on = ["db2"]', "depends_on.db2", "unknown service 'db2'"),
    ('command = "x"\ndepends_on = { a = "healthy" }', "depends_on.a",
     'expected one of "started", "ready", "completed"'),
    ('command = "x"\nuser = "no-such-user-fastorch"', "user", "unknown user"),
    ('command = "x"\ngroup = "no-such-group-fastorch"', "group", "unknown group"),
    ('command = "x"\nbackoff = { factor = 0.5 }', "backoff.factor", ">= 1.0"),
    ('command = "x"\nbackoff = { jitter = 1.5 }', "backoff.jitter", "<= 1.0"),
    ('command = "x"\nbackoff = { nope = 1 }', "backoff.nope", "unknown key"),
    ('command = "x"\nstart_limit = { burst = -1 }', "start_limit.burst", ">= 0"),
    ('command = "x"\nreadiness = { tcp = "h:1", success_threshold = 0 }',
     "readiness.success_threshold", "expected an integer >= 1, got 0"),
    ('command = "x"\nliveness = { tcp = "h:1", failure_threshold = 0 }',
     "liveness.failure_threshold", ">= 1"),
    ('command = "x"\nreadiness = { interval = "1s" }', "readiness",
     "exactly one of http, tcp, exec, got none"),
    ('command = "x"\nreadiness = { tcp = "h:1", exec = "true" }', "readiness",
     "got tcp, exec"),
    ('command = "x"\nreadiness = { tcp = "nohost" }', "readiness.tcp",
     'expected "host:port"'),
    ('command = "x"\nreadiness = { http = "ftp://x/" }', "readiness.http",
     "http:// or https://"),
    ('command = "x"\nreadiness = { tcp = "h:1", status = [200, 299] }',
     "readiness.status", "only allowed with an http probe"),
    ('command = "x"\nreadiness = { http = "http://h/", status = [399, 200] }',
     "readiness.status", "min <= max"),
    ('command = "x"\nreadiness = { http = "http://h/", interval = "0s" }',
     "readiness.interval", "longer than 0s"),
    ('command = "x"\nstop_signal = "SIGFOO"', "stop_signal",
     'expected a signal like "SIGTERM"'),
    ('command = "x"\nstop_signal = 999', "stop_signal", "got 999"),
    ('command = "x"\numask = "999"', "umask", 'expected an octal string like "022"'),
    ('command = "x"\numask = 18', "umask", "got 18"),
    ('command = "x"\nrlimits = { files = 1 }', "rlimits.files",
     'unknown key, expected one of "nofile"'),
    ('command = "x"\nrlimits = { nofile = "lots" }', "rlimits.nofile",
     '"infinity", got "lots"'),
    ('command = "x"\nrlimits = { nofile = -5 }', "rlimits.nofile", "negative"),
    ('command = "x"\nrlimits = { nofile = [10, 5] }', "rlimits.nofile",
     "soft limit above the hard limit"),
    ('command = "x"\nenv_file = "missing.env"', "env_file", "cannot read"),
    ('command = "x"\ncwd = "no/such/dir"', "cwd", "no such directory"),
    ('command = "x"\nenv = { A = true }', "env.A", "got true"),
    ('command = "x"\ninstances = 0', "instances", ">= 1"),
    ('command = "x"\nsuccess_exit_codes = [0, 256]', "success_exit_codes[1]",
     "<= 255"),
    ('command = "x"\nlogs = { destination = "syslog" }', "logs.destination",
     '"journal", "file", "inherit", "null"'),
    ('command = "x"\nlogs = { max_size = "10 MB" }', "logs.max_size",
     'expected a size like "10MiB"'),
    ('command = "x"\nlogs = { keep = -1 }', "logs.keep", ">= 0"),
    ('command = "x"\nreadiness = "http://x/"', "readiness", "expected a table"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "path", "words"), ERRORS)
def test_each_error_has_its_path_and_reason(
    body: str, path: str, words: str, tmp_path: Path
) -> None:
    problems = problems_of(f"[services.a]\n{body}\n", tmp_path)
    reason = reason_at(problems, f"services.a.{path}")
    assert words.lower() in reason.lower()


def test_error_message_reads_path_colon_reason() -> None:
    text = (
        '[services.web]\ncommand = "x"\n'
        'readiness = { tcp = "h:1", interval = "5 seconds" }'
    )
    with pytest.raises(ConfigError) as info:
        loads(text)
    assert str(info.value) == (
        'services.web.readiness.interval: expected a duration like "5s", '
        'got "5 seconds"'
    )


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        ("nonsense = 1", "nonsense", "unknown key"),
        ("services = 3", "services", "expected a table"),
        ("[services]\nweb = 3", "services.web", "expected a table"),
        ('[services."a.b"]\ncommand = "x"', 'services."a.b"', "a name is letters"),
        ("[supervisor]\nbogus = 1", "supervisor.bogus", "unknown key"),
        ('[supervisor]\napi_tcp = "127.0.0.1:7070"', "supervisor.api_token_file",
         "required with api_tcp"),
        ('[supervisor]\napi_tcp = "localhost"\napi_token_file = "/dev/null"',
         "supervisor.api_tcp", 'expected "host:port"'),
        ('[supervisor]\napi_token_file = "/no/such/token"',
         "supervisor.api_token_file", "cannot read"),
        ('[supervisor]\napi_socket_mode = "0999"', "supervisor.api_socket_mode",
         "octal"),
        ('[supervisor]\napi_socket_owner = "no-such-user-fastorch"',
         "supervisor.api_socket_owner", "unknown user"),
        ('[supervisor]\nready_when = "never"', "supervisor.ready_when",
         'one of "settled", "started"'),
        ('[supervisor]\nstatus_interval = "1 s"', "supervisor.status_interval",
         "duration"),
        ('[supervisor]\nlog_level = "loud"', "supervisor.log_level", "one of"),
        ('[defaults]\ncommand = "x"', "defaults.command", "only allowed in a service"),
        ('[defaults]\ninstances = 2', "defaults.instances", "only allowed"),
        ('[defaults]\nstop_timeout = "soon"', "defaults.stop_timeout", "duration"),
        ('[defaults]\nuser = "no-such-user-fastorch"', "defaults.user",
         "unknown user"),
    ],
)  # fmt: skip
def test_errors_outside_services_have_their_path(
    text: str, path: str, words: str
) -> None:
    assert words in reason_at(problems_of(text), path)


# -- errors: all at once ------------------------------------------------------


def test_errors_of_several_services_and_one_service_are_all_reported() -> None:
    problems = problems_of(
        """
        [supervisor]
        status_interval = "often"

        [defaults]
        stop_timeout = 10

        [services.web]
        command = "x"
        restart = "sometimes"
        readiness = { http = "http://h/", interval = "5 seconds", timeout = "x" }
        logs = { keep = -1, extra = 1 }
        frobnicate = true
        user = "no-such-user-fastorch"
        depends_on = ["db2"]

        [services.api]
        command = ""
        stop_signal = "SIGFOO"

        [services.ok]
        command = "x"

        [services.db]
        command = "x"
        backoff = { initial = "1x", factor = 0 }
        """
    )
    paths = [p for p, _ in problems]
    assert sorted(paths) == sorted(
        [
            "supervisor.status_interval",
            "defaults.stop_timeout",
            "services.web.restart",
            "services.web.readiness.interval",
            "services.web.readiness.timeout",
            "services.web.logs.keep",
            "services.web.logs.extra",
            "services.web.frobnicate",
            "services.web.user",  # checked although the table had type errors
            "services.web.depends_on.db2",
            "services.api.command",
            "services.api.stop_signal",
            "services.db.backoff.initial",
            "services.db.backoff.factor",
        ]
    )


def test_one_bad_service_does_not_hide_the_dependency_check_of_others() -> None:
    problems = problems_of(
        """
        [services.a]
        command = 1
        [services.b]
        command = "x"
        depends_on = ["a", "zz"]
        """
    )
    assert [p for p, _ in problems] == [
        "services.a.command",
        "services.b.depends_on.zz",
    ]


def test_a_service_that_is_no_table_hides_nothing_else() -> None:
    problems = problems_of(
        """
        [services]
        web = 3
        [services.db]
        command = 1
        [services.ok]
        command = "x"
        depends_on = ["web", "nope"]
        """
    )
    assert [p for p, _ in problems] == [
        "services.web",
        "services.db.command",
        "services.ok.depends_on.nope",
    ]
    assert problems[0][1] == "expected a table, got 3"


def test_a_dependency_named_twice_gives_one_edge() -> None:
    cfg = loads(
        """
        [services.w]
        command = "x"
        instances = 2
        [services.a]
        command = "x"
        depends_on = ["w@1", "w", "w"]
        """
    )
    assert cfg.services["a"].depends_on == (("w@1", "started"), ("w@2", "started"))


# -- cycles -------------------------------------------------------------------


def test_cycle_is_reported_with_its_path() -> None:
    with pytest.raises(CycleError) as info:
        loads(
            """
            [services.a]
            command = "x"
            depends_on = ["b"]
            [services.b]
            command = "x"
            depends_on = { c = "ready" }
            [services.c]
            command = "x"
            depends_on = ["a"]
            [services.d]
            command = "x"
            depends_on = ["a"]
            """
        )
    assert info.value.cycle == ["a", "b", "c", "a"]
    assert info.value.problems == [
        ("services.a.depends_on", "dependency cycle: a -> b -> c -> a")
    ]


def test_self_dependency_is_a_cycle() -> None:
    with pytest.raises(CycleError) as info:
        loads('[services.a]\ncommand = "x"\ninstances = 2\ndepends_on = ["a@1"]\n')
    assert info.value.cycle == ["a", "a"]


def test_cycles_and_other_errors_come_together() -> None:
    problems = problems_of(
        """
        [services.a]
        command = "x"
        depends_on = ["b"]
        [services.b]
        command = "x"
        depends_on = ["a"]
        [services.c]
        command = "x"
        depends_on = ["d"]
        [services.d]
        command = "x"
        depends_on = ["c"]
        restart = "twice"
        """
    )
    assert ("services.a.depends_on", "dependency cycle: a -> b -> a") in problems
    assert ("services.c.depends_on", "dependency cycle: c -> d -> c") in problems
    reason_at(problems, "services.d.restart")
    assert len(problems) == 3


def test_long_chain_has_no_false_cycle() -> None:
    text = '[services.s0]\ncommand = "x"\n' + "".join(
        f'[services.s{i}]\ncommand = "x"\ndepends_on = ["s{i - 1}"]\n'
        for i in range(1, 3000)
    )
    cfg = loads(text)
    assert len(levels(cfg)) == 3000


# -- TOML syntax and files ----------------------------------------------------


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '[services.a]\ncommand = "x"\nrestart = = 1\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    ((where, reason),) = info.value.problems
    assert where == f"{path}:3:11"
    assert reason.startswith("TOML syntax error at line 3, column 11")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.toml")


def test_bad_env_file_line_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a.env").write_text("GOOD=1\nthis is not a variable\n")
    problems = problems_of(
        '[services.a]\ncommand = "x"\nenv_file = "a.env"\n', tmp_path
    )
    assert "line 2: expected NAME=value" in reason_at(problems, "services.a.env_file")


# -- supervisor ---------------------------------------------------------------


def test_supervisor_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTORCH_RUNTIME_DIR", str(tmp_path / "run"))
    path = write(tmp_path, '[services.a]\ncommand = "x"\n', name="prod.toml")
    sup = load(path).supervisor
    assert sup.runtime_dir == str(tmp_path / "run")
    assert sup.api_socket == str(tmp_path / "run" / "api.sock")
    assert sup.drop_in_dir == str(tmp_path / "prod.d")
    assert (sup.api_socket_mode, sup.api_tcp, sup.api_token_file) == (0o660, None, None)
    assert (sup.ready_when, sup.status_interval_ms, sup.log_level) == (
        "settled", 1000, "info",
    )  # fmt: skip


def test_supervisor_settings(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("secret\n")
    path = write(
        tmp_path,
        f"""
        [supervisor]
        api_socket = "sock/api.sock"
        api_socket_mode = "0600"
        api_socket_owner = "{USER}"
        api_socket_group = "{GROUP}"
        api_tcp = "[::1]:7070"
        api_token_file = "token"
        metrics_without_token = true
        ready_when = "started"
        status_interval = "250ms"
        drop_in_dir = "/etc/fastorch/api.d"
        log_level = "debug"
        """,
    )
    sup = load(path).supervisor
    assert sup.api_socket == str(tmp_path / "sock" / "api.sock")
    assert (sup.api_socket_mode, sup.api_socket_owner) == (0o600, USER)
    assert sup.api_tcp == ("::1", 7070)
    assert sup.api_token_file == str(tmp_path / "token")
    assert sup.metrics_without_token and sup.ready_when == "started"
    assert (sup.status_interval_ms, sup.log_level) == (250, "debug")
    assert sup.drop_in_dir == "/etc/fastorch/api.d"


# -- diff, parse_service, graph -----------------------------------------------

BASE = """
[defaults]
stop_timeout = "5s"
[services.db]
command = "db"
[services.web]
command = "web"
depends_on = ["db"]
[services.worker]
command = "work"
instances = 2
"""


def test_diff_names_added_removed_changed_unchanged() -> None:
    old = loads(BASE)
    new = loads(
        BASE.replace('command = "web"', 'command = "web --fast"').replace(
            "instances = 2", "instances = 3"
        )
        + '[services.cache]\ncommand = "cache"\n'
    )
    d = diff(old, new)
    assert d.added == ["worker@3", "cache"]
    assert d.removed == []
    assert d.changed == ["web"]
    assert d.unchanged == ["db", "worker@1", "worker@2"]
    assert diff(new, old).removed == ["worker@3", "cache"]


def test_diff_sees_a_change_of_defaults_in_every_service() -> None:
    d = diff(loads(BASE), loads(BASE.replace('"5s"', '"6s"')))
    assert d.changed == ["db", "web", "worker@1", "worker@2"] and not d.unchanged


def test_single_instance_to_instances_is_remove_and_add() -> None:
    d = diff(
        loads(BASE),
        loads(BASE.replace('command = "db"', 'command = "db"\ninstances = 2')),
    )
    assert (d.added, d.removed) == (["db@1", "db@2"], ["db"])


def test_parse_service_applies_defaults_and_expands() -> None:
    cfg = loads(BASE)
    services = parse_service(
        "api",
        {"command": ["api"], "instances": 2, "depends_on": {"worker": "ready"}},
        cfg,
    )
    assert [s.name for s in services] == ["api@1", "api@2"]
    assert all(isinstance(s, ServiceConfig) for s in services)
    assert services[0].stop_timeout_ms == 5000
    assert services[1].depends_on == (("worker@1", "ready"), ("worker@2", "ready"))


def test_parse_service_reports_paths_of_its_table() -> None:
    cfg = loads(BASE)
    with pytest.raises(ConfigError) as info:
        parse_service(
            "api", {"command": "", "depends_on": ["db2"], "stop_timeout": "x"}, cfg
        )
    assert sorted(p for p, _ in info.value.problems) == [
        "services.api.command",
        "services.api.depends_on.db2",
        "services.api.stop_timeout",
    ]


def test_parse_service_refuses_a_cycle_through_the_existing_graph() -> None:
    cfg = loads(BASE)
    with pytest.raises(CycleError) as info:
        parse_service("db", {"command": "db", "depends_on": ["web"]}, cfg)
    assert info.value.cycle == ["db", "web", "db"]


def test_with_and_without_service() -> None:
    cfg = loads(BASE)
    bigger = config.with_service(cfg, "cache", {"command": "cache"})
    assert list(bigger.services)[-1] == "cache" and "cache" not in cfg.services
    smaller = config.without_service(bigger, "worker")
    assert "worker@1" not in smaller.services and "worker" not in smaller.groups
    with pytest.raises(ConfigError, match="unknown service 'db'"):
        config.without_service(cfg, "db")


def test_levels_of_a_diamond() -> None:
    cfg = loads(
        """
        [services.top]
        command = "x"
        depends_on = ["left", "right"]
        [services.left]
        command = "x"
        depends_on = ["base"]
        [services.right]
        command = "x"
        depends_on = { base = "completed" }
        [services.base]
        command = "x"
        oneshot = true
        """
    )
    assert levels(cfg) == [["base"], ["left", "right"], ["top"]]
    dot = to_dot(cfg)
    assert dot.startswith("digraph fastorch {") and dot.rstrip().endswith("}")
    assert '"right" -> "base" [label="completed"];' in dot
    assert '"top" -> "left" [label="started"];' in dot
    assert '"base" [style="rounded,dashed"];' in dot


def test_engine_options_drive_the_real_engine() -> None:
    core = pytest.importorskip("fastorch._core", reason="compiled core not built")
    cfg = loads(
        """
        [services.db]
        command = "x"
        restart = "always"
        readiness = { tcp = "127.0.0.1:1", interval = "2s" }
        [services.web]
        command = "x"
        instances = 2
        notify = true
        depends_on = { db = "ready" }
        """
    )
    engine = core.Engine()
    for svc in cfg.services.values():
        engine.add_service(svc.name, **engine_options(svc))
    for svc in cfg.services.values():
        for dep, condition in svc.depends_on:
            engine.add_dependency(
                engine.sid(svc.name), engine.sid(dep), config.condition_value(condition)
            )
    assert engine_options(cfg.services["db"])["restart"] == core.Restart.ALWAYS
    assert engine_options(cfg.services["db"])["readiness"] == (0, 2000, 1000, 1, 3)
    assert engine_options(cfg.services["web@1"])["ready_notify"] is True
    names = [[engine.name(sid) for sid in level] for level in engine.levels()]
    assert names == levels(cfg)
    assert config.MAX_DURATION_MS == core.MAX_DURATION_MS


def test_rlimit_pairs_survive_garbage_collection() -> None:
    # Guards the msgspec union issue noted at _Limit: this crashed the process.
    cfg = loads('[services.a]\ncommand = "x"\nrlimits = { core = [0, "infinity"] }\n')
    gc.collect()
    assert cfg.services["a"].rlimits["core"] == (0, config.RLIM_INFINITY)


def test_config_is_a_msgspec_struct_that_encodes() -> None:
    import msgspec

    cfg = loads(BASE)
    assert isinstance(cfg, Config)
    data = msgspec.json.decode(msgspec.json.encode(cfg.services["web"]))
    assert data["depends_on"] == [["db", "started"]]


def test_backoff_max_below_initial_is_refused_even_through_defaults():
    text = """
[defaults]
backoff = { initial = "40s" }
[services.a]
command = ["true"]
[services.b]
command = ["true"]
backoff = { initial = "1s", max = "500ms" }
"""
    with pytest.raises(ConfigError) as info:
        config.loads(text)
    paths = [path for path, _ in info.value.problems]
    assert paths == ["services.a.backoff.max", "services.b.backoff.max"]


def test_limits_the_engine_counts_in_are_checked():
    text = """
[services.a]
command = ["true"]
start_limit = { burst = 70000 }
readiness = { tcp = "127.0.0.1:1", success_threshold = 256 }
"""
    with pytest.raises(ConfigError) as info:
        config.loads(text)
    paths = sorted(path for path, _ in info.value.problems)
    assert paths == [
        "services.a.readiness.success_threshold",
        "services.a.start_limit.burst",
    ]
