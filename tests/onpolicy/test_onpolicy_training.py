"""On-policy sources inside the training loop: lmbda = 0, resume, metrics."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kdjax import metrics, training
import tiny_run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("onpolicy_training"))


def _final_params(workdir):
  """The student params of the last checkpoint by path, read from its files
  alone (no run is built); an on-policy run pairs its train state with the
  source's."""
  ckpt = os.path.join(workdir, "ckpt")
  step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  state = ocp.StandardCheckpointer().restore(
      os.path.join(ckpt, str(step), "state")
  )
  if isinstance(state, list):
    state = state[0]
  return {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]
  }


def test_gkd_with_lmbda_zero_is_the_off_policy_run_bit_for_bit(root, tmp_path):
  off = tiny_run.config("jsd_gpt2", root, steps=3)
  gkd = tiny_run.config("gkd_gpt2", root, steps=3, **{"onpolicy.lmbda": 0.0})
  training.train_and_evaluate(off, str(tmp_path / "off"))
  training.train_and_evaluate(gkd, str(tmp_path / "gkd"))
  a, b = metrics.read(str(tmp_path / "off")), metrics.read(
      str(tmp_path / "gkd")
  )
  for x, y in zip(a, b):
    assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"]
    assert y["onpolicy_fraction"] == 0
  pa = _final_params(tmp_path / "off")
  pb = _final_params(tmp_path / "gkd")
  assert pa.keys() == pb.keys() and pa
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("gkd_gpt2", {"onpolicy.lmbda": 0.5}),
        # tau = 1 from the start and a one-batch buffer: the run generates, fills
        # the buffer and replays from it, and is cut with the buffer full.
        (
            "distillm_gpt2",
            {"onpolicy.init_threshold": 1.0, "onpolicy.buffer_size": 8},
        ),
    ],
)
def test_on_policy_run_resumes_bit_identically(root, tmp_path, name, overrides):
  c = tiny_run.config(name, root, steps=6, **overrides)
  c.onpolicy.max_new_tokens = 8
  a, b = tiny_run.straight_and_resumed(c, str(tmp_path), stop_at=3)
  for x, y in zip(a, b):
    for k in (
        "loss",
        "grad_norm",
        "onpolicy_fraction",
        "gen_fraction",
        "gen_len",
    ):
      assert x[k] == y[k], (x["step"], k)
  fractions = [r["onpolicy_fraction"] for r in a]
  assert 0 < np.mean(fractions)
  if name == "distillm_gpt2":
    assert (
        np.mean(fractions) == 1 and np.mean([r["gen_fraction"] for r in a]) < 1
    )
  assert all(
      r["gen_time_s"] > 0 and 0 < r["gen_share"]
      for r in a
      if r["gen_fraction"] > 0
  )
  pa = _final_params(tmp_path / "straight")
  pb = _final_params(tmp_path / "resumed")
  assert pa.keys() == pb.keys() and pa
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
