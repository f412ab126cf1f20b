"""The kd_zoo terms inside `Distill`: layers, options, pre-training stages, heterogeneous pairs, errors."""

import pytest
import torch
from test_distill import STUDENT, teacher_ckpt, tiny_batch, train_steps  # noqa: F401  (teacher_ckpt is a fixture)

from histodistill.errors import UserError
from histodistill.methods.distill import Distill
from histodistill.methods.kd_zoo import ZOO
from histodistill.models.backbones import create_backbone
from histodistill.models.intermediates import forward_layers, pyramid

STAGED = {"ab", "ft", "fsp"}
# Official feature weights of each term (MoMA's comparison where it ran the method, RepDistiller otherwise);
# AB and FSP train without their term after their stage.
WEIGHTS = {
    "hint": 100.0,
    "crd": 0.8,
    "at": 1000.0,
    "sp": 3000.0,
    "cc": 0.02,
    "vid": 1.0,
    "rkd": 1.0,
    "pkt": 30000.0,
    "ab": 0.0,
    "ft": 200.0,
    "fsp": 0.0,
    "nst": 50.0,
    "semckd": 50.0,
    "simkd": 1.0,
    "srrl": 1.0,
}


def make(path, feature, **kwargs):
    kwargs.setdefault("w_feature", WEIGHTS[feature])
    if feature in STAGED:
        kwargs.setdefault("init_steps", 3)
    if feature == "semckd":
        kwargs.setdefault("feature_options", {"batch_size": 8})
    if feature == "crd":
        kwargs.setdefault("feature_options", {"num_samples": 8, "nce_k": 4})
    return Distill(num_classes=3, teacher=str(path), feature=feature, **STUDENT, **kwargs)


def test_every_zoo_name_is_a_feature_choice():
    import typing

    from histodistill.methods.distill import FeatureName

    assert set(typing.get_args(FeatureName)) == {"none", *ZOO}  # every term, hint and crd included
    assert set(ZOO) == set(WEIGHTS)


@pytest.mark.parametrize("feature", sorted(ZOO))
def test_each_zoo_term_trains_a_tiny_student(teacher_ckpt, feature):  # noqa: F811
    path, _ = teacher_ckpt()
    torch.manual_seed(0)
    # official weights assume batches of 64
    distill = make(path, feature, w_feature=min(WEIGHTS[feature], 1.0))
    batch = (*tiny_batch(), torch.arange(8))  # the sample indices CRD needs; the other terms ignore them
    losses = train_steps(distill, batch, steps=10, lr=0.02)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    after = distill.objective(batch)
    assert {"ce", "kd", "loss"} <= set(after)
    assert (feature in after) == (WEIGHTS[feature] != 0)
    assert after["ce"].item() < 1.1  # the student learned the batch (ln 3 ≈ 1.10 at chance)


def test_default_layers_follow_the_official_slices():
    student = create_backbone("resnet18", pretrained=False, channels=[8, 16, 32, 64])
    vit = create_backbone("tiny/vit-tiny-p8-64", pretrained=False)
    assert pyramid(student) == [0, 1, 2, 3, 4] and pyramid(vit) == [0, 2, 5, 8, 11]
    from histodistill.methods.kd_zoo import build_term

    assert build_term("at", student, vit, None, None, None).teacher_layers == [2, 5, 8, 11]  # feat[1:-1]
    assert build_term("nst", student, student, None, None, None).student_layers == [1, 2, 3]  # feat[1:-2]
    assert build_term("sp", student, student, None, None, None).student_layers == [4]  # feat[-2]
    assert build_term("fsp", student, student, None, None, None).student_layers == [0, 1, 2, 3, 4]
    assert build_term("at", student, student, [-2, -1], [3, 4], None).student_layers == [3, 4]


def momas_endpoints(model, images):
    """MoMA's EfficientNet ``extract_endpoints`` rule run on timm's modules: the map just before every block
    that shrinks the spatial size, then the conv-head map (trinhvg/MoMA
    models/efficientnet_pytorch/model.py)."""
    x = model.bn1(model.conv_stem(images))
    endpoints, previous = [], x
    for block in [b for stage in model.blocks for b in stage]:
        x = block(x)
        if previous.shape[-1] > x.shape[-1]:
            endpoints.append(previous)
        previous = x
    return [*endpoints, model.bn2(model.conv_head(x))]


