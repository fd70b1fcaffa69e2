"""The bench runner's JSON on a tiny CPU sweep; 2-process gloo DDP equals one process."""

import json
import os
import subprocess
import sys

import pytest
import torch

from neurosal.bench import GPT_PRESETS, BenchConfig, cases, error_line, gpt_flops, mlp_flops, run


def test_bench_runner_writes_a_valid_json_on_cpu(tmp_path):
    # a subprocess per row; the depth sweep's rows are covered by test_bench_runs_under_bf16_autocast
    cfg = BenchConfig(rules=["bp", "dfa[recompute]"], widths=[], depths=[], params=[2e4],
                      width=32, depth=2, batch=16, steps=2, warmup=1, models=["cnn:4/16", "snn:8:T=4"],
                      accel="cpu")
    res = run(cfg, tmp_path, progress=False)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["machine"]["device"] == "cpu" and data["machine"]["torch"] == torch.__version__
    assert data["settings"]["batch"] == 16 and data["matmul_peak_flops"] > 0
    assert len(data["rows"]) == len(cases(cfg)) == len(res["rows"])
    for r in data["rows"]:
        assert "error" not in r, r
        assert r["step_ms"] > 0 and r["samples_per_s"] > 0 and r["params"] > 0
        assert r["time_vs_bp"] > 0
        if r["width"]:
            assert 0 < r["flops_fraction"] < 5
    assert any(r["model"] == "cnn:4/16" for r in data["rows"])
    assert (tmp_path / "bench.md").read_text().count("\n| ") == len(data["rows"]) + 1
    assert (tmp_path / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,expect", [
    ([], None),  # no sweep named: the preset's sweeps
    (["--widths", "64"], {"widths": [64], "depths": [], "params": [], "models": [], "gpt_params": [],
                          "gpt_depths": []}),
    (["--gpt-depths", "2", "--models", "cnn"], {"widths": [], "depths": [], "params": [], "models": ["cnn"],
                                                "gpt_params": [], "gpt_depths": [2]}),
])
def test_bench_sweeps_named_replace_the_presets(monkeypatch, tmp_path, argv, expect):
    """`neurosal bench --widths 4096` runs that width sweep only: the sweeps a command names replace the
    preset's (unnamed ones are off); naming none keeps the preset."""
    import neurosal.bench
    from neurosal.cli import main

    seen = {}
    monkeypatch.setattr(neurosal.bench, "run", lambda cfg, out: seen.setdefault("cfg", cfg))
    assert main(["bench", "--small", *argv, "--out", str(tmp_path)]) == 0
    cfg = seen["cfg"]
    got = {k: getattr(cfg, k) for k in ("widths", "depths", "params", "models", "gpt_params", "gpt_depths")}
    small = BenchConfig.small()
    assert got == (expect or {k: getattr(small, k) for k in got})


def test_flop_counts():
    # one hidden layer 4 -> 3 -> 2, batch 5: forward 2*5*(12+6) = 180
    assert mlp_flops("bp", 5, [4, 3, 2], 2) == 180 + 180 + 2 * 5 * 6
    assert mlp_flops("dfa", 5, [4, 3, 2], 2) == 180 + 180 + 2 * 5 * 2 * 3
    assert mlp_flops("dfa[recompute]", 5, [4, 3, 2], 2) == 180 + 180 + 60 + 180


def test_bench_transformer_rows_on_cpu(tmp_path):
    """The transformer sweep through the general engine: tokens/s, FLOP fraction, activation bytes
    (recomputing DFA keeps less than BP at depth 4), SAL's area load."""
    cfg = BenchConfig(rules=["bp", "dfa", "dfa[recompute]", "sal"], widths=[], depths=[], params=[],
                      gpt_depths=[4], gpt_dim=32, ctx=16, vocab=24, gpt_batch=2, steps=1, warmup=1, accel="cpu")
    rows = run(cfg, tmp_path, progress=False)["rows"]
    assert [r["rule"] for r in rows] == cfg.rules and all("error" not in r for r in rows), rows
    by = {r["rule"]: r for r in rows}
    for r in rows:
        assert r["model"] == "gpt:layers=4,dim=32,heads=1,ctx=16" and r["sweep"] == "gpt-depth"
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 16) and 0 < r["flops_fraction"] < 5
    assert by["dfa[recompute]"]["act_vs_bp"] < 0.75 * by["dfa"]["act_vs_bp"]
    assert by["sal"]["area_load_max_over_mean"] >= 1.0 and "area_load_max_over_mean" not in by["bp"]


