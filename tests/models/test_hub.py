"""Hub access without network (issue 29): one quick probe, then huggingface_hub's offline mode, so the user
gets our one line at once (HF_HUB_OFFLINE=1 first) instead of ~53 s of retries. Only loopback addresses are
used."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import timm
import torch
from safetensors.torch import save_file

from histodistill.errors import UserError
from histodistill.models import hub
from histodistill.models.backbones import create_backbone

NAME, HUB_ID = "test_resnet", "timm/test_resnet.r160_in1k"


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed when the block ends: nothing listens there


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """HF_ENDPOINT at a closed loopback port, online mode, an empty cache; counts probes; any retry loop fails
    the test (huggingface_hub sleeps between retries)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    probes = []
    real = hub.unreachable_reason
    monkeypatch.setattr(hub, "unreachable_reason", lambda endpoint: probes.append(endpoint) or real(endpoint))

    def no_retry(seconds):
        raise AssertionError(f"a retry loop ran (sleep {seconds} s)")

    monkeypatch.setattr("time.sleep", no_retry)
    return probes


def test_an_unreachable_hub_is_one_probe_and_one_line_naming_hf_hub_offline_first(unreachable_hub):
    from huggingface_hub import constants

    with pytest.raises(UserError) as error:
        create_backbone(NAME)
    message = str(error.value)
    assert len(unreachable_hub) == 1  # one connection attempt, no retries
    assert "\n" not in message and "cannot be reached" in message and "Connection refused" in message
    assert (
        message.index("HF_HUB_OFFLINE=1")
        < message.index("`weights=FILE`")
        < message.index("`pretrained=False`")
    )
    assert constants.HF_HUB_OFFLINE is False  # offline mode only for the block


def test_cached_weights_load_when_the_hub_is_unreachable(unreachable_hub, tmp_path):
    from huggingface_hub import constants

    torch.manual_seed(123)
    state = timm.create_model(NAME).state_dict()
    snapshot = tmp_path / "hf-cache" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file(state, snapshot / "model.safetensors")
    backbone = create_backbone(NAME)
    torch.testing.assert_close(backbone.model.conv1[0].weight, state["conv1.0.weight"])
    assert len(unreachable_hub) == 1 and constants.HF_HUB_OFFLINE is False


def test_any_http_answer_means_reachable_and_offline_mode_is_not_probed(monkeypatch):
    from huggingface_hub import constants

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - http.server's name
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the test session runs offline (conftest)
    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert hub.unreachable_reason(f"http://127.0.0.1:{server.server_port}") is None
    finally:
        server.shutdown()
    assert hub.unreachable_reason(f"http://127.0.0.1:{closed_port()}") is not None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "unreachable_reason", lambda endpoint: pytest.fail("probed although offline"))
    with hub.hub_access() as unreachable:
        assert unreachable is None
