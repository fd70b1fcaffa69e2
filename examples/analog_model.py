"""Your own model on simulated analog hardware: every Linear/Conv2d becomes differential pairs of
resistive devices (finite conductance steps, nonlinearity, device variation, read noise), then a rule
trains it. ``hw_models.attach`` realises each optimiser step as pulses on the arrays, so the loop
stays an ordinary PyTorch loop.

    python examples/analog_model.py [--device rram-like] [--rule dfa] [--epochs 8]
"""

import argparse

import torch
import torch.nn as nn

import hw_models
import neurosal

from _digits import accuracy, digits

ap = argparse.ArgumentParser()
ap.add_argument("--device", default="rram-like")
ap.add_argument("--rule", default="dfa")
ap.add_argument("--epochs", type=int, default=8)
args = ap.parse_args()

torch.manual_seed(0)
xtr, ytr, xte, yte = digits()
model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(8 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
model = hw_models.convert(model, device=args.device)  # convert first, then wrap
model = neurosal.wrap(model, args.rule)
opt = torch.optim.Adam(model.parameters(), lr=3e-3)  # any optimiser: it proposes, the devices dispose
hw_models.attach(opt, model)  # after every opt.step(): pulses on the devices, weights read back
for epoch in range(args.epochs):
    model.train()
    for idx in torch.randperm(len(xtr)).split(32):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    print(f"epoch {epoch + 1}: test accuracy {accuracy(model, xte, yte):.4f}")
print(f"test accuracy ({args.device}, {args.rule}): {accuracy(model, xte, yte):.4f}")
