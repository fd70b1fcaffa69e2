"""Train a model defined right here -- not from neurosal's zoo -- with direct feedback alignment.

Two branches, a LayerNorm and a residual add; the training loop is plain PyTorch: your optimiser, your
loss, ``loss.backward()``. ``neurosal.wrap`` is the only change. Runs in seconds on a CPU; the last line
printed is the test accuracy.

    python examples/own_model.py [--rule dfa] [--epochs 10]
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import neurosal


class TwoBranchNet(nn.Module):
    def __init__(self, n_in: int = 64, width: int = 64, n_classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(n_in, width)
        self.left = nn.Linear(width, width)
        self.right = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        h = F.relu(self.inp(x))
        h = self.norm(h + F.relu(self.left(h)) + self.right(h))  # two branches, residual add, LayerNorm
        return self.head(h)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rule", default="dfa")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x))
    train, test = perm[:1400], perm[1400:]

    model = neurosal.wrap(TwoBranchNet(), rule=args.rule)  # <- the only neurosal line
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    for epoch in range(args.epochs):
        model.train()
        for idx in train[torch.randperm(len(train))].split(32):
            opt.zero_grad()
            out = model(x[idx])
            if model.rule.needs_target:  # drtp teaches from the target itself
                model.set_target(y[idx])
            loss = F.cross_entropy(out, y[idx])
            loss.backward()  # the rule's teaching signals, not backprop's
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
        sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    print(f"test accuracy ({args.rule}): {acc:.4f}")


if __name__ == "__main__":
    main()
