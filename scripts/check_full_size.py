#!/usr/bin/env python
"""`make check-full-size`: the real InternVL3.5-1B architecture (random weights, Hub layout) loaded, checked tensor by
tensor, trained one LoRA step on two A4 pages and encoded through the mteb wrapper, on this machine (~10 minutes on a
2-core CPU). See colintern/benchmarks/full_size_check.py.

    python scripts/check_full_size.py [--work-dir DIR] [--output results/benchmarks/check-full-size.json]
"""

from __future__ import annotations

import sys

from colintern.benchmarks.full_size_check import build_parser, main
from colintern.cli import run

if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
