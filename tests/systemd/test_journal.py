"""fastorch's own log into a real journald, and the stderr fallback."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from fastorch import systemd as fsystemd
from fastorch.errors import ConfigError
from fastorch.systemd import (
    JournalHandler,
    encode_journal_fields,
    journal_available,
    setup_logging,
)
from harness.journald import Journald
from harness.journald import skip_reason as journald_skip_reason

try:
    import systemd.journal  # noqa: F401

    HAVE_SYSTEMD_PYTHON = True
except ImportError:
    HAVE_SYSTEMD_PYTHON = False


@pytest.fixture(scope="module")
def journald() -> Iterator[Journald]:
    """A private systemd-journald for the module's tests."""
    reason = journald_skip_reason()
    if reason:
        pytest.skip(reason)
    with Journald() as jd:
        yield jd


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what setup_logging does to the root logger."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    if fsystemd._installed is not None:
        root.removeHandler(fsystemd._installed)
        fsystemd._installed.close()
        fsystemd._installed = None
    root.handlers[:] = handlers
    root.setLevel(level)


SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")
MESSAGE_ID = "5d3a1b2c4e6f48a19b0c7d8e9f0a1b2c"


def _transition_extra(run: str) -> dict[str, object]:
    return {
        "FASTORCH_SERVICE": "web",
        "FASTORCH_FROM": "starting",
        "FASTORCH_TO": "running",
        "FASTORCH_PID": 4242,
        "FASTORCH_RUN": run,
        "MESSAGE_ID": MESSAGE_ID,
    }


def test_encode_uses_binary_form_for_multiline_values():
    data = encode_journal_fields({"MESSAGE": "a\nb", "PRIORITY": "6"})
    assert data == b"MESSAGE\n" + struct.pack("<Q", 3) + b"a\nb\n" + b"PRIORITY=6\n"


