"""Side-by-side benchmarks: cosmoflow_actors, bare trio and PocketFlow.

Run them all with ``python -m benchmarks`` (see benchmarks/README.md).
"""