def test_gpt_flops_match_torch_flop_counter():
    """BP's count of the matmuls (all but attention) is what torch's FlopCounterMode counts, exactly;
    attention (scaled_dot_product_attention) adds 3 x 2*T*T*D per layer and window (causal half)."""
    from torch.utils.flop_counter import FlopCounterMode

    from neurosal.train import loss_and_hits
    from neurosal.zoo import build_zoo

    layers, dim, ctx, vocab, batch = 2, 32, 16, 40, 3
    net = build_zoo(f"gpt:layers={layers},dim={dim},heads=2,ctx={ctx}", (ctx,), vocab)
    x, y = torch.randint(0, vocab, (batch, ctx)), torch.randint(0, vocab, (batch, ctx))
    with FlopCounterMode(display=False) as counter:
        loss_and_hits(net(x), y)[0].backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    matmuls = sum(v for k, v in counts.items() if k in ("aten.mm", "aten.addmm", "aten.bmm"))
    attention = 3 * 2 * ctx * ctx * dim * layers * batch
    assert matmuls == gpt_flops("bp", batch, ctx, layers, dim, vocab) - attention
    assert gpt_flops("dfa", batch, ctx, layers, dim, vocab) - gpt_flops("bp", batch, ctx, layers, dim, vocab) \
        == 2 * batch * ctx * vocab * dim * layers


def test_transformer_presets_have_the_parameter_counts_they_claim():
    from neurosal.zoo import GPT

    for target, (layers, dim, heads) in GPT_PRESETS.items():
        blocks = 12 * layers * dim * dim
        assert 0.95 * target < blocks < 1.08 * target
    small = GPT(256, *[6, 384, 6], ctx=64)
    n = sum(p.numel() for p in small.blocks.parameters())
    assert 0.99 < n / (12 * 6 * 384 ** 2) < 1.01  # biases and LayerNorms are the rest


def launch(tmp_path, name, rule, nproc, *extra, model="mlp:32x16"):
    """Train 2 epochs: ``nproc`` > 1 ranks under torchrun, or one process -- this one, through the CLI's
    ``main`` (the reference run; it saves a process start per test)."""
    args = ["train", "--rule", rule, "--model", model, "--epochs", "2", "--batch-size", "64",
            "--out", str(tmp_path / name), "--no-progress", "--accel", "cpu", *extra]
    if nproc == 1:
        from neurosal.cli import main

        assert main(args) == 0
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "neurosal.cli", *args]
        # torchrun leaves a torchelastic_* folder in the temp dir per job: keep it in the test's own
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(tmp_path)})
        assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(tmp_path / name / "ckpt-epoch-0002.pt", weights_only=True)


VIT = "vit:patch=4,dim=8,depth=1,heads=2"
# plain SGD for the ViT: the attention's key bias has a zero true gradient (softmax ignores a constant
# per row); Adam would turn its rounding noise into full-size steps that differ between 1 and 2 ranks
SGD = ("--optimizer", "SGD", "--lr", "0.01")  # 0.05 is chaotic for dfa here: 2e-7 -> 0.26 in an epoch


# SAL's areas in the ViT's feed-forward layers; no load-balance term, so the router's objective is a mean
# over samples (equal shards average to the global batch's). Not bit-for-bit: each rank moves its routing
# centre with its own half batch's mean before routing (averaged after the step, like BatchNorm without
# SyncBN), which moved the weights by up to 1e-3 in 2 epochs (measured); without the gradient averaging
# each rank would train on half the data and differ by far more.
SAL_VIT = ("--rule-options", "balance=0,warmup=0.5", *SGD)


@pytest.mark.parametrize("rule,extra,model", [("bp", (), "mlp:32x16"), ("dfa", (), "mlp:32x16"),
                                              ("bp", ("--fsdp",), "mlp:32x16"), ("dfa", SGD, VIT), ("kp", SGD, VIT),
                                              ("sal", SAL_VIT, VIT), ("fa", (*SGD, "--device", "linear-256"), VIT)])
