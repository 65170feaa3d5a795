"""Integrations of lmloss with training libraries.

- ``lmloss.integrations.transformers``: the fused loss inside a transformers
  model's own ``forward`` (``apply``/``remove``) and a ``compute_loss_func`` for
  ``transformers.Trainer`` (``trainer_loss``).

Each integration imports its library only when it is imported itself, so
``import lmloss`` never needs transformers.
"""

__all__: list[str] = []


def __getattr__(name: str) -> object:
    # ``lmloss.integrations.transformers`` works without an explicit import, still lazily.
    if name == "transformers":
        import importlib

        return importlib.import_module(f"{__name__}.transformers")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