def test_efficientnet_pyramid_is_momas_feature_list_ending_with_the_conv_head():
    backbone = create_backbone("efficientnet_b0", pretrained=False).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        official = momas_endpoints(backbone.model, images)
        ours = forward_layers(backbone, images, pyramid(backbone))
    assert [m.shape[1] for m in official] == [16, 24, 40, 112, 1280]
    assert [m.shape[-1] for m in official] == [32, 16, 8, 4, 2]  # strides 2, 4, 8, 16, 32
    for mine, theirs in zip(ours.maps, official, strict=True):
        torch.testing.assert_close(mine, theirs)
    from histodistill.methods.kd_zoo import build_term
    from histodistill.models.intermediates import layer_channels, layer_sizes

    term = build_term("at", backbone, backbone, None, None, None)  # feat[1:-1]: 24, 40, 112, 1280
    assert layer_channels(backbone, term.student_layers) == [24, 40, 112, 1280]
    assert layer_sizes(backbone, term.student_layers) == [56, 28, 14, 7]  # at its 224-px input size


def test_forward_layers_gives_the_backbones_own_pooled_feature_and_maps():
    for name in ("tiny/resnet18-64", "tiny/vit-tiny-p8-64"):
        backbone = create_backbone(name, pretrained=False).eval()
        images = torch.randn(2, 3, 64, 64)
        out = forward_layers(backbone, images, [4, 1])
        torch.testing.assert_close(out.pooled, backbone(images))
        assert [m.shape[0] for m in out.maps] == [2, 2] and all(m.ndim == 4 for m in out.maps)


def test_pre_training_stage_trains_only_its_own_loss_then_hands_over(teacher_ckpt):  # noqa: F811
    path, _ = teacher_ckpt()
    distill = make(path, "ft", init_steps=2)
    backbone_before = {k: v.clone() for k, v in distill.backbone.state_dict().items()}
    paraphraser_before = [p.clone() for p in distill.feature_loss.paraphraser.parameters()]
    train_steps(distill, tiny_batch(), steps=2)
    # FT's stage trains the paraphraser on the teacher alone: the student is untouched
    for key, value in distill.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    assert any(
        not torch.equal(a, b)
        for a, b in zip(paraphraser_before, distill.feature_loss.paraphraser.parameters(), strict=True)
    )
    assert int(distill.trained_batches) == 2
    distill.train()
    assert set(distill.objective(tiny_batch())) == {"ce", "kd", "ft", "loss"}
    assert "trained_batches" in distill.state_dict()  # a resumed run knows its stage is over


def test_ab_stage_trains_the_student_towards_the_teachers_activation_boundaries(teacher_ckpt):  # noqa: F811
    path, _ = teacher_ckpt()
    distill = make(path, "ab", init_steps=5)
    losses = train_steps(distill, tiny_batch(), steps=5, lr=0.01)
    assert losses[-1] < losses[0]
    distill.train()
    assert set(distill.objective(tiny_batch())) == {"ce", "kd", "loss"}  # w_feature 0 afterwards, as official


def test_ab_connects_only_pairs_whose_shapes_differ(teacher_ckpt):  # noqa: F811
    # RepDistiller's Connector: an empty Sequential where channels and map size agree, ConvReg otherwise.
    path, _ = teacher_ckpt()
    same = make(path, "ab").feature_loss.connectors.connectors  # the teacher has the student's architecture
    assert all(isinstance(c, torch.nn.Identity) for c in same)
    vit = create_backbone("tiny/vit-tiny-p8-64", pretrained=False)
    student = create_backbone("resnet18", pretrained=False, channels=[8, 16, 32, 64])
    from histodistill.methods.kd_zoo import build_term

    other = build_term("ab", student, vit, None, None, None).connectors.connectors
    assert not any(isinstance(c, torch.nn.Identity) for c in other)


@pytest.mark.parametrize("feature", ["ab", "fsp"])
def test_ab_and_fsp_stages_train_the_student_in_eval_mode(teacher_ckpt, feature):  # noqa: F811
    # RepDistiller helper/pretrain.py init(): model_s.eval() while its feature modules train.
    path, _ = teacher_ckpt()
    distill = make(path, feature, init_steps=2, student_init="random")  # a student unlike its teacher
    stats = {k: v.clone() for k, v in distill.backbone.state_dict().items() if "running" in k}
    weights = [p.clone() for p in distill.backbone.parameters()]
    train_steps(distill, tiny_batch(), steps=2, lr=0.01)
    for key, value in stats.items():  # BatchNorm read its running statistics and left them alone
        assert torch.equal(distill.backbone.state_dict()[key], value), key
    assert any(not torch.equal(a, b) for a, b in zip(weights, distill.backbone.parameters(), strict=True))
    assert distill.backbone.training  # back in training mode for the step after the stage
    distill.objective(tiny_batch())  # after the stage the student runs in training mode again
    assert any(not torch.equal(distill.backbone.state_dict()[k], v) for k, v in stats.items())


