"""Deep span mode: any linear module past layer 0 whose weight gradient has a usable span.

`objective` scores candidate batches against the observed spans, `continuous` runs Adam on
embeddings and rounds them to tokens, `moves` builds and ranks discrete moves, `descent` sweeps
them, `search` chains starts, kicks and per-sentence searches, `solve` runs it for the attack.
"""
