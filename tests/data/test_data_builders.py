"""TFDS builders on local fixture files: splits, determinism, bad input.

Nothing touches the network: Dolly's online branch is exercised with the
download manager's ``download`` replaced by a local file.
"""

import hashlib
import json
import sys

import pytest
import tensorflow_datasets as tfds

from kdjax.data import (
    dolly,
    jsonl,
    pipeline,
    sources,
    synthetic_tasks,
    template,
)


def _dolly_line(i, response=None):
  return json.dumps(
      {
          "instruction": f"Do thing {i}.",
          "context": f"ctx {i}" if i % 3 == 0 else "",
          "response": f"Done {i}." if response is None else response,
          "category": ["open_qa", "summarization"][i % 2],
      }
  )


def _write_dolly(directory, n, extra_lines=()):
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / dolly.FILENAME
  path.write_text(
      "\n".join([_dolly_line(i) for i in range(n)] + list(extra_lines)) + "\n"
  )
  return path


@pytest.fixture
def small_splits(monkeypatch):
  monkeypatch.setattr(dolly, "NUM_VALIDATION", 10)
  monkeypatch.setattr(dolly, "NUM_TEST", 5)


def _texts(source, key="response"):
  return [pipeline.to_text(source[i][key]) for i in range(len(source))]


# ----------------------------------------------------------------------------
# JSONL reading.


def test_malformed_lines_are_reported_with_file_and_line(tmp_path):
  path = _write_dolly(
      tmp_path,
      3,
      extra_lines=[
          "{not json",
          json.dumps(["a list"]),
          "",
          json.dumps({"response": "x"}),
          _dolly_line(9, response="  "),
          json.dumps({"instruction": 1, "response": "y"}),
      ],
  )
  with pytest.raises(jsonl.BadLinesError) as e:
    jsonl.read_jsonl(path, dolly.parse)
  message = str(e.value)
  # Lines 4, 5, 7 and 9 are bad (line 6 is blank, line 8 an empty response).
  assert message.startswith("4 malformed line(s)")
  for lineno in (4, 5, 7, 9):
    assert f"{path}:{lineno}:" in message
  assert f"{path}:8:" not in message and "skip_bad=True" in message
  counts = jsonl.Counts()
  records = jsonl.read_jsonl(path, dolly.parse, skip_bad=True, counts=counts)
  assert [r["response"] for r in records] == ["Done 0.", "Done 1.", "Done 2."]
  assert counts == {"read": 8, "bad_line": 4, "empty_response": 1, "kept": 3}


def test_split_sizes_and_seeded_determinism():
  records = [{"response": str(i)} for i in range(1600)]
  splits = dolly.split_records(
      records, seed=10, num_validation=1000, num_test=500
  )
  assert {k: len(v) for k, v in splits.items()} == {
      "validation": 1000,
      "test": 500,
      "train": 100,
  }
  ids = {k: [r["response"] for r in v] for k, v in splits.items()}
  assert sorted(sum(ids.values(), []), key=int) == [str(i) for i in range(1600)]
  assert (
      dolly.split_records(records, seed=10, num_validation=1000, num_test=500)
      == splits
  )
  other = dolly.split_records(
      records, seed=11, num_validation=1000, num_test=500
  )
  assert [r["response"] for r in other["test"]] != ids["test"]
  with pytest.raises(ValueError, match="1500 usable records"):
    dolly.split_records(
        records[:1500], seed=10, num_validation=1000, num_test=500
    )


def test_dolly_permutation_is_pinned():
  # 15,011 = lines of databricks-dolly-15k. A change here changes the split.
  order = dolly.stable_order(15011, dolly.SPLIT_SEED)
  assert order[:6] == [13535, 14647, 13092, 10157, 6285, 11422]
  assert sorted(order) == list(range(15011))
  assert hashlib.sha256(str(order).encode()).hexdigest() == (
      "2ac681151877d4b2f561ce365dd593711d4a707357d153fc9be153a7eac35cf0"
  )


# ----------------------------------------------------------------------------
# Builders.


def test_dolly_offline_build_is_byte_for_byte_deterministic(
    tmp_path, small_splits
):
  manual = tmp_path / "raw"
  _write_dolly(manual, 40, extra_lines=[_dolly_line(99, response="")])
  builders = [
      sources.prepare("dolly", tmp_path / f"tfds{k}", manual_dir=manual)
      for k in range(2)
  ]
  info = builders[0].info
  assert {s: info.splits[s].num_examples for s in info.splits} == {
      "train": 25,
      "validation": 10,
      "test": 5,
  }
  assert info.metadata["counts"] == {
      "read": 41,
      "kept": 40,
      "empty_response": 1,
  }
  files = sorted(
      p.name
      for p in builders[0].data_path.iterdir()
      if "array_record" in p.name
  )
  assert len(files) == 3
  for name in files:
    assert (builders[0].data_path / name).read_bytes() == (
        builders[1].data_path / name
    ).read_bytes()
  test = builders[0].as_data_source(split="test")
  example = test[0]
  assert isinstance(example["response"], bytes)  # real TFDS Text is bytes
  records = jsonl.read_jsonl(manual / dolly.FILENAME, dolly.parse)
  expected = dolly.split_records(
      records, seed=dolly.SPLIT_SEED, num_validation=10, num_test=5
  )
  for split in ("train", "validation", "test"):
    source = builders[0].as_data_source(split=split)
    assert sorted(_texts(source)) == sorted(
        r["response"] for r in expected[split]
    )
  row = {k: pipeline.to_text(v) for k, v in example.items()}
  i = int(row["response"].split()[1].rstrip("."))
  assert row == json.loads(_dolly_line(i))
  assert "tensorflow" not in sys.modules


