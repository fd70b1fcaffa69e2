import pytest
import torch

from neurosal.engine import block_output_shapes
from neurosal.models import build_model
from neurosal.rules import make_rule


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def assert_close(actual, expected, ulps: float = 1e4, msg=None):
    """Equal up to rounding: for two *different* computation orders of the same mathematics (kernels,
    BLAS blockings and summation orders differ between CPUs, so bitwise equality is not portable).
    Tolerance from the dtype: ``ulps`` machine epsilons relative, and as much again of the largest
    magnitude as absolute slack (float64: ~2e-12)."""
    eps = torch.finfo(expected.dtype).eps
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=ulps * eps, atol=ulps * eps * max(scale, 1e-30), msg=msg)


def sgd_step(wrapped, opt, x, y):
    """One step of a user's loop on a wrapped model: cross-entropy, the target for rules that need it."""
    import torch.nn.functional as F

    opt.zero_grad()
    out = wrapped(x)
    if wrapped.rule.needs_target:
        wrapped.set_target(y)
    loss = F.cross_entropy(out, y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def setup_rule(name, net, input_shape, n_classes=10, seed=1, **options):
    rule = make_rule(name, **options)
    rule.setup(net, block_output_shapes(net, input_shape), n_classes, torch.Generator().manual_seed(seed))
    p = next(net.parameters())
    return rule.to(p.device, p.dtype)


def tiny(spec="mlp:7x5", shape=(1, 3, 3), n_classes=4, batch=6, seed=0):
    torch.manual_seed(seed)
    net = build_model(spec, shape, n_classes).double()
    x = torch.randn(batch, *shape, dtype=torch.float64)
    y = torch.randint(0, n_classes, (batch,))
    return net, x, y
