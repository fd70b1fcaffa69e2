import pytest
import torch

from neurosal.engine import block_output_shapes
from neurosal.models import build_model
from neurosal.rules import make_rule


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


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
