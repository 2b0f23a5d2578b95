"""Print the torchvision requirement that matches the installed torch, or nothing if torchvision is there.

torchvision's minor version is torch's plus 15 (torch 2.13 <-> torchvision 0.28). Installing it with
--no-deps keeps pip from replacing the installed torch (e.g. the CPU build) with another one.
"""

import importlib.metadata as metadata

try:
    metadata.version("torchvision")
except metadata.PackageNotFoundError:
    major, minor = (int(part) for part in metadata.version("torch").split("+")[0].split(".")[:2])
    print(f"torchvision=={major - 2}.{minor + 15}.*")
