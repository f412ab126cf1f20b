"""Every distillation term of `Distill` (MoMA's comparison baselines) as one object with hooks.

A term wraps one loss of `histodistill.losses` with what the official code (trinhvg/MoMA, which follows
RepDistiller) feeds it, and says through its hooks what `Distill` must give it:

- what it needs from the forward pass: ``layers`` (a default pyramid slice of intermediate maps; None: the
  pooled feature and final map only), ``needs_index`` (the batch's sample indices),
  ``needs_teacher_classifier``;
- ``__init__`` builds its trainable adapters from the student's and teacher's layer shapes, and `setup` what
  depends on the training data (CRD's memory: the number of samples; SemCKD's attention: the batch size);
- `loss` (and, for AB, FT and FSP, a pre-training stage: ``init_stage`` and `init_loss`);
- `logits`, for a term that replaces the student's classifier (SimKD).

All terms are configured the same way: ``feature`` (the name in `ZOO`), ``w_feature``, ``feature_options``
(the term's own options, checked here), ``student_layers`` / ``teacher_layers``. Layers are pyramid positions
(`histodistill.models.intermediates`); each term has a default slice of the pyramid (RepDistiller's
``feat[1:-1]`` is ``[1:]`` here: every stage after the stem), which ``student_layers`` / ``teacher_layers``
override.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from histodistill.errors import UserError
from histodistill.losses.activation_boundary import ABConnectors
from histodistill.losses.attention_transfer import at_loss
from histodistill.losses.correlation_congruence import cc_loss
from histodistill.losses.crd import CRDLoss
from histodistill.losses.factor_transfer import Paraphraser, ft_loss, translator
from histodistill.losses.fsp import fsp_loss
from histodistill.losses.hint import HintLoss
from histodistill.losses.nst import nst_loss
from histodistill.losses.pkt import pkt_loss
from histodistill.losses.rkd import rkd_loss
from histodistill.losses.semckd import SemCKDLoss
from histodistill.losses.similarity_preserving import sp_loss
from histodistill.losses.simkd import SimKDProjector, simkd_loss
from histodistill.losses.srrl import SRRLLoss
from histodistill.losses.vid import VIDLoss
from histodistill.models.backbones import Backbone
from histodistill.models.intermediates import (
    LayerFeatures,
    layer_channels,
    layer_sizes,
    pyramid,
    resolve_layers,
)


@dataclass
class TermInputs:
    """What a term is computed from (teacher side already detached)."""

    student: LayerFeatures | None  # None during FT's stage, which trains on the teacher alone
    teacher: LayerFeatures
    teacher_logits: torch.Tensor | None = None
    teacher_classifier: nn.Module | None = None
    index: torch.Tensor | None = None  # (B,) sample indices, given to terms with ``needs_index``


@dataclass
class TrainingData:
    """What `Term.setup` may ask about the training data. Each returns None where the data does not say, and
    is called only by a term that needs it (counting the samples builds the training loader)."""

    batch_size: Callable[[], int | None]
    num_samples: Callable[[], int | None]


class Term(nn.Module):
    """Base of the terms. Subclasses set ``layers`` (default pyramid slice, None: pooled features only),
    ``defaults`` (their ``feature_options``), and implement `loss`; a term with a pre-training stage
    sets ``init_stage`` and implements `init_loss`."""

    layers: ClassVar[slice | None] = None
    # Student and teacher layers are compared one to one (SemCKD's attention pairs each student layer with
    # all).
    pairs_layers: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {}
    init_stage: ClassVar[bool] = False
    stage_needs_student: ClassVar[bool] = True
    # RepDistiller's init stage runs the student in eval mode (BatchNorm on running statistics) while it
    # trains.
    stage_student_eval: ClassVar[bool] = False
    needs_teacher_classifier: ClassVar[bool] = False
    needs_index: ClassVar[bool] = False

    def __init__(
        self,
        student: Backbone,
        teacher: Backbone,
        student_layers: list[int],
        teacher_layers: list[int],
        options: dict[str, Any],
    ) -> None:
        super().__init__()
        self.options = {**self.defaults, **options}
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        self.student_channels = layer_channels(student, student_layers)
        self.teacher_channels = layer_channels(teacher, teacher_layers)
        self.student_sizes, self.teacher_sizes = (
            layer_sizes(student, student_layers),
            layer_sizes(teacher, teacher_layers),
        )

    def setup(self, data: TrainingData) -> None:
        """Build what depends on the training data, before training starts (nothing, for most terms)."""

    def loss(self, inputs: TermInputs) -> torch.Tensor:
        raise NotImplementedError

    def init_loss(self, inputs: TermInputs) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, student: LayerFeatures, teacher_classifier: nn.Module | None) -> torch.Tensor | None:
        """The student's logits (B, num_classes) where the term replaces its classifier; None: the
        classifier's."""
        return None

    def pairs(self, inputs: TermInputs):
        return zip(inputs.student.maps, inputs.teacher.maps, strict=True)


