"""Layers and algorithms both models share: attention with a KV cache, activations, losses, decoding
(sampling, the token loop, beam search) and taps (captured and edited intermediates)."""
