"""Data-parallel training over processes, launched by ``torchrun`` (torch.distributed; gloo or NCCL).

    torchrun --nproc_per_node 2 -m neurosal.cli train --rule dfa --data digits --out runs/ddp

Every rank takes its equal share of each global batch (``--batch-size`` is the global batch), so the
averaged gradient is the gradient of the global batch and the weights match a single process's
(SAL: close to it, see the last point).

* ``bp`` trains through :class:`torch.nn.parallel.DistributedDataParallel`, whose reducer hooks
  autograd's backward pass.
* On neurosal's spec chains the other rules never run autograd's backward, so DDP's reducer would
  never fire. They use the same collective DDP uses -- ``all_reduce`` of the gradients, averaged --
  launched *per layer, asynchronously, the moment that layer's local update is in .grad* (the
  engine's ``on_layer`` callback). With the direct rules (DFA, SAL) each layer's update is independent
  of the others, so a layer's communication overlaps the remaining layers' compute. Parameters without
  a gradient this step (an SAL area no sample chose) join with zeros and get their ``None`` back when no
  rank used them.
* Other models (the general engine: ``neurosal.wrap`` of any module, the zoo's ResNet/ViT/GPT) train
  through DDP with every rule -- their teaching signals reach the weights by autograd -- except when they
  hold routing layers (SAL): an area no sample chose gets no gradient and the router's comes from its
  local objective, both outside DDP's reducer, so there every gradient is averaged with the same
  all-reduce once the backward pass is done (no overlap with it).
* Floating-point buffers (SAL's routing centres) are averaged after every step so ranks agree. Each rank
  moves its centre with its own shard's mean before routing, so SAL over N ranks is close to, not bit
  for bit, one process on the global batch (as BatchNorm without SyncBN).

Shutdown: the context that created the process group destroys it (:meth:`DistContext.close`) while the
interpreter is still fully alive -- after a barrier, so no rank closes its connections while a peer is
still talking to it. A process group left to interpreter finalisation aborts at random (SIGABRT,
``terminate called without an active exception``): gloo's C++ worker threads and the work objects
they hold (with references to our gradient tensors) are then torn down in static destructors, racing
the interpreter's own teardown. Destroying the group first made that rarer, not impossible (still about
one job in 10-20 on a 2-core machine, 2026-12-07), so a rank of a multi-process job then leaves without
interpreter finalisation (``os._exit`` after flushing, :func:`neurosal.cli.entry`): 0 aborts in 80 jobs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def launched_world_size() -> int:
    """The number of processes of the job this one was launched into (``WORLD_SIZE``, set by torchrun and
    other launchers); 1 for a process on its own. Above 1, :meth:`DistContext.from_env` makes a process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    owns_group: bool = False  # this context created the default process group, so it destroys it

    @staticmethod
    def from_env() -> "DistContext | None":
        if launched_world_size() <= 1:
            return None
        owns = not dist.is_initialized()
        if owns:
            backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
            dist.init_process_group(backend)
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    def close(self, clean: bool = True) -> None:
        """Destroy the process group this context created (a no-op for one it was handed).

        ``clean``: every rank got here the normal way, so wait at a barrier first (no rank tears down
        its connections under a peer's last collective). After a failure, a barrier could wait forever
        for a dead peer: destroy at once and let the launcher stop the others.
        """
        if not (self.owns_group and dist.is_initialized()):
            return
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()
            self.owns_group = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch of indices (equal contiguous chunks)."""
        return idx.tensor_split(self.world)[self.rank]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t


class LayerwiseAllReduce:
    """Average gradients over ranks, one layer at a time, as soon as each layer's update is ready."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        self.pending: list = []

    def __call__(self, op: torch.nn.Module) -> None:
        for p in op.parameters():
            if not p.requires_grad:
                continue
            was_none = p.grad is None
            if was_none:
                p.grad = torch.zeros_like(p)
            self.pending.append((p, was_none, dist.all_reduce(p.grad, async_op=True)))

    def wait(self) -> None:
        try:
            for p, was_none, work in self.pending:
                work.wait()
                p.grad.div_(self.ctx.world)
                if was_none and not torch.any(p.grad):
                    p.grad = None  # no rank used it: stays untouched by the optimiser
        finally:
            self.pending.clear()  # never leave work objects (and the tensors they hold) behind


def reduce_learned_feedback(ctx: DistContext, rule) -> None:
    """Average the grads of a rule's own learned parameters (ldef's feedback factors)."""
    for p in rule.parameters():
        if p.grad is not None and p.numel():
            dist.all_reduce(p.grad)
            p.grad.div_(ctx.world)


def average_buffers(ctx: DistContext, net: torch.nn.Module) -> None:
    for b in net.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b.div_(ctx.world)
