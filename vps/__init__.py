"""vps: automatic video polyp segmentation with AutoSAM.

The Python front door is ``vps.Segmenter`` (``vps/api.py``)::

    import vps
    seg = vps.Segmenter()              # the built-in model; device and precision chosen for this machine
    probs = seg.predict(frames)        # uint8 (N, H, W, 3) RGB -> float32 (N, H, W) in [0, 1]

``import vps`` stays light: the model code loads on first use of ``vps.Segmenter``.
"""

from typing import TYPE_CHECKING

from vps._compat import ensure_torchvision

ensure_torchvision()

__version__ = "0.1.0"
__all__ = ["Segmenter", "__version__"]

if TYPE_CHECKING:
    from vps.api import Segmenter


def __getattr__(name: str):
    if name == "Segmenter":
        from vps.api import Segmenter

        return Segmenter
    raise AttributeError(f"module 'vps' has no attribute '{name}'")
