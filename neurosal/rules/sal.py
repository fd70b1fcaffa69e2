"""SAL -- Selective Adaptive Learning (Liu, Yang, Zou 2026, arXiv 2601.21561), as a rule.

What the paper fixes and this implements:

* every hidden fully connected layer is split into K mutually exclusive parameter areas
  (:class:`neurosal.areas.AreaLinear`); each sample activates, and updates, exactly one area per layer;
* the area is chosen by learned-frozen decoupled routing: a learnable projection into a routing
  space, frozen prototypes there, hard (argmax-cosine) selection;
* no weight transport: the error reaches the layers through fixed random feedback.

What the paper leaves *open* in our notes, and what we chose (the method section was not reachable
from this workplace, only the abstract and introduction; each choice is a config field):

* refined feedback alignment = direct projection of the output error to every hidden layer through
  one fixed random matrix (DFA's pathway, Nokland 2016), shared by all areas of a layer and delivered
  only to the selected area. The direct pathway is what makes depth harmless: no error passes through
  127 random matrices. With K = 1 SAL *is* DFA on the same network (a test asserts it exactly).
* the router's projection learns by a local objective on the layer input (pull to the chosen
  prototype + load balance, see :mod:`neurosal.areas`), updated by the same optimiser as the weights.
* depth: a parameter-free RMS scaling before each hidden activation (``norm="rms"``) bounds every
  activation; ``norm="rms_clip"`` only scales down; with ``norm="none"`` the stack is the plain MLP.
* K areas split the data: each sees about 1/K of it, which on small sets made SAL worse than the DFA it
  refines (benchmarks/reports/sal). Two defaults answer that, each an option with an ablation row in
  the report: the areas of a layer start from **one shared initialisation** (``area_init="shared"``;
  in a user's model, the Linear's own weights), and for the **first half of the run** (``warmup=0.5``,
  a share of ``run_steps``, which neurosal's trainer fills in) every sample's update reaches every area
  while the router already learns its routing -- the areas stay one copy, trained on all the data, then
  specialise on their own samples. After the warm-up each sample updates only its area, as above.

Convolutional blocks in a SAL model stay dense and learn from the same direct signal: an area per
image for a shared kernel has no clean counterpart of "the sample's own parameters" that we could check
against the paper, so we did not invent one.

On any other ``nn.Module`` (:func:`neurosal.wrap`), the chosen ``nn.Linear`` layers (default: MLP hidden
layers and transformer FFN layers) become area layers routing every token on its own (a top-1 mixture
of experts), the error arrives at the feedback points through DFA's projection, and the areas learn
through the true local derivatives between their point and the one below; unchosen areas get no
gradient, the router learns from the same local objective when the backward pass reaches the layer.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch.nn as nn

from ..areas import AreaLinear
from ..layers import RMSClip, RMSScale
from ..errors import NeurosalError
from .base import register
from ..options import check, non_negative, positive
from .direct import DirectConfig, DirectRule


@dataclasses.dataclass
class SALConfig(DirectConfig):
    #: K, the number of mutually exclusive parameter areas per hidden layer
    areas: int = 4
    #: dimension of the routing space (learned projection target, where the prototypes live)
    route_dim: int = 16
    #: weight of the router's load-balance term (0 lets areas die)
    balance: float = 0.1
    #: softmax temperature of the soft assignment used by the balance term
    temperature: float = 0.1
    #: EMA momentum of the routing input's running mean
    center_momentum: float = 0.01
    #: "rms": parameter-free RMS scaling before each hidden activation; "rms_clip": scale down only
    #: (samples whose RMS exceeds 1); "none": plain
    norm: str = "rms"
    #: "shared": all areas of a layer start from one initialisation (in a user's model: the Linear's own
    #: weights) and diverge as their samples do; "independent": one random draw per area
    area_init: str = "shared"
    #: share of the run during which all areas learn together from every sample, while the router
    #: already learns its routing; areas are mutually exclusive after it. 0: exclusive from the start
    warmup: float = 0.5
    #: the run's length in training steps (batches), which ``warmup`` is a share of: neurosal's trainer
    #: fills it in; a user's loop passes it (0: unknown -- no warm-up, with a warning)
    run_steps: int = 0
    #: area layers of the general engine: "auto" runs all areas as one grouped matmul
    #: (torch.nn.functional.grouped_mm) on CUDA and a loop over the areas elsewhere; "on" / "off" force it
    grouped: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check(self.areas >= 1, "rule option areas", f"must be >= 1, got {self.areas}")
        check(self.route_dim >= 1, "rule option route_dim", f"must be >= 1, got {self.route_dim}")
        check(non_negative(self.balance), "rule option balance", f"must be a number >= 0, got {self.balance}")
        check(positive(self.temperature), "rule option temperature", f"must be positive, got {self.temperature}")
        check(0 <= self.center_momentum <= 1, "rule option center_momentum",
              f"must be in [0, 1], got {self.center_momentum}")
        check(self.norm in ("rms", "rms_clip", "none"), "rule option norm",
              f"use rms, rms_clip or none, not {self.norm!r}")
        check(self.area_init in ("shared", "independent"), "rule option area_init",
              f"use shared or independent, not {self.area_init!r}")
        check(0 <= self.warmup <= 1, "rule option warmup", f"must be a share of the run in [0, 1], got {self.warmup}")
        check(isinstance(self.run_steps, int) and self.run_steps >= 0, "rule option run_steps",
              f"must be an integer >= 0, got {self.run_steps}")
        check(self.grouped in ("auto", "on", "off"), "rule option grouped",
              f"use auto, on or off, not {self.grouped!r}")


@register
class SAL(DirectRule):
    name = "sal"
    summary = "selective adaptive learning: K routed areas per layer, direct random feedback"
    Config = SALConfig

    def __init__(self, config=None):
        super().__init__(config)
        c = self.config
        if c.areas < 1:
            raise NeurosalError(f"sal: areas must be >= 1, got {c.areas}")
        if c.balance < 0 or c.temperature <= 0:
            raise NeurosalError("sal: balance must be >= 0 and temperature > 0")

    def plan(self, run_steps: int) -> None:
        if not self.config.run_steps:  # a length the user gave wins
            self.config.run_steps = int(run_steps)

    def warmup_steps(self) -> int:
        """The warm-up in training steps: ``warmup`` times the run's length."""
        c = self.config
        if c.warmup > 0 and c.areas > 1 and not c.run_steps:
            warnings.warn("sal: the warm-up is a share of the run, whose length is unknown: pass run_steps "
                          "(the run's training steps) or warmup=0; training without warm-up", stacklevel=3)
            return 0
        return round(c.warmup * c.run_steps)

    def area_layer(self, n_in: int, n_out: int, tokens: bool = False) -> AreaLinear:
        """An area layer with this rule's options (``tokens``: route every position on its own)."""
        c = self.config
        layer = AreaLinear(n_in, n_out, c.areas, c.route_dim, c.balance, c.temperature, c.center_momentum, tokens,
                           shared_init=c.area_init == "shared", warmup_steps=self.warmup_steps())
        layer.grouped = c.grouped
        return layer

    def hidden_layer(self, n_in, n_out):
        return self.area_layer(n_in, n_out)

    def hidden_tail(self, activation: nn.Module) -> nn.Module:
        norm = {"rms": RMSScale, "rms_clip": RMSClip}.get(self.config.norm)
        return nn.Sequential(norm(), activation) if norm else activation

    def source(self, e, target):
        return e

    def epoch_stats(self, net) -> dict:
        usage = [m.take_usage() for m in net.modules() if isinstance(m, AreaLinear)]
        dead = [sum(1 for c in layer if c == 0) for layer in usage]
        return {"area_usage": usage, "dead_areas": dead}
