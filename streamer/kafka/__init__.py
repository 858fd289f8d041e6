"""Kafka plumbing the stages share: the batching consumer (poll, steps, backpressure,
rebalance, commit last) and the topics."""
