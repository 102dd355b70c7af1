"""The training loop (``loop``) and what it is built from; ``train_from_recipe`` runs a recipe.

``Trainer`` and ``train_from_recipe`` are imported from :mod:`apo_cli.train.loop` on first use, so
that ``apo_cli.train.spec`` (the recipe sections the loop reads) imports without the loop and torch.
"""

__all__ = ["Trainer", "train_from_recipe"]


def __getattr__(name):
    if name in __all__:
        from apo_cli.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
