"""A corpus of bad inputs across commands, and the security properties of what apo reads.

Every case is one command line built around a bad input (a model folder, a data file, a reward, a
run directory, a checkpoint, a prompts file...). It must end with the expected exit code and ONE
`error:` line, without a traceback, that names the culprit (a path, a row, a field). Recipe *parsing*
errors live in tests/bad_recipes/ and are not repeated here. Fixture files are in tests/bad_inputs/.

A case with ``known_bug`` is a strict xfail stating the behaviour wanted once the bug (outside this
test's reach) is fixed; when it starts passing, drop ``known_bug``.
"""

from __future__ import annotations

import ast
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import FIXTURES, tiny_recipe, write_recipe
from tests.test_faults import strip_reward_traceback

BAD = Path(__file__).parent / "bad_inputs"
TOY = FIXTURES / "toy_rewards.py"
REPO = Path(__file__).parents[1]
MIN_CASES = 50


@dataclass
class Env:
    """Where a case builds its inputs; ``trained`` is a finished 1-step run to copy from."""

    tmp: Path
    trained: Path
    tiny: Path

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    def recipe(self, change: Callable[[dict], Any] | None = None, name: str = "recipe.yaml") -> str:
        d = tiny_recipe(self.tmp, "run", run={"max_steps": 1})
        if change is not None:
            change(d)
        return str(write_recipe(self.tmp, d, name))

    def train(self, change: Callable[[dict], Any] | None = None, *extra: str) -> list[str]:
        return ["train", self.recipe(change), *extra]

    def copy_run(self) -> Path:
        shutil.copytree(self.trained, self.run)
        return self.run

    def model_copy(self, name: str, drop: tuple[str, ...] = (), write: dict[str, bytes] | None = None) -> str:
        m = self.tmp / name
        shutil.copytree(self.tiny, m)
        for f in drop:
            (m / f).unlink()
        for f, data in (write or {}).items():
            (m / f).write_bytes(data)
        return str(m)

    def file(self, name: str, text: str) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p


