"""The pieces of ``lmloss train`` (the trainer itself lands with its issue).

``builtin``: the built-in SFT data set (``data/chat.jsonl``, made by
``scripts/make_builtin_data.py``), a locally trained ChatML tokenizer, and small
Qwen2 model configurations: everything a run needs without downloading anything.
"""
