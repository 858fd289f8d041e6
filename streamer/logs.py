"""One logging setup for every command: quiet by default.

``setup_logging(level, verbose)``: kg-streamer's own loggers at ``level`` (``KGS_LOG_LEVEL``,
INFO by default); third-party loggers (kafka-python logs every connection at INFO, the Neo4j
driver, transformers, urllib3) at WARNING, unless ``--verbose`` or ``KGS_LOG_LEVEL=DEBUG``,
which let everything through at that level. One handler on the root logger, to stderr.

Quiet also means: kafka-python's selector warns at WARNING whenever its I/O thread waited on
the GIL for more than 0.1 s ("Task ... ran for 0.2s"), which says nothing a user can act on;
it is at ERROR unless verbose. Hugging Face progress bars (loading weights) are off.
"""

from __future__ import annotations

import logging
import os

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
    if not loud:
        logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
