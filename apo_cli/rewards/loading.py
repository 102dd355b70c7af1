"""Resolving a reward name from the recipe to a callable: a registered name (:data:`REWARDS`: the
built-ins and the ``apo.rewards`` entry points), ``module:function`` or ``file.py:function``.

Custom code is imported only from what the recipe names, only with the user's opt-in
(:mod:`apo_cli.trust`: ``--trust-code`` or ``APO_TRUST_CODE=1``), and every way that can fail (no such
module, file or function; the module raising on import; something that is not callable) becomes a
one-line :class:`~apo_cli.errors.RewardError` that names the target. Training and evaluation import
custom rewards only inside their worker processes (:mod:`apo_cli.rewards.isolated`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from apo_cli.errors import RewardError
from apo_cli.rewards.builtin import REWARDS
from apo_cli.trust import require


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _load_file(path_text: str, target: str) -> object:
    path = Path(path_text).expanduser()
    if not path.is_absolute():
        path = path.resolve()
    if not path.is_file():
        raise RewardError(f"reward {target!r}: file not found: {path}")
    # a stable, unique module name per file, so two reward files named rewards.py do not collide
    mod_name = f"apo_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise RewardError(f"reward {target!r}: cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - user code may raise anything on import
        del sys.modules[mod_name]
        raise RewardError(f"reward {target!r}: importing {path} failed: {_one_line(e)}") from None
    return module


def _load_module(name: str, target: str) -> object:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise RewardError(f"reward {target!r}: no module named {name!r}") from None
        raise RewardError(f"reward {target!r}: importing {name!r} failed: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001
        raise RewardError(f"reward {target!r}: importing {name!r} failed: {_one_line(e)}") from None


def check_name(name: str) -> None:
    """RewardError unless ``name`` is registered or of the form ``module:function`` / ``file.py:function``."""
    where, sep, func = name.rpartition(":")
    if name not in REWARDS and (not sep or not where or not func):
        raise RewardError(
            f"unknown reward {name!r}; built-ins: {', '.join(REWARDS.names())}, "
            "or give 'module:function' / 'path/to/file.py:function'"
        )


def load_reward(name: str) -> Callable:
    """The callable for a recipe reward name: built-in, ``module:function`` or ``path/file.py:function``."""
    if name in REWARDS:
        try:
            return REWARDS.get(name)
        except Exception as e:  # noqa: BLE001 - a plugin's module may raise anything on import
            raise RewardError(f"reward {name!r}: importing it failed: {_one_line(e)}") from None
    check_name(name)
    require([f"reward {name!r}"])
    where, _, func = name.rpartition(":")
    module = _load_file(where, name) if where.endswith(".py") else _load_module(where, name)
    fn = getattr(module, func, None)
    if fn is None:
        raise RewardError(f"reward {name!r}: {where} has no attribute {func!r}")
    if not callable(fn):
        raise RewardError(f"reward {name!r}: {where}.{func} is a {type(fn).__name__}, not a function")
    return fn


def metric_key(name: str) -> str:
    """The short name used in metrics: the built-in's name, or the custom function's name."""
    return name.rpartition(":")[2] if ":" in name else name