def test_two_process_gloo_run_equals_one_process_on_the_same_global_batch(tmp_path, rule, extra, model):
    """DDP (bp; any model through the general engine, learned feedback reduced beside it), per-layer
    async all-reduce (chains), FSDP2 (bp), SAL on the general engine (its unchosen areas and its
    router's local objective bypass DDP: every gradient averaged after the backward pass), and analog
    layers writing their own update under fa (bypassing DDP, averaged by the wrapper) against one
    process."""
    one = launch(tmp_path, "one", rule, 1, *[a for a in extra if a != "--fsdp"], model=model)
    two = launch(tmp_path, "two", rule, 2, *extra, model=model)
    atol, rel = (5e-3, 1e-3) if rule == "sal" else (1e-6, 1e-6)
    for k, v in one["net"].items():
        if torch.is_tensor(v):  # (SAL layers also keep a dict of extra state: the warm-up clock)
            assert torch.allclose(v, two["net"][k], rtol=0, atol=atol), k
    for k, v in one["rule"].items():  # learned feedback (kp) too
        assert torch.allclose(v, two["rule"][k], rtol=0, atol=atol), k
    assert two["history"][-1]["train_loss"] == pytest.approx(one["history"][-1]["train_loss"], rel=rel)


@pytest.mark.parametrize("rule,extra", [("bp", ("--fsdp",)), ("dfa", ())])
def test_two_process_gpt_equals_one_process(tmp_path, rule, extra):
    """The language model's paths over ranks: FSDP2 shards bp's GPT block by block; dfa's GPT trains
    through DDP. Both against one process on the same global batches (a user's text file)."""
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good "
                    "fortune, must be in want of a wife. " * 60)
    common = ("--data", str(text), "--epoch-samples", "256", "--eval-limit", "64", *SGD)
    gpt = "gpt:layers=2,dim=16,heads=2,ctx=16"
    one = launch(tmp_path, "one", rule, 1, *common, model=gpt)
    two = launch(tmp_path, "two", rule, 2, *common, *extra, model=gpt)
    for k, v in one["net"].items():
        assert torch.allclose(v, two["net"][k], rtol=0, atol=1e-6), k
    assert two["history"][-1]["train_loss"] == pytest.approx(one["history"][-1]["train_loss"], rel=1e-6)


