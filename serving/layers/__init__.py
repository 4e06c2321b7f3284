"""Building blocks of the decoder: linear layers with TP shards, attention over the paged cache, norms, sampler."""
