"""One logging set-up for the command line; library code only ever calls ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import os


def setup_logging(verbosity: int = 0) -> None:
    """Our messages at INFO by default (DEBUG with -vv, WARNING with -q); other libraries' only from WARNING up,
    unless -vv asks for everything."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity <= 1 else logging.DEBUG
    level = logging.getLevelName(os.environ.get("DATAFILTER_LOG_LEVEL", logging.getLevelName(level)).upper())
    logging.basicConfig(level=logging.DEBUG if verbosity >= 2 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("datafilter").setLevel(level)