@dataclass
class Case:
    id: str
    args: Callable[[Env], list[str]]
    code: int
    culprit: tuple[str, ...]  # substrings of the error line; {tmp} {bad} {run} {trained} are expanded
    known_bug: str | None = None


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A recipe change: set a dotted field (a file data source drops the built-in task's kwargs)."""
    def change(d: dict) -> None:
        node = d
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value() if callable(value) else value
        if path == "data.source" and not str(node[last]).startswith("builtin:"):
            node.pop("task_kwargs", None)
    return change


def _all(*changes: Callable[[dict], None]) -> Callable[[dict], None]:
    def change(d: dict) -> None:
        for c in changes:
            c(d)
    return change


def _data(name: str, **more: Any) -> Callable[[dict], None]:
    return _all(_set("data.source", str(BAD / "data" / name)), *(_set(f"data.{k}", v) for k, v in more.items()))


def _reward(name: str, **spec: Any) -> Callable[[dict], None]:
    return _set("rewards", [{"name": name, **spec}])


def _corrupt_checkpoint(env: Env, name: str) -> str:
    run = env.copy_run()
    ck = run / "checkpoints" / "step-1"
    f = ck / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return str(ck)


def _pickled_bin_model(env: Env) -> str:
    """The tiny model with its weights as a pickled pytorch_model.bin that also holds a code-running object."""
    import torch
    from safetensors.torch import load_file

    class Evil:
        def __reduce__(self):
            return (open, (str(env.tmp / "pwned"), "w"))

    m = Path(env.model_copy("m"))
    state = {**load_file(m / "model.safetensors"), "evil": Evil()}
    (m / "model.safetensors").unlink()
    torch.save(state, m / "pytorch_model.bin")
    return str(m)


def _recipes_through_a_dangling_link(env: Env) -> list[str]:
    (env.tmp / "elsewhere").mkdir()
    link = env.tmp / "mine.yaml"
    link.symlink_to(env.tmp / "elsewhere" / "target.yaml")
    return ["recipes", "quickstart", str(link)]


def _python_tag_run_dir(env: Env) -> list[str]:
    env.run.mkdir()
    (env.run / "recipe.yaml").write_text(f"!!python/object/apply:os.system ['touch {env.tmp}/pwned']\n")
    return env.train(None, "--output-dir", str(env.run), "--resume")


_ALIAS_BOMB = "a: &a [" + ",".join(["x"] * 10) + "]\n" + "".join(
    f"{n}: &{n} [" + ",".join([f"*{p}"] * 10) + "]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def _alias_bomb_run_dir(*command: str) -> Callable[[Env], list[str]]:
    """A run directory (someone else's) whose recipe.yaml is a ~1 kB YAML alias bomb (10^9 values):
    before, reading it back (--resume, inspect-alpha, eval --base) ran for hours."""
    def make(env: Env) -> list[str]:
        env.file("run/recipe.yaml", _ALIAS_BOMB)
        env.file("run/metrics.jsonl", json.dumps({"step": 1, "reward": 0.5}) + "\n")
        if command[0] == "train":
            return env.train(None, "--resume", "--output-dir", str(env.run))
        return [*command, str(env.run)]
    return make


def _syntax_error_reward(env: Env) -> list[str]:
    f = env.file("rewards/syntax_error.py", "def frac_a(completions, **_):\n    return [0.0 for c in completions\n")
    return env.train(_reward(f"{f}:frac_a"))


def _kill_leftover(env: Env) -> list[str]:
    """A checkpoint folder a kill left half-written: weights, no checksums."""
    ck = env.tmp / ".tmp-step-2-abc"
    shutil.copytree(env.trained / "checkpoints" / "step-1", ck)
    (ck / "checksums.json").unlink()
    return env.train(None, "--resume-from", str(ck), "--output-dir", str(env.tmp / "new"))


def _generate(*args: str) -> Callable[[Env], list[str]]:
    return lambda env: ["generate", *[a.format(bad=BAD, tmp=env.tmp, trained=env.trained) for a in args]]


def _eval(*args: str) -> Callable[[Env], list[str]]:
    return lambda env: ["eval", *[a.format(bad=BAD, tmp=env.tmp, trained=env.trained) for a in args]]


CASES = [
    # ---- apo train: the model --------------------------------------------------------------------
    Case("model_path_missing", lambda e: e.train(_set("model.name_or_path", str(e.tmp / "no_model"))), 1,
         ("{tmp}/no_model", "does not exist")),
    Case("model_path_missing_names_it", lambda e: e.train(_set("model.name_or_path", str(e.tmp / "no_model"))), 1,
         ("{tmp}/no_model",)),
    Case("model_folder_without_config", lambda e: e.train(_set("model.name_or_path", e.model_copy("m", ("config.json",)))),
         1, ("{tmp}/m", "config.json")),
    Case("model_config_not_json", lambda e: e.train(_set("model.name_or_path", e.model_copy("m", write={"config.json": b"{oops"}))),
         1, ("{tmp}/m/config.json", "not a valid JSON")),
    Case("model_without_weights", lambda e: e.train(_set("model.name_or_path", e.model_copy("m", ("model.safetensors",)))),
         1, ("{tmp}/m", "no file named model.safetensors")),
    Case("model_weights_garbage", lambda e: e.train(_set("model.name_or_path", e.model_copy("m", write={"model.safetensors": b"garbage"}))),
         1, ("{tmp}/m",)),
    Case("model_unknown_model_type",
         lambda e: e.train(_set("model.name_or_path", e.model_copy("m", write={"config.json": b'{"model_type": "nonsense"}'}))),
         1, ("{tmp}/m",)),
    Case("model_hub_id_offline", lambda e: e.train(_set("model.name_or_path", "nonexistent-org/nonexistent-model")),
         1, ("nonexistent-org/nonexistent-model",)),
    Case("tokenizer_path_missing", lambda e: e.train(_set("model.tokenizer", str(e.tmp / "no_tok"))), 1,
         ("{tmp}/no_tok",)),
    Case("tokenizer_json_garbage", lambda e: e.train(_set("model.name_or_path", e.model_copy("m", write={"tokenizer.json": b"{oops"}))),
         1, ("{tmp}/m", "tokenizer")),
    Case("model_pickled_bin_with_code", lambda e: e.train(_set("model.name_or_path", _pickled_bin_model(e))), 1,
         ("cannot load model '{tmp}/m'", "pickled weights (.bin) hold objects other than tensors")),
    Case("lora_unknown_target_module", lambda e: e.train(_set("model.lora", {"target_modules": ["no_such_proj"]})), 1,
         ("no_such_proj",)),
    Case("chat_template_on_without_one", lambda e: e.train(_set("data.chat_template", "on")), 2,
         ("has no chat template", "data.chat_template")),
    # ---- apo train: the data ---------------------------------------------------------------------
    Case("data_file_missing", lambda e: e.train(_set("data.source", str(e.tmp / "nope.jsonl"))), 2,
         ("data file not found", "{tmp}/nope.jsonl")),
    Case("data_file_wrong_extension", lambda e: e.train(_data("prompts.txt")), 2, ("{bad}/data/prompts.txt",)),
    Case("data_file_wrong_extension_says_so", lambda e: e.train(_data("prompts.txt")), 2,
         ("{bad}/data/prompts.txt", "unsupported file type")),
    Case("data_source_is_a_folder", lambda e: e.train(_set("data.source", str((e.tmp / "dir.jsonl").mkdir() or e.tmp / "dir.jsonl"))),
         2, ("data file not found", "{tmp}/dir.jsonl")),
    Case("jsonl_malformed_line", lambda e: e.train(_data("malformed_line3.jsonl")), 2,
         ("malformed_line3.jsonl: line 3: invalid JSON",)),
    Case("jsonl_line_not_an_object", lambda e: e.train(_data("not_an_object_line2.jsonl")), 2,
         ("not_an_object_line2.jsonl: line 2: expected a JSON object, got list",)),
    Case("jsonl_missing_prompt_column", lambda e: e.train(_data("missing_prompt_row2.jsonl")), 2,
         ("missing_prompt_row2.jsonl: row 2 has no column 'prompt' (data.prompt_column)",)),
    Case("jsonl_missing_answer_column", lambda e: e.train(_data("missing_answer_row1.jsonl")), 2,
         ("missing_answer_row1.jsonl: row 1 has no column 'answer' (data.answer_column)",)),
    Case("mapped_prompt_column_missing", lambda e: e.train(_data("good.jsonl", prompt_column="question")), 2,
         ("good.jsonl: row 0 has no column 'question' (data.prompt_column)",)),
    Case("mapped_answer_column_missing", lambda e: e.train(_data("good.jsonl", answer_column="solution")), 2,
         ("good.jsonl: row 0 has no column 'solution' (data.answer_column)",)),
    Case("extra_column_missing", lambda e: e.train(_data("good.jsonl", extra_columns=["difficulty"])), 2,
         ("good.jsonl: row 0 has no column 'difficulty' (data.extra_columns)",)),
    Case("empty_prompt", lambda e: e.train(_data("empty_prompt_row1.jsonl")), 2,
         ("empty_prompt_row1.jsonl: row 1: column 'prompt' (data.prompt_column) is empty",)),
    Case("empty_data_file", lambda e: e.train(_data("empty.jsonl")), 2, ("empty.jsonl: no rows",)),
    Case("json_not_a_list", lambda e: e.train(_data("not_a_list.json")), 2, ("not_a_list.json: expected a list",)),
    Case("json_invalid", lambda e: e.train(_data("invalid_line3.json")), 2, ("invalid_line3.json: line 3: invalid JSON",)),
    Case("json_row_not_an_object", lambda e: e.train(_data("row1_not_object.json")), 2,
         ("row1_not_object.json: row 1: expected an object, got int",)),
    Case("csv_missing_prompt_column", lambda e: e.train(_data("no_prompt_column.csv")), 2,
         ("no_prompt_column.csv: row 0 has no column 'prompt'",)),
    Case("data_not_utf8", lambda e: e.train(_data("latin1.jsonl")), 2, ("latin1.jsonl: not UTF-8",)),
    Case("parquet_corrupt", lambda e: e.train(_data("corrupt.parquet")), 2, ("corrupt.parquet: cannot read parquet file",)),
    Case("filter_column_missing", lambda e: e.train(_data("good.jsonl", filters={"level": 3})), 2,
         ("good.jsonl: row 0 has no column 'level' (used in data.filters)",)),
    Case("filter_matches_nothing", lambda e: e.train(_data("good.jsonl", filters={"topic": "division"})), 2,
         ("good.jsonl: no row of 2 matches data.filters", "'products'")),
    Case("eval_fraction_with_one_row", lambda e: e.train(_data("one_row.jsonl", eval_fraction=0.5)), 2,
         ("one_row.jsonl: data.eval_fraction=0.5 needs at least 2 rows",)),
    Case("prompt_template_unknown_column", lambda e: e.train(_set("data.prompt_template", "Q: {question}")), 2,
         ("data.prompt_template uses {question}",)),
    Case("unknown_builtin_task", lambda e: e.train(_set("data.source", "builtin:no_such_task")), 2,
         ("unknown builtin task 'no_such_task'",)),
    Case("task_kwargs_on_a_file", lambda e: e.train(_all(_data("good.jsonl"), _set("data.task_kwargs", {"level": 2}))), 2,
         ("data.task_kwargs applies to builtin: tasks only", "good.jsonl")),
    Case("arithmetic_level_out_of_range", lambda e: e.train(_set("data.task_kwargs", {"level": 99})), 2,
         ("data.task_kwargs.level must be one of 1..5 (got 99)",)),
    Case("arithmetic_unknown_kwarg", lambda e: e.train(_set("data.task_kwargs", {"bogus": 1})), 2,
         ("data.task_kwargs has unknown key 'bogus'",)),
    Case("csv_row_with_an_extra_field", lambda e: e.train(_data("ragged_line3.csv")), 2,
         ("ragged_line3.csv: line 3: 3 fields, but the header has 2 (prompt, answer)",)),
    Case("csv_row_missing_a_field", lambda e: e.train(_data("short_line3.csv")), 2,
         ("short_line3.csv: line 3: 1 field, but the header has 2",)),
    Case("prompt_is_a_number", lambda e: e.train(_data("prompt_number_row1.jsonl")), 2,
         ("prompt_number_row1.jsonl: row 1: column 'prompt' (data.prompt_column) holds a number (42), not text",)),
    Case("prompt_is_an_object", lambda e: e.train(_data("prompt_object_row1.jsonl")), 2,
         ("prompt_object_row1.jsonl: row 1: column 'prompt' (data.prompt_column) holds an object",
          "a chat prompt is a list of such messages")),
    Case("prompt_is_a_boolean", lambda e: e.train(_data("prompt_bool_row0.jsonl")), 2,
         ("prompt_bool_row0.jsonl: row 0: column 'prompt' (data.prompt_column) holds a boolean (True)",)),
    Case("prompt_is_nan", lambda e: e.train(_data("prompt_nan_row1.json")), 2,
         ("prompt_nan_row1.json: row 1: column 'prompt' (data.prompt_column) is empty",)),
    Case("chat_message_without_content", lambda e: e.train(_data("chat_message_without_content_row0.jsonl")), 2,
         ("chat_message_without_content_row0.jsonl: row 0: column 'prompt' (data.prompt_column) holds a list whose "
          "item 1 is an object without 'role' and 'content'",)),
    Case("chat_prompt_without_a_user_message", lambda e: e.train(_data("chat_without_user_row0.jsonl")), 2,
         ("chat_without_user_row0.jsonl: row 0", "no 'user' message")),
    Case("chat_prompts_for_a_tokenizer_without_a_chat_template", lambda e: e.train(_data("chat_prompts.jsonl")), 2,
         ("{bad}/data/chat_prompts.jsonl: row ", "is a chat prompt", "needs a chat template",
          "the tokenizer of ")),
    # ---- apo train: the rewards ------------------------------------------------------------------
    Case("reward_file_missing", lambda e: e.train(_reward(f"{e.tmp}/nope.py:score")), 1,
         ("reward '{tmp}/nope.py:score': file not found",)),
    Case("reward_function_missing", lambda e: e.train(_reward(f"{TOY}:no_such_function")), 1,
         ("has no attribute 'no_such_function'", "toy_rewards.py")),
    Case("reward_not_callable", lambda e: e.train(_reward(f"{TOY}:NOT_CALLABLE")), 1,
         ("NOT_CALLABLE is a int, not a function",)),
    Case("reward_module_missing", lambda e: e.train(_reward("no_such_module_xyz:score")), 1,
         ("no module named 'no_such_module_xyz'",)),
    Case("reward_file_syntax_error", _syntax_error_reward, 1, ("syntax_error.py failed: SyntaxError",)),
    Case("reward_file_raises_on_import", lambda e: e.train(_reward(f"{BAD}/rewards/raises_on_import.py:score")), 1,
         ("raises_on_import.py failed: RuntimeError: the reward server is not configured",)),
    Case("builtin_reward_unknown_kwarg", lambda e: e.train(_reward("exact_match", kwargs={"tolerance": 0.1})), 1,
         ("reward exact_match: unknown kwargs key 'tolerance'",)),
    Case("reward_fails_on_every_sample", lambda e: e.train(_reward(f"{TOY}:explode")), 2,
         ("reward explode failed on all 16 samples", "this reward always fails")),
    Case("reward_returns_strings", lambda e: e.train(_reward(f"{TOY}:wrong_type")), 2,
         ("reward wrong_type failed on all 16 samples", "returned str '0.5' for completion 0")),
    # ---- apo train: run directories, resume, checkpoints ----------------------------------------
    Case("run_dir_holds_another_recipes_run",
         lambda e: (e.copy_run(), e.train(_set("rollout.temperature", 0.5), "--output-dir", str(e.run)))[1], 1,
         ("run directory {run} already holds another recipe's run", "--resume")),
    Case("run_dir_holds_this_run_without_resume",
         lambda e: (e.copy_run(), e.train(None, "--output-dir", str(e.run)))[1], 1,
         ("run directory {run} already holds a run of this recipe", "--resume")),
    Case("resume_with_nothing_to_resume", lambda e: e.train(None, "--resume", "--output-dir", str(e.run)), 1,
         ("nothing to resume in {run}",)),
    Case("resume_with_an_unsafe_change",
         lambda e: (e.copy_run(), e.train(_set("rollout.temperature", 0.5), "--resume", "--output-dir", str(e.run)))[1], 1,
         ("cannot change on resume: rollout.temperature",)),
    Case("resume_allowing_changes_still_refuses_unsafe_ones",
         lambda e: (e.copy_run(), e.train(_set("optim.warmup_steps", 5), "--resume", "--allow-recipe-change",
                                          "--output-dir", str(e.run)))[1], 1,
         ("cannot change on resume: optim.warmup_steps",)),
    Case("resume_from_missing", lambda e: e.train(None, "--resume-from", str(e.tmp / "step-9")), 1,
         ("checkpoint {tmp}/step-9 does not exist",)),
    Case("resume_from_a_file", lambda e: e.train(None, "--resume-from", str(e.file("ck.txt", "x"))), 1,
         ("checkpoint {tmp}/ck.txt is not a folder",)),
    Case("resume_from_a_run_dir", lambda e: e.train(None, "--resume-from", str(e.trained)), 1,
         ("checkpoint {trained} is incomplete: checksums.json is missing", "use --resume")),
    Case("resume_from_corrupt_weights",
         lambda e: e.train(None, "--resume-from", _corrupt_checkpoint(e, "model.safetensors")), 1,
         ("checkpoint {run}/checkpoints/step-1: model.safetensors is corrupted (checksum mismatch)",)),
    Case("resume_from_corrupt_optimizer",
         lambda e: e.train(None, "--resume-from", _corrupt_checkpoint(e, "optimizer.pt")), 1,
         ("checkpoint {run}/checkpoints/step-1: optimizer.pt is corrupted (checksum mismatch)",)),
    Case("resume_from_corrupt_trainer_state",
         lambda e: e.train(None, "--resume-from", _corrupt_checkpoint(e, "trainer_state.json")), 1,
         ("checkpoint {run}/checkpoints/step-1: trainer_state.json is corrupted (checksum mismatch)",)),
    Case("resume_from_a_kill_leftover", _kill_leftover, 1,
         ("checkpoint {tmp}/.tmp-step-2-abc is incomplete: checksums.json is missing",)),
    Case("run_dir_recipe_not_yaml",
         lambda e: (e.file("run/recipe.yaml", "model: [unclosed"), e.train(None, "--resume", "--output-dir", str(e.run)))[1],
         1, ("{run}/recipe.yaml is not valid YAML",)),
    Case("run_dir_recipe_python_tag", _python_tag_run_dir, 1, ("{run}/recipe.yaml is not valid YAML",)),
    Case("run_dir_recipe_alias_bomb_resume", _alias_bomb_run_dir("train"), 1,
         ("{run}/recipe.yaml: line", "expands to more than 100,000 values")),
    Case("run_dir_recipe_alias_bomb_inspect", _alias_bomb_run_dir("inspect-alpha"), 1,
         ("{run}/recipe.yaml: line", "expands to more than 100,000 values")),
    Case("run_dir_recipe_not_a_mapping",
         lambda e: (e.file("run/recipe.yaml", "- a\n- b\n"), e.train(None, "--resume", "--output-dir", str(e.run)))[1],
         1, ("{run}/recipe.yaml is not a recipe",)),
    Case("output_dir_is_a_file", lambda e: e.train(None, "--output-dir", str(e.file("run", "x"))), 1,
         ("run directory {run} is a file, not a folder",)),
    Case("output_dir_under_a_file", lambda e: e.train(None, "--output-dir", str(e.file("f", "x")) + "/run"), 1,
         ("cannot create run directory {tmp}/f/run: {tmp}/f is a file",)),
    Case("metrics_file_is_a_folder",
         lambda e: ((e.tmp / "run/metrics.jsonl").mkdir(parents=True), e.train(None, "--output-dir", str(e.run)))[1], 1,
         ("run directory {run} is not empty and holds no apo run (no recipe.yaml): metrics.jsonl",)),
    Case("checkpoints_is_a_file",
         lambda e: (e.file("run/checkpoints", "x"), e.train(None, "--output-dir", str(e.run)))[1], 1,
         ("run directory {run} is not empty and holds no apo run (no recipe.yaml): checkpoints",)),
    # ---- apo train: the recipe file itself (parsing is covered by tests/bad_recipes) -------------
    Case("recipe_file_missing", lambda e: ["train", str(e.tmp / "nope.yaml")], 2, ("{tmp}/nope.yaml", "recipe file not found")),
    Case("recipe_is_a_folder", lambda e: ["train", str(e.tmp)], 2, ("{tmp}", "is a directory")),
    # ---- apo generate ----------------------------------------------------------------------------
    Case("generate_corrupted_checkpoint", lambda e: ["generate", _corrupt_checkpoint(e, "model.safetensors"), "-p", "x"],
         1, ("{run}/checkpoints/step-1: model.safetensors is corrupted",)),
    Case("generate_run_dir_all_corrupted",
         lambda e: ["generate", str(Path(_corrupt_checkpoint(e, "model.safetensors")).parents[1]), "-p", "x"], 1,
         ("run directory {run} has no intact checkpoint",)),
    Case("generate_model_is_a_file", lambda e: ["generate", str(e.file("model.bin", "x")), "-p", "x"], 1,
         ("{tmp}/model.bin is a file",)),
    Case("generate_folder_not_a_model", lambda e: ["generate", str((e.tmp / "empty").mkdir() or e.tmp / "empty"), "-p", "x"],
         1, ("{tmp}/empty is not a model folder",)),
    Case("generate_prompts_file_missing", _generate("tiny-random", "-f", "{tmp}/nope.txt"), 2, ("{tmp}/nope.txt",)),
    Case("generate_prompts_jsonl_malformed", _generate("tiny-random", "-f", "{bad}/prompts/malformed.jsonl"), 2,
         ("{bad}/prompts/malformed.jsonl:2",)),
    Case("generate_prompts_jsonl_without_prompt", _generate("tiny-random", "-f", "{bad}/prompts/missing_prompt_field.jsonl"),
         2, ("{bad}/prompts/missing_prompt_field.jsonl:2", "'prompt'")),
    Case("generate_prompt_and_prompts_file", _generate("tiny-random", "-p", "x", "-f", "{bad}/prompts/empty.txt"), 2,
         ("--prompt", "--prompts-file")),
    Case("generate_temperature_zero", _generate("tiny-random", "-p", "x", "-t", "0"), 2, ("--temperature", "--greedy")),
    # ---- apo eval --------------------------------------------------------------------------------
    Case("eval_recipe_and_data", _eval("{trained}", "--recipe", "{tmp}/r.yaml", "--data", "{bad}/data/good.jsonl"), 2,
         ("--recipe", "--data")),
    Case("eval_reward_without_data", _eval("{trained}", "--reward", "exact_match"), 2, ("--reward", "--data")),
    Case("eval_fewer_samples_than_k", _eval("{trained}", "--data", "{bad}/data/good.jsonl", "-k", "4", "-n", "2"), 2,
         ("--samples 2", "-k 4")),
    Case("eval_data_file_missing", _eval("{trained}", "--data", "{tmp}/nope.jsonl"), 2, ("{tmp}/nope.jsonl",)),
    Case("eval_data_malformed_line", _eval("{trained}", "--data", "{bad}/data/malformed_line3.jsonl"), 2,
         ("malformed_line3.jsonl: line 3: invalid JSON",)),
    Case("eval_unknown_reward", _eval("{trained}", "--data", "{bad}/data/good.jsonl", "--reward", "no_such_reward"), 1,
         ("no_such_reward",)),
    Case("eval_recipe_file_missing", _eval("{trained}", "--recipe", "{tmp}/nope.yaml"), 2, ("{tmp}/nope.yaml",)),
    # ---- apo recipes ----------------------------------------------------------------------------
    Case("recipes_copy_through_a_dangling_symlink", _recipes_through_a_dangling_link, 2,
         ("{tmp}/mine.yaml is a symbolic link (to {tmp}/elsewhere/target.yaml)",)),
    # ---- apo inspect-alpha -----------------------------------------------------------------------
    Case("inspect_a_file_that_is_not_metrics", lambda e: ["inspect-alpha", str(e.file("notes.txt", "hello\n"))], 1,
         ("{tmp}/notes.txt holds no readable step",)),
    Case("inspect_metrics_is_a_folder",
         lambda e: ["inspect-alpha", str((e.tmp / "r/metrics.jsonl").mkdir(parents=True) or e.tmp / "r")], 1,
         ("{tmp}/r has no metrics.jsonl",)),
    Case("inspect_metrics_not_json", lambda e: ["inspect-alpha", str(e.file("r/metrics.jsonl", "not json\n").parent)], 1,
         ("{tmp}/r/metrics.jsonl",)),
]


def _error_message(out: str) -> str:
    """The one `error:` line (with a recipe error's indented problem lines); no traceback anywhere."""
    out = strip_reward_traceback(out)
    assert "Traceback" not in out, out
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, out
    block = [lines[starts[0]]]
    for line in lines[starts[0] + 1:]:
        if not line.startswith("  - "):
            break
        block.append(line)
    return "\n".join(block)


def _expand(text: str, env: Env) -> str:
    for key, value in (("{tmp}", env.tmp), ("{bad}", BAD), ("{run}", env.run), ("{trained}", env.trained)):
        text = text.replace(key, str(value))
    return text


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from apo_cli.recipe import recipe_from_dict
    from apo_cli.train import train_from_recipe

    tmp = tmp_path_factory.mktemp("trained")
    train_from_recipe(recipe_from_dict(tiny_recipe(tmp, "run", run={"max_steps": 1})))
    return tmp / "run"


@pytest.fixture(scope="module")
def tiny() -> Path:
    from apo_cli.models import ensure_tiny

    return ensure_tiny(0)


def test_the_corpus_is_large_enough():
    assert len(CASES) >= MIN_CASES
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.known_bug, strict=True)] if c.known_bug else [])
             for c in CASES])
