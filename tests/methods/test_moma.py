import copy
from pathlib import Path

import pytest
import torch

from conftest import write_supervised_checkpoint
from histodistill.cli import main
from histodistill.errors import ConfigError, UserError
from histodistill.losses.infonce import infonce_loss
from histodistill.methods import moma as moma_module
from histodistill.methods.moma import MoMA

# A narrow ResNet-18 that declares 32-px inputs, the size of `tiny_batch` and of the ViT teacher.
STUDENT = {
    "backbone": "resnet18",
    "pretrained": False,
    "backbone_kwargs": {"channels": [8, 16, 32, 64], "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}},
}
SMALL = {"queue_size": 32, "embed_dim": 16, "attention_heads": 4}
VIT_TEACHER = {
    "teacher": "vit_tiny_patch16_224",
    "teacher_pretrained": False,
    "teacher_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
}


def tiny_batch(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.arange(n) % 3


@pytest.fixture
def teacher_ckpt(tmp_path):
    return str(write_supervised_checkpoint(tmp_path / "teacher.ckpt", **STUDENT)[0])


def train_steps(module, batch, steps=12, lr=0.05):
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    module.train()
    losses = []
    for step in range(steps):
        module.on_train_batch_start(batch, step)
        loss = module.objective(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_ema_teacher_follows_its_formula_and_keeps_its_bn_buffers(teacher_ckpt):
    torch.manual_seed(0)
    model = MoMA(num_classes=3, teacher=teacher_ckpt, momentum=0.9, **SMALL, **STUDENT)
    teacher_before = copy.deepcopy(model.teacher)
    embed_before, attn_before = copy.deepcopy(model.embed_k), copy.deepcopy(model.attn_k)
    classifier_before = copy.deepcopy(model.teacher_classifier)
    model.momentum_update()
    pairs = [
        (model.teacher.model, teacher_before.model, model.backbone.model),
        (model.embed_k, embed_before, model.embed_q),
        (model.attn_k, attn_before, model.attn_q),
        (model.teacher_classifier, classifier_before, model.classifier),
    ]
    for new, old, source in pairs:
        for (name, p_new), p_old, p_src in zip(
            new.named_parameters(), old.parameters(), source.parameters(), strict=True
        ):
            torch.testing.assert_close(p_new, 0.9 * p_old + 0.1 * p_src, msg=name)
    for (name, buffer), old in zip(model.teacher.named_buffers(), teacher_before.buffers(), strict=True):
        assert torch.equal(buffer, old), name


def test_frozen_teacher_and_its_key_head_never_change():
    # Regression: the key head used to train through the positive logit; its keys drifted away from the queued
    # ones and the demo's InfoNCE reached exactly 0 by step 19 of 104 (docs/moma.md), leaving MoMA = KD.
    torch.manual_seed(0)
    model = MoMA(num_classes=3, teacher_update="frozen", w_kd=0.0, **VIT_TEACHER, **SMALL, **STUDENT)
    frozen_before = copy.deepcopy(
        {"teacher": model.teacher.state_dict(), "embed_k": model.embed_k.state_dict()}
    )
    query_before = copy.deepcopy(model.embed_q.state_dict())
    train_steps(model, tiny_batch(), steps=3)
    for part, before in frozen_before.items():
        for key, value in getattr(model, part).state_dict().items():
            assert torch.equal(value, before[key]), f"{part}.{key}"
    assert any(not torch.equal(v, query_before[k]) for k, v in model.embed_q.state_dict().items())
    assert not any(p.requires_grad for p in [*model.attn_k.parameters(), *model.embed_k.parameters()])


def test_ema_with_a_different_teacher_architecture_is_refused():
    with pytest.raises(ConfigError, match="set `teacher_update='frozen'`"):
        MoMA(num_classes=3, w_kd=0.0, **VIT_TEACHER, **SMALL, **STUDENT)


def test_kd_with_a_mismatched_class_count_is_refused(teacher_ckpt):
    with pytest.raises(UserError, match="`w_kd=0`"):
        MoMA(num_classes=4, teacher=teacher_ckpt, **SMALL, **STUDENT)
    model = MoMA(num_classes=4, teacher=teacher_ckpt, w_kd=0.0, **SMALL, **STUDENT)
    assert model.teacher_classifier is None and "kd" not in model.objective(tiny_batch())


def test_nce_term_equals_infonce_on_attended_embeddings_and_the_keys_are_enqueued(teacher_ckpt):
    torch.manual_seed(0)
    model = MoMA(num_classes=3, teacher=teacher_ckpt, **SMALL, **STUDENT)
    model.eval()  # BN in eval for the student so the recomputation below is identical
    images, labels = tiny_batch()
    queue_before = model.queue.queue.clone()
    losses = model.objective((images, labels))
    with torch.no_grad():
        features, _ = model.student_forward(images)
        teacher_features, _ = model.teacher_forward(images, batch_statistics=True)
        query = model.attn_q(model.embed_q(features))
        key = model.attn_k(model.embed_k(teacher_features))
    assert losses["nce"].item() == pytest.approx(
        infonce_loss(query, key, queue_before, 0.15).item(), rel=1e-5
    )
    assert set(losses) == {"ce", "kd", "nce", "loss"}
    assert losses["loss"].item() == pytest.approx(
        sum(losses[k].item() for k in ("ce", "kd", "nce")), rel=1e-6
    )
    assert int(model.queue.pointer) == 8
    torch.testing.assert_close(model.queue.queue[:8], key)
    torch.testing.assert_close(model.queue.queue[8:], queue_before[8:])


def test_kd_logits_come_from_the_teacher_before_the_ema_update_and_the_key_after_it(teacher_ckpt):
    # trinhvg/MoMA helper/loops_moma.py train_distill_moma: logit_t = model_t(images) (line 271), then
    # momentum_update(model_s, model_t) (309), then the key forward through the updated teacher with its
    # BatchNorm in training mode (set_bn_train, 318-320).
    from histodistill.losses.kd import kd_loss

    torch.manual_seed(0)
    model = MoMA(num_classes=3, teacher=teacher_ckpt, momentum=0.5, **SMALL, **STUDENT)
    with torch.no_grad():  # the student moves away from the teacher, so the update changes the teacher
        for param in [*model.backbone.parameters(), *model.classifier.parameters()]:
            param.add_(0.05 * torch.randn_like(param))
    model.eval()  # the student's BN on running statistics, so its recomputation below is the same
    images, labels = tiny_batch()
    reference = copy.deepcopy(model)
    losses = model.objective((images, labels))
    with torch.no_grad():
        _, logits = reference.student_forward(images)
        _, logits_before = reference.teacher_forward(images, batch_statistics=True)
        reference.momentum_update()
        features_after, logits_after = reference.teacher_forward(images, batch_statistics=True)
        key = reference.attn_k(reference.embed_k(features_after))
    assert not torch.allclose(logits_before, logits_after)
    assert losses["kd"].item() == pytest.approx(kd_loss(logits, logits_before, 4.0).item(), rel=1e-5)
    torch.testing.assert_close(model.queue.queue[:8], key)


def test_the_ema_teacher_normalises_with_the_batch_but_never_drops_paths():
    # MoMA's set_bn_train switches only BatchNorm to training mode: a drop-path teacher stays deterministic.
    torch.manual_seed(0)
    kwargs = {**STUDENT["backbone_kwargs"], "drop_path_rate": 0.5}
    model = MoMA(
        num_classes=3,
        teacher="resnet18",
        teacher_pretrained=False,
        teacher_kwargs=kwargs,
        w_kd=0.0,
        backbone="resnet18",
        pretrained=False,
        backbone_kwargs=kwargs,
        **SMALL,
    )
    images, _ = tiny_batch()
    first, _ = model.teacher_forward(images, batch_statistics=True)
    second, _ = model.teacher_forward(images, batch_statistics=True)
    torch.testing.assert_close(first, second)
    assert all(m.training for m in model.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not model.teacher.model.layer1[1].drop_path.training


def test_keys_gathered_from_every_rank_enter_the_queue(teacher_ckpt, monkeypatch):
    torch.manual_seed(0)
    model = MoMA(num_classes=3, teacher=teacher_ckpt, **SMALL, **STUDENT)
    gathered = {}

    def fake_gather(tensor):  # world size 2: the other rank's keys are this rank's plus one
        gathered["value"] = torch.cat([tensor, tensor + 1]).detach()
        return gathered["value"]

    monkeypatch.setattr(moma_module, "concat_all_gather", fake_gather)
    model.objective(tiny_batch())
    assert int(model.queue.pointer) == 16
    with torch.no_grad():
        torch.testing.assert_close(model.queue.queue[:16], model.attn_k(gathered["value"]))


def test_the_embeddings_are_unit_vectors_before_attention_and_attention_mixes_the_batch(teacher_ckpt):
    model = MoMA(num_classes=3, teacher=teacher_ckpt, **SMALL, **STUDENT).eval()
    images, _ = tiny_batch()
    with torch.no_grad():
        embedded = model.embed_q(model.backbone(images))
        torch.testing.assert_close(embedded.norm(dim=1), torch.ones(8))
        changed = embedded.clone()
        changed[-1] = -changed[-1]
        assert not torch.allclose(model.attn_q(embedded)[0], model.attn_q(changed)[0])


@pytest.mark.parametrize("mode", ["ema", "frozen"])
def test_a_tiny_moma_run_lowers_its_loss(teacher_ckpt, mode):
    torch.manual_seed(0)
    teacher = {"teacher": teacher_ckpt} if mode == "ema" else VIT_TEACHER
    model = MoMA(
        num_classes=3, teacher_update=mode, w_kd=1.0 if mode == "ema" else 0.0, **teacher, **SMALL, **STUDENT
    )
    batch = tiny_batch()
    initial_queue = copy.deepcopy(model.queue.state_dict())

    def loss_on_initial_queue():
        # Training on one repeated batch fills the queue with this batch's own keys (hard negatives that
        # change every step), so the loss is compared against the same queue before and after training.
        model.queue.load_state_dict(initial_queue)
        with torch.no_grad():
            return model.objective(batch)["loss"].item()

    before = loss_on_initial_queue()
    losses = train_steps(model, batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert loss_on_initial_queue() < 0.7 * before


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_moma_config_trains_end_to_end_from_a_supervised_checkpoint(tmp_path, distill_inputs):
    from conftest import QUIET_ONE_EPOCH

    run = tmp_path / "run"
    assert (
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "moma" / "tiny_cpu.yaml"),
                "--trainer.default_root_dir",
                str(run),
                "--model.init_args.teacher",
                str(distill_inputs["teacher"]),
                "--data.init_args.train.init_args.root",
                str(distill_inputs["train"]),
                "--data.init_args.val.init_args.root",
                str(distill_inputs["val"]),
                *QUIET_ONE_EPOCH,
            ]
        )
        == 0
    )
    for name in ("checkpoints/last.ckpt", "checkpoints/best-accuracy.ckpt", "checkpoints/best-macro_f1.ckpt"):
        assert (run / name).is_file(), name
    metrics = (run / "metrics.csv").read_text()
    assert "train/nce" in metrics and "train/kd" in metrics
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(checkpoint["state_dict"]["queue.pointer"]) == 12  # 3 steps of 4 keys entered the queue


def test_teacher_layer_keys_are_the_layer_map_averaged_over_space_and_kd_keeps_the_pooled_logits():
    from histodistill.methods.distill import to_teacher_input
    from histodistill.models.intermediates import forward_layers, resolve_layers

    torch.manual_seed(0)
    teacher = {
        **VIT_TEACHER,
        "teacher_kwargs": {**VIT_TEACHER["teacher_kwargs"], "depth": 4, "embed_dim": 24},
    }
    model = MoMA(
        num_classes=3, teacher_update="frozen", w_kd=0.0, teacher_layer=2, **teacher, **SMALL, **STUDENT
    )
    images, _ = tiny_batch()
    features, logits = model.teacher_layer_forward(images)
    index = resolve_layers(model.teacher, [2], "teacher_layer")[0]
    expected = forward_layers(
        model.teacher, to_teacher_input(images, model.preprocess, model.teacher.preprocess), [index]
    ).maps[0]  # (B, C, h, w): the patch tokens on the patch grid
    assert expected.dim() == 4 and features.shape == (8, 24) and logits is None
    torch.testing.assert_close(features, expected.mean(dim=(2, 3)))
    losses = train_steps(model, tiny_batch(), steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    with pytest.raises(ConfigError, match="set `teacher_update='frozen'`"):
        MoMA(
            num_classes=3,
            teacher="resnet18",
            teacher_pretrained=False,
            teacher_kwargs=STUDENT["backbone_kwargs"],
            w_kd=0.0,
            teacher_layer=1,
            **SMALL,
            **STUDENT,
        )
