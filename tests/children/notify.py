"""Send READY=1 to $NOTIFY_SOCKET after a delay, then sleep."""

import os
import socket
import sys
import time

time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else 0.0)
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.sendto(b"READY=1\nSTATUS=serving", os.environ["NOTIFY_SOCKET"])
time.sleep(60)
