"""One logging setup for every command: quiet by default.

``setup_logging(level, verbose)``: kg-streamer's own loggers at ``level`` (``KGS_LOG_LEVEL``,
INFO by default); third-party loggers (kafka-python logs every connection at INFO, the Neo4j
driver, transformers, urllib3) at WARNING, unless ``--verbose`` or ``KGS_LOG_LEVEL=DEBUG``,
which let everything through at that level. One handler on the root logger, to stderr.
"""

from __future__ import annotations

import logging

OWN = ("streamer", "sinks", "encoders", "training", "devtools", "kg-streamer")
THIRD_PARTY = ("kafka", "neo4j", "transformers", "urllib3", "filelock", "httpx", "huggingface_hub", "torch")


def setup_logging(level: str = "INFO", verbose: bool = False) -> None:
    own_level = getattr(logging, level.upper(), logging.INFO)
    loud = verbose or own_level <= logging.DEBUG
    root_level = logging.DEBUG if verbose and own_level > logging.DEBUG else own_level
    logging.basicConfig(
        level=root_level if loud else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for name in OWN:
        logging.getLogger(name).setLevel(root_level if loud else own_level)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(root_level if loud else logging.WARNING)
