"""torch -> ONNX: the graph's input and output names and dynamic axes (shared by onnxruntime and ascend)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from ..tasks.data import IOSpec

INPUT, OUTPUT = "input", "output"


def default_io(n_inputs: int = 1) -> IOSpec:
    """One input ``input`` (or ``input_0``, ``input_1``, ...) with a dynamic batch axis."""
    names = (INPUT,) if n_inputs == 1 else tuple(f"{INPUT}_{i}" for i in range(n_inputs))
    return IOSpec(names)


def graph_input_names(path: str | Path) -> list[str]:
    """The graph inputs of an ONNX file that are fed (not initializers)."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in inits]


@contextlib.contextmanager
def native_output_kept_on_success():
    """Hold what native code writes to the process's stdout and stderr (file descriptors 1 and 2) while
    the block runs: written to stderr after it succeeds, dropped when it raises.

    ``torch.onnx.export`` prints its whole TorchScript IR graph on stderr before raising on an
    unsupported operator; the error itself (one line) is what a person needs. The held text goes to an
    unnamed temporary file (nothing is left behind, even if the process is killed).
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no such descriptors (embedded interpreters): nothing to hold
        yield
        return
    ok = False
    with tempfile.TemporaryFile() as held:
        try:
            os.dup2(held.fileno(), 1)
            os.dup2(held.fileno(), 2)
            yield
            ok = True
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if ok:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)


def export_onnx(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    opset: int = 17,
    io: IOSpec | None = None,
) -> None:
    """Export with the io's names and dynamic axes (default: one input ``input``, dynamic batch),
    initializers named after the torch parameters."""
    model = model.eval()
    io = io or default_io(len(example_inputs))
    with warnings.catch_warnings(), native_output_kept_on_success():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            tuple(example_inputs),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(io.input_names),
            output_names=[io.output_name],
            dynamic_axes=io.onnx_axes(),
            do_constant_folding=True,
        )
