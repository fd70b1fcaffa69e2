"""Plug-in points for packages that extend neurosal without neurosal importing them.

``neurosal`` never imports ``hw_models`` or ``export``; they announce themselves through Python entry
points declared in ``pyproject.toml``:

* group ``neurosal.substrates``: a :class:`Substrate` -- ``names()`` (the hardware devices it
  provides), ``accepts(name)`` (a name or file it can build) and ``apply(net, name, options, seed)``
  (turn a built model into one whose layers live on that device);
* group ``neurosal.commands``: a function ``add(subparsers)`` that adds CLI subcommands.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .errors import NeurosalError
from .protocols import AfterStep, EpochStats, Substrate, implements


def _load(group: str) -> list:
    return [ep.load() for ep in sorted(entry_points(group=group), key=lambda e: e.name)]


def substrates() -> list[Substrate]:
    return _load("neurosal.substrates")


def device_names() -> list[str]:
    return sorted(n for s in substrates() for n in s.names())


def substrate_for(name: str) -> Substrate:
    """The installed substrate that builds device ``name`` (a preset name or a file it accepts)."""
    for sub in substrates():
        if sub.accepts(name):
            return sub
    known = device_names()
    raise NeurosalError(f"unknown device {name!r}; known: {', '.join(known) if known else 'none installed'}")


def apply_device(net, name: str, options: dict, seed: int):
    return substrate_for(name).apply(net, name, dict(options), seed)


def command_plugins() -> list:
    return _load("neurosal.commands")


def epoch_stats(net) -> dict:
    """Per-epoch figures that hardware layers report (``layer.epoch_stats() -> dict``), one list entry
    per layer that reports a value (None means: nothing to report)."""
    out: dict = {}
    for m in net.modules():
        if not implements(m, EpochStats):
            continue
        for key, value in m.epoch_stats().items():
            if value is not None:
                out.setdefault(key, []).append(value)
    return out


def finish_step(net) -> None:
    """After the optimiser step: let layers that realise updates physically (analog arrays) do so."""
    for m in net.modules():
        if implements(m, AfterStep):
            m.after_optimizer_step()
