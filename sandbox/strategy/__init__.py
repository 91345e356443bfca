"""A small real trading strategy for the sandbox exchange: the system breakglass manages.

Run a release with ``python -m sandbox.strategy --release DIR --config FILE``.
"""
