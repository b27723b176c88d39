"""adapter-serving: the HTTP service that serves many adapters on one resident base model."""
