"""Model families (adapters), module selection, batches, and loading models."""
