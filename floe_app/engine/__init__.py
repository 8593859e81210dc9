"""Inference: the local llama.cpp model and the token-by-token decoding loop."""
