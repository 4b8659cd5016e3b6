"""Contrastive and multi-label losses: InfoNCE, the Dual Softmax Loss (CAMoE), ASL (MlTr era)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric in-batch InfoNCE on a (B, B) logit matrix whose diagonal holds the positives."""
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def dual_softmax_loss(logits: torch.Tensor, temperature: float = 1000.0,
                      reduction: str = "mean") -> torch.Tensor:
    """DSL (arXiv 2109.04290): revise S by a prior ``P = softmax(S / T, dim=0)`` (down each column)
    to ``S' = S * P * B``, then cross-entropy on the rows with the diagonal as target; symmetric
    over S and its transpose. The gradient flows through the prior. As T → ∞, P → 1/B and the
    loss equals InfoNCE. ``reduction="none"``: the loss of each pair (its row's and its column's
    cross-entropy, averaged), in the order of the diagonal."""
    b = len(logits)
    target = torch.arange(b, device=logits.device)

    def one_side(s):
        prior = torch.softmax(s / temperature, dim=0)
        return F.cross_entropy(s * prior * b, target, reduction=reduction)

    return 0.5 * (one_side(logits) + one_side(logits.T))


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_pos: float = 0.0,
                    gamma_neg: float = 4.0, margin: float = 0.05, eps: float = 1e-8
                    ) -> torch.Tensor:
    """ASL for multi-label classification:
    ``-(y (1-p)^g+ log p + (1-y) p_m^g- log(1-p_m))``, ``p_m = max(p - m, 0)``; BCE when
    g+ = g- = m = 0. Mean over the batch, summed over labels."""
    p = torch.sigmoid(logits)
    p_m = (p - margin).clamp(min=0) if margin > 0 else p
    pos = targets * (1 - p).pow(gamma_pos) * torch.log(p.clamp(min=eps))
    neg = (1 - targets) * p_m.pow(gamma_neg) * torch.log((1 - p_m).clamp(min=eps))
    return -(pos + neg).sum(1).mean()
