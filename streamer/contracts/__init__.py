"""What crosses a boundary: input events, the graph changelog record, the vector record, the
dead-letter record, and the rows of one graph transaction. Nothing here talks to Kafka or the
graph DB; sinks and encoders may import these (and the settings), nothing else of the runtime."""
