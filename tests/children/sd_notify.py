"""Send sd_notify datagrams to $NOTIFY_SOCKET following a small script.

Each argument is one step:

    send:TEXT        one datagram; "," in TEXT separates lines
    wait:PATH        wait (at most 30 s) until PATH exists
    sleep:SECONDS    sleep
    ping:SECONDS:EVERY   WATCHDOG=1 every EVERY seconds for SECONDS

After the last step the child sleeps, so only the supervisor ends it.
"""

import os
import socket
import sys
import time

sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.connect(os.environ["NOTIFY_SOCKET"])
for step in sys.argv[1:]:
    verb, _, arg = step.partition(":")
    if verb == "send":
        sock.send(arg.replace(",", "\n").encode())
    elif verb == "wait":
        deadline = time.monotonic() + 30
        while not os.path.exists(arg) and time.monotonic() < deadline:
            time.sleep(0.005)
    elif verb == "sleep":
        time.sleep(float(arg))
    elif verb == "ping":
        seconds, every = map(float, arg.split(":"))
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sock.send(b"WATCHDOG=1")
            time.sleep(every)
    else:
        sys.exit(f"unknown step {step!r}")
time.sleep(60)
