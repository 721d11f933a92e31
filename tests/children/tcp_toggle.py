"""Listen on 127.0.0.1:PORT until CLOSEFILE exists, then close the listener.

The process itself lives on (sleeping), so a probe sees the port go away
while the service's pid stays the same.
"""

import os
import socket
import sys
import time

port, close_file = int(sys.argv[1]), sys.argv[2]
srv = socket.create_server(("127.0.0.1", port))
srv.settimeout(0.02)
while not os.path.exists(close_file):
    try:
        conn, _ = srv.accept()
    except TimeoutError:
        continue
    conn.close()
srv.close()
time.sleep(60)
