"""Muon for convolution filters, Nesterov SGD for the other parameters, in one optimiser.

Muon (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/) replaces a weight matrix's Nesterov
momentum update by the nearest semi-orthogonal matrix (a Newton-Schulz iteration), so that every direction of the
update moves at the same rate. airbench94_muon trains its CIFAR-10 net this way (Muon for the filters, Nesterov
SGD for the norms and the classifier) and reaches 94% in 8 epochs instead of 10. One optimiser object keeps
checkpoints, resuming and the learning-rate schedule as they are for the other optimisers.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig

# Jordan's quintic Newton-Schulz coefficients (torch.optim.Muon's defaults)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(update: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T for the SVD U S V^T of ``update``; a filter bank [out, in, kh, kw] is taken as the
    matrix [out, in*kh*kw] (as airbench does).

    torch.optim.Muon's own iteration takes 2-D parameters only and runs in bf16, which CPUs without native bf16
    emulate slowly; the matrices of a convolutional net are small, so this one stays in fp32.
    """
    a, b, c = NS_COEFFICIENTS
    x = update.reshape(len(update), -1).float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # Frobenius >= spectral norm, so the spectral norm is <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    if tall:
        x = x.T
    return x.reshape(update.shape).to(update.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum for every group; a group with ``orthogonal=True`` steps along its update orthogonalised.

    The other groups step as ``torch.optim.SGD(nesterov=True)`` (weight decay added to the gradient). An
    orthogonal group's weight decay is decoupled (the weights shrink by ``lr * weight_decay``), as in
    ``torch.optim.Muon``, since its step no longer scales with the gradient. Its momentum buffer is SGD's sum of
    past gradients; ``torch.optim.Muon`` keeps their average, which orthogonalisation makes the same step.

    An orthogonal group with ``normalize=True`` instead rescales each weight to Frobenius norm sqrt(rows) before
    its step and takes no weight decay (airbench94_muon): the step then turns a filter bank by about the same
    angle all through training, which only makes sense for weights whose scale a norm layer removes.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "orthogonal": False, "normalize": False, "ns_steps": ns_steps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad, momentum, decay = p.grad, group["momentum"], group["weight_decay"]
        if decay and not group["orthogonal"]:
            grad = grad.add(p, alpha=decay)
        buf = self.state[p].get("momentum_buffer")
        if buf is None:
            buf = self.state[p]["momentum_buffer"] = grad.clone()
        else:
            buf.mul_(momentum).add_(grad)
        update = grad.add(buf, alpha=momentum)
        if group["orthogonal"]:
            update = orthogonalize(update, group["ns_steps"])
            if group.get("normalize"):  # .get: optimiser states saved before this option lack the key
                p.mul_(len(p) ** 0.5 / p.norm().clamp(min=1e-12))
            elif decay:
                p.mul_(1 - group["lr"] * decay)
        p.add_(update, alpha=-group["lr"])


def muon_groups(groups: list[dict], config: TrainConfig) -> list[dict]:
    """`finetune.param_groups`'s groups with each group's convolution filters (4-D weights) moved to a group of
    their own, orthogonal, at ``config.muon_lr`` and ``config.muon_momentum`` (``lr_mult`` scaled to match, so
    the schedule moves both rates together).

    The other parameters (the classifier's matrix, biases, norms) keep their group and ``config.momentum``. The
    first group stays a non-orthogonal one: the training log reports its learning rate.
    """
    out: list[dict] = []
    for group in groups:
        filters = [p for p in group["params"] if p.ndim == 4]
        out.append({**group, "params": [p for p in group["params"] if p.ndim != 4]})
        if filters:
            mult = group["lr_mult"] * config.muon_lr / config.lr
            out.append({**group, "params": filters, "orthogonal": True, "lr_mult": mult,
                        "lr": config.lr * mult, "momentum": config.muon_momentum, "normalize": config.muon_norm})
    return out
