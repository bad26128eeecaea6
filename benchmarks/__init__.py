"""Side-by-side benchmarks: envpipe against the floor, its peers and a plain passthrough.

`envpipe bench` (see `benchmarks.run`) writes results.json, results.md and PNG plots. These
are programs that print figures; the test suite only runs them in a smoke mode and checks
the shape of the JSON, never a speed.
"""
