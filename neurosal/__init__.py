"""neurosal: learning rules without weight transport, on GPUs and on simulated hardware."""

__version__ = "0.1.0"

from .rules import make_rule, rule_names  # noqa: E402
from .substrates import finish_step  # noqa: E402
from .wrap import Point, Wrapped, update_alignment, wrap  # noqa: E402



def load_run(run_dir, accel: str = "cpu"):
    """The model a ``neurosal train`` run folder holds (its latest checkpoint, or a checkpoint file),
    rebuilt with its rule's layers and devices: ``(model, rule, config, checkpoint)``, the model in eval
    mode. Loaded with ``torch.load(weights_only=True)``: a file asking for more is refused."""
    from .train import load_run as _load_run

    return _load_run(run_dir, accel)


__all__ = ["Point", "Wrapped", "finish_step", "load_run", "make_rule", "rule_names", "update_alignment", "wrap"]
