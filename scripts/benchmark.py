#!/usr/bin/env python
"""Benchmarks: colintern against the reference implementations, measured side by side in one run.

    python scripts/benchmark.py <name> [options]      # e.g. scoring, encode, train-step
    python scripts/benchmark.py <name> --help

Each prints a table and writes JSON (figures, machine, versions, the command) to results/benchmarks/.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from colintern.benchmarks import SUBBENCHMARKS, mark_start
from colintern.cli import run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, module_name in SUBBENCHMARKS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        sub_parser.add_argument("--output-dir", help="where to write the JSON (default: results/benchmarks)")
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


def main(args: argparse.Namespace) -> int:
    mark_start()
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(run(main, build_parser()))
