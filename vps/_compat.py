"""Make ``import torchvision`` work beside a CPU-only torch.

PyPI's torchvision wheels for x86-64 Linux are CUDA builds. Installed beside the CPU build of the
same torch release, their compiled extension fails to load, and ``import torchvision`` then dies
in ``torchvision/_meta_registrations.py`` with ``RuntimeError: operator torchvision::nms does not
exist``: it registers fake kernels for ``nms``/``qnms`` without checking that the ops exist.
segment-anything and timm import torchvision at import time (they only use its pure-Python
transforms), so the whole project would fail to import.

``ensure_torchvision()`` is called once from ``vps/__init__.py``. Where torchvision imports
normally (a GPU machine, a matching CPU build) it does nothing. Otherwise it declares the two
missing op schemas, without kernels, and imports torchvision again. Calling ``torchvision.ops.nms``
would then raise "no kernel" errors; nothing in vps calls it.
"""

from __future__ import annotations

import sys

import torch

_MISSING_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_schema_library = None  # kept alive: the schemas vanish when the Library object is collected


def ensure_torchvision() -> bool:
    """Import torchvision, patching the CPU/CUDA mismatch if needed. Returns True if patched."""
    global _schema_library
    try:
        import torchvision  # noqa: F401

        return False
    except RuntimeError as error:
        if "torchvision::nms does not exist" not in str(error):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    _schema_library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _MISSING_OPS:
        _schema_library.define(schema)
    import torchvision  # noqa: F401

    return True
