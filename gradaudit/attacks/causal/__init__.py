"""The causal span attack for decoders: grow each sentence inside a gradient's row space."""
