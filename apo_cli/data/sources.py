"""Reading raw rows (dicts) from a data source: built-in tasks, local files, or the Hugging Face hub.

``data.source`` is read as:

- ``builtin:arithmetic`` — generated integer arithmetic (:mod:`apo_cli.data.arithmetic`);
- ``builtin:gsm`` — GSM-style word problems (reasoning-gym's ``gsm_symbolic``);
- ``builtin:<name>`` — any reasoning-gym dataset, ``task_kwargs`` passed to its config
  (``size`` default 2000, ``seed`` default 0); rows carry ``metadata`` for the reasoning_gym reward;
- a path ending in .jsonl, .json, .parquet or .csv — a local file (the file *is* the split);
- anything else — ``datasets.load_dataset(source, config, split=...)`` (hub id or local dataset dir).

Heavy libraries (datasets, pyarrow, reasoning-gym) are imported only for the source that needs them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apo_cli.errors import DataError

if TYPE_CHECKING:
    from apo_cli.data.spec import DataSpec

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
BUILTIN_ALIASES = {"gsm": "gsm_symbolic"}


def _one_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0].strip()}" if lines else type(e).__name__


def source_kind(source: str) -> str:
    """'builtin', 'file' or 'hub' for a ``data.source`` value."""
    if source.startswith("builtin:"):
        return "builtin"
    if source.lower().endswith(FILE_SUFFIXES) or Path(source).is_file():
        return "file"  # an existing file with another extension gets read_file's "unsupported type"
    return "hub"


def read_rows(spec: DataSpec, split: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of ``spec.source`` (for hub datasets, of ``split``) and the columns to add to every example."""
    kind = source_kind(spec.source)
    if kind == "builtin":
        return _builtin_rows(spec.source.removeprefix("builtin:"), dict(spec.task_kwargs))
    if spec.task_kwargs:
        raise DataError(f"data.task_kwargs applies to builtin: tasks only, not to {spec.source}")
    if kind == "file":
        return read_file(Path(spec.source)), []
    return _hub_rows(spec.source, spec.config, split), []


# --------------------------------------------------------------------------------------------------
# Built-in tasks


def builtin_names() -> list[str]:
    """Every task name accepted after ``builtin:`` (imports reasoning-gym to list its datasets)."""
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError:
        return ["arithmetic", "gsm"]
    return ["arithmetic", "gsm", *sorted(DATASETS)]


def _builtin_rows(task: str, kwargs: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    if task == "arithmetic":
        from apo_cli.data.arithmetic import generate

        return generate(kwargs), []
    name = BUILTIN_ALIASES.get(task, task)
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise DataError(f"builtin:{task} needs the reasoning-gym package (pip install reasoning-gym)") from None
    if name not in DATASETS:
        raise DataError(f"unknown builtin task {task!r}; known: {', '.join(builtin_names())}")
    kwargs.setdefault("size", 2000)
    kwargs.setdefault("seed", 0)
    try:
        dataset = reasoning_gym.create_dataset(name, **kwargs)
        entries = list(dataset)
    except (TypeError, ValueError, AssertionError) as e:
        raise DataError(f"builtin:{task}: bad data.task_kwargs {kwargs}: {_one_line(e)}") from None
    rows = [{"prompt": e["question"], "answer": str(e["answer"]), "metadata": e.get("metadata", {})} for e in entries]
    return rows, ["metadata"]


# --------------------------------------------------------------------------------------------------
# Local files


def read_file(path: Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json/.parquet/.csv file; DataError naming the file (and line) when unreadable."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except DataError:
        raise
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one line naming the file
        raise DataError(f"{path}: cannot read {suffix[1:]} file: {_one_line(e)}") from None
    raise DataError(f"{path}: unsupported file type {suffix!r}; use {', '.join(FILE_SUFFIXES)}")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header line; a row with more or fewer fields than the header is an error.
    A UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped."""
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        for row in reader:
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                raise DataError(f"{path}: line {reader.line_num}: {len(row)} field{'s' if len(row) != 1 else ''}, "
                                f"but the header has {len(header)} ({', '.join(header)})")
            rows.append(dict(zip(header, row)))
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    """A list of objects, {"data"|"rows"|"examples": [...]}, or a mapping of equal-length column lists."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict):
        for key in ("data", "rows", "examples"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:
            lengths = {len(v) for v in data.values() if isinstance(v, list)}
            if data and len(lengths) == 1 and all(isinstance(v, list) for v in data.values()):
                cols = list(data)
                data = [dict(zip(cols, vals)) for vals in zip(*data.values())]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects (or a mapping of column lists)")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
    return data


# --------------------------------------------------------------------------------------------------
# Hub


def _hub_rows(source: str, config: str | None, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError("hub datasets need the 'datasets' package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as e:  # noqa: BLE001 - network, missing config/split, offline cache miss...
        where = f"{source!r}" + (f" (config {config!r})" if config else "")
        raise DataError(f"cannot load dataset {where}, split {split!r}: {_one_line(e)}") from None
    return ds.to_list()
