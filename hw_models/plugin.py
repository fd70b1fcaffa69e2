"""Entry points that make ``neurosal train --device NAME`` and ``neurosal sweep`` work."""

from __future__ import annotations

from .analog import convert
from .presets import device_names, get_device


class AnalogSubstrate:
    @staticmethod
    def names() -> list[str]:
        return device_names()

    @staticmethod
    def apply(net, name: str, options: dict, seed: int):
        return convert(net, get_device(name, **options), seed)


SUBSTRATE = AnalogSubstrate()


def add_commands(subparsers) -> None:
    from .sweep import add_parser

    add_parser(subparsers)
