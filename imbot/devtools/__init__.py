"""Development and test infrastructure: the embedded Kafka broker, child processes that end
with their parent, and pieces the tests and the benchmarks share.

Production never imports this package; only the composition root (``cli``), ``tests/`` and
``bench/`` do (tests/unit/test_import_rules.py checks it).
"""
