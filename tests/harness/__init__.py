"""Test harnesses that run real systemd pieces without systemd as PID 1.

- ``harness.journald.Journald``: a private, volatile ``systemd-journald``
  whose sockets and journal files are reachable from the test process.
- ``harness.usermanager.UserManager``: a real ``systemd --user`` manager
  (with its own journald) in private mount and PID namespaces.

Both need root, ``unshare`` and the systemd binaries; ``skip_reason()`` in
each module names what is missing so a test can skip with that reason.
"""
