"""kdjax.data.pipeline: template, tokens, response-only masks, grain batching."""

import subprocess
import sys

import numpy as np
import pytest

from commands import ROOT
from kdjax.data import pipeline, template
from kdjax.data import tokenizer as byte_tok

EOS = byte_tok.EOS_ID


@pytest.fixture(scope="module")
def tok():
  return byte_tok.byte_level()


def _source(n, response=lambda i: f"answer {i}", input_=lambda i: ""):
  """An in-memory data source (len + random access), bytes like TFDS."""
  return [
      {
          "instruction": f"task {i}".encode(),
          "input": input_(i).encode(),
          "response": response(i).encode(),
      }
      for i in range(n)
  ]


# ----------------------------------------------------------------------------
# Template and tokenizer.


def test_template_text_is_exact():
  # Literal text of docs/data.md "The prompt template" (MiniLLM / Alpaca).
  assert template.prompt("Say hi.") == (
      "Below is an instruction that describes a task. Write a response that "
      "appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n"
      "### Response:\n"
  )
  assert template.prompt("Add.", "1 + 2") == (
      "Below is an instruction that describes a task, paired with an input "
      "that provides further context. Write a response that appropriately "
      "completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n1 + 2"
      "\n\n### Response:\n"
  )
  # Dolly's "context" is the input; an empty one selects the no-input template.
  assert pipeline.prompt_of({"instruction": b"Add.", "context": b"1 + 2"}) == (
      template.prompt("Add.", "1 + 2")
  )
  assert pipeline.prompt_of({"instruction": "Say hi.", "input": ""}) == (
      template.prompt("Say hi.")
  )
  given = template.prompt("x")
  assert (
      pipeline.prompt_of({"instruction": b"", "prompt": given.encode()})
      == given
  )


def test_byte_level_tokenizer_ids_are_bytes(tok, tmp_path):
  text = "héllo\n\t wörld ✓"
  assert tok.encode(text).ids == list(text.encode("utf-8"))
  assert tok.get_vocab_size() == byte_tok.VOCAB_SIZE == 257
  assert tok.token_to_id("<|endoftext|>") == EOS == 256
  assert tok.decode(list(text.encode()) + [EOS]) == text
  tok.save(str(tmp_path / "tokenizer.json"))
  reloaded = byte_tok.tokenizers.Tokenizer.from_file(
      str(tmp_path / "tokenizer.json")
  )
  assert reloaded.encode(text).ids == list(text.encode())


# ----------------------------------------------------------------------------
# Tokenisation and the training row.


def _reference_row(prompt, response, length):
  """MiniLLM collator from scratch: labels -100 on prompt and padding."""
  p = list(prompt.encode())
  ids = (p + list((prompt + response).encode())[len(p) :] + [EOS])[:length]
  input_ids = np.full(length, EOS)
  labels = np.full(length, -100)
  input_ids[: len(ids) - 1] = ids[:-1]
  labels[: len(ids) - 1] = ids[1:]
  labels[: len(p) - 1] = -100
  return input_ids, labels


@pytest.mark.parametrize("length", [320, 240])  # 240 cuts two responses
def test_loss_mask_is_exactly_the_response_tokens(tok, length):
  source = _source(
      6,
      response=lambda i: "resp " * (i * 3 + 1),
      input_=lambda i: "ctx" * (i % 2),
  )
  examples, stats = pipeline.tokenize_split(
      source,
      tok,
      eos_id=EOS,
      max_length=length,
      max_prompt_length=230,
      prompt_policy="drop",
  )
  assert stats.kept == 6
  for ex, example in zip(source, examples):
    row = pipeline.train_row(example, max_length=length, eos_id=EOS)
    prompt = pipeline.prompt_of(ex)
    input_ids, labels = _reference_row(prompt, ex["response"].decode(), length)
    np.testing.assert_array_equal(row["input_ids"], input_ids)
    np.testing.assert_array_equal(row["loss_mask"], (labels != -100))
    np.testing.assert_array_equal(
        row["labels"][labels != -100], labels[labels != -100]
    )
    n = int(row["attention_mask"].sum())
    assert (
        row["attention_mask"][:n].all() and not row["attention_mask"][n:].any()
    )
    np.testing.assert_array_equal(row["positions"], np.arange(length))
    # The masked targets decode to the response (+ EOS unless cut).
    targets = row["labels"][row["loss_mask"] > 0].tolist()
    full = ex["response"].decode().encode() + b"\x00"
    assert bytes(t if t != EOS else 0 for t in targets) == full[: len(targets)]
  assert stats.truncated_length == (2 if length == 240 else 0)


