"""Sparse models that pay off: the packed checkpoint and the packed layers that run from it.

`packing` packs one weight (bitmask or N:M), `format` reads and writes the checkpoint (`lmprune pack`,
`unpack`, `prune --save-format sparse`), `model` builds a transformers model from it, `linear` is the
packed layer (SparseLinear), `kernel` + gemv.cpp the compiled batch-1 GEMV, `autoload` the opt-in
registration with transformers' Auto classes.
"""