class Hint(Term):
    """FitNet's hint on the pooled feature (`HintLoss`: ConvReg then MSE)."""

    def __init__(self, student, teacher, student_layers, teacher_layers, options):
        super().__init__(student, teacher, student_layers, teacher_layers, options)
        self.criterion = HintLoss(student.num_features, teacher.num_features)

    def loss(self, inputs):
        return self.criterion(inputs.student.pooled, inputs.teacher.pooled)


class CRD(Term):
    """CRD on the pooled features (`CRDLoss`). Its memory holds one row per training sample, so it is built
    once the data size is known: the ``num_samples`` option, else the training set at `setup`."""

    defaults = {"feat_dim": 128, "nce_k": 16384, "temperature": 0.07, "momentum": 0.5, "num_samples": None}
    needs_index = True

    def __init__(self, student, teacher, student_layers, teacher_layers, options):
        super().__init__(student, teacher, student_layers, teacher_layers, options)
        self.dims = (student.num_features, teacher.num_features)
        self.criterion: CRDLoss | None = None
        if self.options["num_samples"] is not None:
            self.build(int(self.options["num_samples"]))

    def build(self, num_samples: int) -> None:
        options = {key: value for key, value in self.options.items() if key != "num_samples"}
        self.criterion = CRDLoss(*self.dims, num_samples, **options)

    def setup(self, data):
        if self.criterion is not None:
            return
        num_samples = data.num_samples()
        if num_samples is None:
            raise UserError(
                "feature: crd needs the index of every training sample: wrap data.init_args.train in "
                "histodistill.data.indexed_dataset.IndexedDataset (see configs/kd/tiny_crd.yaml), "
                "or give model.init_args.feature_options.num_samples when training without a data module"
            )
        self.build(num_samples)

    def loss(self, inputs):
        return self.criterion(inputs.student.pooled, inputs.teacher.pooled, inputs.index)


class AT(Term):
    layers, defaults = slice(1, None), {"p": 2.0}

    def loss(self, inputs):
        return torch.stack([at_loss(s, t, self.options["p"]) for s, t in self.pairs(inputs)]).sum()


class SP(Term):
    layers = slice(-1, None)

    def loss(self, inputs):
        return torch.stack([sp_loss(s, t) for s, t in self.pairs(inputs)]).sum()


class CC(Term):
    defaults = {"feat_dim": 128, "gamma": 0.4, "order": 2}

    def __init__(self, student, teacher, student_layers, teacher_layers, options):
        super().__init__(student, teacher, student_layers, teacher_layers, options)
        self.embed_student = nn.Linear(student.num_features, self.options["feat_dim"])
        self.embed_teacher = nn.Linear(teacher.num_features, self.options["feat_dim"])

    def loss(self, inputs):
        return cc_loss(
            self.embed_student(inputs.student.pooled),
            self.embed_teacher(inputs.teacher.pooled),
            self.options["gamma"],
            self.options["order"],
        )


class VID(Term):
    layers, defaults = slice(1, None), {"init_variance": 5.0}

    def __init__(self, student, teacher, student_layers, teacher_layers, options):
        super().__init__(student, teacher, student_layers, teacher_layers, options)
        self.per_layer = nn.ModuleList(
            VIDLoss(s, t, t, self.options["init_variance"])
            for s, t in zip(self.student_channels, self.teacher_channels, strict=True)
        )

    def loss(self, inputs):
        return torch.stack(
            [vid(s, t) for vid, (s, t) in zip(self.per_layer, self.pairs(inputs), strict=True)]
        ).sum()


