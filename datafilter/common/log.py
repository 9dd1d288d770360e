"""One logging set-up for the command line; library code only ever calls ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import os


def setup_logging(verbosity: int = 0) -> None:
    """-q: warnings only; default: the project's INFO messages; -v: the project's DEBUG messages; -vv: every
    library's DEBUG messages too. ``DATAFILTER_LOG_LEVEL`` (e.g. ``DEBUG``) overrides the project's level."""
    ours = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    override = os.environ.get("DATAFILTER_LOG_LEVEL", "").upper()
    if override:
        if not isinstance(logging.getLevelName(override), int):
            raise SystemExit(f"DATAFILTER_LOG_LEVEL={override!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
        ours = logging.getLevelName(override)
    logging.basicConfig(level=logging.DEBUG if verbosity >= 2 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("datafilter").setLevel(ours)
