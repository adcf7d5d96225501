"""Bad input to a training run: one sentence naming the problem, nothing trained.

Each case runs ``training.train_and_evaluate`` on a tiny config and checks the
message names the offending file / value and its fix, and that the workdir
holds no config, checkpoint, metrics or export afterwards.
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kdjax import training
import tiny_run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("bad_input"))


def _refused(config, workdir: str, error=ValueError) -> str:
  with pytest.raises(error) as e:
    training.train_and_evaluate(config, workdir)
  # Not even config.json: the corrected command must start, not be refused as
  # a different run in the same workdir.
  for name in ("config.json", "ckpt", "best", "metrics.jsonl", "hf", "best_hf"):
    assert not os.path.exists(os.path.join(workdir, name)), name
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def _jsonl(path, rows) -> str:
  with open(path, "w") as f:
    for r in rows:
      f.write(r if isinstance(r, str) else json.dumps(r))
      f.write("\n")
  return str(path)


def _good(n, prompt="add 1 and 2"):
  return [{"prompt": f"{prompt} #{i}", "output": "3"} for i in range(n)]


def test_malformed_jsonl_line_names_file_and_line(root, tmp_path):
  rows = _good(20)
  rows.insert(2, '{"prompt": "no closing brace", "output": "x"')
  path = _jsonl(tmp_path / "train.jsonl", rows)
  c = tiny_run.config("sft_gpt2", root, steps=1, **{"data.name": path})
  msg = _refused(c, str(tmp_path / "w"))
  assert f"{path}:3" in msg and "malformed" in msg and "Fix the file" in msg


def test_prompts_over_the_prompt_limit_leave_no_examples(root, tmp_path):
  # Every prompt is longer than max_prompt_length (80 bytes at the tiny scale)
  # and prompt_policy="drop" drops them all.
  path = _jsonl(tmp_path / "long.jsonl", _good(20, prompt="x" * 200))
  c = tiny_run.config(
      "sft_gpt2",
      root,
      steps=1,
      **{"data.name": path, "data.prompt_policy": "drop"},
  )
  msg = _refused(c, str(tmp_path / "w"))
  assert "only 0 usable examples for batch_size 8" in msg
  assert "raise it or use prompt_policy='truncate'" in msg


def test_unknown_prompt_policy_is_named(root, tmp_path):
  path = _jsonl(tmp_path / "t.jsonl", _good(20))
  c = tiny_run.config(
      "sft_gpt2",
      root,
      steps=1,
      **{"data.name": path, "data.prompt_policy": "cut"},
  )
  msg = _refused(c, str(tmp_path / "w"))
  assert "prompt_policy must be one of" in msg and "'cut'" in msg


def test_pickle_only_teacher_is_refused(root, tmp_path):
  teacher = str(tmp_path / "pickled")
  os.makedirs(teacher)
  good = tiny_run.make_teacher(os.path.join(root, "teacher"))
  with open(os.path.join(good, "config.json")) as f:
    cfg = f.read()
  with open(os.path.join(teacher, "config.json"), "w") as f:
    f.write(cfg)
  with open(os.path.join(teacher, "pytorch_model.bin"), "wb") as f:
    f.write(b"\x80\x02}q\x00.")  # a pickle: never unpickled
  c = tiny_run.config("akl_gpt2", root, steps=1, **{"teacher.path": teacher})
  msg = _refused(c, str(tmp_path / "w"))
  assert "holds only pickle checkpoints (pytorch_model.bin)" in msg
  assert "safe_serialization=True" in msg


def test_teacher_tensor_of_the_wrong_shape_is_named(root, tmp_path):
  good = tiny_run.make_teacher(os.path.join(root, "teacher"))
  teacher = str(tmp_path / "bad_shape")
  os.makedirs(teacher)
  with open(os.path.join(good, "config.json")) as f:
    cfg = f.read()
  with open(os.path.join(teacher, "config.json"), "w") as f:
    f.write(cfg)
  tensors = load_file(os.path.join(good, "model.safetensors"))
  key = next(k for k in tensors if k.endswith("h.0.mlp.c_fc.weight"))
  want = tensors[key].shape
  tensors[key] = np.zeros((want[0], want[1] - 1), tensors[key].dtype)
  save_file(
      tensors, os.path.join(teacher, "model.safetensors"), {"format": "pt"}
  )
  c = tiny_run.config("akl_gpt2", root, steps=1, **{"teacher.path": teacher})
  msg = _refused(c, str(tmp_path / "w"))
  assert f"{key!r} has shape {(want[0], want[1] - 1)}" in msg
  assert f"checkpoint {teacher} does not match the GPT2Config" in msg


def _teacher_copy(root, tmp_path) -> str:
  good = tiny_run.make_teacher(os.path.join(root, "teacher"))
  teacher = str(tmp_path / "teacher")
  os.makedirs(teacher)
  for name in ("config.json", "model.safetensors"):
    with open(os.path.join(good, name), "rb") as src:
      with open(os.path.join(teacher, name), "wb") as dst:
        dst.write(src.read())
  return teacher


def _cut(path: str, keep: float) -> str:
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * keep))
  return path


def _latin1_jsonl(tmp_path) -> str:
  rows = b"".join(
      json.dumps({"prompt": f"p{i}", "output": "o"}).encode() + b"\n"
      for i in range(20)
  )
  path = tmp_path / "latin1.jsonl"
  path.write_bytes(rows.replace(b'"p2"', b'"p\xe92"'))  # line 3
  return str(path)


def _bad_config_json(root, tmp):
  t = _teacher_copy(root, tmp)
  cfg = _cut(f"{t}/config.json", 0.5)
  return {"teacher.path": t}, [f"{cfg} is not valid JSON (", "at line"]


def _cut_safetensors(root, tmp):
  t = _teacher_copy(root, tmp)
  weights = _cut(f"{t}/model.safetensors", 0.9)
  return {"teacher.path": t}, [
      f"{weights} is not a valid safetensors file: truncated: the header "
      "declares",
      "re-download it",
  ]


def _teacher_is_a_file(root, tmp):
  del root
  (tmp / "a_file").write_text("x")
  f = str(tmp / "a_file")
  return {"teacher.path": f}, [f"teacher.path={f!r} is a file, not a directory"]


def _teacher_is_empty(root, tmp):
  del root
  d = str(tmp / "empty")
  os.makedirs(d)
  return {"teacher.path": d}, [f"teacher.path={d!r} is an empty directory"]


def _data_is_a_directory(root, tmp):
  del root
  d = str(tmp / "dir.jsonl")
  os.makedirs(d)
  return {"data.name": d}, [
      f"data.name={d!r} is a directory, not a file",
      "pass the JSONL file inside it",
  ]


def _data_not_utf8(root, tmp):
  del root
  p = _latin1_jsonl(tmp)
  return {"data.name": p}, [f"{p}:3: not UTF-8 text (byte 0xe9 at column 14)"]


# Each makes its damage and returns (overrides, words of the one sentence).
DAMAGED = {
    f.__name__.lstrip("_"): f
    for f in (
        _bad_config_json,
        _cut_safetensors,
        _teacher_is_a_file,
        _teacher_is_empty,
        _data_is_a_directory,
        _data_not_utf8,
    )
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_damaged_or_misplaced_files_are_named_before_anything_is_written(
    root, tmp_path, damage
):
  overrides, words = DAMAGED[damage](root, tmp_path)
  c = tiny_run.config("akl_gpt2", root, steps=1, **overrides)
  msg = _refused(c, str(tmp_path / "w"))
  for w in words:
    assert w in msg, (w, msg)