def test_prompt_policy_drop_and_truncate_are_counted(tok):
  long_input = lambda i: "x" * (200 if i < 3 else 0)
  source = _source(5, input_=long_input)
  split = lambda policy: pipeline.tokenize_split(
      source,
      tok,
      eos_id=EOS,
      max_length=400,
      max_prompt_length=180,
      prompt_policy=policy,
  )
  _, dropped = split("drop")
  assert (dropped.kept, dropped.dropped_long_prompt) == (2, 3)
  cut, truncated = split("truncate")
  assert (truncated.kept, truncated.truncated_prompt) == (5, 3)
  assert [e.prompt_len for e in cut[:3]] == [180] * 3
  # The response survives the prompt cut: ids end with "answer 0" + EOS.
  assert cut[0].ids[180:].tolist() == list(b"answer 0") + [EOS]
  with pytest.raises(ValueError, match="prompt_policy"):
    pipeline.tokenize_split(source, tok, eos_id=EOS, prompt_policy="keep")
  with pytest.raises(ValueError, match="max_prompt_length"):
    pipeline.tokenize_split(
        source, tok, eos_id=EOS, max_length=100, max_prompt_length=100
    )


def test_empty_responses_are_dropped_and_counted(tok):
  source = _source(4, response=lambda i: ["ok", "", "  \n", "fine"][i])
  examples, stats = pipeline.tokenize_split(source, tok, eos_id=EOS)
  assert (stats.total, stats.kept, stats.dropped_empty_response) == (4, 2, 2)
  assert [bytes(e.ids[e.prompt_len : -1].tolist()) for e in examples] == [
      b"ok",
      b"fine",
  ]


# ----------------------------------------------------------------------------
# Training batches: epochs, sharding, resume.


def _ids_of(batch):
  """Which example (by its "answer i" response) each row holds."""
  out = []
  for row, mask in zip(batch["labels"], batch["loss_mask"]):
    text = bytes(row[mask > 0][:-1].tolist()).decode()
    out.append(int(text.split()[1]))
  return out


def _train(tok, n=10, **kw):
  kw = (
      dict(
          eos_id=EOS,
          batch_size=4,
          seed=3,
          max_length=200,
          max_prompt_length=150,
          process_index=0,
          process_count=1,
      )
      | kw
  )
  return pipeline.train_batches(_source(n), tok, **kw)


def test_epoch_structure_is_pinned(tok):
  data = _train(tok, num_epochs=3)
  assert (data.steps_per_epoch, data.num_steps, len(data.dataset)) == (2, 6, 6)
  epochs = [
      sum((_ids_of(data.dataset[s]) for s in range(2 * e, 2 * e + 2)), [])
      for e in range(3)
  ]
  for order in epochs:  # 8 distinct examples per epoch; the remainder 2 dropped
    assert len(set(order)) == 8 and set(order) <= set(range(10))
  assert len({tuple(o) for o in epochs}) == 3  # reshuffled every epoch
  # Same seed, same stream; another seed, another one.
  again = _train(tok, num_epochs=3)
  assert all(
      _ids_of(again.dataset[s]) == _ids_of(data.dataset[s]) for s in range(6)
  )
  assert _ids_of(_train(tok, seed=4).dataset[0]) != _ids_of(data.dataset[0])
  # num_epochs=None repeats forever with the same first epochs.
  forever = _train(tok)
  assert forever.num_steps is None
  assert _ids_of(forever.dataset[5]) == _ids_of(data.dataset[5])
  with pytest.raises(ValueError, match="lower batch_size or add data"):
    _train(tok, n=3)


