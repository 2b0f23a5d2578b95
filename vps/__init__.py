"""vps: automatic video polyp segmentation with AutoSAM."""

from vps._compat import ensure_torchvision

ensure_torchvision()

__version__ = "0.1.0"
