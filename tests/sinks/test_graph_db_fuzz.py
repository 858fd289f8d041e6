"""The write path fuzzed against the real graph DB (ArcadeDB over Bolt): every batch of events
that passed validation is written by ``GraphSink.write``, never refused and never failing with
anything else (validation is what guarantees that a valid event is storable: a refusal would
send a valid event to the dead-letter topic); and a value is stored as sent."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinks.graph_db import GraphRejected, GraphSink
from streamer.contracts.events import InvalidEvent, ProductEvent, decode_event
from streamer.ingest.plan import plan_batch
from tests.helpers import nasty_event_cases, query
from tests.streamer.contracts.test_fuzz import event_shaped


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(docs=st.lists(event_shaped(), min_size=1, max_size=6))
def test_valid_events_are_written_or_refused_as_data(settings, docs):
    events = []
    for doc in docs:
        try:
            events.append(decode_event(json.dumps(doc).encode("utf-8", "surrogatepass")))
        except InvalidEvent:
            pass
    if not events:
        return
    sink = GraphSink(settings)
    try:
        result = sink.write(plan_batch(events), source_ms=1)
    except GraphRejected as exc:
        raise AssertionError(f"the graph DB refused valid events {docs}: {exc.message}") from exc
    finally:
        sink.close()
    assert result.attempts >= 1


def test_nasty_but_valid_values_are_stored_verbatim(settings):
    sink = GraphSink(settings)
    try:
        for name, raw, valid in nasty_event_cases(prefix="verbatim-"):
            if not valid:
                continue
            event = decode_event(raw)
            assert isinstance(event, ProductEvent)
            sink.write(plan_batch([event]))
            stored = query(
                settings, "MATCH (p:Product {id: $id}) RETURN p.title AS title, p.description AS description", id=event.id
            )
            assert stored == [{"title": event.title, "description": event.description}], name
    finally:
        sink.close()


def test_a_value_the_driver_cannot_pack_is_a_refusal_not_a_crash(settings):
    """Validation keeps such values out; if one got past it, the sink must still report it as
    the data's fault (GraphRejected: the ingest step bisects and dead-letters the event)."""
    import pytest

    from streamer.contracts.graph_batch import GraphBatch

    event = decode_event(b'{"type":"product","id":"too-big","ts":1}')
    batch = plan_batch([event])
    row = batch.product_upserts[0]
    bad = GraphBatch(product_upserts=[{**row, "version": 2**70}], events=1)
    sink = GraphSink(settings)
    try:
        with pytest.raises(GraphRejected) as refused:
            sink.write(bad)
        assert refused.value.error_class.startswith("ValueRefused:")
        assert sink.write(batch).nodes_written == 1, "the sink is usable afterwards"
    finally:
        sink.close()
