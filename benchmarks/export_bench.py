"""onnxruntime inference latency against torch eager for the same models, as ratios, in one run.

    python benchmarks/export_bench.py --out results/export_bench.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from export.onnx_export import export_onnx, reference_outputs  # noqa: E402
from neurosal.bench import save_result  # noqa: E402
from neurosal.train import TrainConfig, Trainer  # noqa: E402

MODELS = [("mlp:256x256", "dfa", None, "gather"), ("cnn:6,16/120,84", "fa", None, "gather"),
          ("mlp:256x256", "sal", None, "gather"), ("mlp:256x256", "sal", None, "dense"),
          ("mlp:256x256", "dfa", "rram-like", "gather"), ("snn:100:T=25", "dfa", None, "gather")]


def timed(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="results/export_bench.json")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, rule, device, sal_mode in MODELS:
            cfg = TrainConfig(rule=rule, model=model, epochs=1, data="mnist-5k", device=device, progress=False)
            tr = Trainer(cfg, None)
            net = tr.net.eval()
            x_all = tr.data.x_test[:256]
            if model.startswith("snn"):
                with torch.no_grad():
                    x_all = net.stem(x_all)
            path = Path(tmp) / "m.onnx"
            export_onnx(net, x_all[:2], path, sal_mode=sal_mode)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for b in [int(v) for v in args.batches.split(",")]:
                x = x_all[:b]
                xn = x.numpy()
                t_torch = timed(lambda: reference_outputs(net, x), args.reps)
                t_ort = timed(lambda: sess.run(None, {"input": xn}), args.reps)
                rows.append({"model": model, "rule": rule if rule != "sal" else f"sal[{sal_mode}]",
                             "device": device or "float", "batch": b,
                             "torch_ms": t_torch, "onnxruntime_ms": t_ort, "speedup": t_torch / t_ort})
                r = rows[-1]
                print(f"{model:18s} {r['rule']:11s} {r['device']:9s} batch {b:4d}: torch {t_torch:8.3f} ms  "
                      f"onnxruntime {t_ort:8.3f} ms  x{r['speedup']:.2f}", flush=True)
    save_result(args.out, "export_bench", torch.device("cpu"), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
