"""neurosal: learning rules without weight transport, on GPUs and on simulated hardware."""

__version__ = "0.1.0"
