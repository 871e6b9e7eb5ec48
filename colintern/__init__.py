"""colintern: train, evaluate and benchmark ColPali-style visual document retrievers on InternVL3.5.

The public names are imported lazily so that `import colintern` (and every script's `--help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "ColIntern3_5": "colintern.model.modeling",
    "ColIntern3_5Processor": "colintern.model.processing",
    "max_sim": "colintern.model.scoring",
    "load_model": "colintern.model.loading",
    "load_processor": "colintern.model.loading",
    "load_retriever": "colintern.model.loading",
    "ColinternError": "colintern.utils",
    "EMBEDDED_MODEL": "colintern.model.embedded",
    "EMBEDDED_DATASET": "colintern.data.synthdocs",
}

__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from colintern.data.synthdocs import EMBEDDED_DATASET
    from colintern.model.embedded import EMBEDDED_MODEL
    from colintern.model.loading import load_model, load_processor, load_retriever
    from colintern.model.modeling import ColIntern3_5
    from colintern.model.processing import ColIntern3_5Processor
    from colintern.model.scoring import max_sim
    from colintern.utils import ColinternError


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'colintern' has no attribute {name!r}")
