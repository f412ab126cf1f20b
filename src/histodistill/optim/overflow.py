"""Telling a diverging optimiser step from a bug.

With an absurd learning rate (``lr: 1e38``) Adam's step size ``lr / (1 - beta1^t)`` no longer fits in a
float32 and torch raises ``RuntimeError: value cannot be converted to type float without overflow``
from inside ``optimizer.step()``. That is a bad setting, not a bug: training loops turn it into the
same one-line `UserError` as a non-finite loss, via `step_overflowed`.
"""

from __future__ import annotations

# The wording of torch's scalar-conversion check (c10/util/TypeCast.h), the only way to recognise it.
_OVERFLOW_MESSAGE = "without overflow"


def step_overflowed(error: BaseException) -> bool:
    """True when ``error`` is torch's overflow of a scalar (step size, lr) converted to the parameters'
    dtype."""
    return isinstance(error, RuntimeError) and _OVERFLOW_MESSAGE in str(error)
