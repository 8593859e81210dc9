"""Real parts for tests and benchmarks: a local OpenAI-compatible server and a fault proxy."""
