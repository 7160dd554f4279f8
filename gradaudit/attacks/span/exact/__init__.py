"""Exact span mode: layer-0 query, key and value of an absolute-position encoder.

`screening` tests every token at every slot against the row space, `words` splits the gradient
into word and slot shares, `membership` tells sentences apart by attention, `search` sorts the
slots' tokens out by the gradient match, `solve` runs them and peels verified sentences.
"""
