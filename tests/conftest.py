"""Shared fixtures: the sandbox exchange and the Temporal servers, each in its own module."""

pytest_plugins = [
    "tests.fixtures.sandbox",
    "tests.fixtures.temporal",
    "tests.fixtures.venues",
    "tests.fixtures.postgres",
    "tests.fixtures.rollback",
]
