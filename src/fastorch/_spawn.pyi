"""Typed API of ``fastorch._spawn``: posix_spawn with a chdir action."""

INHERIT: int
DEVNULL: int

def spawn(
    path: bytes,
    argv: list[bytes],
    envp: list[bytes],
    cwd: bytes | None,
    stdin: int,
    stdout: int,
    stderr: int,
) -> int: ...
