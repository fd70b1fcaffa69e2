"""Convergence on sklearn digits within the CPU budget (the issue's accuracy bars)."""

import pytest

from neurosal.data import load_dataset
from neurosal.train import TrainConfig, Trainer

DIGITS = load_dataset("digits")


def run(rule, model="mlp:256x256", epochs=25, **kw):
    cfg = TrainConfig(rule=rule, model=model, data="digits", epochs=epochs, batch_size=32,
                      progress=False, seed=0, **kw)
    return Trainer(cfg, None, dataset=DIGITS).fit()["epochs"]


@pytest.mark.parametrize("rule", ["bp", "fa", "usf", "dfa"])
def test_two_hidden_layer_mlp_reaches_95_percent(rule):
    hist = run(rule)
    assert hist[-1]["test_acc"] >= 0.95, hist[-1]


def test_drtp_reaches_90_percent():
    # DRTP's signal never shrinks as the error does, so it needs bounded units (tanh), as in
    # Frenkel et al. 2021; with ReLU and Adam its weights grow without limit.
    hist = run("drtp", model="mlp:256x256:tanh")
    assert hist[-1]["test_acc"] >= 0.90, hist[-1]


def test_ldef_learns():
    hist = run("ldef", epochs=15)
    assert hist[-1]["test_acc"] >= 0.90, hist[-1]


@pytest.mark.parametrize("rule,bar", [("bp", 0.93), ("fa", 0.88), ("dfa", 0.82)])
def test_cnn_trains(rule, bar):
    # measured at seed 0: bp 95.6%, fa 92.2%, dfa 87.4% (DFA is known to be weak on conv layers)
    hist = run(rule, model="cnn:8,16/64", epochs=15)
    assert hist[-1]["test_acc"] >= bar, (rule, hist[-1])


def test_feedback_alignment_aligns():
    """Alignment logging: FA's last hidden layer signal turns towards BP's during training."""
    hist = run("fa", epochs=8, alignment=True)
    first, last = hist[0]["alignment_deg"], hist[-1]["alignment_deg"]
    assert len(first) == 3
    assert last[1] < first[1] - 10 and last[1] < 80, (first, last)


@pytest.mark.parametrize("optimizer", ["Adam", "SGD", "AdamW"])
def test_trainer_optimiser_runs_foreach_and_equals_the_loop(optimizer):
    """The trainer asks torch for its multi-tensor optimiser on any device (torch's default only on CUDA);
    the same steps with the per-parameter loop give the same weights up to rounding."""
    from conftest import assert_close

    from neurosal.engine import train_step

    ds = load_dataset("iris")
    nets = []
    for foreach in (True, False):
        tr = Trainer(TrainConfig(rule="dfa", model="mlp:16x8", optimizer=optimizer, lr=0.05, progress=False),
                     None, dataset=ds)
        assert all(g["foreach"] for g in tr.opt.param_groups)
        for g in tr.opt.param_groups:
            g["foreach"] = foreach
        for i in range(5):
            tr.opt.zero_grad(set_to_none=True)
            train_step(tr.net, tr.rule, ds.x_train[16 * i:16 * i + 16], ds.y_train[16 * i:16 * i + 16], ds.n_classes)
            tr.opt.step()
        nets.append(tr.net.state_dict())
    for k, v in nets[0].items():
        assert_close(v, nets[1][k], msg=k)
