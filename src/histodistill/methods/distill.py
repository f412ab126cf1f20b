"""Student + teacher machinery shared by every distillation method, and the classic baselines.

`TeacherStudentMethod` is a `ClassificationMethod` (the student: backbone + classifier, trained with
cross-entropy and validated like any supervised run) that also holds a teacher backbone and, when
knowledge distillation is on, the teacher's classifier. `Distill` adds one pluggable feature term to
``w_ce · CE + w_kd · KD``: none (Hinton KD) or one of the terms of `histodistill.methods.kd_zoo` (``hint``:
FitNet on the pooled feature, ``crd``: contrastive representation distillation, AT, SP, CC, VID, RKD, PKT, AB,
FT, FSP, NST, SemCKD, SimKD, SRRL), each an object whose hooks say what it needs. MoMA
(`histodistill.methods.moma`) builds on the same base.

Where the student starts (``student_init``): ``teacher`` copies the teacher's backbone into the
student, and its classifier too when the teacher checkpoint has one for the same classes, as MoMA's
``load_model`` does with ``--std_pre PANDA --tec_pre PANDA`` (step 0: student = teacher);
``imagenet`` is the backbone's published weights; ``random`` a fresh initialisation. The default is
``teacher`` whenever the two architectures match, else whatever ``pretrained`` / ``weights`` say.

Where the teacher's logits come from: a teacher given as one of our checkpoints (``.ckpt`` of a
supervised run) carries its classifier; otherwise ``teacher_classifier_from_checkpoint`` names the
supervised checkpoint whose ``classifier.*`` weights to use. Without either, KD cannot run and the
recipe must set ``w_kd: 0`` (the different-task scenario).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from histodistill.data.indexed_dataset import IndexedDataset
from histodistill.errors import ConfigError, UserError
from histodistill.losses.kd import kd_loss
from histodistill.methods.classification import ClassificationMethod
from histodistill.methods.kd_zoo import Term, TermInputs, TrainingData, build_term
from histodistill.models.backbones import Backbone, Preprocess, create_backbone
from histodistill.models.intermediates import LayerFeatures, forward_layers
from histodistill.models.weights import read_checkpoint
from histodistill.optim.optimizer import OptimConfig

# Prefix of the classifier's weights in a ClassificationMethod checkpoint's state dict.
CLASSIFIER_PREFIX = "classifier."


class TeacherStudentMethod(ClassificationMethod):
    """A student classifier plus a teacher (no gradient, outside the optimiser and DDP's gradient sync).

    Teacher arguments mirror the student's: ``teacher`` is anything `create_backbone` accepts (a timm
    or registered name, an ``hf-hub:`` id, one of our ``.ckpt`` files, an exported directory), with
    ``teacher_weights`` an optional local weights file and ``teacher_kwargs`` timm arguments. The
    teacher sees the student's batch re-normalised with its own mean/std and resized to its input size.
    ``classifier_dropout`` drops pooled features on their way to the student's classifier only (`classify`).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        teacher: str,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = True,
        weights: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        teacher_pretrained: bool = True,
        teacher_weights: str | None = None,
        teacher_classifier_from_checkpoint: str | None = None,
        student_init: Literal["teacher", "imagenet", "random"] | None = None,
        classifier_dropout: float = 0.0,
        w_ce: float = 1.0,
        w_kd: float = 1.0,
        temperature: float = 4.0,
        optim: OptimConfig | None = None,
    ) -> None:
        if student_init is not None and student_init not in STUDENT_INITS:
            raise ConfigError(
                f"`student_init={student_init!r}`: must be one of {', '.join(STUDENT_INITS)} (or unset)"
            )
        # Built randomly first: whether the student starts as the teacher is known only once both exist,
        # and a student that does never needs its published weights.
        super().__init__(
            backbone=backbone,
            backbone_kwargs=backbone_kwargs,
            num_classes=num_classes,
            pretrained=False,
            optim=optim,
        )
        if not 0 <= classifier_dropout < 1:
            raise ConfigError(f"`classifier_dropout={classifier_dropout}`: must be in [0, 1)")
        self.classifier_dropout = classifier_dropout
        self.w_ce, self.w_kd, self.temperature = w_ce, w_kd, temperature
        self.teacher: Backbone = create_backbone(
            teacher, pretrained=teacher_pretrained, weights=teacher_weights, **(teacher_kwargs or {})
        )
        self.teacher_classifier: nn.Linear | None = None
        if w_kd > 0:
            self.teacher_classifier = load_teacher_classifier(
                teacher, teacher_classifier_from_checkpoint, self.teacher.num_features, num_classes
            )
        freeze(self.teacher)
        if self.teacher_classifier is not None:
            freeze(self.teacher_classifier)
        same_architecture = state_shapes(self.backbone.model) == state_shapes(self.teacher.model)
        if student_init == "teacher" and not same_architecture:
            raise ConfigError(
                f"`student_init='teacher'` copies the teacher into the student, but teacher "
                f"{self.teacher.spec.name!r} and student {self.backbone.spec.name!r} differ in "
                "architecture: set `student_init='imagenet'` or `student_init='random'`"
            )
        own_weights = pretrained or weights is not None
        self.student_init = student_init or (
            "teacher" if same_architecture else "imagenet" if own_weights else "random"
        )
        if student_init is None:
            rank_zero_info(
                f"student_init: {self.student_init} (the default: teacher when the architectures match, "
                "else the student's own pretrained/weights setting)"
            )
        if self.student_init == "teacher":
            self.start_from_teacher(teacher, teacher_classifier_from_checkpoint)
        elif (
            self.student_init == "imagenet"
        ):  # the published weights, from the hub or the local `weights` file
            self.backbone = create_backbone(
                backbone, pretrained=weights is None, weights=weights, **(backbone_kwargs or {})
            )

    def start_from_teacher(self, teacher: str, classifier_source: str | None) -> None:
        """Student ← teacher (weights and BN buffers); classifier too when the teacher has one for these
        classes.

        Otherwise the classifier keeps its fresh initialisation, as MoMA re-initialises only the
        classifier when the class counts differ (``load_model(..., strict=False)``).
        """
        self.backbone.model.load_state_dict(self.teacher.model.state_dict())
        classifier = self.teacher_classifier
        if classifier is None:
            state = classifier_state(teacher, classifier_source)
            if state is not None and state["weight"].shape == self.classifier.weight.shape:
                classifier = state
        if classifier is not None:
            self.classifier.load_state_dict(
                classifier if isinstance(classifier, dict) else classifier.state_dict()
            )
        else:
            rank_zero_info(
                f"student_init: teacher: the student starts as the teacher; its {self.num_classes}-class "
                "classifier is freshly initialised (the teacher has none for these classes)"
            )

    # ---- what subclasses use -------------------------------------------------------------------
    def student_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) -> pooled features (B, D_s) and logits (B, num_classes)."""
        features = self.backbone(images)
        return features, self.classify(features)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D_s) -> logits, through dropout while training: MoMA's EfficientNet has it
        inside its classifier (``Dropout(0.2)`` then ``Linear``), so the features the distillation terms see
        are not dropped (timm's ``drop_rate`` would drop them too)."""
        return self.classifier(F.dropout(features, self.classifier_dropout, self.training))

    @torch.no_grad()
    def teacher_forward(
        self, images: torch.Tensor, batch_statistics: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images prepared for the student -> teacher pooled features (B, D_t) and logits (or None).

        ``batch_statistics`` runs the teacher's BatchNorm layers, and only those, in training mode (the
        momentum encoder of MoCo/MoMA normalises with the batch: MoMA's ``set_bn_train``), so dropout and
        drop-path stay off; otherwise the whole teacher is in eval mode, whatever mode Lightning put the
        module in.
        """
        self.teacher.eval()
        if batch_statistics:
            for module in self.teacher.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train()
        features = self.teacher(to_teacher_input(images, self.preprocess, self.teacher.preprocess))
        logits = self.teacher_classifier(features) if self.teacher_classifier is not None else None
        return features, logits

    @torch.no_grad()
    def teacher_layers_forward(
        self, images: torch.Tensor, layers: list[int]
    ) -> tuple[LayerFeatures, torch.Tensor | None]:
        """images prepared for the student -> the teacher's `LayerFeatures` (pooled feature, final map and the
        maps of ``layers``, ``feature_info`` indices) and its logits from the pooled feature (or None); the
        whole teacher in eval mode."""
        self.teacher.eval()
        teacher = forward_layers(
            self.teacher, to_teacher_input(images, self.preprocess, self.teacher.preprocess), layers
        )
        logits = self.teacher_classifier(teacher.pooled) if self.teacher_classifier is not None else None
        return teacher, logits

    def supervised_terms(
        self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None
    ):
        """The weighted CE and KD terms: {"ce", "kd" (when on)} and their weighted sum as "loss"."""
        losses = {"ce": F.cross_entropy(logits, labels)}
        total = self.w_ce * losses["ce"]
        if self.w_kd > 0:
            losses["kd"] = kd_loss(logits, teacher_logits, self.temperature)
            total = total + self.w_kd * losses["kd"]
        losses["loss"] = total
        return losses


FeatureName = Literal[
    "none",
    "hint",
    "crd",
    "at",
    "sp",
    "cc",
    "vid",
    "rkd",
    "pkt",
    "ab",
    "ft",
    "fsp",
    "nst",
    "semckd",
    "simkd",
    "srrl",
]
# Flat CRD arguments of earlier versions -> the crd term's ``feature_options`` keys they now are.
LEGACY_CRD_ARGUMENTS = {
    "crd_feat_dim": "feat_dim",
    "crd_nce_k": "nce_k",
    "crd_temperature": "temperature",
    "crd_momentum": "momentum",
    "num_samples": "num_samples",
}


class Distill(TeacherStudentMethod):
    """The baselines of the MoMA comparison: ``w_ce · CE + w_kd · KD + w_feature · feature term``.

    ``feature: none`` is Hinton KD (T = 4). Every other name is a term of `histodistill.methods.kd_zoo`
    (docs/moma.md lists paper, formula, options and weight of each), configured alike: ``w_feature`` its
    weight (the term is computed only when it is not 0), ``feature_options`` its own options,
    ``student_layers`` / ``teacher_layers`` its layers (pyramid positions of
    `histodistill.models.intermediates`; default: the official choice), and ``init_steps`` the length, in
    training batches, of the pre-training stage of ab, ft and fsp (only the stage's loss trains then; after
    it the objective is CE + KD + w_feature · term).
    ``hint`` is FitNet on the pooled feature (MoMA used w_feature = 100); ``crd`` is CRD (w_feature = 0.8) and
    needs the sample index in every batch: wrap the training dataset in `IndexedDataset`. Vanilla CE is
    `histodistill.methods.supervised.Supervised`.

    ``crd_feat_dim``, ``crd_nce_k``, ``crd_temperature``, ``crd_momentum`` and ``num_samples`` are the flat
    arguments of earlier versions, still read (with a warning) as the crd term's ``feature_options``.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        teacher: str,
        feature: FeatureName = "none",
        w_feature: float = 0.0,
        feature_options: dict[str, Any] | None = None,
        student_layers: list[int] | None = None,
        teacher_layers: list[int] | None = None,
        init_steps: int = 0,
        crd_feat_dim: int | None = None,
        crd_nce_k: int | None = None,
        crd_temperature: float | None = None,
        crd_momentum: float | None = None,
        num_samples: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, teacher=teacher, **kwargs)
        self.feature, self.w_feature = feature, w_feature
        options = migrate_crd_arguments(
            feature,
            feature_options,
            {
                "crd_feat_dim": crd_feat_dim,
                "crd_nce_k": crd_nce_k,
                "crd_temperature": crd_temperature,
                "crd_momentum": crd_momentum,
                "num_samples": num_samples,
            },
        )
        self.feature_loss: Term | None = None
        if feature != "none":
            self.build_term(
                teacher,
                student_layers,
                teacher_layers,
                options,
                kwargs.get("teacher_classifier_from_checkpoint"),
            )
        staged = self.feature_loss is not None and self.feature_loss.init_stage
        if init_steps < 0 or (init_steps > 0 and not staged):
            raise ConfigError(
                f"`init_steps={init_steps}`: only ab, ft and fsp have a pre-training "
                "stage; give a number of training batches >= 0 for those, 0 otherwise"
            )
        self.init_steps = init_steps
        if staged:
            # Training batches seen so far: a buffer, so a resumed run knows whether its stage is over.
            self.register_buffer("trained_batches", torch.zeros((), dtype=torch.long))

    def build_term(
        self, teacher: str, student_layers, teacher_layers, options, classifier_source: str | None
    ) -> None:
        """The term, and the teacher classifier where the term reuses it."""
        self.feature_loss = build_term(
            self.feature, self.backbone, self.teacher, student_layers, teacher_layers, options
        )
        if self.feature_loss.needs_teacher_classifier and self.teacher_classifier is None:
            if classifier_source is None and Path(teacher).suffix != ".ckpt":
                raise UserError(
                    f"feature: {self.feature} reuses the teacher's classifier, but teacher {teacher!r} is "
                    "not a histodistill .ckpt: set `teacher_classifier_from_checkpoint=...` to the "
                    "supervised checkpoint it comes from, or choose a term that needs no classifier (rkd, "
                    "pkt, cc, sp, at, vid, nst, semckd...)"
                )
            self.teacher_classifier = load_teacher_classifier(
                teacher, classifier_source, self.teacher.num_features, self.num_classes
            )
            freeze(self.teacher_classifier)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.feature_loss is not None:
            datamodule = getattr(self.trainer, "datamodule", None)
            self.feature_loss.setup(
                TrainingData(
                    batch_size=lambda: getattr(datamodule, "batch_size", None),
                    num_samples=lambda: indexed_samples(datamodule),
                )
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints from before hint and crd were terms hold their loss's weights one level up
        (``feature_loss.regressor.*``, now ``feature_loss.criterion.regressor.*``): move them."""
        state, own = checkpoint.get("state_dict", {}), self.state_dict()
        for key in [key for key in state if key.startswith("feature_loss.") and key not in own]:
            moved = "feature_loss.criterion." + key.removeprefix("feature_loss.")
            if moved in own:
                state[moved] = state.pop(key)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> logits: the classifier's, or the term's where it replaces it (SimKD)."""
        student, term = forward_layers(self.backbone, images, []), self.feature_loss
        logits = term.logits(student, self.teacher_classifier) if term is not None else None
        return self.classifier(student.pooled) if logits is None else logits

    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch[0], batch[1]
        term = self.feature_loss
        teacher, teacher_logits = self.teacher_layers_forward(
            images, term.teacher_layers if term is not None else []
        )
        in_stage = False
        if term is not None and term.init_stage and self.training:
            self.trained_batches += 1
            in_stage = bool(self.trained_batches <= self.init_steps)
        # FT's stage trains the paraphraser on the teacher alone: the student (and its BatchNorm) is left as
        # is.
        student = None
        if not in_stage or term.stage_needs_student:
            # AB's and FSP's stages train the student in eval mode, as RepDistiller's helper/pretrain.py
            # `init`.
            eval_mode = in_stage and term.stage_student_eval and self.backbone.training
            if eval_mode:
                self.backbone.eval()
            student = forward_layers(self.backbone, images, term.student_layers if term is not None else [])
            if eval_mode:
                self.backbone.train()
        index = None
        if term is not None and term.needs_index:
            if len(batch) < 3:
                raise UserError(
                    f"feature: {self.feature} needs batches (image, label, index): wrap the "
                    "training dataset in histodistill.data.indexed_dataset.IndexedDataset"
                )
            index = batch[2]
        inputs = TermInputs(student, teacher, teacher_logits, self.teacher_classifier, index)
        if in_stage:
            init = term.init_loss(inputs)
            return {f"{self.feature}_init": init, "loss": init}
        logits = term.logits(student, self.teacher_classifier) if term is not None else None
        if logits is None:
            logits = self.classify(student.pooled)
        losses = self.supervised_terms(logits, labels, teacher_logits)
        if term is not None and self.w_feature != 0:  # AB and FSP train with CE + KD alone after their stage
            losses[self.feature] = term.loss(inputs)
            losses["loss"] = losses["loss"] + self.w_feature * losses[self.feature]
        return losses


def migrate_crd_arguments(
    feature: str, options: dict[str, Any] | None, legacy: dict[str, Any]
) -> dict[str, Any]:
    """``feature_options`` with the flat CRD arguments of earlier versions moved in (crd only, as before)."""
    given = {name: value for name, value in legacy.items() if value is not None}
    if not given:
        return dict(options or {})
    moved = ", ".join(f"{LEGACY_CRD_ARGUMENTS[name]}: {value}" for name, value in given.items())
    rank_zero_warn(
        f"model.init_args {', '.join(given)} are deprecated: give them as "
        f"model.init_args.feature_options {{{moved}}}"
        + ("" if feature == "crd" else f" (feature: {feature} ignores them)")
    )
    if feature != "crd":
        return dict(options or {})
    return {**{LEGACY_CRD_ARGUMENTS[name]: value for name, value in given.items()}, **(options or {})}


def indexed_samples(datamodule: Any) -> int | None:
    """The number of training samples behind the data module's `IndexedDataset`, or None without one."""
    dataset = datamodule.train_dataloader().dataset if datamodule is not None else None
    # The data module may wrap the training set again (seeded augmentation): look through `.dataset`.
    while dataset is not None and not isinstance(dataset, IndexedDataset):
        dataset = getattr(dataset, "dataset", None)
    return len(dataset) if dataset is not None else None


# ---- helpers ----------------------------------------------------------------------------------------
STUDENT_INITS = ("teacher", "imagenet", "random")


def state_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter and buffer: equal for two modules of the same architecture."""
    return {name: tuple(value.shape) for name, value in module.state_dict().items()}


def classifier_state(teacher: str, source: str | None) -> dict[str, torch.Tensor] | None:
    """The ``classifier.*`` tensors of the teacher's supervised checkpoint, or None when it has none."""
    source = source or (teacher if Path(teacher).suffix == ".ckpt" else None)
    if source is None:
        return None
    state = read_checkpoint(source).get("state_dict", {})
    found = {
        key[len(CLASSIFIER_PREFIX) :]: value
        for key, value in state.items()
        if key.startswith(CLASSIFIER_PREFIX)
    }
    return found if found.get("weight") is not None and found["weight"].ndim == 2 else None


def freeze(module: nn.Module) -> None:
    """No gradient, so the optimiser skips it and DDP leaves it out of the gradient all-reduce."""
    module.requires_grad_(False)


def to_teacher_input(images: torch.Tensor, student: Preprocess, teacher: Preprocess) -> torch.Tensor:
    """Re-normalise (B, 3, H, W) images from the student's mean/std to the teacher's, and rescale them
    by teacher / student input size, so that a teacher built for another resolution (a ViT-L at 224 px
    teaching a CNN at 64 px) sees the same field of view at the size it was trained at."""
    if student.mean != teacher.mean or student.std != teacher.std:
        s_mean, s_std, t_mean, t_std = (
            torch.tensor(v, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
            for v in (student.mean, student.std, teacher.mean, teacher.std)
        )
        images = (images * s_std + s_mean - t_mean) / t_std
    if teacher.input_size != student.input_size:
        size = (
            round(images.shape[-2] * teacher.input_size / student.input_size),
            round(images.shape[-1] * teacher.input_size / student.input_size),
        )
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    return images


def load_teacher_classifier(
    teacher: str, source: str | None, in_features: int, num_classes: int
) -> nn.Linear:
    """The teacher's linear classifier from a supervised checkpoint (the teacher's own ``.ckpt`` by default).

    Refuses clearly when there is no such checkpoint or when its class count differs from the
    student's: KD compares class distributions, so both sides need the same classes in the same order.
    """
    if source is None and Path(teacher).suffix == ".ckpt":
        source = teacher
    if source is None:
        raise UserError(
            f"w_kd > 0 needs the teacher's classifier, but teacher {teacher!r} is not a histodistill .ckpt: "
            "set `teacher_classifier_from_checkpoint=...` to the supervised checkpoint the teacher comes "
            "from, or set `w_kd=0` (teacher and student tasks differ)"
        )
    state = classifier_state(teacher, source)
    if state is None:
        raise UserError(
            f"{source} has no linear '{CLASSIFIER_PREFIX}weight' in its state_dict: use the checkpoint "
            "of a supervised run (histodistill fit with a classification method)"
        )
    weight, bias = state["weight"], state.get("bias")
    if weight.shape[0] != num_classes:
        raise UserError(
            f"KD is on (w_kd > 0) but the teacher classifier in {source} has {weight.shape[0]} classes and "
            f"the student has num_classes={num_classes}: KD needs the same classes on both sides. For a "
            "different task set `w_kd=0` (the feature term still transfers knowledge)"
        )
    if weight.shape[1] != in_features:
        raise UserError(
            f"the classifier in {source} expects {weight.shape[1]}-d features but the teacher "
            f"produces {in_features}-d: teacher and teacher_classifier_from_checkpoint do not match"
        )
    classifier = nn.Linear(in_features, num_classes, bias=bias is not None)
    classifier.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})})
    return classifier
