"""Listen on 127.0.0.1:PORT after a delay, then accept and close forever."""

import socket
import sys
import time

time.sleep(float(sys.argv[2]))
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = srv.accept()
    conn.close()
