"""Shared plumbing for the command-line scripts: logging, and one-line errors instead of stack traces."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from colintern.utils import ColinternError, setup_logging

logger = logging.getLogger("colintern")


def run(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse arguments, set up logging, run `main(args)`; a ColinternError becomes one `error:` line and exit 2."""
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        return int(main(args) or 0)
    except ColinternError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
