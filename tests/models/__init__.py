"""Plain-Python reference models of the compiled core.

Each model follows ``docs/engine.md`` with a deliberately simple, different
algorithm, so agreement under random event sequences is real evidence. The
same models are the baselines of ``bench/bench_core.py``.
"""
