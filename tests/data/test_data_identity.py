"""A JSONL file's cached TFDS build is keyed by its content, not its name."""

import hashlib
import json

from kdjax.data import pipeline, sources


def _write(path, answers):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(
      "".join(
          json.dumps({"prompt": f"q{i}", "output": a}) + "\n"
          for i, a in enumerate(answers)
      )
  )
  return str(path)


def _responses(path, data_dir):
  src = sources.load_source("instruct_jsonl", "test", str(data_dir), path=path)
  return sorted(pipeline.to_text(src[i]["response"]) for i in range(len(src)))


def test_editing_the_file_is_not_served_stale(tmp_path):
  data_dir = tmp_path / "tfds"
  path = _write(tmp_path / "train.jsonl", ["a", "b"])
  assert _responses(path, data_dir) == ["a", "b"]
  _write(tmp_path / "train.jsonl", ["a", "b", "edited"])
  assert _responses(path, data_dir) == ["a", "b", "edited"]


def test_another_file_with_the_same_name_is_not_served_stale(tmp_path):
  data_dir = tmp_path / "tfds"
  first = _write(tmp_path / "one" / "train.jsonl", ["first"])
  second = _write(tmp_path / "two" / "train.jsonl", ["second"])
  assert _responses(first, data_dir) == ["first"]
  assert _responses(second, data_dir) == ["second"]


def test_the_key_is_the_content_hash(tmp_path):
  a = _write(tmp_path / "a" / "set.jsonl", ["x"])
  b = _write(tmp_path / "b" / "set.jsonl", ["x"])
  digest = hashlib.sha256(open(a, "rb").read()).hexdigest()[:16]
  # Same bytes under another directory: the same cache entry.
  assert (
      sources.file_config_name(a)
      == sources.file_config_name(b)
      == (f"set-{digest}")
  )
  assert sources.file_config_name(a, "my set") == f"my_set-{digest}"
