"""CLAM: clustering-constrained attention MIL (Lu et al., "Data-efficient and weakly supervised computational
pathology on whole-slide images", Nature Biomedical Engineering 2021; github.com/mahmoodlab/CLAM,
``models/model_clam.py`` and ``utils/core_utils.py``), single-branch (`CLAMSB`) and multi-branch (`CLAMMB`).

The model: Linear(D, 512) + ReLU + dropout embeds each tile (CLAM's ``size_arg="small"``: [D, 512, 256]);
gated attention (tanh and sigmoid branches of width 256, each followed by dropout, their product mapped to
K scores per tile) softmaxed over the bag; K = 1 branch for SB, one per class for MB. SB classifies the
attention-pooled bag with one Linear(512, C); MB pools once per class and scores class c from its own
pooling with its own Linear(512, 1). Each class c also has an instance classifier Linear(512, 2).

The objective (`clam_loss`): ``bag_weight`` × bag cross-entropy + (1 - ``bag_weight``) × the instance
clustering loss (`clam_instance_loss`): for a bag of class y, the ``k_sample`` tiles with the highest
attention (of branch y for MB) are pseudo-labelled 1 and the ``k_sample`` lowest 0 for class y's instance
classifier, cross-entropy averaged over those 2k tiles. With ``subtyping`` (CLAM's flag for subtype tasks,
where every class is tumour), every other class c also gets its branch's top-k tiles pushed to 0 by its
classifier (cross-entropy over k tiles), and the sum over the C classifiers is divided by C.

Defaults are CLAM's: dropout 0.25, ``k_sample`` 8 (``--B``), ``bag_weight`` 0.7, ``subtyping`` False,
cross-entropy instance loss. Deviations (docs/mil.md):
- CLAM's smooth top-1 SVM instance loss (``--inst_loss svm``, from the unpackaged ``topk`` repository) is
  left out: no maintained library implements it.
- A bag with fewer than ``k_sample`` tiles uses all its tiles as top-k and as bottom-k (CLAM's ``topk``
  raises there); padded tiles are never picked.
- The K per-class bag classifiers (MB) and the C instance classifiers are each held as one Linear layer
  whose rows are the classes: the same functions and initialisation as CLAM's lists of layers, one matrix
  product instead of a Python loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.errors import ConfigError
from histodistill.models.mil_base import MILHead, MILOutput, bag_cross_entropy, full_mask, masked_softmax


class GatedAttentionBranches(nn.Module):
    """CLAM's ``Attn_Net_Gated``: ``c(tanh(a h) ⊙ sigm(b h))`` with dropout after tanh and sigmoid;
    h (B, N, L) -> raw attention scores (B, N, K), K branches."""

    def __init__(self, dim: int, attention_dim: int, branches: int, dropout: float) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(dim, attention_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.c = nn.Linear(attention_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(h) * self.b(h))


class CLAM(MILHead):
    """CLAM-SB (``multi_branch`` False) or CLAM-MB; see the module docstring. ``scores`` are the attention
    over the bag (SB), or of the predicted class's branch (MB), summing to 1 over real tiles."""

    multi_branch = False

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool = False,
    ) -> None:
        super().__init__()
        if k_sample < 1 or not 0 <= bag_weight <= 1:
            raise ConfigError(
                f"CLAM needs k_sample >= 1 and 0 <= bag_weight <= 1, got {k_sample}, {bag_weight}"
            )
        self.num_classes, self.k_sample, self.bag_weight, self.subtyping = (
            num_classes,
            k_sample,
            bag_weight,
            subtyping,
        )
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttentionBranches(
            hidden_dim, attention_dim, num_classes if self.multi_branch else 1, dropout
        )
        # MB: row c of the weight is class c's own Linear(hidden_dim, 1); SB: one Linear(hidden_dim, C).
        self.classifier = nn.Linear(hidden_dim, num_classes)
        self.instance_classifiers = nn.Linear(hidden_dim, 2 * num_classes)  # C Linear(hidden_dim, 2), stacked

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = full_mask(x, mask)
        h = self.embed(x)  # (B, N, L)
        attention = masked_softmax(self.attention(h).transpose(1, 2), mask[:, None])  # (B, K, N)
        pooled = attention @ h  # (B, K, L)
        if self.multi_branch:  # class c from its own pooling: w_c · pooled_c + b_c
            logits = (pooled * self.classifier.weight).sum(-1) + self.classifier.bias  # (B, C)
            branch = logits.argmax(dim=1)
        else:
            logits = self.classifier(pooled[:, 0])  # (B, C)
            branch = torch.zeros_like(logits[:, 0], dtype=torch.long)
        instance_logits = self.instance_classifiers(h).unflatten(-1, (self.num_classes, 2))  # (B, N, C, 2)
        scores = attention[torch.arange(len(x), device=x.device), branch]  # (B, N)
        return MILOutput(logits, scores, attention, instance_logits, mask)

    def loss(self, output: MILOutput, labels: torch.Tensor) -> torch.Tensor:
        return clam_loss(output, labels, self.bag_weight, self.k_sample, self.subtyping)


