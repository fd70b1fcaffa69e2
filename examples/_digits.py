"""Shared by the examples: sklearn's digits as (N, 1, 8, 8) images in [0, 1], a fixed split."""

import torch
from sklearn.datasets import load_digits


def digits(seed: int = 0, images: bool = True):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def fit(model, x, y, epochs: int, lr: float = 3e-3, batch: int = 32, after_step=None):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(batch):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}")
    return model


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()
