"""On-device personalization: training data, LoRA training, GGUF export, adapter registry.

Nothing here is imported on the chat path; torch, transformers and peft load only when
training runs.
"""
