"""Benchmarks: measurements that print a table and, last, one `ratios: name=value ...` line against baselines
measured in the same run (absolute times on shared machines are noise; ratios are the result).

Each benchmark is `python -m benchmarks.<name>`; see benchmarks/README.md.
"""
