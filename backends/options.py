"""The ``backend:`` section of a recipe: validated against the options model of the chosen kind only.

Every backend is one entry of :data:`backends.BACKENDS` (``Registry("backend", group="apo.backends")``),
and its *options model* — a :class:`BackendOptions` subclass, the pydantic model of its ``backend:``
keys — is found from that entry, in one of two ways:

- the entry is the **backend class** (what a third-party entry point usually names:
  ``mybackend = "my_pkg.backend:MyBackend"``): its class attribute ``options`` is the options model;
  a class without one gets a model with ``kind`` only (any other key is an error);
- the entry is a :class:`backends.BackendRef`, a **light descriptor** holding the options model and the
  backend class as ``"module:Class"``, imported only when the backend is created. The built-ins are
  registered this way (``backends.cpu_options:CPU``, ``backends.gpu_options:GPU``), and a third-party
  package may be too: validating a recipe imports the options module of its own kind only — a CPU
  recipe never imports torch, ``backends.gpu`` or vLLM.

An options model need not declare ``kind``: the one used is given ``kind: Literal[<name>]``. A kind that
is not registered lists the valid kinds (entry points included); a backend whose module cannot be
imported is one line naming it. This module imports pydantic and the registry only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, create_model
from pydantic_core import PydanticCustomError

from apo_cli.spec import Section
from backends import BACKENDS

__all__ = ["BackendOptions", "backend_options", "builtin_backend_options", "validate_backend"]


class BackendOptions(Section):
    """Base of the options model of a backend (the recipe's ``backend:`` section)."""

    kind: str = Field(..., description="The backend's registered name.")


# (kind, declared model or None) -> the model used, with kind: Literal[kind]
_MODELS: dict[tuple[str, type | None], type[BackendOptions]] = {}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _with_kind(kind: str, declared: type | None, owner: Any) -> type[BackendOptions]:
    key = (kind, declared)
    if key in _MODELS:
        return _MODELS[key]
    if declared is None:
        model = create_model(f"{getattr(owner, '__name__', kind)}Options", __base__=BackendOptions,
                             kind=(Literal[kind], kind))  # type: ignore[valid-type]
    elif not (isinstance(declared, type) and issubclass(declared, BackendOptions)):
        raise TypeError(f"backend {kind!r}: its options model must subclass backends.options.BackendOptions, "
                        f"not {declared!r}")
    elif declared.model_fields["kind"].default == kind:
        model = declared
    else:  # a model without its own kind (or one inherited from the backend it extends)
        model = create_model(declared.__name__, __base__=declared, __module__=declared.__module__,
                             kind=(Literal[kind], kind))  # type: ignore[valid-type]
    _MODELS[key] = model
    return model


def backend_options(kind: str) -> type[BackendOptions]:
    """The options model of backend ``kind``. Raises ``UnknownName`` (a KeyError) for an unknown kind,
    and whatever importing a third-party entry raises."""
    entry = BACKENDS.get(kind)
    return _with_kind(kind, getattr(entry, "options", None), entry)


def builtin_backend_options() -> list[tuple[str, type[BackendOptions]]]:
    """(kind, options model) of every built-in backend, in registration order (for the schema and docs)."""
    return [(kind, backend_options(kind)) for kind in BACKENDS.builtins()]


def _kinds_text(sep: str) -> str:
    return sep.join(BACKENDS.ordered())


def validate_backend(value: Any) -> Any:
    """Validate a recipe's ``backend:`` mapping against the options model of its ``kind``.

    Used as a before-validator of the recipe's ``backend`` field: problems are pydantic errors located
    under ``backend`` (``backend.threads``), so they are reported like those of any other section.
    """
    if isinstance(value, BaseModel):
        return value  # already an options instance (built in code)
    if not isinstance(value, dict):
        raise PydanticCustomError("model_type", "Input should be a valid dictionary or object to extract fields from")
    if "kind" not in value:
        raise PydanticCustomError("backend_kind_missing", "backend.kind is missing: set kind: {kinds}",
                                  {"kinds": _kinds_text(" or kind: ")})
    kind = value["kind"]
    if not isinstance(kind, str) or kind not in BACKENDS:
        raise PydanticCustomError("backend_kind_unknown", "unknown backend kind {kind}; valid kinds: {kinds}",
                                  {"kind": repr(str(kind)), "kinds": _kinds_text(", ")})
    try:
        model = backend_options(kind)
    except Exception as e:  # noqa: BLE001 - a plugin's module may raise anything on import
        raise PydanticCustomError("backend_unavailable", "backend {kind} cannot be loaded: {problem}",
                                  {"kind": repr(kind), "problem": _one_line(e)}) from None
    return model.model_validate(value)  # a ValidationError here is located under backend.<field>
