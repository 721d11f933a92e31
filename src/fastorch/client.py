"""The command line's client of the control API (Unix socket or TCP).

``add_subcommands`` registers ``status``, ``start``, ``stop``, ``restart``,
``reload``, ``logs`` and ``graph`` on the ``fastorch`` parser. Each command
is also a plain function over a :class:`Client`, for scripts and tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import orjson

from fastorch.errors import ApiError

__all__ = [
    "Client",
    "add_subcommands",
    "default_socket",
    "graph",
    "logs",
    "reload",
    "restart",
    "start",
    "status",
    "stop",
]


def default_socket() -> str:
    """The API socket path: ``$FASTORCH_API_SOCKET``, else the runtime dir's."""
    path = os.environ.get("FASTORCH_API_SOCKET")
    if path:
        return path
    runtime = os.environ.get("FASTORCH_RUNTIME_DIR")
    if not runtime:
        runtime = (
            "/run/fastorch" if os.geteuid() == 0 else f"/tmp/fastorch-{os.getuid()}"
        )
    return os.path.join(runtime, "api.sock")


class Client:
    """A synchronous client of one supervisor's control API.

    Args:
        socket_path: the Unix socket (the default listener).
        url: ``http://host:port`` of the TCP listener instead.
        token: the bearer token the TCP listener demands.
        timeout: seconds for one request (streams wait for ever).
    """

    def __init__(
        self,
        socket_path: str | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        # httpx is imported here, not at module level: the parser of every
        # fastorch command (``run`` included) imports this module, and the
        # supervisor should not carry an HTTP client it never uses.
        import httpx

        self._transport_error = httpx.TransportError
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if url:
            self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)
            self.where = url
        else:
            path = socket_path or default_socket()
            transport = httpx.HTTPTransport(uds=path)
            self._http = httpx.Client(
                transport=transport,
                base_url="http://fastorch",
                headers=headers,
                timeout=timeout,
            )
            self.where = path

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """One request; the decoded JSON body, or the text of a non-JSON one.

        Raises:
            ApiError: the API answered with an error status, or is not there.
        """
        content = orjson.dumps(json) if json is not None else None
        headers = {"content-type": "application/json"} if content else None
        try:
            response = self._http.request(
                method, path, content=content, params=params, headers=headers
            )
        except self._transport_error as exc:
            raise ApiError(
                503, f"cannot reach fastorch at {self.where}: {exc}"
            ) from exc
        return _decode(response)

    def stream(
        self, path: str, params: dict[str, Any] | None = None
    ) -> Iterator[tuple[str, str]]:
        """Server-sent events of ``path`` as ``(event, data)`` pairs.

        Raises:
            ApiError: as :meth:`request`.
        """
        try:
            with self._http.stream(
                "GET", path, params=params, timeout=None
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    _decode(response)
                event = ""
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        yield event, line[6:]
                    elif not line:
                        event = ""
        except self._transport_error as exc:
            raise ApiError(
                503, f"cannot reach fastorch at {self.where}: {exc}"
            ) from exc


def _decode(response: Any) -> Any:
    ctype = response.headers.get("content-type", "")
    body: Any = response.text
    if ctype.startswith("application/json"):
        body = orjson.loads(response.content)
    if response.status_code >= 400:
        message = body.get("error") if isinstance(body, dict) else str(body)
        problems = body.get("problems") if isinstance(body, dict) else None
        if problems:
            message = "\n".join(
                f"{p['path']}: {p['reason']}" if p.get("path") else p["reason"]
                for p in problems
            )
        raise ApiError(response.status_code, message or response.reason_phrase)
    return body


# -- the commands as functions ---------------------------------------------


def status(
    client: Client, pattern: str | None = None, state: str | None = None
) -> list[dict[str, Any]]:
    """Status rows, filtered by name glob and state."""
    params = {k: v for k, v in (("name", pattern), ("state", state)) if v}
    return client.request("GET", "/v1/services", params=params)["services"]


def _act(client: Client, action: str, names: Sequence[str] | None) -> list[str]:
    if names and len(names) == 1:
        result = client.request("POST", f"/v1/services/{names[0]}/{action}")
    else:
        body = {"services": list(names)} if names else None
        result = client.request("POST", f"/v1/{action}", json=body)
    return list(result["services"])


def start(client: Client, names: Sequence[str] | None = None) -> list[str]:
    """Start services (all when ``names`` is empty); the names acted on."""
    return _act(client, "start", names)


def stop(client: Client, names: Sequence[str] | None = None) -> list[str]:
    """Stop services (all when ``names`` is empty); the names acted on."""
    return _act(client, "stop", names)


def restart(client: Client, names: Sequence[str] | None = None) -> list[str]:
    """Restart services (all when ``names`` is empty); the names acted on."""
    return _act(client, "restart", names)


def reload(client: Client) -> dict[str, list[str]]:
    """Re-read the configuration: ``{"added", "removed", "changed"}``."""
    return client.request("POST", "/v1/reload")


def logs(
    client: Client, name: str, n: int = 100, follow: bool = False
) -> Iterator[str]:
    """The last ``n`` lines of a service; with ``follow``, then new ones."""
    if not follow:
        yield from client.request("GET", f"/v1/services/{name}/logs", params={"n": n})[
            "lines"
        ]
        return
    for event, data in client.stream(
        f"/v1/services/{name}/logs", params={"n": n, "follow": 1}
    ):
        if event == "line":
            yield data
        elif event == "end":
            return


def graph(client: Client, dot: bool = False) -> Any:
    """The live dependency graph: a dict, or DOT text with ``dot``."""
    if dot:
        return client.request("GET", "/v1/graph.dot")
    return client.request("GET", "/v1/graph")


# -- the command line ------------------------------------------------------


def _format_rows(rows: list[dict[str, Any]], out: TextIO) -> None:
    header = ("NAME", "STATE", "PID", "UPTIME", "RESTARTS", "LAST EXIT", "STATUS")
    table = [header]
    for row in rows:
        uptime = row.get("uptime_s") or 0
        table.append(
            (
                row["name"],
                row["state"],
                str(row.get("pid") or "-"),
                _duration(uptime) if row.get("pid") else "-",
                str(row.get("restarts", 0)),
                "-" if row.get("last_exit") is None else str(row["last_exit"]),
                row.get("status_text") or row.get("reason") or "",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)]
        out.write("  ".join([*cells, r[-1]]).rstrip() + "\n")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _client(args: argparse.Namespace) -> Client:
    token = None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    return Client(socket_path=args.socket, url=args.url, token=token)


def _run(args: argparse.Namespace) -> int:
    try:
        with _client(args) as client:
            return int(args.client_func(client, args) or 0)
    except ApiError as exc:
        print(f"fastorch: {exc.message}", file=sys.stderr)
        return 1 if exc.status != 503 else 3
    except OSError as exc:
        print(f"fastorch: {exc}", file=sys.stderr)
        return 1


def _cmd_status(client: Client, args: argparse.Namespace) -> int:
    if args.json:
        rows = status(client, args.pattern, args.state)
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _format_rows(status(client, args.pattern, args.state), sys.stdout)
    return 0


def _cmd_action(client: Client, args: argparse.Namespace) -> int:
    done = globals()[args.command](client, args.names or None)
    print(f"{args.command}: {' '.join(done)}" if done else f"{args.command}: nothing")
    return 0


def _cmd_reload(client: Client, args: argparse.Namespace) -> int:
    result = reload(client)
    for key in ("added", "removed", "changed"):
        if result.get(key):
            print(f"{key}: {' '.join(result[key])}")
    if not any(result.get(k) for k in ("added", "removed", "changed")):
        print("reload: no change")
    return 0


def _cmd_logs(client: Client, args: argparse.Namespace) -> int:
    source = client.request("GET", f"/v1/services/{args.name}/logs", params={"n": 0})
    if source.get("destination") == "journal":
        return _journal_logs(source["journal"], args.lines, args.follow)
    for line in logs(client, args.name, args.lines, args.follow):
        sys.stdout.write(line + "\n")
        if args.follow:
            sys.stdout.flush()
    return 0


def _journal_logs(matches: dict[str, str], n: int, follow: bool) -> int:
    """A journal-mode service's lines, read back with journalctl.

    The child writes straight into journald (fastorch holds none of it),
    so the lines are read on this host from the journal, matched by the
    stream's identifier (the service name) on the stdout transport.
    """
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        sys.stderr.write("fastorch: the service logs to the journal: no journalctl\n")
        return 1
    argv = [journalctl, "--no-pager", "-o", "cat", "-n", str(n)]
    if follow:
        argv.append("-f")
    argv += [f"{key}={value}" for key, value in sorted(matches.items())]
    try:
        return subprocess.run(argv, check=False).returncode
    except KeyboardInterrupt:
        return 0


def _cmd_graph(client: Client, args: argparse.Namespace) -> int:
    if args.json:
        data = graph(client)
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(graph(client, dot=True))
    return 0


def live_graph_command(args: argparse.Namespace) -> int:
    """``fastorch graph`` without a config: the running graph, from the API.

    ``args`` may lack the connection options; the defaults apply then.
    """
    for key, default in (("socket", None), ("url", None), ("token_file", None)):
        if not hasattr(args, key):
            setattr(args, key, default)
    if not hasattr(args, "json"):
        args.json = False
    args.client_func = _cmd_graph
    return _run(args)


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register the client's verbs on the ``fastorch`` parser.

    A verb the parser already has (the offline ``graph CONFIG``) is left
    alone; :func:`live_graph_command` serves it when no config is given.
    """
    common = argparse.ArgumentParser(add_help=False)
    where = common.add_argument_group("connection")
    where.add_argument(
        "--socket", default=None, help="API Unix socket (default: %(default)s)"
    )
    where.add_argument("--url", default=None, help="TCP API, http://host:port")
    where.add_argument(
        "--token-file", default=None, help="bearer token file (TCP only)"
    )
    taken = set(subparsers.choices)

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser | None:
        if name in taken:
            return None
        p = subparsers.add_parser(name, parents=[common], help=help_text)
        p.set_defaults(func=_run, client_func=func)
        return p

    p = add("status", _cmd_status, "show the services' states")
    if p is not None:
        p.add_argument("pattern", nargs="?", help="name glob, e.g. 'worker@*'")
        p.add_argument("--state", help="only services in this state")
        p.add_argument("--json", action="store_true", help="print JSON rows")
    for verb in ("start", "stop", "restart"):
        p = add(verb, _cmd_action, f"{verb} services (all when none is named)")
        if p is not None:
            p.add_argument("names", nargs="*", metavar="NAME")
    add("reload", _cmd_reload, "re-read the configuration file")
    p = add("logs", _cmd_logs, "show a service's output")
    if p is not None:
        p.add_argument("name")
        p.add_argument("-n", "--lines", type=int, default=100)
        p.add_argument("-f", "--follow", action="store_true")
    p = add("graph", _cmd_graph, "the running dependency graph (DOT)")
    if p is not None:
        p.add_argument("--json", action="store_true", help="print JSON")
