"""The rows of one graph transaction: the contract between ingest's planner and the graph sink.

``streamer.ingest.plan.plan_batch`` builds a ``GraphBatch`` from the valid events of one
consumer batch (coalesced: at most one row per entity); ``sinks.graph_db.GraphSink.write``
sends each list as the ``$rows`` parameter of one statement of ``sinks/cypher.py``.

Row fields (all plain JSON-able values, so the Bolt driver packs them directly):

* ``product_upserts``: ``id``, ``ts`` (epoch ms), ``version``, ``title``, ``description``,
  ``brand``, ``categories`` (path), ``attributes`` (JSON text), ``price``, ``owned``
  (``"REL|dst id"`` of every structural out-edge), and the flattened structure rows
  ``brand_ids``, ``categories_path`` (``{id, name}`` per prefix), ``leaf_category``,
  ``attribute_nodes`` (``{id, key, value}``);
* ``product_deletes``: ``id``, ``ts``, ``version``;
* ``interactions``: per relationship type (``PURCHASED`` ...), rows ``user_id``,
  ``product_id``, ``tss`` (sorted distinct event times), ``rating``, ``rating_ts``;
* ``relations``: per ``(src label, rel, dst label)``, rows ``src``, ``dst``, ``ts``, ``op``
  (``upsert`` | ``delete``), ``props``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]


@dataclass
class GraphBatch:
    """Rows for one graph transaction; see sinks/cypher.py for the statement each list feeds."""

    product_upserts: list[Row] = field(default_factory=list)
    product_deletes: list[Row] = field(default_factory=list)
    interactions: dict[str, list[Row]] = field(default_factory=dict)  # rel type -> rows
    relations: dict[tuple[str, str, str], list[Row]] = field(default_factory=dict)  # (src label, rel, dst label)
    events: int = 0

    def is_empty(self) -> bool:
        return not (self.product_upserts or self.product_deletes or self.interactions or self.relations)
