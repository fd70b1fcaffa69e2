"""A small Vision Transformer trained by SAL: the FFN layers of every encoder layer become K routed
areas (each token chooses one, like a top-1 mixture of experts), the error arrives at every block's
output through one fixed random projection, attention and LayerNorm keep their true local derivatives.

    python examples/vit_sal.py [--rule sal] [--areas 4] [--epochs 8]
"""

import argparse

import torch

import neurosal
from neurosal.zoo import ViT

from _digits import accuracy, digits, fit

ap = argparse.ArgumentParser()
ap.add_argument("--rule", default="sal")
ap.add_argument("--areas", type=int, default=4)
ap.add_argument("--epochs", type=int, default=20)
args = ap.parse_args()

torch.manual_seed(0)
xtr, ytr, xte, yte = digits()
vit = ViT((1, 8, 8), 10, patch=2, dim=32, depth=2, heads=4)
# sal's warm-up (all areas learn together for the first half of the run) is a share of the run's length
steps = args.epochs * -(-len(xtr) // 32)  # epochs x batches of 32 (what fit() below runs)
options = {"areas": args.areas, "run_steps": steps} if args.rule == "sal" else {}
model = neurosal.wrap(vit, args.rule, **options)
fit(model, xtr, ytr, args.epochs)
print("feedback points:", model.point_names)
if args.rule == "sal":
    print("tokens per area (FFN layers):", model.rule.epoch_stats(model.model)["area_usage"])
print(f"test accuracy (vit, {args.rule}): {accuracy(model, xte, yte):.4f}")
