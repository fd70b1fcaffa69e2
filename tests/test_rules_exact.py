"""Exact identities and hand-written references for every rule's update."""

import math

import pytest
import torch
import torch.nn.functional as F

from neurosal import engine
from neurosal.errors import NeurosalError
from neurosal.rules import make_rule, rule_names

from conftest import assert_close, setup_rule, tiny


def grads(net):
    return [p.grad.clone() for p in net.parameters()]


def autograd_bp(net, x, y):
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()
    return grads(net)


def rule_grads(net, rule, x, y, n_classes, memory="cache"):
    net.zero_grad(set_to_none=True)
    engine.train_step(net, rule, x, y, n_classes, memory)
    return grads(net)


@pytest.mark.parametrize("spec,shape", [("mlp:9x7x5", (1, 4, 4)), ("cnn:3,4/6", (1, 8, 8)),
                                        ("cnn:2/", (2, 6, 6))])
def test_fa_with_transposed_weights_is_backprop(spec, shape):
    net, x, y = tiny(spec, shape)
    ref = autograd_bp(net, x, y)
    fa = setup_rule("fa", net, shape, 4)
    for l, blk in enumerate(net.blocks):
        if l:
            fa.set_feedback(l, blk.op.weight.detach())
    got = rule_grads(net, fa, x, y, 4)
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, rtol=0, atol=1e-13)


def test_manual_bp_teaching_equals_autograd():
    net, x, y = tiny("cnn:3/5", (1, 6, 6))
    ref = autograd_bp(net, x, y)
    bp = make_rule("bp")
    bp.autograd = False  # route through the teaching-signal path
    got = rule_grads(net, bp, x, y, 4)
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, rtol=0, atol=1e-13)


def test_dfa_one_hidden_layer_with_w2_is_backprop():
    net, x, y = tiny("mlp:8", (1, 3, 3))
    ref = autograd_bp(net, x, y)
    dfa = setup_rule("dfa", net, (1, 3, 3), 4)
    dfa.B.copy_(net.blocks[1].op.weight.detach())  # B_1 = W_2 (as a n_classes x hidden matrix)
    for g, r in zip(rule_grads(net, dfa, x, y, 4), ref):
        assert torch.allclose(g, r, rtol=0, atol=1e-14)


def _forward(net, x):
    h0 = x.flatten(1)
    w = [b.op.weight.detach() for b in net.blocks]
    bs = [b.op.bias.detach() for b in net.blocks]
    a1 = h0 @ w[0].T + bs[0]
    h1 = a1.clamp_min(0)
    a2 = h1 @ w[1].T + bs[1]
    h2 = a2.clamp_min(0)
    out = h2 @ w[2].T + bs[2]
    return (h0, h1, h2), (a1, a2), w, out


def _hand_reference(net, x, y, d2_from, d1_from):
    (h0, h1, h2), (a1, a2), w, out = _forward(net, x)
    e = (torch.softmax(out, 1) - F.one_hot(y, 4)) / len(y)
    d3 = e
    d2 = d2_from(e, d3) * (a2 > 0)
    d1 = d1_from(e, d2) * (a1 > 0)
    return [d1.T @ h0, d1.sum(0), d2.T @ h1, d2.sum(0), d3.T @ h2, d3.sum(0)]


def _check(net, rule, x, y, expected):
    got = rule_grads(net, rule, x, y, 4)
    for g, r in zip(got, expected):
        assert torch.allclose(g, r, rtol=1e-12, atol=1e-14)


def test_fa_hand_reference():
    net, x, y = tiny()
    fa = setup_rule("fa", net, (1, 3, 3), 4)
    b2, b3 = fa.B1, fa.B2
    _check(net, fa, x, y, _hand_reference(net, x, y, lambda e, d3: d3 @ b3, lambda e, d2: d2 @ b2))


def test_usf_hand_reference():
    net, x, y = tiny()
    usf = setup_rule("usf", net, (1, 3, 3), 4)
    w = [b.op.weight.detach() for b in net.blocks]
    s = [torch.sign(m) * m.norm() / math.sqrt(m.numel()) for m in w]
    _check(net, usf, x, y, _hand_reference(net, x, y, lambda e, d3: d3 @ s[2], lambda e, d2: d2 @ s[1]))


def test_dfa_hand_reference():
    net, x, y = tiny()
    dfa = setup_rule("dfa", net, (1, 3, 3), 4)
    b1, b2 = dfa.B[:, :7], dfa.B[:, 7:12]
    _check(net, dfa, x, y, _hand_reference(net, x, y, lambda e, d3: e @ b2, lambda e, d2: e @ b1))


def test_drtp_hand_reference():
    net, x, y = tiny()
    drtp = setup_rule("drtp", net, (1, 3, 3), 4)
    t = -F.one_hot(y, 4).double() / len(y)
    b1, b2 = drtp.B[:, :7], drtp.B[:, 7:12]
    _check(net, drtp, x, y, _hand_reference(net, x, y, lambda e, d3: t @ b2, lambda e, d2: t @ b1))


