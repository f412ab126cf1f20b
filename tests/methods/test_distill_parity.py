"""Every distillation term of `Distill` against values pinned from the code before terms became objects.

The numbers were computed at main 8309e99 (before issue 31's refactor) with the setup of the test below:
three SGD steps on one fixed batch, then the eval-mode logits. A change to how terms are built, fed or
weighted changes them; a pure restructuring does not.
"""

import pytest
import torch
from test_distill import STUDENT, teacher_ckpt, tiny_batch  # noqa: F401  (teacher_ckpt is a fixture)

from histodistill.methods.distill import Distill

# Per-term arguments beyond feature / w_feature (small CRD memory; staged terms: one batch of stage).
ARGS = {
    "crd": {"feature_options": {"num_samples": 8, "nce_k": 16, "feat_dim": 16}},
    "semckd": {"feature_options": {"batch_size": 8}},
    "ab": {"init_steps": 1},
    "ft": {"init_steps": 1},
    "fsp": {"init_steps": 1},
}
# name -> (named losses of each of three training steps, sum of the eval-mode logits afterwards)
PINNED = {
    "none": (
        [
            {"ce": 1.132445, "kd": 0.04394, "loss": 1.176385},
            {"ce": 1.039636, "kd": 0.048977, "loss": 1.088613},
            {"ce": 0.861388, "kd": 0.044816, "loss": 0.906204},
        ],
        0.91344,
    ),
    "hint": (
        [
            {"ce": 1.132445, "kd": 0.04394, "loss": 1.629546, "hint": 0.453161},
            {"ce": 0.994461, "kd": 0.027342, "loss": 1.520408, "hint": 0.498605},
            {"ce": 0.839448, "kd": 0.054109, "loss": 1.363369, "hint": 0.469812},
        ],
        1.46172,
    ),
    "crd": (
        [
            {"ce": 1.132445, "kd": 0.04394, "loss": 16.3195, "crd": 15.143114},
            {"ce": 1.453427, "kd": 0.084713, "loss": 18.54163, "crd": 17.00349},
            {"ce": 1.150323, "kd": 0.042986, "loss": 14.521317, "crd": 13.328007},
        ],
        3.25057,
    ),
    "at": (
        [
            {"ce": 1.132445, "kd": 0.04394, "loss": 1.369623, "at": 0.193237},
            {"ce": 1.069284, "kd": 0.038807, "loss": 1.332441, "at": 0.224349},
            {"ce": 0.848798, "kd": 0.042638, "loss": 1.092573, "at": 0.201137},
        ],
        1.24775,
    ),
    "sp": (
        [
            {"ce": 1.132445, "kd": 0.04394, "loss": 1.231232, "sp": 0.054847},
            {"ce": 1.039499, "kd": 0.05165, "loss": 1.138524, "sp": 0.047375},
            {"ce": 0.876593, "kd": 0.042575, "loss": 0.96805, "sp": 0.048882},
        ],
        0.86665,
    ),
    "cc": (
        [
            {"ce": 1.132445, "kd": 0.04394, "loss": 1.280641, "cc": 0.104256},
            {"ce": 1.059075, "kd": 0.055737, "loss": 1.217587, "cc": 0.102774},
            {"ce": 0.897945, "kd": 0.04472, "loss": 1.034574, "cc": 0.09191},
        ],
        0.53355,
    ),
    "vid": (
        [
            {"ce": 1.132445, "kd": 0.04394, "loss": 4.786687, "vid": 3.610301},
            {"ce": 1.039386, "kd": 0.048904, "loss": 4.698925, "vid": 3.610635},
            {"ce": 0.861612, "kd": 0.044716, "loss": 4.516675, "vid": 3.610347},
        ],
        0.92339,
    ),
    "rkd": (
        [
            {"ce": 1.132445, "kd": 0.04394, "loss": 6.978362, "rkd": 5.801976},
            {"ce": 1.207651, "kd": 0.061685, "loss": 6.652807, "rkd": 5.383471},
            {"ce": 1.072716, "kd": 0.074358, "loss": 4.0511, "rkd": 2.904026},
        ],
        15.6948,
    ),
    "pkt": (
        [
            {"ce": 1.132445, "kd": 0.04394, "loss": 1.178466, "pkt": 0.002081},
            {"ce": 1.039498, "kd": 0.048899, "loss": 1.090265, "pkt": 0.001868},
            {"ce": 0.861013, "kd": 0.044693, "loss": 0.907636, "pkt": 0.001931},
        ],
        0.91355,
    ),
    "ab": (
        [
            {"ab_init": 0.465226, "loss": 0.465226},
            {"ce": 1.138429, "kd": 0.042371, "loss": 333.974304, "ab": 332.793518},
            {"ce": 1.073199, "kd": 0.043108, "loss": 244.767517, "ab": 243.651215},
        ],
        55.08054,
    ),
    "ft": (
        [
            {"ft_init": 0.152081, "loss": 0.152081},
            {"ce": 1.132445, "kd": 0.04394, "loss": 1.331488, "ft": 0.155103},
            {"ce": 1.048896, "kd": 0.049726, "loss": 1.261401, "ft": 0.162779},
        ],
        1.08501,
    ),
    "fsp": (
        [
            {"fsp_init": 0.0, "loss": 0.0},
            {"ce": 1.132445, "kd": 0.04394, "loss": 2.892405, "fsp": 1.71602},
            {"ce": 1.049194, "kd": 0.055128, "loss": 2.87483, "fsp": 1.770508},
        ],
        1.07231,
    ),
    "nst": (
        [
            {"ce": 1.132445, "kd": 0.04394, "loss": 1.60196, "nst": 0.425575},
            {"ce": 1.054143, "kd": 0.04812, "loss": 1.513347, "nst": 0.411083},
            {"ce": 0.905163, "kd": 0.040447, "loss": 1.323325, "nst": 0.377715},
        ],
        1.14967,
    ),
    "semckd": (
        [
            {"ce": 1.132445, "kd": 0.04394, "loss": 2.313624, "semckd": 1.137239},
            {"ce": 1.054566, "kd": 0.053354, "loss": 2.121022, "semckd": 1.013103},
            {"ce": 0.891592, "kd": 0.062979, "loss": 1.936252, "semckd": 0.981682},
        ],
        1.54123,
    ),
    "simkd": (
        [
            {"ce": 1.060188, "kd": 0.031581, "loss": 1.590607, "simkd": 0.498838},
            {"ce": 1.101773, "kd": 0.057524, "loss": 1.623733, "simkd": 0.464436},
            {"ce": 0.849559, "kd": 0.05431, "loss": 1.396024, "simkd": 0.492155},
        ],
        -0.64655,
    ),
    "srrl": (
        [
            {"ce": 1.132445, "kd": 0.04394, "loss": 1.713839, "srrl": 0.537453},
            {"ce": 1.078812, "kd": 0.034708, "loss": 1.733722, "srrl": 0.620202},
            {"ce": 0.848133, "kd": 0.060234, "loss": 1.534177, "srrl": 0.62581},
        ],
        2.30468,
    ),
}