class RKD(Term):
    defaults = {"w_distance": 25.0, "w_angle": 50.0}

    def loss(self, inputs):
        return rkd_loss(
            inputs.student.pooled, inputs.teacher.pooled, self.options["w_distance"], self.options["w_angle"]
        )


class PKT(Term):
    def loss(self, inputs):
        return pkt_loss(inputs.student.pooled, inputs.teacher.pooled)


class NST(Term):
    layers = slice(1, -1)

    def loss(self, inputs):
        return torch.stack([nst_loss(s, t) for s, t in self.pairs(inputs)]).sum()


class AB(Term):
    layers, defaults, init_stage = slice(1, None), {"margin": 1.0, "w_init": 3e-3}, True
    stage_student_eval = True

    def __init__(self, student, teacher, student_layers, teacher_layers, options):
        super().__init__(student, teacher, student_layers, teacher_layers, options)
        # RepDistiller's Connector: no connector where channels and map size already agree.
        student = list(zip(self.student_channels, self.student_sizes, strict=True))
        teacher = list(zip(self.teacher_channels, self.teacher_sizes, strict=True))
        same = [s == t for s, t in zip(student, teacher, strict=True)]
        self.connectors = ABConnectors(
            self.student_channels, self.teacher_channels, self.options["margin"], same
        )

    def loss(self, inputs):
        return self.connectors(inputs.student.maps, inputs.teacher.maps)

    def init_loss(self, inputs):
        return self.options["w_init"] * self.loss(inputs)


class FT(Term):
    layers, defaults, init_stage = (
        slice(-1, None),
        {"rate": 0.5, "p": 1, "w_init": 1.0, "paraphraser_bn": False},
        True,
    )
    stage_needs_student = False

    def __init__(self, student, teacher, student_layers, teacher_layers, options):
        super().__init__(student, teacher, student_layers, teacher_layers, options)
        if len(student_layers) != 1:
            raise UserError(
                f"feature: ft uses one layer pair, got student_layers of length {len(student_layers)}"
            )
        self.paraphraser = Paraphraser(
            self.teacher_channels[0], self.options["rate"], self.options["paraphraser_bn"]
        )
        self.translator = translator(self.student_channels[0], self.paraphraser.factor_channels)

    def loss(self, inputs):
        # After its stage the paraphraser is fixed (eval mode, no gradient), as in the paper.
        self.paraphraser.eval()
        with torch.no_grad():
            teacher_factor = self.paraphraser.encoder(inputs.teacher.maps[0])
        return ft_loss(self.translator(inputs.student.maps[0]), teacher_factor, self.options["p"])

    def init_loss(self, inputs):
        self.paraphraser.train()
        return self.options["w_init"] * self.paraphraser.reconstruction_loss(inputs.teacher.maps[0])


class FSP(Term):
    layers, defaults, init_stage = slice(0, None), {"w_init": 1.0}, True
    stage_student_eval = True

    def __init__(self, student, teacher, student_layers, teacher_layers, options):
        super().__init__(student, teacher, student_layers, teacher_layers, options)
        if self.student_channels != self.teacher_channels:
            raise UserError(
                "feature: fsp compares C_i × C_(i+1) matrices, so student and teacher layers need the same "
                f"channels; got student {self.student_channels} and teacher {self.teacher_channels}. Choose "
                "layers with equal channels (model.init_args.student_layers / teacher_layers) or a method "
                "that allows different widths (at, nst, vid, ab, semckd)"
            )

    def loss(self, inputs):
        return fsp_loss(inputs.student.maps, inputs.teacher.maps)

    def init_loss(self, inputs):
        return self.options["w_init"] * self.loss(inputs)


