"""neurosal: learning rules without weight transport, on GPUs and on simulated hardware."""

__version__ = "0.1.0"

from .rules import make_rule, rule_names  # noqa: E402
from .substrates import finish_step  # noqa: E402
from .wrap import Point, Wrapped, update_alignment, wrap  # noqa: E402

__all__ = ["Point", "Wrapped", "finish_step", "make_rule", "rule_names", "update_alignment", "wrap"]