def test_process_shards_tile_the_global_batch(tok):
  whole = _train(tok, n=13, batch_size=4)
  shards = [
      _train(tok, n=13, batch_size=4, process_index=p, process_count=2)
      for p in range(2)
  ]
  assert all(s.local_batch_size == 2 for s in shards)
  for step in range(5):  # crosses the epoch boundary at step 3
    assert _ids_of(whole.dataset[step]) == (
        _ids_of(shards[0].dataset[step]) + _ids_of(shards[1].dataset[step])
    )
  with pytest.raises(ValueError, match="not divisible"):
    _train(tok, batch_size=4, process_index=0, process_count=3)


def test_iterator_resume_gives_exactly_the_next_batch(tok):
  data = _train(tok, num_epochs=4)
  expected = [b for _, b in zip(range(6), data.iterator())]
  it = data.iterator()
  for _ in range(3):
    next(it)
  state = it.get_state()
  fresh = _train(tok, num_epochs=4).iterator()
  fresh.set_state(state)
  for want in expected[3:]:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_iterator_state_round_trips_through_orbax(tok, tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  data = _train(tok, num_epochs=2)
  it = data.iterator()
  _skip(it, 2)
  want = next(_skip(data.iterator(), 2))
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(
        2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it))
    )
    mngr.wait_until_finished()
    fresh = _train(tok, num_epochs=2).iterator()
    mngr.restore(
        2,
        args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)),
    )
  np.testing.assert_array_equal(next(fresh)["input_ids"], want["input_ids"])


def _skip(it, k):
  for _ in range(k):
    next(it)
  return it


# ----------------------------------------------------------------------------
# Evaluation batches.


def test_left_padded_prompts_positions_start_at_zero():
  batch = pipeline.left_pad([[5, 6, 7], [9], []], length=4, eos_id=EOS)
  np.testing.assert_array_equal(
      batch["input_ids"], [[EOS, 5, 6, 7], [EOS, EOS, EOS, 9], [EOS] * 4]
  )
  np.testing.assert_array_equal(
      batch["attention_mask"], [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
  )
  np.testing.assert_array_equal(
      batch["positions"], [[0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]]
  )


def test_eval_prompts_cover_every_example_once_per_process_set(tok):
  source = _source(7, input_=lambda i: "y" * (60 if i == 2 else 0))
  source[0]["valid_answers"] = [b"a", b"b"]
  shards = [
      pipeline.eval_prompts(
          source,
          tok,
          eos_id=EOS,
          batch_size=2,
          max_prompt_length=150,
          process_index=p,
          process_count=2,
      )
      for p in range(2)
  ]
  assert shards[0].truncated_prompts == 1  # the one with a long input
  assert shards[0].examples[0]["references"] == ["a", "b"]
  assert shards[0].examples[1]["references"] == ["answer 1"]
  seen = []
  for shard in shards:
    assert len(shard.dataset) == 2  # ceil(ceil(7 / 2) / 2) on both processes
    for b in range(2):
      batch = shard.dataset[b]
      assert batch["input_ids"].shape == (2, 150)
      for row, index, valid in zip(
          batch["input_ids"], batch["index"], batch["valid"]
      ):
        assert valid == (index >= 0)
        if valid:
          seen.append(int(index))
          prompt = shard.examples[index]["prompt"].encode()[:150]
          assert bytes(row[row != EOS].tolist()) == prompt
  assert sorted(seen) == list(range(7))


def test_eval_batches_keep_every_example_and_pad_with_zero_mask(tok):
  batches = pipeline.eval_batches(
      _source(5),
      tok,
      eos_id=EOS,
      batch_size=2,
      max_length=200,
      max_prompt_length=150,
      process_index=0,
      process_count=1,
  )
  assert len(batches) == 3
  ids = sum(
      (
          _ids_of({k: v[:1] if b == 2 else v for k, v in batches[b].items()})
          for b in range(3)
      ),
      [],
  )
  assert ids == [0, 1, 2, 3, 4]
  assert not batches[2]["loss_mask"][1].any()


def test_importing_kdjax_data_does_not_import_tensorflow():
  code = (
      "import sys, kdjax.data, kdjax.data.pipeline, kdjax.data.prepare; "
      "assert kdjax.data.__file__.startswith(sys.argv[1]), kdjax.data.__file__; "
      "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
  )
  root = ROOT
  # cwd = repo root puts this checkout's kdjax first on sys.path.
  subprocess.run([sys.executable, "-c", code, root], check=True, cwd=root)
