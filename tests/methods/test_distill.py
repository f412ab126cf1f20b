from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import write_supervised_checkpoint
from histodistill.cli import main
from histodistill.data.indexed_dataset import IndexedDataset
from histodistill.errors import UserError
from histodistill.losses.kd import kd_loss
from histodistill.methods.distill import Distill, to_teacher_input
from histodistill.methods.supervised import Supervised
from histodistill.models.backbones import Preprocess

# A ResNet-18 layout with 8..64 channels: the real code path at a size a 2-core CPU trains in seconds.
STUDENT = {"backbone": "resnet18", "pretrained": False, "backbone_kwargs": {"channels": [8, 16, 32, 64]}}


def tiny_batch(n=8, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.arange(n) % classes


@pytest.fixture
def teacher_ckpt(tmp_path):
    """A supervised run's checkpoint (3 classes) as `histodistill fit` writes it: weights + backbone
    record."""

    def make(num_classes=3, name="teacher.ckpt"):
        return write_supervised_checkpoint(tmp_path / name, num_classes=num_classes, **STUDENT)

    return make


def train_steps(module, batch, steps=12, lr=0.05):
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    module.train()
    losses = []
    for step in range(steps):
        if hasattr(module, "on_train_batch_start"):
            module.on_train_batch_start(batch, step)
        loss = module.objective(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_w_kd_zero_gives_exactly_the_supervised_loss(teacher_ckpt):
    path, _ = teacher_ckpt()
    torch.manual_seed(0)
    distill = Distill(num_classes=3, teacher=str(path), w_kd=0.0, **STUDENT)
    torch.manual_seed(0)
    supervised = Supervised(num_classes=3, **STUDENT)
    supervised.load_state_dict(
        {k: v for k, v in distill.state_dict().items() if k.split(".")[0] in ("backbone", "classifier")}
    )
    batch = tiny_batch()
    distill.eval(), supervised.eval()
    ours = distill.objective(batch)
    assert set(ours) == {"ce", "loss"}
    assert ours["loss"].item() == supervised.objective(batch)["loss"].item()


def test_kd_objective_is_ce_plus_t2_kl_against_the_teacher_checkpoint(teacher_ckpt):
    path, teacher = teacher_ckpt()
    distill = Distill(num_classes=3, teacher=str(path), w_kd=0.5, temperature=2.0, **STUDENT)
    images, labels = tiny_batch()
    distill.eval(), teacher.eval()
    losses = distill.objective((images, labels))
    student_logits = distill(images)
    expected = F.cross_entropy(student_logits, labels) + 0.5 * kd_loss(student_logits, teacher(images), 2.0)
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_with_a_different_class_count_is_refused_clearly(teacher_ckpt):
    path, _ = teacher_ckpt(num_classes=4)
    with pytest.raises(UserError, match=r"4 classes.*num_classes=3.*`w_kd=0`"):
        Distill(num_classes=3, teacher=str(path), **STUDENT)
    # switching KD off is the documented way to distil across tasks
    Distill(num_classes=3, teacher=str(path), w_kd=0.0, feature="hint", w_feature=1.0, **STUDENT)


def test_kd_without_a_teacher_classifier_is_refused():
    with pytest.raises(UserError, match="teacher_classifier_from_checkpoint"):
        Distill(
            num_classes=3,
            teacher="resnet18",
            teacher_pretrained=False,
            teacher_kwargs={"channels": [8, 16, 32, 64]},
            **STUDENT,
        )


def test_frozen_teacher_never_changes_and_is_left_out_of_the_optimiser(teacher_ckpt):
    path, _ = teacher_ckpt()
    distill = Distill(num_classes=3, teacher=str(path), feature="hint", w_feature=1.0, **STUDENT)
    before = {k: v.clone() for k, v in distill.teacher.state_dict().items()}
    train_steps(distill, tiny_batch(), steps=3)
    for key, value in distill.teacher.state_dict().items():
        # BN running stats included: the teacher runs in eval mode
        assert torch.equal(value, before[key]), key
    assert not any(p.requires_grad for p in distill.teacher.parameters())
    assert not any(p.requires_grad for p in distill.teacher_classifier.parameters())


@pytest.mark.parametrize(("feature", "w_feature"), [("none", 0.0), ("hint", 100.0), ("crd", 0.8)])
def test_a_tiny_run_of_each_baseline_lowers_its_loss(teacher_ckpt, feature, w_feature):
    path, _ = teacher_ckpt()
    torch.manual_seed(0)
    options = {"num_samples": 8, "nce_k": 16, "feat_dim": 16} if feature == "crd" else None
    distill = Distill(
        num_classes=3,
        teacher=str(path),
        feature=feature,
        w_feature=w_feature,
        feature_options=options,
        **STUDENT,
    )
    images, labels = tiny_batch()
    losses = train_steps(distill, (images, labels, torch.arange(8)))
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.7 * losses[0]
    assert feature == "none" or feature in distill.objective((images, labels, torch.arange(8)))


def test_crd_without_indices_says_how_to_get_them(teacher_ckpt):
    path, _ = teacher_ckpt()
    distill = Distill(
        num_classes=3,
        teacher=str(path),
        feature="crd",
        w_feature=0.8,
        feature_options={"num_samples": 8},
        **STUDENT,
    )
    with pytest.raises(UserError, match="IndexedDataset"):
        distill.objective(tiny_batch())


def test_indexed_dataset_adds_the_index_and_forwards_transform_and_classes():
    class Base(torch.utils.data.Dataset):
        classes = ["a", "b"]
        transform = None

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return (i * 10 if self.transform is None else self.transform(i)), i % 2

    wrapped = IndexedDataset(Base())
    assert len(wrapped) == 3 and wrapped.classes == ["a", "b"]
    assert wrapped[2] == (20, 0, 2)
    wrapped.transform = lambda x: -x
    assert wrapped.dataset.transform is wrapped.transform and wrapped[1] == (-1, 1, 1)


def test_teacher_input_is_renormalised_and_rescaled():
    student = Preprocess((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), input_size=32)
    teacher = Preprocess((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), input_size=32)
    images = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(to_teacher_input(images, student, teacher), images * 0.25 + 0.5)
    bigger = Preprocess(student.mean, student.std, input_size=64)
    assert to_teacher_input(images, student, bigger).shape == (2, 3, 16, 16)
    assert to_teacher_input(images, student, student) is images


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_crd_config_trains_end_to_end_with_indexed_data(tmp_path, distill_inputs):
    from conftest import QUIET_ONE_EPOCH

    run = tmp_path / "run"
    assert (
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "kd" / "tiny_crd.yaml"),
                "--trainer.default_root_dir",
                str(run),
                "--model.init_args.teacher",
                str(distill_inputs["teacher"]),
                "--data.init_args.train.init_args.dataset.init_args.root",
                str(distill_inputs["train"]),
                "--data.init_args.val.init_args.root",
                str(distill_inputs["val"]),
                *QUIET_ONE_EPOCH,
            ]
        )
        == 0
    )
    assert "train/crd" in (run / "metrics.csv").read_text()
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    # one memory row per training image
    assert state["feature_loss.criterion.memory.memory_student"].shape == (12, 128)
    assert state["feature_loss.criterion.memory.z_student"] > 0


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", ["distill", "moma"])
def test_student_starts_as_the_teacher_by_default_classifier_included(teacher_ckpt, method):
    from histodistill.methods.moma import MoMA

    path, teacher = teacher_ckpt()
    cls = MoMA if method == "moma" else Distill
    extra = {"queue_size": 16, "embed_dim": 8} if method == "moma" else {}
    module = cls(num_classes=3, teacher=str(path), **STUDENT, **extra)
    assert module.student_init == "teacher"
    assert _same_state(module.backbone.model, teacher.backbone.model)
    assert _same_state(module.classifier, teacher.classifier)
    module.eval()
    images = tiny_batch()[0]
    torch.testing.assert_close(module(images), teacher.eval()(images))  # step 0: the student is the teacher


