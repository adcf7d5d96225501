"""Speculative KD (Xu et al., ICLR 2025): student proposes, teacher vets.

At every decoding step ``i`` of a response (docs/on_policy.md):

  y ~ q_s(. | x, y_<i)                       (student proposal)
  accept  iff  z_t[y] >= the K-th largest teacher logit z_t   (y in top-K)
  y_i = y if accepted, else y' ~ softmax(top_K(z_t) / tau)

Ties with the K-th logit count as inside, as in
:func:`kdjax.sampling.top_k_mask`; ``K >= V`` accepts everything (plain
student sampling); ``K = 1`` puts the teacher's argmax wherever the student
disagrees with it. ``resample="full"`` draws ``y'`` from the whole
(temperature-scaled) teacher distribution instead of its top-K.

Both models decode in one ``lax.while_loop`` with their own KV caches
(:func:`decode_together`, shared with MiniLLM's teacher-mixed sampler): per
step one student and one teacher forward on the chosen token, no host
round-trip. The proposal uses the sampler's key schedule exactly (``key, sub
= split(key)``; ``categorical(sub, ...)``), so with ``K >= V`` the tokens are
bit-identical to :func:`kdjax.sampling.generate`'s; the teacher draw uses
``fold_in(sub, 1)``.

:class:`SKD` is GKD's mixture (:class:`kdjax.onpolicy.gkd.GKD`) with these
decodes as its generated responses.
"""

from __future__ import annotations

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp

from kdjax import sampling
from kdjax.onpolicy import gkd

Array = jax.Array
RESAMPLE = ("top_k", "full")


def in_top_k(logits_BxV: Array, token_B: Array, k: int) -> Array:
  """True where ``logits[token]`` is at least the k-th largest logit."""
  if k >= logits_BxV.shape[-1]:
    return jnp.ones(token_B.shape, bool)
  kth_B = jax.lax.top_k(logits_BxV, k)[0][..., -1]
  mine_B = jnp.take_along_axis(logits_BxV, token_B[:, None], axis=-1)[:, 0]
  return mine_B >= kth_B


def choose(
    student_BxV: Array,
    teacher_BxV: Array,
    key: Array,
    *,
    teacher_top_k: int,
    settings: sampling.Settings,
    resample: str = "top_k",
    tokens_BxS=None,
    valid_BxS=None,
    end=None,
) -> tuple[Array, Array]:
  """One SKD step: ``(token_B, replaced_B)`` from both next-token logits.

  ``settings`` (temperature, top-k/top-p, no-repeat n-grams, greedy) shape
  both the student's proposal and the teacher's replacement draw, as in
  :func:`kdjax.sampling.process_logits`; top-K membership is judged on the
  teacher's raw logits.
  """
  s = settings
  student_BxV = sampling.process_logits(
      student_BxV, s, tokens_BxS, valid_BxS, end
  )
  teacher_raw = teacher_BxV.astype(jnp.float32)
  teacher_BxV = sampling.process_logits(
      teacher_raw, s, tokens_BxS, valid_BxS, end
  )
  if resample == "top_k":
    teacher_BxV = sampling.top_k_mask(teacher_BxV, teacher_top_k)
  if s.greedy:
    proposal_B = jnp.argmax(student_BxV, axis=-1)
    replacement_B = jnp.argmax(teacher_BxV, axis=-1)
  else:
    proposal_B = jax.random.categorical(key, student_BxV, axis=-1)
    replacement_B = jax.random.categorical(
        jax.random.fold_in(key, 1), teacher_BxV, axis=-1
    )
  accept_B = in_top_k(teacher_raw, proposal_B, teacher_top_k)
  token_B = jnp.where(accept_B, proposal_B, replacement_B)
  return token_B.astype(jnp.int32), ~accept_B


@dataclasses.dataclass(frozen=True)
class Rule:
  """SKD's step rule for :func:`decode_together` (hashable: static in jit).

  Records ``replaced`` (bool) per generated token.
  """

  settings: sampling.Settings
  teacher_top_k: int
  resample: str = "top_k"

  RECORDS = {"replaced": jnp.bool_}

  def __call__(self, student_BxV, teacher_BxV, key, tokens_BxS, valid_BxS, end):
    token_B, replaced_B = choose(
        student_BxV,
        teacher_BxV,
        key,
        teacher_top_k=self.teacher_top_k,
        settings=self.settings,
        resample=self.resample,
        tokens_BxS=tokens_BxS,
        valid_BxS=valid_BxS,
        end=end,
    )
    return token_B, {"replaced": replaced_B}


def generate(
    student: nnx.Module,
    teacher: nnx.Module,
    prompt_ids_BxP: Array,
    prompt_mask_BxP: Array,
    key: Array,
    *,
    teacher_top_k: int,
    resample: str = "top_k",
    **settings,
) -> tuple[Array, Array]:
  """SKD decoding of ``max_new_tokens`` per row (both models in eval mode).

  Returns ``(tokens_BxN, replaced_BxN)``: the tokens (after a row's first
  stop id the rest is ``pad_id``) and where the teacher replaced the student's
  proposal (False after the end).
  """
  s = sampling.make_settings(**settings)
  if teacher_top_k < 1:
    raise ValueError(
        f"SKD teacher_top_k={teacher_top_k} must be >= 1 (the "
        "teacher's top-K that accepts a student token)."
    )
  if resample not in RESAMPLE:
    raise ValueError(f"SKD resample={resample!r} must be one of {RESAMPLE}.")
  tokens_BxN, records = decode_together(
      student,
      teacher,
      prompt_ids_BxP,
      prompt_mask_BxP,
      key,
      Rule(s, teacher_top_k, resample),
  )
  return tokens_BxN, records["replaced"]


