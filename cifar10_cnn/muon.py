"""Muon (Keller Jordan, 2024; the optimizer of airbench94_muon), written for this project.

For a convolution's filter bank, momentum SGD's update is replaced by the nearest (semi-)orthogonal
matrix to it: every direction the gradient points in gets the same step, so rarely-seen directions
learn as fast as dominant ones. The weights are scaled back to a fixed norm before each step, so the
learning rate is the step's size relative to the weights (no weight decay is needed for the filters).
Every other parameter (batch-norm shifts, the whitening bias, the linear head) takes a plain SGD step
with Nesterov momentum and weight decay, exactly as torch.optim.SGD would.
"""

from __future__ import annotations

import torch

# Newton-Schulz quintic coefficients of airbench94_muon / modded-nanogpt: chosen for the steepest slope at
# zero rather than convergence, so 3 iterations push every singular value into about [0.5, 1.5].
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
NEWTON_SCHULZ_STEPS = 3


def orthogonalize(g: torch.Tensor, steps: int = NEWTON_SCHULZ_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """A matrix with the singular vectors of the 2-D `g` and singular values near 1 (float32 on any device)."""
    a, b, c = NEWTON_SCHULZ
    x = g.float() / (g.norm() + eps)  # every singular value <= 1 before iterating
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked `orthogonal=True` (4-D conv weights), Nesterov SGD for the others.

    Group options: lr, momentum, weight_decay (SGD groups only), orthogonal.
    """

    def __init__(self, groups: list[dict], momentum: float):
        super().__init__(groups, {"lr": 0.0, "momentum": momentum, "weight_decay": 0.0, "orthogonal": False})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["orthogonal"] and group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"].mul_(momentum).add_(grad)
                update = grad.add(buf, alpha=momentum)  # Nesterov
                if group["orthogonal"]:
                    p.mul_(len(p) ** 0.5 / p.norm())  # each filter bank back to norm sqrt(out_channels)
                    update = orthogonalize(update.reshape(len(p), -1)).view_as(p)
                p.add_(update, alpha=-lr)
