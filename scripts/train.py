#!/usr/bin/env python
"""Fine-tune ColIntern3.5 (InternVL3.5 + a 128-dim multi-vector head) for visual document retrieval.

A thin front end over `colintern.training` (also runnable as `python -m colintern.training`); `--help` lists every
option.
"""

import sys

from colintern.cli import run
from colintern.training.__main__ import build_parser, main

if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
