"""Serve HTTP on 127.0.0.1:PORT with the status code written in STATUSFILE.

The status is read again for every request (200 while the file is missing
or empty), so a test changes the answer by rewriting the file. With LOGFILE,
the wall-clock time of each request is appended to it, one per line.
"""

import socket
import sys
import time

port, status_file = int(sys.argv[1]), sys.argv[2]
log_file = sys.argv[3] if len(sys.argv) > 3 else None


def status() -> int:
    try:
        with open(status_file) as f:
            return int(f.read().strip() or 200)
    except (OSError, ValueError):
        return 200


srv = socket.create_server(("127.0.0.1", port))
while True:
    conn, _ = srv.accept()
    with conn:
        conn.settimeout(2.0)
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                data = conn.recv(4096)
                if not data:
                    break
                head += data
        except OSError:
            continue
        if log_file:
            with open(log_file, "a") as f:
                f.write(f"{time.time()}\n")
        code = status()
        body = b"ok\n" if code < 400 else b"broken\n"
        conn.sendall(
            b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (code, len(body), body)
        )