def test_dolly_bad_lines_fail_the_build_unless_skip_bad(tmp_path, small_splits):
  manual = tmp_path / "raw"
  _write_dolly(manual, 20, extra_lines=["{oops"])
  with pytest.raises(
      jsonl.BadLinesError, match=r"databricks-dolly-15k.jsonl:21:"
  ):
    sources.prepare("dolly", tmp_path / "a", manual_dir=manual)
  b = sources.prepare("dolly", tmp_path / "b", manual_dir=manual, skip_bad=True)
  assert b.info.metadata["counts"]["bad_line"] == 1
  assert b.info.splits["train"].num_examples == 5


def test_dolly_online_uses_the_download_manager(
    tmp_path, small_splits, monkeypatch
):
  fixture = _write_dolly(tmp_path / "fake_net", 20)
  urls = []

  def fake_download(self, url):
    del self
    urls.append(url)
    return fixture

  monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
  from kdjax import hub

  # The network is faked: the builder must take its download path.
  monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: True)
  b = sources.prepare("dolly", tmp_path / "tfds")
  assert urls == [dolly.URL]
  assert b.info.splits["validation"].num_examples == 10


def test_dolly_manual_dir_without_the_file_names_the_fix(tmp_path):
  (tmp_path / "raw").mkdir()
  (tmp_path / "raw" / "other.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="has no databricks-dolly-15k"):
    sources.prepare("dolly", tmp_path / "tfds", manual_dir=tmp_path / "raw")


def test_instruct_jsonl_named_config_and_path(tmp_path):
  lines = [
      {"prompt": "What is 2+2?", "output": ["4", "four", ""]},
      {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
      {"prompt": template.prompt("Given."), "output": "done"},
      {"instruction": "Empty.", "output": ["", " "]},
  ]
  manual = tmp_path / "raw"
  manual.mkdir()
  (manual / "sinst.jsonl").write_text(
      "\n".join(json.dumps(l) for l in lines) + "\n"
  )
  b = sources.prepare(
      "instruct_jsonl/sinst", tmp_path / "tfds", manual_dir=manual
  )
  assert b.info.metadata["counts"] == {
      "read": 4,
      "kept": 3,
      "empty_response": 1,
  }
  source = b.as_data_source(split="test")
  by_response = {
      pipeline.to_text(source[i]["response"]): source[i]
      for i in range(len(source))
  }
  assert pipeline.references_of(by_response["4"]) == ["4", "four"]
  assert pipeline.prompt_of(by_response["4"]) == template.prompt("What is 2+2?")
  assert pipeline.prompt_of(by_response["hello"]) == template.prompt(
      "Translate.", "bonjour"
  )
  assert pipeline.prompt_of(by_response["done"]) == template.prompt("Given.")
  # Any file through a path config; its bad line fails the build.
  mine = tmp_path / "mine.jsonl"
  mine.write_text(json.dumps(lines[1]) + "\n" + '{"output": "x"}\n')
  with pytest.raises(jsonl.BadLinesError, match=r"mine.jsonl:2: needs an"):
    sources.prepare("instruct_jsonl", tmp_path / "tfds", path=mine)
  with pytest.raises(ValueError, match="needs a config from"):
    sources.builder("instruct_jsonl/unknown", tmp_path / "tfds")


def test_synthetic_builder_writes_the_generator_output(tmp_path, monkeypatch):
  monkeypatch.setattr(
      synthetic_tasks, "SPLIT_SIZES", {"train": 28, "validation": 6, "test": 4}
  )
  source = sources.load_source("synthetic_instruct", "train", tmp_path)
  assert len(source) == 28
  got = sorted(
      (
          json.dumps(
              {
                  k: (
                      pipeline.to_texts(v)
                      if k == "valid_answers"
                      else pipeline.to_text(v)
                  )
                  for k, v in source[i].items()
              },
              sort_keys=True,
          )
          for i in range(28)
      )
  )
  want = sorted(
      json.dumps(e.as_dict(), sort_keys=True)
      for e in synthetic_tasks.generate("train")
  )
  assert got == want


def test_mock_data_gives_str_and_the_pipeline_decodes_it(tmp_path):
  with tfds.testing.mock_data(num_examples=3):
    source = sources.builder("synthetic_instruct", tmp_path).as_data_source(
        split="validation"
    )
    example = source[0]
  assert isinstance(example["instruction"], str)  # bytes when real
  assert pipeline.prompt_of(example).startswith(template.PREAMBLE)