class SemCKD(Term):
    layers, defaults, pairs_layers = slice(1, None), {"soft": 1.0, "batch_size": None}, False

    def __init__(self, student, teacher, student_layers, teacher_layers, options):
        super().__init__(student, teacher, student_layers, teacher_layers, options)
        self.criterion: SemCKDLoss | None = None
        if self.options["batch_size"] is not None:
            self.build(int(self.options["batch_size"]))

    def build(self, batch_size: int) -> None:
        """The attention embeds a whole row of the batch similarity, so it is built once the batch size is
        known."""
        self.criterion = SemCKDLoss(
            self.student_channels, self.teacher_channels, batch_size, self.options["soft"]
        )

    def setup(self, data):
        if self.criterion is not None:
            return
        batch_size = data.batch_size()
        if batch_size is None:
            raise UserError(
                "feature: semckd needs the batch size before training: use a data module with "
                "batch_size, or give model.init_args.feature_options.batch_size"
            )
        self.build(int(batch_size))

    def loss(self, inputs):
        size = inputs.student.pooled.shape[0]
        if size != self.criterion.batch_size:
            raise UserError(
                f"feature: semckd was built for batches of {self.criterion.batch_size} but got {size}: "
                "keep data.init_args.batch_size fixed (the training loader drops the last short batch)"
            )
        return self.criterion(inputs.student.maps, inputs.teacher.maps)


class SimKD(Term):
    defaults, needs_teacher_classifier = {"factor": 2}, True

    def __init__(self, student, teacher, student_layers, teacher_layers, options):
        super().__init__(student, teacher, student_layers, teacher_layers, options)
        for role, backbone in (("student", student), ("teacher", teacher)):
            if backbone.feature_kind != "map":
                raise UserError(
                    "feature: simkd projects the student's last feature map onto the teacher's and reuses "
                    f"the teacher's classifier on it, so both need a CNN feature map; the {role} "
                    f"{backbone.spec.name} is a token model. Use a CNN, or a method on pooled features or "
                    "maps (rkd, pkt, cc, sp, at, vid...)"
                )
        self.projector = SimKDProjector(student.num_features, teacher.num_features, self.options["factor"])

    def loss(self, inputs):
        return simkd_loss(self.projector(inputs.student.final), inputs.teacher.final)

    def logits(self, student, teacher_classifier):
        """The student predicts through the teacher's classifier, on its projected final map."""
        return self.projector.predict(student.final, teacher_classifier)


class SRRL(Term):
    needs_teacher_classifier = True

    def __init__(self, student, teacher, student_layers, teacher_layers, options):
        super().__init__(student, teacher, student_layers, teacher_layers, options)
        self.criterion = SRRLLoss(student.num_features, teacher.num_features)

    def loss(self, inputs):
        return self.criterion(
            inputs.student.pooled, inputs.teacher.pooled, inputs.teacher_classifier, inputs.teacher_logits
        )


ZOO: dict[str, type[Term]] = {
    "hint": Hint,
    "crd": CRD,
    "at": AT,
    "sp": SP,
    "cc": CC,
    "vid": VID,
    "rkd": RKD,
    "pkt": PKT,
    "ab": AB,
    "ft": FT,
    "fsp": FSP,
    "nst": NST,
    "semckd": SemCKD,
    "simkd": SimKD,
    "srrl": SRRL,
}


def build_term(
    name: str,
    student: Backbone,
    teacher: Backbone,
    student_layers: list[int] | None,
    teacher_layers: list[int] | None,
    options: dict[str, Any] | None,
) -> Term:
    """The term ``name`` for this pair, with its layers resolved and its options checked."""
    cls = ZOO[name]
    options = dict(options or {})
    unknown = sorted(set(options) - set(cls.defaults))
    if unknown:
        allowed = ", ".join(sorted(cls.defaults)) or "none"
        raise UserError(
            f"model.init_args.feature_options {unknown} are not options of feature: {name} (its options: "
            f"{allowed})"
        )
    s_ids, t_ids = [], []
    if cls.layers is not None:
        s_pos = student_layers if student_layers is not None else default_positions(student, cls.layers)
        t_pos = teacher_layers if teacher_layers is not None else default_positions(teacher, cls.layers)
        if cls.pairs_layers and len(s_pos) != len(t_pos):
            raise UserError(
                f"feature: {name} pairs student and teacher layers one to one, but student_layers has "
                f"{len(s_pos)} ({s_pos}) and teacher_layers {len(t_pos)} ({t_pos}): give both the same length"
            )
        s_ids = resolve_layers(student, s_pos, "model.init_args.student_layers")
        t_ids = resolve_layers(teacher, t_pos, "model.init_args.teacher_layers")
    return cls(student, teacher, s_ids, t_ids, options)


def default_positions(backbone: Backbone, layers: slice) -> list[int]:
    """The term's default pyramid slice as explicit positions."""
    return list(range(len(pyramid(backbone))))[layers]
