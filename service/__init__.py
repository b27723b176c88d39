"""The adapter-serving service: the resident base model, the engine that batches requests over it, the
adapter registry and the HTTP API. `adapters_core` does the adapter work; this package serves it."""
