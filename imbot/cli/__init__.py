"""The composition root: the ``imbot`` command and the dev stack.

It may import every package; no package of the service imports it
(tests/unit/test_import_rules.py checks both).
"""
