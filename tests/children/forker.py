"""Fork a grandchild (in a new session with --setsid) that outlives us.

The grandchild writes its pid to PIDFILE and sleeps; this parent sleeps
too, so a stop must deal with both.
"""

import os
import sys
import time

pidfile = sys.argv[1]
if os.fork() == 0:
    if "--setsid" in sys.argv:
        os.setsid()
    # Ignore SIGTERM: only the supervisor's cleanup can end it.
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    time.sleep(60)
    os._exit(0)
if "--exit" in sys.argv:
    # Leave only once the grandchild is settled in its own session.
    while not os.path.exists(pidfile):
        time.sleep(0.005)
    os._exit(0)
time.sleep(60)
