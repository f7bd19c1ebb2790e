"""Hugging Face's hub switched off while a built-in task loads a local folder: nothing downloads."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Inside, the hub is off: ``HF_HUB_OFFLINE=1`` in the environment (for a ``huggingface_hub`` imported
    inside) and in ``huggingface_hub.constants`` when it is already imported (it reads the variable once,
    at import, so the environment alone would not reach it); both restored after. Callers also pass
    ``local_files_only=True`` and a folder they checked exists."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    was = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = was
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
