"""Seeded fault injection: rules set through the admin API, matched per request."""

from __future__ import annotations

import fnmatch
import random

from sandbox.admin_models import FaultRule


class FaultInjector:
    def __init__(self, seed: int) -> None:
        self.rules: list[FaultRule] = []
        self._rng = random.Random(f"faults:{seed}")

    def set(self, rules: list[FaultRule]) -> None:
        self.rules = [r.model_copy(update={"hits": 0}) for r in rules]

    def add(self, rules: list[FaultRule]) -> None:
        self.rules.extend(r.model_copy(update={"hits": 0}) for r in rules)

    def clear(self) -> None:
        self.rules = []

    @staticmethod
    def _matches(rule: FaultRule, method: str, path: str) -> bool:
        if " " in rule.match:
            m, glob = rule.match.split(" ", 1)
            if m != "*" and m.upper() != method:
                return False
        else:
            glob = rule.match
        return fnmatch.fnmatchcase(path, glob)

    def take(self, kind: str, method: str, path: str, api_key: str | None) -> FaultRule | None:
        """The first live rule of ``kind`` hitting this request, counted as used."""
        for rule in self.rules:
            if rule.kind != kind or not self._matches(rule, method, path):
                continue
            if rule.api_key is not None and rule.api_key != api_key:
                continue
            if rule.max_count is not None and rule.hits >= rule.max_count:
                continue
            # Draw only for probabilistic rules so certain rules don't shift the random stream.
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                continue
            rule.hits += 1
            return rule
        return None
