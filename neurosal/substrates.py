"""Plug-in points for packages that extend neurosal without neurosal importing them.

``neurosal`` never imports ``hw_models`` or ``export``; they announce themselves through Python entry
points declared in ``pyproject.toml``:

* group ``neurosal.substrates``: an object with ``names() -> list[str]`` (the hardware devices it
  provides) and ``apply(net, name, options: dict, seed: int) -> net`` (turn a built model into one
  whose layers live on that device);
* group ``neurosal.commands``: a function ``add(subparsers)`` that adds CLI subcommands.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from .errors import NeurosalError


def _load(group: str) -> list:
    return [ep.load() for ep in sorted(entry_points(group=group), key=lambda e: e.name)]


def substrates() -> list:
    return _load("neurosal.substrates")


def device_names() -> list[str]:
    return sorted(n for s in substrates() for n in s.names())


def apply_device(net, name: str, options: dict, seed: int):
    for sub in substrates():
        if name in sub.names():
            return sub.apply(net, name, dict(options), seed)
    known = device_names()
    raise NeurosalError(f"unknown device {name!r}; known: {', '.join(known) if known else 'none installed'}")


def command_plugins() -> list:
    return _load("neurosal.commands")


def finish_step(net) -> None:
    """After the optimiser step: let layers that realise updates physically (analog arrays) do so."""
    for m in net.modules():
        hook = getattr(m, "after_optimizer_step", None)
        if hook is not None:
            hook()
