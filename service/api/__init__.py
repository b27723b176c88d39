"""HTTP routes, one module per noun: openai (OpenAI-compatible inference), native (TGI/LoRAX shape),
admin (adapter management), health (liveness, readiness, metrics); errors and dependencies beside them."""