def test_bad_input_is_one_line_naming_the_culprit(case: Case, cli, tmp_path, trained, tiny, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = Env(tmp_path, trained, tiny)
    args = case.args(env)
    res = cli(*args)
    out = res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), f"uncaught {res.exception!r}\n{out}"
    message = _error_message(out)
    for text in case.culprit:
        assert _expand(text, env) in message, f"{_expand(text, env)!r} not in {message!r}"
    assert res.exit_code == case.code, out
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------------------------
# Security: what apo executes and what it writes


def test_trust_remote_code_is_false_unless_the_recipe_sets_it(monkeypatch, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apo_cli.models import load_policy
    from apo_cli.recipe import recipe_from_dict

    seen: list[tuple[str, Any]] = []

    def spy(cls_name, real):
        def fake(*args, **kwargs):
            seen.append((cls_name, kwargs.get("trust_remote_code", "absent")))
            return real(*args, **kwargs)
        return fake

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy("model", AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", spy("tokenizer", AutoTokenizer.from_pretrained))
    load_policy(recipe_from_dict({"model": {"name_or_path": str(tiny)}}).model)
    assert seen == [("tokenizer", False), ("model", False)]
    seen.clear()
    load_policy(recipe_from_dict({"model": {"name_or_path": str(tiny), "trust_remote_code": True}}).model)
    assert seen == [("tokenizer", True), ("model", True)]


def test_yaml_python_tags_are_rejected_not_executed(cli, tmp_path):
    marker = tmp_path / "pwned"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    res = cli("train", str(recipe))
    assert res.exit_code == 2 and "python/object" in res.output
    assert not marker.exists()


def test_only_the_code_a_recipe_names_is_imported(tmp_path, monkeypatch):
    """Python files beside the recipe, in the data folder or in a local dataset folder never run."""
    import sys

    from apo_cli.errors import DataError
    from apo_cli.recipe import load_recipe
    from apo_cli.train import Trainer

    marker = tmp_path / "pwned"
    evil = f"open({str(marker)!r}, 'w').write('ran')\n"
    for name in ("rewards.py", "reward.py", "data.py", "sitecustomize.py", "apo_plugin.py"):
        (tmp_path / name).write_text(evil)
    ds = tmp_path / "my_dataset"
    ds.mkdir()
    (ds / "my_dataset.py").write_text(evil)
    named = tmp_path / "named.py"
    named.write_text("def score(completions, **_):\n    return [1.0] * len(completions)\n")
    d = tiny_recipe(tmp_path, "run", run={"max_steps": 1}, rewards=[{"name": "named.py:score"}])
    monkeypatch.chdir(tmp_path)
    t = Trainer(load_recipe(write_recipe(tmp_path, d)))
    t.train()
    assert not marker.exists()
    assert [m for m in sys.modules.values() if str(getattr(m, "__file__", "") or "").startswith(str(tmp_path))] == \
        [sys.modules[n] for n in sys.modules if n.startswith("apo_reward_named_")]
    d = tiny_recipe(tmp_path, "run2", data={"source": str(ds)})
    d["data"].pop("task_kwargs")
    with pytest.raises(DataError, match="my_dataset"):
        Trainer(load_recipe(write_recipe(tmp_path, d, "r2.yaml")))
    assert not marker.exists()


def _calls(tree: ast.AST, module: str, func: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == func and isinstance(n.func.value, ast.Name) and n.func.value.id == module]


def _sources() -> list[Path]:
    return sorted((REPO / "apo_cli").rglob("*.py")) + sorted((REPO / "backends").rglob("*.py"))


def test_deserialisation_in_the_source_is_safe():
    """torch.load always with weights_only=True; no pickle, no unsafe YAML, no eval/exec, and no
    trust_remote_code=True written into the code."""
    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(REPO)
        for call in _calls(tree, "torch", "load"):
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                problems.append(f"{where}:{call.lineno}: torch.load without weights_only=True")
        for func in ("load", "loads", "Unpickler"):
            problems += [f"{where}:{c.lineno}: pickle.{func}" for c in _calls(tree, "pickle", func)]
        for func in ("unsafe_load", "full_load", "load_all", "unsafe_load_all"):
            problems += [f"{where}:{c.lineno}: yaml.{func}" for c in _calls(tree, "yaml", func)]
        for call in _calls(tree, "yaml", "load"):
            loader = {k.arg: k.value for k in call.keywords}.get("Loader") or (call.args[1] if len(call.args) > 1 else None)
            if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                problems.append(f"{where}:{call.lineno}: yaml.load without SafeLoader")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                problems.append(f"{where}:{node.lineno}: {node.func.id}()")
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and \
                    isinstance(node.value, ast.Constant) and node.value.value is True:
                problems.append(f"{where}:{node.value.lineno}: trust_remote_code=True")
    assert not problems, "\n".join(problems)


def test_a_pickled_payload_in_a_checkpoint_is_refused_not_run(tmp_path, cli, trained):
    """optimizer.pt holding an object whose unpickling runs code: checksums made to match, still refused."""
    import hashlib
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ck = tmp_path / "step-1"
    shutil.copytree(trained / "checkpoints" / "step-1", ck)
    import torch

    torch.save({"optimizer": Evil()}, ck / "optimizer.pt", pickle_module=pickle)
    sums = json.loads((ck / "checksums.json").read_text())
    sums["optimizer.pt"] = hashlib.sha256((ck / "optimizer.pt").read_bytes()).hexdigest()
    (ck / "checksums.json").write_text(json.dumps(sums))
    assert not marker.exists()  # pickling does not run __reduce__'s callable; unpickling would
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, "run", run={"max_steps": 2}))
    res = cli("train", str(recipe), "--resume-from", str(ck), "--output-dir", str(tmp_path / "new"))
    assert res.exit_code == 1
    assert f"checkpoint {ck}: cannot read optimizer.pt" in res.output
    assert not marker.exists()


