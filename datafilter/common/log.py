"""One logging set-up for the command line; library code only ever calls ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import os


def setup_logging(verbosity: int = 0) -> None:
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    level = os.environ.get("DATAFILTER_LOG_LEVEL", logging.getLevelName(level)).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
