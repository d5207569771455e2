"""Lazy access to NeMo's ASR collection, with the install hint when it is missing.

NeMo is heavy (6-10 s and ~740 MB to import), so nothing imports it at module
load time: callers ask for it when they first build or load an encoder.
"""
from __future__ import annotations

import importlib
import logging
import os

INSTALL_HINT = "pip install nemo_toolkit[asr]"


def nemo_asr():
    """Return `nemo.collections.asr`, or raise ImportError naming the install command."""
    # NeMo's telemetry tries to reach the network at import; nothing here has one.
    os.environ.setdefault("NEMO_DISABLE_TELEMETRY", "1")
    try:
        module = importlib.import_module("nemo.collections.asr")
    except ImportError as exc:  # the package, or one of its own dependencies, is missing
        raise ImportError(
            f"NVIDIA NeMo is required for NEST encoders but could not be imported ({exc}). "
            f"Install it with: {INSTALL_HINT}"
        ) from exc
    # NeMo logs every module construction at INFO; keep our output readable.
    logging.getLogger("nemo_logger").setLevel(logging.WARNING)
    try:
        from nemo.utils import logging as nemo_logging

        nemo_logging.setLevel(logging.WARNING)
    except Exception:  # pragma: no cover - cosmetic only
        pass
    return module