def decode_together(
    student: nnx.Module,
    teacher: nnx.Module,
    prompt_ids_BxP: Array,
    prompt_mask_BxP: Array,
    key: Array,
    rule,
) -> tuple[Array, dict[str, Array]]:
  """Student and teacher decode one sequence per row together.

  ``rule`` (hashable, with a ``settings`` :class:`kdjax.sampling.Settings`
  and a ``RECORDS`` dict of name -> dtype) maps both models' next-token
  logits, the step's key and the tokens so far to ``(token_B, records)``;
  each record ``[B]`` is kept per generated token. Per step: ``key, sub =
  split(key)`` (the sampler's schedule), one rule call, one student and one
  teacher forward on the chosen token through their own KV caches.

  Returns ``(tokens_BxN, records)``: after a row's first stop id the tokens
  are ``pad_id`` and the records zero (False).
  """
  s = rule.settings
  if s.temperature <= 0:
    raise ValueError(
        f"temperature={s.temperature} must be > 0; use "
        "greedy=True for argmax decoding."
    )
  s_def, s_state = nnx.split(student)
  t_def, t_state = nnx.split(teacher)
  return _decode_together(
      s_def,
      t_def,
      s_state,
      t_state,
      jnp.asarray(prompt_ids_BxP, jnp.int32),
      jnp.asarray(prompt_mask_BxP, bool),
      key,
      rule,
  )


@functools.partial(jax.jit, static_argnums=(0, 1, 7))
def _decode_together(
    s_def, t_def, s_state, t_state, prompt_BxP, mask_BxP, key, rule
):
  student = nnx.merge(s_def, s_state)
  teacher = nnx.merge(t_def, t_state)
  s = rule.settings
  B, P = prompt_BxP.shape
  N = s.max_new_tokens
  S = P + N
  s_cache, t_cache = student.init_cache(B, S), teacher.init_cache(B, S)
  s_logits, s_cache = student.decode(
      prompt_BxP, s_cache, attention_mask=mask_BxP
  )
  t_logits, t_cache = teacher.decode(
      prompt_BxP, t_cache, attention_mask=mask_BxP
  )
  tokens_BxS = jnp.full((B, S), s.pad_id, jnp.int32).at[:, :P].set(prompt_BxP)
  valid_BxS = jnp.zeros((B, S), bool).at[:, :P].set(mask_BxP)
  records = {k: jnp.zeros((B, N), dt) for k, dt in rule.RECORDS.items()}

  def cond(carry):
    i, done_B = carry[0], carry[5]
    return (i < N) & ~jnp.all(done_B)

  def body(carry):
    i, tokens_BxS, valid_BxS, records, logits, done_B, caches, key = carry
    key, sub = jax.random.split(key)
    next_B, step = rule(logits[0], logits[1], sub, tokens_BxS, valid_BxS, P + i)
    next_B = jnp.where(done_B, s.pad_id, next_B).astype(jnp.int32)
    tokens_BxS = tokens_BxS.at[:, P + i].set(next_B)
    valid_BxS = valid_BxS.at[:, P + i].set(~done_B)
    records = {
        k: r.at[:, i].set(jnp.where(done_B, 0, step[k]).astype(r.dtype))
        for k, r in records.items()
    }
    done_B = done_B | sampling.is_stop(next_B, s.stop_ids)
    s_next, s_cache = student.decode(next_B[:, None], caches[0])
    t_next, t_cache = teacher.decode(next_B[:, None], caches[1])
    return (
        i + 1,
        tokens_BxS,
        valid_BxS,
        records,
        (s_next[:, 0], t_next[:, 0]),
        done_B,
        (s_cache, t_cache),
        key,
    )

  carry = (
      jnp.array(0, jnp.int32),
      tokens_BxS,
      valid_BxS,
      records,
      (s_logits[:, -1], t_logits[:, -1]),
      jnp.zeros((B,), bool),
      (s_cache, t_cache),
      key,
  )
  _, tokens_BxS, _, records, *_ = jax.lax.while_loop(cond, body, carry)
  return tokens_BxS[:, P:], records


# ----------------------------------------------------------------------------
# The strategy.


@dataclasses.dataclass(frozen=True)
class SKD(gkd.GKD):
  """GKD's mixture with SKD-decoded responses (:func:`generate`).

  Attributes:
    skd_top_k: the teacher's top-K that accepts a student token.
    skd_resample: what a rejected token is drawn from (:data:`RESAMPLE`).
  """

  kind = "skd"
  skd_top_k: int = 25
  skd_resample: str = "top_k"

  def responses(self, params, rest, teacher_state, batch, key):
    s = self.sampler
    rows, replaced_BxN = s.generate_rows(
        batch,
        lambda prompt_BxP, mask_BxP: generate(
            s.student(params, rest),
            s.teacher(teacher_state),
            prompt_BxP,
            mask_BxP,
            key,
            teacher_top_k=self.skd_top_k,
            resample=self.skd_resample,
            **s.settings._asdict(),
        ),
    )
    n_tokens = jnp.maximum(jnp.sum(rows.length_B - rows.prompt_len_B), 1)
    return rows, jnp.sum(replaced_BxN) / n_tokens
