"""Cost benchmark of the erasure methods against their published algorithms (not part of the default tests).

Run ``python benchmarks/run.py --size smoke|cpu|gpu --json OUT.json``; see docs/benchmarks.md.
"""