def test_a_run_writes_only_inside_its_run_directory(tmp_path, monkeypatch):
    from apo_cli.recipe import load_recipe
    from apo_cli.train import train_from_recipe

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, "inside", run={"max_steps": 2, "output_dir": "runs/inside"}))
    before = set(tmp_path.rglob("*"))
    train_from_recipe(load_recipe(recipe))
    new = set(tmp_path.rglob("*")) - before
    run = work / "runs" / "inside"
    assert new and all(p == run or run in p.parents or p in run.parents for p in new), sorted(map(str, new))


def test_recipe_paths_cannot_point_writes_outside_the_run_directory(cli, tmp_path):
    for value in ("../escape.jsonl", "/tmp/abs.jsonl", "sub/dir.jsonl", ".."):
        recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, "x", logging={"metrics_file": value}))
        res = cli("validate", str(recipe))
        assert res.exit_code == 2, (value, res.output)
        assert "logging.metrics_file" in res.output
    for value in ("../../etc", "a/b", ""):
        recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, "x", run={"name": value}))
        assert cli("validate", str(recipe)).exit_code == 2, value


def test_recipes_never_writes_through_a_symlink(cli, tmp_path):
    """A dangling link would send the copy wherever it points (outside the folder the user named)."""
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "mine.yaml"
    link.symlink_to(tmp_path / "elsewhere" / "target.yaml")
    res = cli("recipes", "quickstart", str(link))
    assert res.exit_code == 2, res.output
    assert not (tmp_path / "elsewhere" / "target.yaml").exists()
    assert cli("recipes", "quickstart", str(tmp_path / "plain.yaml")).exit_code == 0
    assert (tmp_path / "plain.yaml").read_text().startswith("#")
