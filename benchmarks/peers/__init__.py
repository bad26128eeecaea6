"""The peers envpipe is compared with, each adapted to the benchmark's harness.

Every peer is imported lazily inside its own process, so a peer that is not installed (or
fails to start) costs only its own row, reported as {"error": ...}.
"""
