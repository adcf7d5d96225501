"""Feature and attention transfer terms against float64 NumPy references.

Values and gradients of every term come from one jitted program; the
references are NumPy float64 definitions, their gradients central finite
differences of those definitions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.divergences import features as F

B, T = 2, 5
# Row 0 left-padded (two padding slots), row 1 right-padded (one).
VALID_BxT = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]], np.float32)


# ----------------------------------------------------------------------------
# NumPy float64 references.


def np_mse(h_s, h_t, w):
  return np.mean((h_s @ w - h_t) ** 2, axis=-1)


def np_cosine(h_s, h_t, w):
  p = h_s @ w
  cos = np.sum(p * h_t, -1) / (
      np.linalg.norm(p, axis=-1) * np.linalg.norm(h_t, axis=-1)
  )
  return 1.0 - cos


def np_row_kl(scores_s, scores_t, valid):
  """``mean_h KL(softmax_t ‖ softmax_s)`` per row over keys j <= i, valid."""
  out = np.zeros(scores_s.shape[:1] + scores_s.shape[2:3])
  for b in range(scores_s.shape[0]):
    for i in range(scores_s.shape[2]):
      keys = [j for j in range(i + 1) if valid[b, j]]
      if not keys:
        continue
      kl = 0.0
      for h in range(scores_s.shape[1]):
        ls = scores_s[b, h, i, keys] - np.logaddexp.reduce(
            scores_s[b, h, i, keys]
        )
        lt = scores_t[b, h, i, keys] - np.logaddexp.reduce(
            scores_t[b, h, i, keys]
        )
        kl += np.sum(np.exp(lt) * (lt - ls))
      out[b, i] = kl / scores_s.shape[1]
  return out


def np_attention_scores(q, k):
  H, G, K = q.shape[2], k.shape[2], q.shape[3]
  k = np.repeat(k, H // G, axis=2)
  return np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(K)


def np_relation_scores(x, heads):
  b, t, h, k = x.shape
  d = h * k // heads
  x = x.reshape(b, t, heads, d)
  return np.einsum("btrd,bsrd->brts", x, x) / np.sqrt(d)


def np_attention_kl(q_s, k_s, q_t, k_t, valid):
  return np_row_kl(
      np_attention_scores(q_s, k_s), np_attention_scores(q_t, k_t), valid
  )


def np_relation_kl(x_s, x_t, valid, heads):
  return np_row_kl(
      np_relation_scores(x_s, heads), np_relation_scores(x_t, heads), valid
  )


def fd_grad(f, args, argnum, eps=1e-6):
  """Central finite differences of the scalar ``f(*args)`` in ``args[argnum]``."""
  x = args[argnum]
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    for sign in (1, -1):
      y = x.copy()
      y[idx] += sign * eps
      a = list(args)
      a[argnum] = y
      g[idx] += sign * f(*a) / (2 * eps)
  return g


# ----------------------------------------------------------------------------
# The cases: (name, jax term, numpy term, inputs, differentiated args).

rng = np.random.default_rng(0)
_n = lambda *shape: rng.normal(size=shape)
CASES = {
    "mse": (
        F.hidden_mse,
        np_mse,
        (_n(B, T, 4), _n(B, T, 6), _n(4, 6) * 0.5),
        (0, 2),
    ),
    "cosine": (
        F.hidden_cosine,
        np_cosine,
        (_n(B, T, 4), _n(B, T, 6), _n(4, 6) * 0.5),
        (0, 2),
    ),
    # Grouped-query student (4 query heads on 2 key heads), wider teacher.
    "attention": (
        lambda q_s, k_s, q_t, k_t: F.attention_kl(
            q_s, k_s, q_t, k_t, VALID_BxT
        ),
        lambda q_s, k_s, q_t, k_t: np_attention_kl(
            q_s, k_s, q_t, k_t, VALID_BxT
        ),
        (_n(B, T, 4, 2), _n(B, T, 2, 2), _n(B, T, 4, 3), _n(B, T, 4, 3)),
        (0, 1),
    ),
    # Student 2 heads x 3, teacher 3 heads x 4: relation heads 2 and 3.
    **{
        f"relation{r}": (
            functools.partial(
                lambda x_s, x_t, r: F.relation_kl(x_s, x_t, VALID_BxT, r), r=r
            ),
            functools.partial(
                lambda x_s, x_t, r: np_relation_kl(x_s, x_t, VALID_BxT, r),
                r=r,
            ),
            (_n(B, T, 2, 3), _n(B, T, 3, 4)),
            (0,),
        )
        for r in (2, 3)
    },
}
ROW_WEIGHTS_BxT = rng.uniform(0.5, 1.5, size=(B, T))


@functools.cache
def jax_results():
  """Every case's per-position values and gradients of ``Σ w·loss``, one jit."""

  def all_cases(inputs):
    out = {}
    for name, (fn, _, _, wrt) in CASES.items():
      total = lambda *a, fn=fn: jnp.sum(ROW_WEIGHTS_BxT * fn(*a))
      grads = jax.grad(total, argnums=wrt)(*inputs[name])
      out[name] = (fn(*inputs[name]), grads)
    return out

  inputs = {
      k: tuple(jnp.asarray(x, jnp.float32) for x in c[2])
      for k, c in CASES.items()
  }
  return jax.device_get(jax.jit(all_cases)(inputs))