def test_fsdp_refuses_local_rules_and_single_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "neurosal.cli", "train", "--rule", "bp", "--fsdp", "--out",
                        str(tmp_path), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2 and "torchrun" in r.stderr
    r = subprocess.run([sys.executable, "-m", "neurosal.cli", "train", "--rule", "dfa", "--fsdp", "--out",
                        str(tmp_path), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2 and "local rules" in r.stderr


def test_retained_activations_grow_with_depth_except_in_recompute_mode():
    """The memory count behind the bench's act MB column: BP and cached DFA keep every layer's
    activations (linear in depth), DFA's recompute mode keeps about one block's whatever the depth."""
    from neurosal.bench import retained_activation_bytes
    from neurosal.engine import block_output_shapes
    from neurosal.rules import make_rule

    def count(rule_name, memory, depth):
        torch.manual_seed(0)
        rule = make_rule(rule_name)
        net = rule.build(f"mlp:32*{depth}", (16,), 10)
        rule.setup(net, block_output_shapes(net, (16,)), 10, torch.Generator().manual_seed(1))
        x, y = torch.randn(8, 16), torch.randint(0, 10, (8,))
        return retained_activation_bytes(net, rule, x, y, 10, memory)

    for rule, memory in (("bp", "cache"), ("dfa", "cache")):
        assert count(rule, memory, 16) > 3 * count(rule, memory, 4)
    assert count("dfa", "recompute", 16) == count("dfa", "recompute", 4)
    assert count("dfa", "recompute", 32) < 0.2 * count("bp", "cache", 32)


def test_bench_runs_under_bf16_autocast(tmp_path):
    cfg = BenchConfig(rules=["bp", "dfa", "sal"], widths=[], depths=[2], width=32, batch=16, steps=1, warmup=1,
                      accel="cpu", dtype="bf16")
    rows = run(cfg, tmp_path, progress=False)["rows"]
    assert all("error" not in r for r in rows), rows


def test_a_failed_bench_job_reports_the_line_naming_its_exception():
    """A worker's traceback ends in torch's hints, not its error: the report shows the exception line."""
    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
              "torch._inductor.exc.InductorError: InvalidCxxCompiler: No working C++ compiler found\n\n"
              "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace\n")
    assert error_line(stderr) == "torch._inductor.exc.InductorError: InvalidCxxCompiler: No working C++ compiler found"
    assert error_line("Killed\n") == "Killed"
    assert error_line("") == ""


USER_LOOP = '''
import os, sys, torch, torch.nn as nn, torch.nn.functional as F, torch.distributed as dist, neurosal
from torch.nn.parallel import DistributedDataParallel as DDP
rules, out = sys.argv[1].split(","), sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
saved = {}
for rule in rules:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    if rule == "dfa-chain":
        model = neurosal.make_rule("dfa").build("mlp:16x16:tanh", (8,), 3).double()
    if rule == "fa-analog":
        import hw_models
        hw_models.convert(model, "linear-256")
    w = neurosal.wrap(model, rule.split("-")[0], **({"balance": 0, "warmup": 0} if rule == "sal" else {}))
    # the user's own loop: no find_unused_parameters, nothing neurosal-specific but wrap. When every
    # update is made outside autograd (a spec chain's engine, analog layers under a layerwise rule), DDP
    # has no parameter left and refuses; the wrapper averages on its own under torch.distributed
    ddp = DDP(w) if any(p.requires_grad for p in w.parameters() if all(p is not q for _, q in w.bypassed())) else w
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    if rule == "fa-analog":
        hw_models.attach(opt, w)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = torch.randn(16, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        if rule == "drtp":
            w.set_target(ys)
        F.cross_entropy(ddp(xs), ys).backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in w.parameters()])
    every = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(every, flat)
    assert all(torch.equal(every[0], f) for f in every), f"{rule}: the ranks' parameters differ"
    saved[rule] = {k: v.detach().clone() for k, v in w.state_dict().items() if torch.is_tensor(v)}
if rank == 0:
    torch.save(saved, out)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # gloo may abort a finished rank at interpreter exit (see neurosal.cli.entry)
'''

USER_RULES = ["kp", "ldef", "sal", "dfa-chain", "fa-analog", "drtp"]


def test_a_users_own_ddp_loop_equals_one_process(tmp_path):
    """``DDP(neurosal.wrap(model, rule))`` in a user's loop: gradients written outside autograd (learned
    feedback, SAL's areas and router, a spec chain's engine, analog layers' own updates) are skipped by
    DDP (it crashed on the first of them) and averaged by the wrapper after each backward (SAL's router
    was left per rank: the ranks' weights drifted apart). Two gloo ranks agree bitwise with each other
    (checked in the script) and, but for SAL, with one process on the same global batches."""
    script = tmp_path / "loop.py"
    script.write_text(USER_LOOP)
    outs = {}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(script),
               ",".join(USER_RULES), str(tmp_path / f"w{n}.pt")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "TMPDIR": str(tmp_path)})
        assert r.returncode == 0, r.stderr[-2000:]
        outs[n] = torch.load(tmp_path / f"w{n}.pt", weights_only=True)
    for rule in USER_RULES:
        one, two = outs[1][rule], outs[2][rule]
        assert one.keys() == two.keys()
        if rule == "sal":  # each rank routes with its own half batch's centre (like BatchNorm without
            continue  # SyncBN): not the one process's weights (the trainer's test above bounds that)
        for k, v in one.items():  # the same sums in another order
            if v.is_floating_point():
                assert torch.allclose(two[k], v, rtol=0, atol=1e-9), (rule, k, float((two[k] - v).abs().max()))


def test_the_torchvision_sweep_without_torchvision_says_so_in_one_line():
    """torchvision is no dependency: the sweep benchmark (benchmarks/torchvision_sweep.py) without it exits 2
    with one error line, not a traceback."""
    code = ("import sys, runpy; sys.modules['torchvision'] = None; "
            "sys.argv = ['torchvision_sweep.py', '--out', sys.argv[1]]; "
            "runpy.run_path('benchmarks/torchvision_sweep.py', run_name='__main__')")
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", code, str(root / "no-such-dir")], cwd=root, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().startswith("error: torchvision is not importable") and "\n" not in p.stderr.strip()
