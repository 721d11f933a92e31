"""A simulated hour of 100,000 services through the compiled engine.

Run: python bench/sim.py [N]

Profile: a third of the services have a readiness probe, a seventh a
liveness probe (period 30 s, timeout 1 s, answered after 5 ms; 5 % of the
probed services fail half their probes, the rest 0.2 %); 50 live processes
crash every simulated minute; restart policies mixed; two dependencies per
service onto the first 1,000 services.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tests.core.test_simulation as sim  # noqa: E402


def main() -> None:
    sim.N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    t0 = time.perf_counter()
    seen = sim.simulate_hour(window=0)
    wall = time.perf_counter() - t0
    print(f"{sim.N} services, 1 simulated hour: {wall:.2f} s wall (build included)")
    print(seen)


if __name__ == "__main__":
    main()
