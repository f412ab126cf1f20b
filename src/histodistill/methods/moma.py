"""MoMA (Vuong & Kwak 2024): momentum contrastive distillation through multi-head attention.

Loss = w_ce · CE + w_kd · KD(T) + w_nce · InfoNCE, where for one augmented view of each image:

    q  = attn_q(embed_q(student feature))                 query   (B, 512)
    k  = attn_k(embed_k(teacher feature))                 positive key (B, 512)
    queue ← attn_k(embed_k(teacher features of every rank))   after the step (FIFO, K = 16384)
    InfoNCE(q, k, queue, τ = 0.15)

``teacher_update: ema`` (the official design) makes the teacher the momentum encoder of the student:
each step teacher ← α·teacher + (1 − α)·student on parameters (α = 0.999; BN buffers are the
teacher's own), likewise the teacher classifier and embed_k. In the official loop's order: the KD
logits come from the teacher before this step's update, the key from the teacher after it (two
teacher forwards). ``frozen`` keeps the teacher fixed (any architecture, e.g. a ViT foundation model
teaching a ResNet-18), and embed_k with it: a fixed random projection to the embedding. The official code
never trains the key side by gradient; a key head trained through the positive logit drifts away from the
queued keys, which turns the InfoNCE into telling new keys from stale ones (it reached exactly 0 within 20
steps in the demo, docs/moma.md). In both modes attn_k is the EMA of attn_q (our deviation from the official
code, where the key-side attention modules never train; see docs/moma.md).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch

from histodistill.errors import ConfigError
from histodistill.losses.infonce import MoCoQueue, concat_all_gather, infonce_loss
from histodistill.methods.distill import TeacherStudentMethod, freeze
from histodistill.models.batch_attention import BatchAttention
from histodistill.models.intermediates import layer_channels, resolve_layers
from histodistill.models.projection import ProjectionHead
from histodistill.optim.ema import ema_update


class MoMA(TeacherStudentMethod):
    def __init__(
        self,
        backbone: str,
        num_classes: int,
        teacher: str,
        teacher_update: Literal["ema", "frozen"] = "ema",
        momentum: float = 0.999,
        w_nce: float = 1.0,
        nce_temperature: float = 0.15,
        queue_size: int = 16384,
        embed_dim: int = 512,
        attention_heads: int = 4,
        teacher_layer: int | None = None,
        **kwargs: Any,
    ) -> None:
        """``teacher_layer``: the pyramid position (`histodistill.models.intermediates`; negative counts from
        the end) whose map, averaged over space, is the frozen teacher's feature for the key; None (default,
        the official code's) is the pooled final feature. KD logits always come from the pooled feature."""
        super().__init__(backbone=backbone, num_classes=num_classes, teacher=teacher, **kwargs)
        if not 0 <= momentum < 1:
            raise ConfigError(f"`momentum={momentum}`: must be in [0, 1)")
        self.teacher_update, self.momentum = teacher_update, momentum
        self.w_nce, self.nce_temperature = w_nce, nce_temperature
        if teacher_update == "ema":
            self.check_same_architecture()
            if teacher_layer is not None:
                raise ConfigError(
                    f"`teacher_layer={teacher_layer}` picks a layer of a frozen teacher, but the EMA "
                    "teacher's key head follows the student's pooled feature: set `teacher_update='frozen'` "
                    "or leave `teacher_layer` unset"
                )
        self.teacher_layer = (
            None
            if teacher_layer is None
            else resolve_layers(self.teacher, [teacher_layer], "teacher_layer")[0]
        )
        key_dim = (
            self.teacher.num_features
            if self.teacher_layer is None
            else layer_channels(self.teacher, [self.teacher_layer])[0]
        )
        self.embed_q = ProjectionHead(self.backbone.num_features, embed_dim)
        self.embed_k = ProjectionHead(key_dim, embed_dim)
        self.attn_q = BatchAttention(embed_dim, attention_heads)
        # The MoCo rule for everything on the key side: start as a copy, then follow by EMA.
        self.attn_k = copy.deepcopy(self.attn_q)
        freeze(self.attn_k)
        # ema: embed_k follows embed_q; frozen: it stays as initialised (the module docstring says why).
        freeze(self.embed_k)
        self.queue = MoCoQueue(embed_dim, queue_size)

    def check_same_architecture(self) -> None:
        student = {name: p.shape for name, p in self.backbone.model.named_parameters()}
        teacher = {name: p.shape for name, p in self.teacher.model.named_parameters()}
        if student != teacher:
            raise ConfigError(
                "`teacher_update='ema'` makes the teacher the moving average of the student, so both need "
                f"the same architecture, but teacher {self.teacher.spec.name!r} and student "
                f"{self.backbone.spec.name!r} differ: set `teacher_update='frozen'` for a different teacher"
            )
        if (
            self.teacher_classifier is not None
            and self.teacher_classifier.weight.shape != self.classifier.weight.shape
        ):
            raise ConfigError(
                "`teacher_update='ema'` needs the teacher classifier to match the student's "
                f"{tuple(self.classifier.weight.shape)}; got {tuple(self.teacher_classifier.weight.shape)}"
            )

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Key side ← EMA of query side, once per training step, between the KD-logit and the key forward."""
        ema_update(self.attn_k, self.attn_q, self.momentum)
        if self.teacher_update == "ema":
            ema_update(self.teacher.model, self.backbone.model, self.momentum)
            ema_update(self.embed_k, self.embed_q, self.momentum)
            if self.teacher_classifier is not None:
                ema_update(self.teacher_classifier, self.classifier, self.momentum)

    def teacher_layer_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images prepared for the student -> the frozen teacher's ``teacher_layer`` map averaged over space
        (B, C) and its logits from the pooled feature (or None); the teacher in eval mode."""
        layers, logits = self.teacher_layers_forward(images, [self.teacher_layer])
        return layers.maps[0].mean(dim=(2, 3)), logits  # (B, C, H, W) -> (B, C)

    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch[0], batch[1]
        ema = self.teacher_update == "ema"
        features, logits = self.student_forward(images)  # (B, D_s), (B, C)
        # trinhvg/MoMA loops_moma.py: KD logits from the teacher as it was, then the EMA update, then the key
        # forward (BN on batch statistics) from the updated teacher.
        if self.teacher_layer is None:
            teacher_features, teacher_logits = self.teacher_forward(images, batch_statistics=ema)
        else:  # frozen teacher (refused with ema)
            teacher_features, teacher_logits = self.teacher_layer_forward(images)
        self.momentum_update()
        if ema:
            teacher_features, _ = self.teacher_forward(images, batch_statistics=True)
        losses = self.supervised_terms(logits, labels, teacher_logits)

        query = self.attn_q(self.embed_q(features))  # (B, E): samples attend to each other
        with torch.no_grad():  # the key side never trains by gradient
            key_embeddings = self.embed_k(teacher_features)  # (B, E)
            key = self.attn_k(key_embeddings)  # (B, E)
        # The queue is read before this batch enters it (a clone: enqueue writes in place).
        losses["nce"] = infonce_loss(query, key, self.queue.queue.clone(), self.nce_temperature)
        with torch.no_grad():
            # Every rank's keys, attended as one sequence, enter every rank's queue.
            self.queue.enqueue(self.attn_k(concat_all_gather(key_embeddings)))  # (world · B, E)
        losses["loss"] = losses["loss"] + self.w_nce * losses["nce"]
        return losses
