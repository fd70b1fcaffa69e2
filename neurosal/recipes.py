"""Named training recipes: a paper's settings in one word (``neurosal train --recipe sal-paper``).

A recipe fills :class:`~neurosal.train.TrainConfig` fields and per-rule options; anything given
explicitly (a CLI flag, a keyword of :func:`recipe_config`) wins over the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import NeurosalError


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    #: TrainConfig fields
    settings: dict = field(default_factory=dict)
    #: rule name -> that rule's options
    rule_options: dict = field(default_factory=dict)


RECIPES = {
    "sal-paper": Recipe(
        "sal-paper",
        # Liu, Yang, Zou 2026 (arXiv 2601.21561), Table 2, as quoted second-hand (the method section was
        # not reachable): a 2-layer MLP with 256 hidden units, plain SGD, lr 1e-4, batch 16, 25 epochs,
        # colour images to grayscale, SAL with 16 areas
        "SAL paper's Table 2: mlp:256, plain SGD lr 1e-4 (no momentum), batch 16, 25 epochs, grayscale, "
        "sal areas=16",
        settings={"model": "mlp:256", "optimizer": "SGD", "lr": 1e-4, "momentum": 0.0, "batch_size": 16,
                  "epochs": 25, "schedule": "constant", "grayscale": True},
        rule_options={"sal": {"areas": 16}},
    ),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise NeurosalError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def apply_recipe(name: str, rule: str, settings: dict, rule_options: dict, explicit=()) -> tuple[dict, dict]:
    """``(settings, rule_options)`` with the recipe's values where the caller gave none (``explicit``:
    the setting names the caller gave on purpose; the rule's own options always win)."""
    recipe = get_recipe(name)
    out = dict(settings)
    for key, value in recipe.settings.items():
        if key not in explicit:
            out[key] = value
    return out, {**recipe.rule_options.get(rule, {}), **rule_options}


def recipe_config(name: str, rule: str, rule_options: dict | None = None, **overrides):
    """A :class:`~neurosal.train.TrainConfig` from the recipe; ``overrides`` (data, seed, epochs...) win."""
    from .train import TrainConfig

    settings, options = apply_recipe(name, rule, overrides, rule_options or {}, explicit=set(overrides))
    return TrainConfig(rule=rule, rule_options=options, **settings)
