"""Federated rounds: aggregation of heterogeneous-rank LoRA updates (more to come)."""