@pytest.mark.parametrize("name", sorted(CASES))
def test_value_and_gradient_match_float64_reference(name):
  _, ref, inputs, wrt = CASES[name]
  value, grads = jax_results()[name]
  want = ref(*inputs)
  np.testing.assert_allclose(value, want, rtol=2e-5, atol=2e-6)
  total = lambda *a: float(np.sum(ROW_WEIGHTS_BxT * ref(*a)))
  for argnum, g in zip(wrt, grads):
    np.testing.assert_allclose(
        g, fd_grad(total, inputs, argnum), rtol=1e-3, atol=2e-5
    )


def test_padding_keys_and_rows_are_fenced_off():
  """Values at padding positions change no loss of a valid row, and a row
  spans only the keys at or before it."""
  (value, _), (x_s, x_t) = jax_results()["relation2"], CASES["relation2"][2]
  pad = VALID_BxT == 0
  noisy = [x.copy() for x in (x_s, x_t)]
  for x in noisy:
    x[pad] = 100.0 * rng.normal(size=x[pad].shape)
  again = F.relation_kl(*map(jnp.asarray, noisy), VALID_BxT, 2)
  np.testing.assert_allclose(
      np.asarray(again)[~pad], value[~pad], rtol=1e-5, atol=1e-6
  )
  # The first valid row sees only itself: both distributions are one-hot.
  assert value[0, 2] == pytest.approx(0.0, abs=1e-6)
  assert value[1, 0] == pytest.approx(0.0, abs=1e-6)
  # A later key never enters an earlier row.
  later = [x.copy() for x in (x_s, x_t)]
  for x in later:
    x[:, -1] = rng.normal(size=x[:, -1].shape)
  again = np.asarray(F.relation_kl(*map(jnp.asarray, later), VALID_BxT, 2))
  np.testing.assert_allclose(again[:, :-1], value[:, :-1], rtol=1e-5)


def test_minilm_needs_equal_head_counts():
  q = jnp.zeros((1, 3, 2, 4))
  with pytest.raises(
      ValueError,
      match="student has 2 attention heads and " "the teacher 3.*minilmv2",
  ):
    F.attention_kl(q, q, jnp.zeros((1, 3, 3, 4)), q, jnp.ones((1, 3)))


def test_relation_heads_must_divide_both_widths():
  with pytest.raises(
      ValueError,
      match="4 relation heads do not divide the " "teacher's 3x2 = 6",
  ):
    F.relation_kl(
        jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 3, 3, 2)), jnp.ones((1, 3)), 4
    )


@pytest.mark.parametrize(
    "kind, n_s, n_t, kw, want",
    [
        ("uniform", 2, 4, {}, ((1, 2), (2, 4))),
        ("uniform", 2, 3, {}, ((1, 2), (2, 3))),
        ("uniform", 12, 48, {}, tuple((l, 4 * l) for l in range(1, 13))),
        ("uniform", 3, 2, {}, ((1, 1), (2, 1), (3, 2))),
        ("last", 2, 4, dict(last_k=2), ((1, 3), (2, 4))),
        ("last", 6, 4, {}, ((6, 4),)),
        (
            "pairs",
            2,
            4,
            dict(pairs=((0, 0), (2, 3)), first=0),
            ((0, 0), (2, 3)),
        ),
    ],
)
def test_layer_maps(kind, n_s, n_t, kw, want):
  assert F.layer_pairs(kind, n_s, n_t, **kw) == want


@pytest.mark.parametrize(
    "kind, kw, match",
    [
        ("last", dict(last_k=3), r"last_k=3 must be in \[1, 2\]"),
        ("pairs", dict(pairs=((3, 1),)), r"in \[1, 2\] x \[1, 4\]"),
        ("pairs", dict(pairs=((0, 1),)), r"in \[1, 2\] x \[1, 4\]"),
        ("pairs", {}, "must be non-empty"),
        ("middle", {}, "layer map 'middle' is unknown"),
    ],
)
def test_layer_map_errors(kind, kw, match):
  with pytest.raises(ValueError, match=match):
    F.layer_pairs(kind, 2, 4, **kw)
