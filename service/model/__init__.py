"""The base model: Llama-family decoder, loaders (HF folder, hub, GGUF), tokenizer and chat template."""
