"""Train any model with a rule, then export it to ONNX and check onnxruntime against torch.

    python examples/export_model.py [--rule sal] [--out model.onnx]
"""

import argparse

import torch

import neurosal
from export.onnx_export import export_onnx, verify
from neurosal.zoo import ViT

from _digits import accuracy, digits, fit

ap = argparse.ArgumentParser()
ap.add_argument("--rule", default="sal")
ap.add_argument("--out", default="model.onnx")
args = ap.parse_args()

torch.manual_seed(0)
xtr, ytr, xte, yte = digits()
options = {"run_steps": 10 * -(-len(xtr) // 32)} if args.rule == "sal" else {}  # sal's warm-up: the run's length
model = neurosal.wrap(ViT((1, 8, 8), 10, patch=2, dim=32, depth=2, heads=4), args.rule, **options)
fit(model, xtr, ytr, epochs=10)
plain = model.unwrap()  # the trained model without the rule's hooks
export_onnx(plain, xte[:2], args.out)  # SAL's routing becomes ONNX ops (ArgMax + Gather)
report = verify(plain, args.out, xte)
print(f"{args.out}: onnxruntime vs torch max abs diff {report['max_abs_diff']:.2e}, "
      f"argmax agreement {100 * report['argmax_agreement']:.1f}%")
print(f"test accuracy (torch): {accuracy(plain, xte, yte):.4f}")
