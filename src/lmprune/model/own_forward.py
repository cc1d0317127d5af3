"""A model's own forward failing, told apart from lmprune's own bugs.

A model whose code rejects its config or the calibration batch (a tiny config its attention cannot
handle, a shape its kernels refuse) fails inside its forward, wherever lmprune calls it: that is bad
input, reported as one line naming the model type. Everything else that goes wrong there (lmprune's
hooks, its tracer, its control-flow exceptions) is lmprune's and passes through unchanged, traceback
and all. The raising frame decides: the innermost frame outside torch's own Python code (and outside
`run_op`, the tracer's pass-through of the model's own torch calls) is the model's unless it is lmprune's.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch

from ..errors import LmpruneError
from .loading import first_line

_LMPRUNE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_MESSAGE_CHARS = 160


class ModelForwardError(LmpruneError):
    """The model's own forward code raised (bad input: the model rejects its config or the batch)."""


def run_op(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Run one torch call the model made (a TorchFunctionMode's pass-through): its errors are the model's."""
    return func(*args, **kwargs)


def raised_by_model(exc: BaseException) -> bool:
    """Whether `exc` was raised by the model's code, not by lmprune's (nor by torch on lmprune's behalf)."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    for code in reversed(frames):
        path = os.path.abspath(code.co_filename)
        if path.startswith(_TORCH_DIR) or code is run_op.__code__:
            continue
        return not path.startswith(_LMPRUNE_DIR)
    return False


def describe(exc: BaseException) -> str:
    """`Type: first line of the message`, shortened to one readable line."""
    line = first_line(exc)
    if line.endswith(":"):  # a heading (pydantic-style validation errors): the next line says what is wrong
        line = " ".join(part.strip() for part in str(exc).strip().splitlines()[:2])
    if len(line) > _MESSAGE_CHARS:
        line = line[: _MESSAGE_CHARS - 1] + "…"
    return f"{type(exc).__name__}: {line}"


@contextlib.contextmanager
def model_forward(model_type: str, where: str):
    """Turn an exception the model's own forward raises in this context into one line of bad input."""
    try:
        yield
    except LmpruneError:
        raise
    except Exception as exc:
        if not raised_by_model(exc):
            raise
        raise ModelForwardError(
            f"model_type {model_type!r}: the model's own forward failed {where} on the calibration batch "
            f"(its code rejects this config or input, not lmprune): {describe(exc)}") from exc