def test_journal_available_only_for_a_listening_socket():
    d = tempfile.mkdtemp(prefix="fj-")
    try:
        path = os.path.join(d, "socket")
        assert not journal_available(path)
        open(path, "w").close()
        assert not journal_available(path)
        os.unlink(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(path)
            assert journal_available(path)
        # Bound once, now closed: the file stays but nobody listens.
        assert not journal_available(path)
    finally:
        shutil.rmtree(d)


def test_oversized_entry_travels_in_a_sealed_memfd():
    d = tempfile.mkdtemp(prefix="fj-")
    path = os.path.join(d, "socket")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(path)
            handler = JournalHandler(path)
            try:
                record = logging.LogRecord(
                    "fastorch.t", logging.INFO, __file__, 1, "x" * 400_000, None, None
                )
                handler.emit(record)
            finally:
                handler.close()
            data, ancdata, _, _ = server.recvmsg(16, socket.CMSG_SPACE(4))
            assert data == b""
            ((level, kind, raw),) = ancdata
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fd = struct.unpack("i", raw[:4])[0]
            try:
                # journald maps the memfd; the file offset is past the end.
                body = os.pread(fd, 1_000_000, 0)
            finally:
                os.close(fd)
        assert body.startswith(b"MESSAGE=" + b"x" * 400_000 + b"\n")
        assert b"SYSLOG_IDENTIFIER=fastorch\n" in body
    finally:
        shutil.rmtree(d)


def test_unknown_level_or_target_is_a_config_error(restore_logging):
    with pytest.raises(ConfigError, match="unknown log level 'loud'"):
        setup_logging("loud")
    with pytest.raises(ConfigError, match="unknown log target 'syslog'"):
        setup_logging("info", "syslog")


def test_auto_without_journal_writes_readable_stderr_lines(restore_logging, capsys):
    setup_logging("debug", "auto", journal_socket="/nonexistent/socket")
    logging.getLogger("fastorch.supervisor").info(
        "service %s: starting -> running (pid %d)", "web", 42
    )
    err = capsys.readouterr().err
    line = "INFO    fastorch.supervisor: service web: starting -> running (pid 42)"
    assert line in err


def test_setup_logging_twice_keeps_one_handler(restore_logging, capsys):
    setup_logging("info", "stderr")
    setup_logging("warning", "stderr")
    log = logging.getLogger("fastorch.t")
    log.info("hidden")
    log.warning("shown")
    err = capsys.readouterr().err
    assert err.count("shown") == 1
    assert "hidden" not in err


@pytest.mark.systemd
def test_native_handler_fields_read_back_from_journald(journald, restore_logging):
    run = uuid.uuid4().hex
    setup_logging("info", "journal", journal_socket=journald.socket)
    log = logging.getLogger("fastorch.supervisor")
    log.info(
        "service %s: starting -> running (pid %d)", "web", 4242,
        extra=_transition_extra(run),
    )  # fmt: skip
    try:
        raise ValueError("boom")
    except ValueError:
        extra = {"FASTORCH_RUN": run}
        log.error("service %s: gave up", "web", exc_info=True, extra=extra)
    log.debug("not at this level", extra={"FASTORCH_RUN": run})
    log.info("no process", extra={"FASTORCH_RUN": run, "FASTORCH_PID": None})

    info, error, no_pid = journald.wait_for(FASTORCH_RUN=run, count=3)
    assert info["MESSAGE"] == "service web: starting -> running (pid 4242)"
    assert info["PRIORITY"] == "6"
    assert info["SYSLOG_IDENTIFIER"] == "fastorch"
    assert info["LOGGER"] == "fastorch.supervisor"
    assert info["FASTORCH_SERVICE"] == "web"
    assert (info["FASTORCH_FROM"], info["FASTORCH_TO"]) == ("starting", "running")
    assert info["FASTORCH_PID"] == "4242"
    assert info["MESSAGE_ID"] == MESSAGE_ID
    assert info["_PID"] == str(os.getpid())
    assert error["PRIORITY"] == "3"
    assert "ValueError: boom" in error["EXCEPTION_TEXT"]
    assert "FASTORCH_PID" not in no_pid
    assert len(journald.entries(FASTORCH_RUN=run)) == 3


@pytest.mark.systemd
def test_huge_multiline_message_reaches_journald(journald, restore_logging):
    run = uuid.uuid4().hex
    setup_logging("info", "journal", journal_socket=journald.socket)
    text = "line\n" * 60_000
    logging.getLogger("fastorch.t").info(text, extra={"FASTORCH_RUN": run})
    (entry,) = journald.wait_for(FASTORCH_RUN=run)
    assert entry["MESSAGE"] == text


@pytest.mark.systemd
@pytest.mark.skipif(not HAVE_SYSTEMD_PYTHON, reason="needs systemd-python")
def test_systemd_python_handler_fields_read_back(journald):
    # systemd-python knows only the default socket path: run the client in
    # journald's mount namespace, where that path is this journald.
    run = uuid.uuid4().hex
    code = """
import logging
from fastorch import systemd
systemd.setup_logging("info", "journal")
assert type(systemd._installed).__module__ == "systemd.journal", systemd._installed
logging.getLogger("fastorch.supervisor").warning(
    "service %s: exited -> backoff", "db", extra={extra!r})
"""
    extra = _transition_extra(run) | {"FASTORCH_SERVICE": "db", "FASTORCH_EXIT": None}
    done = journald.run_inside(
        [sys.executable, "-c", code.replace("{extra!r}", repr(extra))],
        env={"PYTHONPATH": os.path.abspath(SRC)},
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr.decode()
    (entry,) = journald.wait_for(FASTORCH_RUN=run)
    assert entry["MESSAGE"] == "service db: exited -> backoff"
    assert entry["PRIORITY"] == "4"
    assert entry["SYSLOG_IDENTIFIER"] == "fastorch"
    assert entry["FASTORCH_SERVICE"] == "db"
    assert entry["FASTORCH_PID"] == "4242"
    assert entry["MESSAGE_ID"] == MESSAGE_ID
    assert "FASTORCH_EXIT" not in entry


@pytest.mark.systemd
def test_auto_picks_journal_when_stderr_is_not_a_terminal(journald):
    run = uuid.uuid4().hex
    code = f"""
import logging
from fastorch import systemd
systemd.setup_logging("info", "auto", journal_socket={journald.socket!r})
logging.getLogger("fastorch.t").info("auto", extra={{"FASTORCH_RUN": {run!r}}})
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": os.path.abspath(SRC)},
        stderr=subprocess.PIPE,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    (entry,) = journald.wait_for(FASTORCH_RUN=run)
    assert entry["MESSAGE"] == "auto"