@pytest.mark.parametrize("feature", sorted(PINNED))
def test_each_term_gives_the_pinned_losses_and_logits(teacher_ckpt, feature):  # noqa: F811
    path, _ = teacher_ckpt()
    torch.manual_seed(0)
    distill = Distill(
        num_classes=3,
        teacher=str(path),
        feature=feature,
        w_feature=0.0 if feature == "none" else 1.0,
        **STUDENT,
        **ARGS.get(feature, {}),
    )
    images, labels = tiny_batch()
    batch = (images, labels, torch.arange(8))
    optimizer = torch.optim.SGD([p for p in distill.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    distill.train()
    steps = []
    for _ in range(3):
        losses = distill.objective(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        steps.append({name: value.item() for name, value in losses.items()})
    distill.eval()
    with torch.no_grad():
        logits = distill(images).sum().item()
    expected_steps, expected_logits = PINNED[feature]
    assert [set(step) for step in steps] == [set(step) for step in expected_steps]
    for step, expected in zip(steps, expected_steps, strict=True):
        assert step == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert logits == pytest.approx(expected_logits, rel=1e-5, abs=1e-4)


def test_the_flat_crd_arguments_of_earlier_versions_still_configure_crd(teacher_ckpt):  # noqa: F811
    path, _ = teacher_ckpt()
    with pytest.warns(
        UserWarning, match=r"crd_nce_k, num_samples are deprecated.*feature_options \{nce_k: 16"
    ):
        old = Distill(
            num_classes=3,
            teacher=str(path),
            feature="crd",
            w_feature=1.0,
            crd_nce_k=16,
            num_samples=8,
            **STUDENT,
        )
    assert old.feature_loss.options == {
        "feat_dim": 128,
        "nce_k": 16,
        "temperature": 0.07,
        "momentum": 0.5,
        "num_samples": 8,
    }
    assert old.feature_loss.criterion.memory.num_data == 8
    with pytest.warns(UserWarning, match="feature: hint ignores them"):
        Distill(num_classes=3, teacher=str(path), feature="hint", w_feature=1.0, num_samples=8, **STUDENT)


@pytest.mark.parametrize("feature", ["hint", "crd"])
def test_a_checkpoint_from_before_hint_and_crd_were_terms_still_loads(teacher_ckpt, feature):  # noqa: F811
    path, _ = teacher_ckpt()

    def make():
        return Distill(
            num_classes=3,
            teacher=str(path),
            feature=feature,
            w_feature=1.0,
            **STUDENT,
            **ARGS.get(feature, {}),
        )

    torch.manual_seed(0)
    saved = make().state_dict()
    # Earlier versions held the loss module itself as feature_loss: its keys had no "criterion." level.
    old = {key.replace("feature_loss.criterion.", "feature_loss."): value for key, value in saved.items()}
    assert old.keys() != saved.keys()
    torch.manual_seed(1)
    distill = make()
    checkpoint = {"state_dict": old}
    distill.on_load_checkpoint(checkpoint)
    distill.load_state_dict(checkpoint["state_dict"])
    for key, value in distill.state_dict().items():
        assert torch.equal(value, saved[key]), key
