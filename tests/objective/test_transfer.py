"""kdjax.transfer through kdjax.objective on tiny GPT-2 and LLaMA models: the
taps and layer maps reach the right layers, padding changes nothing, weight
0 is today's program, and what cannot run is refused in one sentence."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import models, objective, transfer
from kdjax.config import checks
from kdjax.divergences import features as F
from kdjax.models import layers
import tiny_run

B, T, V = 2, 7, 50
# Row 0 right-padded (two slots), row 1 left-padded (one).
ATTN_BxT = np.array([[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]])
LOSS_BxT = np.array([[0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 1]])


def _loss_cfg(**groups):
  """``groups``: ``features`` / ``attention`` fields over weight 0."""
  cfg = dict(
      name="fkl",
      kd_ratio=0.5,
      impl="auto",
      chunk_size=64,
      temperature=1.0,
      hp={},
      select=dict(fraction=1.0, by="student_entropy"),
      features=dict(weight=0.0, kind="mse", layer_map="uniform"),
      attention=dict(weight=0.0, kind="minilmv2", relation_heads=4),
  )
  for g, v in groups.items():
    cfg[g] = dict(cfg[g], **v)
  return cfg


@functools.cache
def _models(family="gpt2"):
  """A 2-block student 16 wide and a 4-block teacher 32 wide, 2 heads each
  (LLaMA: 4 query heads on 2 key/value heads)."""
  if family == "gpt2":
    s = tiny_run.gpt2(0, V, n_layer=2, n_head=2)
    t = tiny_run.gpt2(1, V, n_embd=32, n_layer=4, n_head=2)
  else:
    kw = dict(vocab_size=V, num_attention_heads=4, num_key_value_heads=2)
    s = models.create("tiny-llama", rngs=nnx.Rngs(0), hidden_size=16, **kw)
    t = models.create(
        "tiny-llama",
        rngs=nnx.Rngs(1),
        hidden_size=32,
        num_hidden_layers=4,
        **kw,
    )
  s.eval()
  t.eval()
  return s, t


def _batch(ids):
  positions = np.maximum(np.cumsum(ATTN_BxT, 1) - 1, 0)
  return {
      "input_ids": jnp.asarray(ids),
      "positions": jnp.asarray(positions),
      "attention_mask": jnp.asarray(ATTN_BxT),
      "labels": jnp.asarray(np.roll(ids, -1, 1)),
      "loss_mask": jnp.asarray(LOSS_BxT, jnp.float32),
  }


CFGS = {
    "mse": _loss_cfg(features=dict(weight=1.0)),
    "cosine_pairs": _loss_cfg(
        features=dict(
            weight=1.0, kind="cosine", layer_map="pairs", pairs="0:0,2:3"
        )
    ),
    "minilm": _loss_cfg(attention=dict(weight=1.0, kind="minilm")),
    "minilmv2_last2": _loss_cfg(
        attention=dict(weight=1.0, layer_map="last", last_k=2)
    ),
}


@functools.cache
def _sums(family):
  """Every config's sums on a batch and on the same batch with other tokens
  in its padding slots, one jitted program per family."""
  student, teacher = _models(family)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, V, (B, T))
  other = np.where(ATTN_BxT > 0, ids, rng.integers(0, V, (B, T)))
  proj = {
      k: transfer.init_projection(
          c,
          transfer.plan(c, student, teacher),
          student,
          teacher,
          jax.random.key(3),
      )
      for k, c in CFGS.items()
  }

  @jax.jit
  def run(batches, proj):
    sums = {
        k: [
            objective.sums(c, student, teacher, b, projection=proj[k])
            for b in batches
        ]
        for k, c in CFGS.items()
    }
    b = batches[0]
    inputs = (b["input_ids"], b["positions"], b["attention_mask"])
    hidden = (
        student.intermediates(*inputs, taps=layers.Taps(hidden=(0, 1, 2)))[1],
        teacher.intermediates(
            *inputs, taps=layers.Taps(hidden=(0, 1, 2, 3, 4))
        )[1],
    )
    return sums, hidden

  out, hidden = run((_batch(ids), _batch(other)), proj)
  return out, proj, hidden


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padding_slots_change_no_term(family):
  out, _, _ = _sums(family)
  for k, (a, b) in out.items():
    term = "feature" if CFGS[k]["features"]["weight"] else "attention"
    assert getattr(a, term) > 0, k
    np.testing.assert_allclose(
        getattr(a, term), getattr(b, term), rtol=1e-5, err_msg=k
    )
    assert a.tokens == LOSS_BxT.sum()


def test_feature_sum_is_the_layer_maps_mean_over_response_tokens():
  """The uniform map pairs student blocks 1, 2 with teacher blocks 2, 4;
  the explicit one the embeddings and 2 with 3."""
  out, proj, (hs, ht) = _sums("gpt2")
  h = lambda d, l: np.asarray(d.hidden[l], np.float64)
  for k, fn, pairs in (
      ("mse", F.hidden_mse, ((1, 2), (2, 4))),
      ("cosine_pairs", F.hidden_cosine, ((0, 0), (2, 3))),
  ):
    per = [
        np.asarray(fn(h(hs, s), h(ht, t), np.asarray(proj[k][f"{s}_{t}"])))
        for s, t in pairs
    ]
    want = np.sum(np.mean(per, 0) * LOSS_BxT)
    assert float(out[k][0].feature) == pytest.approx(want, rel=1e-4), k


def test_weight_zero_is_todays_program():
  student, teacher = _models("gpt2")
  b = _batch(np.zeros((B, T), int))
  plain = {
      k: v for k, v in _loss_cfg().items() if k not in ("features", "attention")
  }
  jaxpr = lambda cfg: str(
      jax.make_jaxpr(lambda b: objective.sums(cfg, student, teacher, b))(b)
  )
  assert jaxpr(_loss_cfg()) == jaxpr(plain)
  inputs = (b["input_ids"], b["positions"], b["attention_mask"])
  assert str(jax.make_jaxpr(student.hidden_states)(*inputs)) == str(
      jax.make_jaxpr(
          lambda *a: student.intermediates(*a, taps=layers.Taps())[0]
      )(*inputs)
  )


def test_weights_are_traced():
  """A new weight reuses the compiled loss."""
  s = objective.zero_sums(
      _loss_cfg(features=dict(weight=1.0), attention=dict(weight=1.0)), 2.0
  )
  f = jax.jit(
      lambda w: objective.micro_loss(
          _loss_cfg(features=dict(weight=1.0), attention=dict(weight=1.0)),
          s,
          4.0,
          4.0,
          weights=w,
      )
  )
  one = {"feature": jnp.float32(1.0), "attention": jnp.float32(1.0)}
  three = {"feature": jnp.float32(3.0), "attention": jnp.float32(1.0)}
  assert float(f(three)) - float(f(one)) == pytest.approx(2.0 * 2.0 / 4.0)
  assert f._cache_size() == 1  # pylint: disable=protected-access


def test_plan_refuses_what_the_models_cannot_pair():
  student, teacher = _models("llama")
  other = tiny_run.gpt2(1, V, n_embd=32, n_layer=4, n_head=2)
  with pytest.raises(
      ValueError,
      match="student has 4 query / 2 key-value "
      "heads and the teacher 2 / 2.*kind=minilmv2",
  ):
    transfer.plan(CFGS["minilm"], student, other)
  cfg = _loss_cfg(attention=dict(weight=1.0, relation_heads=3))
  with pytest.raises(
      ValueError,
      match="relation_heads=3 must divide the " "student's query width 16",
  ):
    transfer.plan(cfg, student, teacher)
  cfg = _loss_cfg(features=dict(weight=1.0, layer_map="pairs", pairs="3:1"))
  with pytest.raises(ValueError, match=r"in \[0, 2\] x \[0, 4\]"):
    transfer.plan(cfg, student, teacher)


@pytest.mark.parametrize(
    "override, match",
    [
        (
            {"teacher.source": "cache", "teacher.cache_dir": "/x"},
            "teacher.source='cache' holds the teacher's output distributions",
        ),
        ({"teacher.tokenizer": "byte"}, "unset teacher.tokenizer"),
        ({"loss.impl": "fused"}, "loss.impl='fused' does not return"),
        ({"loss.kd_ratio": 0.0}, "loss.kd_ratio=0 never loads"),
    ],
)
def test_config_check_refuses_what_cannot_run(override, match, tmp_path):
  c = tiny_run.config(
      "features_gpt2", str(tmp_path), **{"loss.attention.weight": 0.5}
  )
  c.unlock()
  for k, v in override.items():
    node, leaf = c, k.split(".")
    for part in leaf[:-1]:
      node = node[part]
    node[leaf[-1]] = v
  with pytest.raises(checks.ConfigError) as e:
    checks.validate(c)
  msg = str(e.value)
  assert "loss.features.weight and loss.attention.weight > 0" in msg
  assert match in msg and "\n" not in msg


def test_config_check_refuses_onpolicy(tmp_path):
  from kdjax.config import recipe

  c = tiny_run.config("features_gpt2", str(tmp_path))
  recipe.add_onpolicy(c, source="gkd", lmbda=0.5)
  with pytest.raises(
      checks.ConfigError, match="onpolicy.source='gkd' is not " "wired"
  ):
    checks.validate(c)