def test_ft_paraphraser_has_no_batchnorm_unless_asked(teacher_ckpt):  # noqa: F811
    # RepDistiller: Paraphraser(t_shape) with use_bn=False, Translator with use_bn=True.
    path, _ = teacher_ckpt()
    has_bn = lambda m: any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    term = make(path, "ft").feature_loss
    assert not has_bn(term.paraphraser) and has_bn(term.translator)
    assert has_bn(make(path, "ft", feature_options={"paraphraser_bn": True}).feature_loss.paraphraser)


def test_simkd_student_predicts_through_the_teacher_classifier(teacher_ckpt):  # noqa: F811
    path, _ = teacher_ckpt()
    distill = make(path, "simkd", w_ce=0.0, w_kd=0.0).eval()
    images, _ = tiny_batch()
    expected = distill.teacher_classifier(
        distill.feature_loss.projector(distill.backbone.forward_features(images)).mean((2, 3))
    )
    torch.testing.assert_close(distill(images), expected)
    assert not any(p.requires_grad for p in distill.teacher_classifier.parameters())


# A 4-block ViT teaching a narrow ResNet-18, both at 64 px: the heterogeneous code path at CPU-test size.
VIT_TEACHER = {
    "teacher": "tiny/vit-tiny-p8-64",
    "teacher_pretrained": False,
    "pretrained": False,
    "teacher_kwargs": {"depth": 4, "embed_dim": 48, "num_heads": 2},
    "backbone": "tiny/resnet18-64",
    "backbone_kwargs": {"channels": [8, 16, 32, 64]},
    "w_kd": 0.0,
}


@pytest.mark.parametrize("feature", sorted(set(ZOO) - {"fsp", "simkd", "srrl"}))
def test_a_vit_teacher_teaches_a_cnn_student(feature):
    torch.manual_seed(0)
    options = {"semckd": {"batch_size": 4}, "crd": {"num_samples": 4, "nce_k": 2}}.get(feature)
    distill = Distill(num_classes=3, feature=feature, w_feature=1.0, feature_options=options, **VIT_TEACHER)
    images, labels = torch.randn(4, 3, 64, 64), torch.arange(4) % 3
    distill.train()
    loss = distill.objective((images, labels, torch.arange(4)))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and distill.backbone.model.conv1.weight.grad is not None


def test_what_a_heterogeneous_pair_cannot_do_is_refused_with_the_fix():
    with pytest.raises(UserError, match="same channels.*student_layers"):
        Distill(num_classes=3, feature="fsp", **VIT_TEACHER)
    with pytest.raises(UserError, match="simkd.*token model"):
        Distill(num_classes=3, feature="simkd", **VIT_TEACHER)
    with pytest.raises(
        UserError, match="srrl reuses the teacher's classifier.*teacher_classifier_from_checkpoint"
    ):
        Distill(num_classes=3, feature="srrl", **VIT_TEACHER)


def test_bad_zoo_settings_are_refused_before_training(teacher_ckpt):  # noqa: F811
    path, _ = teacher_ckpt()
    with pytest.raises(UserError, match=r"\['beta'\].*rkd.*w_angle, w_distance"):
        make(path, "rkd", feature_options={"beta": 1})
    with pytest.raises(UserError, match="same length"):
        make(path, "at", student_layers=[1, 2], teacher_layers=[4])
    with pytest.raises(UserError, match="out of range"):
        make(path, "at", student_layers=[7], teacher_layers=[4])
    with pytest.raises(UserError, match="only ab, ft and fsp"):
        make(path, "at", init_steps=5)


def test_terms_build_what_depends_on_the_data_at_setup_or_say_what_is_missing(teacher_ckpt):  # noqa: F811
    from histodistill.methods.kd_zoo import TrainingData

    path, _ = teacher_ckpt()
    unknown = TrainingData(batch_size=lambda: None, num_samples=lambda: None)
    known = TrainingData(batch_size=lambda: 8, num_samples=lambda: 12)
    cases = (
        ("semckd", lambda t: t.criterion.batch_size, "batch size.*batch_size"),
        ("crd", lambda t: t.criterion.memory.num_data, "IndexedDataset.*num_samples"),
    )
    for feature, built, missing in cases:
        distill = Distill(num_classes=3, teacher=str(path), feature=feature, w_feature=1.0, **STUDENT)
        term = distill.feature_loss
        assert term.criterion is None
        with pytest.raises(UserError, match=missing):
            term.setup(unknown)
        term.setup(known)
        assert built(term) == {"semckd": 8, "crd": 12}[feature]