def test_drtp_centered_hand_reference():
    """center=True: the batch's mean one-hot (its class frequencies) is taken off every target."""
    net, x, y = tiny()
    drtp = setup_rule("drtp", net, (1, 3, 3), 4, center=True)
    onehot = F.one_hot(y, 4).double()
    t = -(onehot - onehot.mean(0)) / len(y)
    b1, b2 = drtp.B[:, :7], drtp.B[:, 7:12]
    _check(net, drtp, x, y, _hand_reference(net, x, y, lambda e, d3: t @ b2, lambda e, d2: t @ b1))


def test_ldef_hand_reference_and_factor_updates():
    net, x, y = tiny()
    ldef = setup_rule("ldef", net, (1, 3, 3), 4, rank=2, decay=0.01)
    a1, c1, a2, c2 = (ldef.factors[i].detach().clone() for i in (2, 3, 4, 5))
    exp = _hand_reference(net, x, y, lambda e, d3: (d3 @ a2) @ c2, lambda e, d2: (d2 @ a1) @ c1)
    _check(net, ldef, x, y, exp)
    # feedback factors: gradient of <A C, dW> plus decay, dW being the forward layer's own update
    dw2, dw3 = exp[2], exp[4]
    assert torch.allclose(ldef.factors[4].grad, dw3 @ c2.T + 0.01 * a2, atol=1e-14)
    assert torch.allclose(ldef.factors[5].grad, a2.T @ dw3 + 0.01 * c2, atol=1e-14)
    assert torch.allclose(ldef.factors[2].grad, dw2 @ c1.T + 0.01 * a1, atol=1e-14)
    assert torch.allclose(ldef.factors[3].grad, a1.T @ dw2 + 0.01 * c1, atol=1e-14)


@pytest.mark.parametrize("name", ["dfa", "drtp"])
@pytest.mark.parametrize("spec,shape", [("mlp:6x5x4", (1, 3, 3)), ("cnn:2,3/5", (1, 8, 8))])
def test_recompute_mode_equals_cache_mode(name, spec, shape):
    net, x, y = tiny(spec, shape)
    rule = setup_rule(name, net, shape, 4)
    a = rule_grads(net, rule, x, y, 4, "cache")
    b = rule_grads(net, rule, x, y, 4, "recompute")
    # one projection matmul for all layers vs one slice per layer: equal up to rounding only
    for g, r in zip(a, b):
        assert_close(r, g)


def test_non_bp_rules_build_no_autograd_graph():
    net, x, y = tiny("mlp:6x5", (1, 3, 3))
    for name in ["fa", "usf", "dfa", "drtp", "ldef"]:
        rule = setup_rule(name, net, (1, 3, 3), 4)
        logits, cache = engine.forward_cached(net, x)
        assert logits.grad_fn is None and all(c.x.grad_fn is None for c in cache)
        loss, _ = engine.train_step(net, rule, x, y, 4)
        assert loss.grad_fn is None


def test_every_registered_rule_is_known():
    assert set(rule_names()) >= {"bp", "fa", "usf", "dfa", "drtp", "ldef"}


def test_unknown_rule_and_bad_options_are_refused():
    with pytest.raises(NeurosalError, match="unknown rule 'nope'"):
        make_rule("nope")
    with pytest.raises(NeurosalError, match="no setting"):
        make_rule("dfa", rank=3)


def test_fa_with_transposed_weights_is_backprop_on_residual_nets():
    net, x, y = tiny("mlp:6*4:relu:res", (1, 3, 3))
    assert [b.residual for b in net.blocks] == [0, 3 ** -0.5, 3 ** -0.5, 3 ** -0.5, 0]
    ref = autograd_bp(net, x, y)
    fa = setup_rule("fa", net, (1, 3, 3), 4)
    for l, blk in enumerate(net.blocks):
        if l:
            fa.set_feedback(l, blk.op.weight.detach())
    for g, r in zip(rule_grads(net, fa, x, y, 4), ref):
        assert torch.allclose(g, r, rtol=0, atol=1e-13)


@pytest.mark.parametrize("flatten", [False, True])
def test_relu_pool_fast_path_equals_autograd(flatten):
    from neurosal.layers import post_forward, post_kind, post_vjp

    mods = [torch.nn.ReLU(), torch.nn.MaxPool2d(2)] + ([torch.nn.Flatten()] if flatten else [])
    post = torch.nn.Sequential(*mods)
    a = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    a[0, 0, :2, :2] = -1.0  # a window where relu is off everywhere
    kind = post_kind(post)
    assert kind == "relu_pool"
    out, state = post_forward(kind, post, a)
    assert torch.equal(out, post(a))  # max and relu round nothing: bitwise on any CPU
    g = torch.randn_like(out)
    assert torch.allclose(post_vjp(kind, post, state, g, a.shape), post_vjp("generic", post, a, g, a.shape),
                          rtol=0, atol=0)
