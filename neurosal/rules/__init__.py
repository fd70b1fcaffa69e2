"""Learning rules, selectable by name: ``make_rule("dfa")``."""

from .base import REGISTRY, Rule, make_rule, parse_options
from . import direct, layerwise, sal  # noqa: F401  (registers the rules)

__all__ = ["REGISTRY", "Rule", "make_rule", "parse_options", "rule_names"]


def rule_names() -> list[str]:
    return sorted(REGISTRY)
