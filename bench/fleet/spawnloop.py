"""The physical limit: posix_spawn N children, respawn each one that exits.

No supervisor can start, restart or stop a fleet faster than this on the
same machine: a loop of ``os.posix_spawn`` (vfork + exec in glibc), one
waiter blocked in ``waitpid(-1)`` that respawns the slot at once, and on
SIGTERM a signal to every child and a wait for all of them.

Usage: python spawnloop.py N [COMMAND...]   (default: sleep 3600)
"""

from __future__ import annotations

import os
import shutil
import signal
import sys


def main(argv: list[str]) -> int:
    """Run the fleet until SIGTERM; return the exit status."""
    n = int(argv[1])
    command = argv[2:] or ["sleep", "3600"]
    path = shutil.which(command[0]) or command[0]
    env = dict(os.environ)
    stopping = False

    def spawn() -> int:
        # Its own process group, as a supervisor gives each service.
        return os.posix_spawn(path, command, env, setpgroup=0)

    def on_term(signo: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    children: set[int] = set()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    for _ in range(n):
        children.add(spawn())

    while children:
        try:
            pid, _status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        children.discard(pid)
        if stopping:
            continue
        new = spawn()
        children.add(new)

        # The signal handler may have run between waitpid and the spawn.
        if stopping:
            os.kill(new, signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
