"""Every Hugging Face hub access goes through `hub_access`: one quick probe instead of a retry loop.

Without network, huggingface_hub retries each file request five times with growing waits: for one
timm model (two weight files) about 53 s and a dozen ``Retrying in 8s`` lines before any error. So
before reaching the hub we ask once whether it answers: one HEAD request to its endpoint
(``HF_ENDPOINT``), `PROBE_TIMEOUT_S` at most, no retries. When it does not, the block runs in
huggingface_hub's offline mode (what ``HF_HUB_OFFLINE=1`` sets), so cached files load at once and
missing ones fail at once (``LocalEntryNotFoundError``), and `unreachable_remedy` words our one line.
Any HTTP answer, whatever its status, means the hub is reachable: gated or missing repositories are
then reported by huggingface_hub as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# Long enough for a slow but working connection to answer; short enough that an offline user
# hears from us within ~10 s, not after huggingface_hub's ~53 s of retries.
PROBE_TIMEOUT_S = 5.0


def unreachable_reason(endpoint: str) -> str | None:
    """Why ``endpoint`` gave no HTTP answer to one HEAD request (None when it answered with any status)."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - connect, DNS, proxy, TLS, timeout: all mean "not reachable"
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


@contextlib.contextmanager
def hub_access() -> Iterator[str | None]:
    """Run a block that may download from the hub; yields None, or why the hub cannot be reached, in which
    case huggingface_hub runs offline (cache only) for the block. Nothing is probed when ``HF_HUB_OFFLINE`` is
    already set."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        yield None
        return
    reason = unreachable_reason(constants.ENDPOINT)
    if reason is None:
        yield None
        return
    constants.HF_HUB_OFFLINE = True  # read by huggingface_hub at each request (constants.is_offline_mode)
    try:
        yield reason
    finally:
        constants.HF_HUB_OFFLINE = False


def unreachable_remedy(where: str, reason: str) -> str:
    """The part of the one-line error that says the hub could not be reached, and the first remedy."""
    from huggingface_hub import constants

    return (
        f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached ({reason}) and {where} is not in the "
        f"cache ({constants.HF_HUB_CACHE}). Remedies: set HF_HUB_OFFLINE=1 and point HF_HOME or HF_HUB_CACHE "
        f"at a cache that holds {where} (download it where the hub is reachable and copy the cache)"
    )