def test_student_from_a_teacher_with_other_classes_gets_a_fresh_classifier(teacher_ckpt):
    path, teacher = teacher_ckpt(num_classes=4)
    module = Distill(num_classes=3, teacher=str(path), w_kd=0.0, **STUDENT)
    assert _same_state(module.backbone.model, teacher.backbone.model)
    assert module.classifier.weight.shape == (3, module.backbone.num_features)


def test_student_init_random_and_imagenet_do_not_copy_the_teacher(teacher_ckpt, monkeypatch):
    path, teacher = teacher_ckpt()
    module = Distill(num_classes=3, teacher=str(path), student_init="random", **STUDENT)
    assert module.student_init == "random" and not _same_state(module.backbone.model, teacher.backbone.model)
    asked = []
    import histodistill.methods.distill as distill

    real = distill.create_backbone
    monkeypatch.setattr(
        distill,
        "create_backbone",
        lambda name, pretrained=False, weights=None, **kw: (
            asked.append((name, pretrained)) or real(name, pretrained=False, **kw)
        ),
    )
    Distill(num_classes=3, teacher=str(path), student_init="imagenet", **STUDENT)
    assert (
        "resnet18",
        True,
    ) in asked  # the published weights are asked for (no hub in tests: built randomly here)


def test_student_init_teacher_with_another_architecture_is_refused(teacher_ckpt):
    path, _ = teacher_ckpt()
    with pytest.raises(UserError, match="student_init"):
        Distill(
            num_classes=3,
            teacher=str(path),
            student_init="teacher",
            backbone="resnet18",
            backbone_kwargs={"channels": [4, 8, 16, 32]},
        )


def test_classifier_dropout_drops_before_the_classifier_not_on_the_distilled_features(teacher_ckpt):
    # MoMA's EfficientNet: classifier_ = Sequential(Dropout(0.2), Linear); feat[-1] (the pooled feature the
    # hint, CRD and MoMA's embedding read) is taken before the dropout.
    path, _ = teacher_ckpt()
    distill = Distill(num_classes=3, teacher=str(path), classifier_dropout=0.5, **STUDENT)
    distill.backbone.eval()  # fixed BN statistics, so only the dropout is random
    distill.classifier.train(), distill.train(True)
    distill.backbone.eval()
    images, _ = tiny_batch()
    (f1, z1), (f2, z2) = distill.student_forward(images), distill.student_forward(images)
    torch.testing.assert_close(f1, f2)
    assert not torch.allclose(z1, z2)
    distill.eval()
    torch.testing.assert_close(
        distill.student_forward(images)[1], distill.classifier(distill.backbone(images))
    )
    with pytest.raises(UserError, match="classifier_dropout"):
        Distill(num_classes=3, teacher=str(path), classifier_dropout=1.0, **STUDENT)
