"""The one implementation behind every fast path of lmloss (private: the names inside
are public to lmloss's own modules, not to users).

- ``plan``: targets per position (alignment, ``TargetPlan``, the mean over items).
- ``rowmath``: the per-token loss terms and the logits gradient, written once.
- ``reducer``: the row statistics of a chunk, on one process or over a vocabulary-
  sharded group (the seam vocabulary parallelism plugs into).
- ``chunks``: the chunk machinery (scored rows, buffers, gradient accumulation,
  chunk sizing, autocast of inputs).
- ``logprobs``: per-token log-probs and entropies by chunks, with a log-prob reducer
  (the whole vocabulary, or a shard with one exchange per chunk).
- ``guard``: the checks of a loss whose gradients are made in forward.
- ``logits_rows``: per-row losses of materialized logits, upcast and checkpointed
  chunk by chunk (the loop of the losses on logits; their row math is their own).
"""