class CLAMSB(CLAM):
    """CLAM single-branch: one attention over the bag."""


class CLAMMB(CLAM):
    """CLAM multi-branch: one attention branch and one bag classifier per class."""

    multi_branch = True


def clam_instance_loss(
    output: MILOutput, labels: torch.Tensor, k_sample: int = 8, subtyping: bool = False
) -> torch.Tensor:
    """CLAM's instance clustering loss (module docstring), the mean over the B bags.

    ``output.attention`` (B, K, N) with K = 1 (SB: every class uses it) or K = C (MB: class c uses branch
    c); ``output.instance_logits`` (B, N, C, 2); ``output.mask`` (B, N); ``labels`` (B,)."""
    attention, mask = output.attention, output.mask
    logits = output.instance_logits.float()
    batch, branches, length = attention.shape
    k = min(k_sample, length)
    # The j-th pick of a bag is a real tile only while j < its tile count: shorter bags use fewer picks.
    valid = (torch.arange(k, device=mask.device) < mask.sum(1, keepdim=True)).float()  # (B, k)
    top = attention.masked_fill(~mask[:, None], float("-inf")).topk(k, dim=-1).indices  # (B, K, k)
    bottom = attention.masked_fill(~mask[:, None], float("inf")).topk(k, dim=-1, largest=False).indices
    rows = torch.arange(batch, device=mask.device)[:, None]  # (B, 1)
    ones, zeros = (torch.full((batch, k), value, dtype=torch.long, device=mask.device) for value in (1, 0))

    def mean_ce(picked: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of picked logits (B, k, 2) against ``target`` (B, k), summed over the valid picks:
        (B,)."""
        return (F.cross_entropy(picked.transpose(1, 2), target, reduction="none") * valid).sum(1)

    total = torch.zeros(batch, device=mask.device)
    for c in range(logits.shape[2]):
        branch = c if branches > 1 else 0
        # (B, k, 2) each
        top_c, bottom_c = (
            logits[rows, top[:, branch], c],
            logits[rows, bottom[:, branch], c],
        )
        in_class = (mean_ce(top_c, ones) + mean_ce(bottom_c, zeros)) / (2 * valid.sum(1))
        out_of_class = mean_ce(top_c, zeros) / valid.sum(1) if subtyping else torch.zeros_like(in_class)
        total = total + torch.where(labels == c, in_class, out_of_class)
    if subtyping:
        total = total / logits.shape[2]
    return total.mean()


def clam_loss(
    output: MILOutput,
    labels: torch.Tensor,
    bag_weight: float = 0.7,
    k_sample: int = 8,
    subtyping: bool = False,
) -> torch.Tensor:
    """CLAM's training objective: ``bag_weight`` × bag cross-entropy + (1 - ``bag_weight``) ×
    `clam_instance_loss`."""
    instance = clam_instance_loss(output, labels, k_sample, subtyping)
    return bag_weight * bag_cross_entropy(output, labels) + (1 - bag_weight) * instance
