"""A ResNet with BatchNorm trained by feedback alignment: every conv and the head send the signal down
through fixed random matrices; BatchNorm, ReLU, the residual adds and the pooling keep their true
derivatives. Compare with ``--rule bp`` or ``--rule usf``.

    python examples/resnet_fa.py [--rule fa] [--depth 8] [--epochs 5]
"""

import argparse

import torch

import neurosal
from neurosal.zoo import ResNet

from _digits import accuracy, digits, fit

ap = argparse.ArgumentParser()
ap.add_argument("--rule", default="fa")
ap.add_argument("--depth", type=int, default=8)
ap.add_argument("--epochs", type=int, default=5)
args = ap.parse_args()

torch.manual_seed(0)
xtr, ytr, xte, yte = digits()
model = neurosal.wrap(ResNet(args.depth, in_channels=1, n_classes=10), args.rule)
fit(model, xtr, ytr, args.epochs)
print("per-layer angle to backprop's update (degrees):",
      [round(a) for a in neurosal.update_alignment(model, xtr[:256], ytr[:256])])
print(f"test accuracy (resnet:{args.depth}, {args.rule}): {accuracy(model, xte, yte):.4f}")
