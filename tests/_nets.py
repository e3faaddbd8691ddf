"""Small real networks shared by the tests."""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)
        self.dense = nn.Linear(width, width)

    def forward(self, x):
        return x + self.dense(torch.tanh(self.q(x)))


class Pooler(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.dense(x))


class Inner(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width, bias=False)

    def forward(self, x):
        return self.q(x)


class CollidingNet(nn.Module):
    """Module names built to trip naive PEFT keys.

    ``layers.1.q`` / ``layers.10.q`` (prefix collision), ``layers.N.dense`` / ``pooler.dense``
    (suffix collision), ``q`` / ``inner.q`` (a whole name that is a suffix of another).
    """

    def __init__(self, width: int = 8, depth: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)
        self.inner = Inner(width)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))
        self.pooler = Pooler(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.inner(self.q(x))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.pooler(x.mean(dim=1)))


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
