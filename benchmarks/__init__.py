"""Benchmarks for cxr-node (`make bench`, or `python -m benchmarks --out bench-results`).

Outside the test run: each benchmark writes ``<out>/<name>.json`` with its measurements, the
conditions they were taken under (load average, whether a training job was running, CPU count) and
a ``dominant`` section that says what limits the figure.
"""
