"""Remote workdirs stay remote: metrics, checkpoints, exports and data files
go through kdjax.fs (etils.epath) into a fake in-memory ``gs://`` bucket."""

import json

import numpy as np

from fake_gcs import fake_gcs_fixture  # noqa: F401 (the fake_gcs fixture)
from kdjax import checkpoint, metrics, models
from kdjax.data import jsonl, sources
import tiny_run

RUN = "gs://bucket/run"


def test_metrics_write_truncate_and_read_remotely(fake_gcs):
  w = metrics.Writer(RUN, tensorboard=False)
  for step in (1, 2, 3):
    w.write(step, {"loss": 1.0 / step, "bad": float("nan")})
  w.truncate(after_step=2)
  w.close()
  rows = metrics.read(RUN)
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[1] == {"step": 2, "loss": 0.5, "bad": "nan"}
  assert f"{RUN}/metrics.jsonl" in fake_gcs


def test_checkpoint_managers_live_in_the_bucket(fake_gcs):
  ckpts = checkpoint.Checkpoints(RUN, every_steps=1, max_to_keep=1)
  assert str(ckpts.latest.directory) == f"{RUN}/ckpt"
  assert str(ckpts.best.directory) == f"{RUN}/best"
  assert ckpts.latest_step() is None
  ckpts.close()


def test_hf_export_writes_every_file_to_the_bucket(fake_gcs):
  model = tiny_run.gpt2()
  models.save_hf(model, f"{RUN}/hf")
  names = sorted(
      k.rsplit("/", 1)[1] for k in fake_gcs if k.startswith(f"{RUN}/hf/")
  )
  assert names == [
      "config.json",
      "generation_config.json",
      "model.safetensors",
      "special_tokens_map.json",
      "tokenizer.json",
      "tokenizer_config.json",
  ]
  cfg = json.loads(fake_gcs[f"{RUN}/hf/config.json"].getvalue())
  assert cfg["eos_token_id"] == 256
  from safetensors.numpy import load

  tensors = load(fake_gcs[f"{RUN}/hf/model.safetensors"].getvalue())
  np.testing.assert_array_equal(
      tensors["transformer.wte.weight"], np.asarray(model.wte.embedding[...])
  )


def test_a_jsonl_file_in_the_bucket_is_read_and_keyed(fake_gcs):
  from etils import epath

  path = epath.Path("gs://bucket/data/train.jsonl")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('{"prompt": "q", "output": "a"}\n')
  rows = jsonl.read_jsonl(str(path), lambda o: {"response": o["output"]})
  assert rows == [{"response": "a"}]
  assert sources.file_config_name(str(path)).startswith("train-")
