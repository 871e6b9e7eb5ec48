"""Check that the environment `make install` built can run colintern: `python -m colintern.env_check`.

Fails loudly, naming the package and the fix, for the install pitfalls of CPU-only machines (a torchvision whose
C++ operators do not match torch breaks every transformers vision import and `import colpali_engine`).
"""

from __future__ import annotations

import importlib
import sys

FIX = "Rebuild the environment: `make clean install` (see README, 'Installation notes')."


def check_environment() -> list[str]:
    """Return a list of human-readable problems; empty when everything imports and runs."""
    problems: list[str] = []
    try:
        import torch
    except Exception as error:  # noqa: BLE001 - report any import failure
        return [f"torch does not import: {error}. {FIX}"]
    try:
        import torchvision.ops

        torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)
    except Exception as error:  # noqa: BLE001
        problems.append(f"torchvision does not work with torch {torch.__version__}: {error}. {FIX}")
    for module in ("transformers.models.internvl", "peft", "colpali_engine.loss", "mteb", "datasets", "accelerate"):
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001
            problems.append(f"`import {module}` failed: {error}. {FIX}")
    return problems


def main() -> int:
    problems = check_environment()
    import torch

    if problems:
        for problem in problems:
            print(f"ERROR: {problem}", file=sys.stderr)
        return 1
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    print(f"colintern environment OK: torch {torch.__version__} ({device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
