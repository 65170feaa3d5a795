"""Integrations of lmloss with training libraries.

- ``lmloss.integrations.transformers``: the fused loss inside a transformers
  model's own ``forward`` (``apply``/``remove``) and a ``compute_loss_func`` for
  ``transformers.Trainer`` (``trainer_loss``).
- ``lmloss.integrations.trl``: TRL's trainers with lmloss's loss (``LMLossSFTTrainer``).

Each integration imports its library only when it is imported itself, so
``import lmloss`` never needs transformers.
"""

__all__: list[str] = []


def __getattr__(name: str) -> object:
    # ``lmloss.integrations.transformers``/``.trl`` work without an explicit import, still lazily.
    if name in ("transformers", "trl"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
