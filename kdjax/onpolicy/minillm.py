r"""MiniLLM (Gu et al., ICLR 2024): sequence-level reverse KL by policy gradient.

The student ``q_θ`` minimises ``KL(q_θ ‖ p)`` over whole responses. Its
gradient (docs/on_policy.md, "MiniLLM") is estimated on responses drawn from
the teacher-mixed policy and split into an exact single-step part and a
sampled long-term part:

**Teacher-mixed sampling.** Every generated token is drawn from

  p̃(y_t | y_<t, x) = α·p(y_t | y_<t, x) + (1 − α)·q_θ(y_t | y_<t, x)

(α = ``alpha``, the reference's ``teacher_mixed_alpha`` = 0.2), both models
decoding together (:func:`kdjax.onpolicy.skd.decode_together`). Recorded per
token: ``old_logp = log q_θold(y_t)`` (the rollout student), ``teacher_logp =
log p(y_t)`` and ``mix_logp = log p̃(y_t)``. Both distributions are the
sampling ones (temperature applied); MiniLLM runs without top-k/top-p
(``onpolicy.top_k = 0``, ``top_p = 1``), so every token has support under
both models.

**Rewards and returns** (rollout constants, no gradient):

  r_t = clip((log p(y_t) − log q_θold(y_t)) / s, −c, c)
  R_t = Σ_{k ≥ t} γ^{k−t} r_k,     A_t = R_t / n_t

with ``reward_scaling`` s = 0.5, ``reward_clip`` c = 100, ``gamma`` γ = 0.95;
the return is normalised by ``n_t``, the number of response tokens at
``k ≥ t`` (the length normalisation, which the reference's loss always applies). ``A`` is
then whitened, ``(A − mean) / sqrt(var + 1e-8)``, mean and (Bessel-corrected)
variance over the batch's response tokens; the reference whitens its padded
``[B, N]`` block, padding zeros included, a shape-dependent statistic kdjax
does not copy.

**Objective** of one update, ``n`` response tokens, ``ε`` = ``cliprange``
(0.2), current log-probs ``log q_θ(y_t)`` at the generation temperature:

  w_t = q_θold(y_t) / p̃(y_t)                        (importance weight)
  ρ_t = exp(log q_θ(y_t) − log q_θold(y_t)) · w_t
  L_pg = (1/n) Σ_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))
  L_reg = (1/n) Σ_t KL(q_θ(· | y_<t) ‖ p(· | y_<t))   (exact over V: kd.rkl)
  L = L_pg + L_reg + λ_lm · L_pt

``L_reg`` is the single-step term (``single_step``; off: ``L_pg`` alone).
The clip acts on the product ``ρ_t``, importance weight included, as the
reference's PPO loss does, so it bounds ``w_t`` to ``[1 − ε, 1 + ε]`` even
when the policy has not moved. ``L_pt`` is the reference's loss on
pre-training text, ``(1 − r)·CE + r·KD``; kdjax evaluates it on the dataset
batch the prompts came from (its responses stand in for the pre-training
corpus) with the run's ``loss.name`` (``fkl`` in ``minillm_gpt2.py``: the
reference's teacher cross-entropy ``−Σ p log q``, which is FKL plus the
teacher's entropy, a constant) and ``loss.kd_ratio`` r (0.5), weighted by
``lm_coef`` λ_lm (1).

**Updates per rollout** (``ppo_epochs``, the reference's 4 in
``minillm_gpt2.py``). A rollout is sampled every ``ppo_epochs`` steps and
trained on by that step and the next ``ppo_epochs − 1`` (the strategy keeps it
in its checkpointed state; each step's own dataset batch still feeds
``L_pt``). At a rollout's first update ``log q_θ = log q_θold``, ``exp(·) =
1`` and ``ρ_t = w_t``: the clip then only bounds the importance weight, and
the gradient of ``L_pg`` is ``−(1/n) Σ_t A_t w_t ∇ log q_θ(y_t)`` on the
unclipped tokens; on the later updates the policy has moved and the clip is
PPO's. With ``ppo_epochs = 1`` every step samples a fresh rollout.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kdjax import divergences as kd
from kdjax import sampling, sharding
from kdjax.onpolicy import batches, skd, strategy
from kdjax.onpolicy.sampler import Sampler

Array = jax.Array
# The rollout's per-token log-probs, as batch keys ``rollout_<name>``.
RECORDS = ("old_logp", "teacher_logp", "mix_logp")
# The dataset batch the pre-training term reads, as batch keys ``lm_<key>``.
LM_PREFIX = "lm_"


@dataclasses.dataclass(frozen=True)
class Config:
  """MiniLLM's constants (``onpolicy.minillm_*``; reference GPT-2 values)."""

  alpha: float = 0.2
  gamma: float = 0.95
  cliprange: float = 0.2
  reward_scaling: float = 0.5
  reward_clip: float = 100.0
  lm_coef: float = 1.0
  single_step: bool = True
  temperature: float = 1.0

  @classmethod
  def from_spec(cls, spec) -> "Config":
    """From a :class:`kdjax.config.spec.OnPolicySpec`."""
    return cls(
        alpha=float(spec.minillm_alpha),
        gamma=float(spec.minillm_gamma),
        cliprange=float(spec.minillm_cliprange),
        reward_scaling=float(spec.minillm_reward_scaling),
        reward_clip=float(spec.minillm_reward_clip),
        lm_coef=float(spec.minillm_lm_coef),
        single_step=bool(spec.minillm_single_step),
        temperature=float(spec.temperature),
    )


# ----------------------------------------------------------------------------
# Teacher-mixed sampling.


def mixed_log_probs(log_q: Array, log_p: Array, alpha: float) -> Array:
  """``log(α·p + (1 − α)·q)`` from log-probabilities, stable at both ends."""
  if alpha <= 0.0:
    return log_q
  if alpha >= 1.0:
    return log_p
  return jnp.logaddexp(jnp.log(alpha) + log_p, jnp.log1p(-alpha) + log_q)


@dataclasses.dataclass(frozen=True)
class MixRule:
  """One teacher-mixed step for :func:`skd.decode_together` (hashable)."""

  settings: sampling.Settings
  alpha: float

  RECORDS = {k: jnp.float32 for k in RECORDS}

  def __call__(self, student_BxV, teacher_BxV, key, tokens_BxS, valid_BxS, end):
    s = self.settings
    s_BxV = sampling.process_logits(student_BxV, s, tokens_BxS, valid_BxS, end)
    t_BxV = sampling.process_logits(teacher_BxV, s, tokens_BxS, valid_BxS, end)
    log_q = jax.nn.log_softmax(s_BxV, axis=-1)
    log_p = jax.nn.log_softmax(t_BxV, axis=-1)
    log_mix = mixed_log_probs(log_q, log_p, self.alpha)
    # At the ends the draw uses the model's own logits, the sampler's exact
    # input, so α = 0 is bit-identical to kdjax.sampling.generate.
    draw = s_BxV if self.alpha <= 0 else t_BxV if self.alpha >= 1 else log_mix
    if s.greedy:
      token_B = jnp.argmax(draw, axis=-1)
    else:
      token_B = jax.random.categorical(key, draw, axis=-1)
    token_B = token_B.astype(jnp.int32)
    at = lambda x: jnp.take_along_axis(x, token_B[:, None], axis=-1)[:, 0]
    return token_B, {
        "old_logp": at(log_q),
        "teacher_logp": at(log_p),
        "mix_logp": at(log_mix),
    }


def generate(
    student, teacher, prompt_ids_BxP, prompt_mask_BxP, key, *, alpha, **settings
) -> tuple[Array, dict[str, Array]]:
  """Teacher-mixed decoding: ``(tokens_BxN, {name: [B, N] float32})``.

  The records are :data:`RECORDS` at each generated token (0 after a row's
  end). ``settings`` are :class:`kdjax.sampling.Settings` fields
  (:func:`kdjax.sampling.make_settings`).
  """
  rule = MixRule(sampling.make_settings(**settings), float(alpha))
  return skd.decode_together(
      student, teacher, prompt_ids_BxP, prompt_mask_BxP, key, rule
  )


def align(values_BxN: Array, prompt_len_B: Array, length_B: Array, L: int):
  """Per-generated-token values onto the training row's label columns.

  Generated token ``i`` is the label of column ``p − 1 + i``
  (:mod:`kdjax.onpolicy.batches`); columns outside ``[p − 1, n − 2]`` get 0.
  """
  t_L = jnp.arange(L)[None, :]
  i_BxL = t_L - (prompt_len_B - 1)[:, None]
  inside = (i_BxL >= 0) & (t_L <= (length_B - 2)[:, None])
  src = jnp.clip(i_BxL, 0, values_BxN.shape[1] - 1)
  got = jnp.take_along_axis(values_BxN, src, axis=1)
  return jnp.where(inside, got, 0.0).astype(jnp.float32)


# ----------------------------------------------------------------------------
# The objective.


class Rollout(NamedTuple):
  """A rollout on the training rows' label columns, ``[B, T]`` each.

  Attributes:
    labels: the sampled tokens ``y_t``.
    old_logp: ``log q_θold(y_t)``, the rollout student.
    teacher_logp: ``log p(y_t)``.
    mix_logp: ``log p̃(y_t)``, the teacher-mixed policy.
  """

  labels: Array
  old_logp: Array
  teacher_logp: Array
  mix_logp: Array


def rollout_from_batch(batch: dict) -> Rollout:
  return Rollout(batch["labels"], *(batch[f"rollout_{k}"] for k in RECORDS))


def lm_batch(batch: dict) -> dict:
  """The dataset batch carried under ``lm_*`` keys, with its own key names."""
  n = len(LM_PREFIX)
  return {k[n:]: v for k, v in batch.items() if k.startswith(LM_PREFIX)}


def rewards(rollout: Rollout, mask_BxT: Array, cfg: Config) -> Array:
  """``r_t = clip((log p − log q_θold) / s, −c, c)`` on response tokens."""
  r = (rollout.teacher_logp - rollout.old_logp) / cfg.reward_scaling
  r = jnp.clip(r, -cfg.reward_clip, cfg.reward_clip)
  return jnp.where(mask_BxT > 0, r, 0.0)


def normalised_returns(rewards_BxT: Array, mask_BxT: Array, gamma) -> Array:
  """``R_t / |{k >= t}|``, ``R_t = Σ_{k >= t} γ^{k−t} r_k``, per row.

  ``|{k >= t}|`` counts the row's response tokens from ``t`` on (at least 1);
  ``rewards`` must be zero off the response.
  """
  m = (mask_BxT > 0).astype(jnp.float32)

  def back(acc_B, r_B):
    acc_B = r_B + gamma * acc_B
    return acc_B, acc_B

  r_TxB = rewards_BxT.T.astype(jnp.float32)
  _, ret_TxB = jax.lax.scan(back, jnp.zeros_like(r_TxB[0]), r_TxB, reverse=True)
  remaining = jnp.cumsum(m[:, ::-1], axis=1)[:, ::-1]
  return ret_TxB.T / jnp.maximum(remaining, 1.0)


def advantages(rollout: Rollout, mask_BxT: Array, cfg: Config) -> Array:
  """Whitened length-normalised returns ``A_t`` (zero off the response)."""
  m = (mask_BxT > 0).astype(jnp.float32)
  a = normalised_returns(rewards(rollout, m, cfg), m, cfg.gamma)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(a * m) / n
  var = jnp.sum(jnp.square(a - mean) * m) / jnp.maximum(n - 1.0, 1.0)
  a = (a - mean) * jax.lax.rsqrt(var + 1e-8)
  return jax.lax.stop_gradient(jnp.where(m > 0, a, 0.0))


def minillm_loss(
    student_logits_BxTxV: Array,
    teacher_logits_BxTxV: Array,
    rollout: Rollout,
    mask_BxT: Array,
    cfg: Config,
    *,
    advantages_BxT: Array | None = None,
    pt_loss: Array | float = 0.0,
    tokens: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
  """``L = L_pg + L_reg + lm_coef · pt_loss`` (module docstring) and metrics.

  Args:
    student_logits_BxTxV: the student on the rollout rows (gradient flows).
    teacher_logits_BxTxV: the teacher on the same rows (held constant).
    rollout: the sampled tokens and their rollout log-probs.
    mask_BxT: 1 on response tokens.
    cfg: the constants.
    advantages_BxT: :func:`advantages` of the whole batch, when this call
      sees one micro-batch of it (default: computed from ``rollout``).
    pt_loss: the pre-training term ``L_pt`` (already a mean).
    tokens: the batch's response-token count ``n`` (default: this mask's),
      so micro-batch losses add up to the batch's.

  Returns:
    ``(loss, metrics)``; metrics are this call's shares of ``minillm_pg``,
    ``minillm_reg``, ``minillm_reward`` (mean per-token reward),
    ``minillm_w`` (mean importance weight) and ``minillm_clipped`` (fraction
    of tokens whose ratio was clipped).
  """
  m = (mask_BxT > 0).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0) if tokens is None else tokens
  if advantages_BxT is None:
    advantages_BxT = advantages(rollout, m, cfg)
  a = jax.lax.stop_gradient(advantages_BxT)
  log_q = kd.log_probs(student_logits_BxTxV, cfg.temperature)
  logp = jnp.take_along_axis(log_q, rollout.labels[..., None], axis=-1)[..., 0]
  old = jax.lax.stop_gradient(rollout.old_logp)
  w = jnp.exp(old - jax.lax.stop_gradient(rollout.mix_logp))
  ratio = jnp.exp((logp - old) * m) * w
  clipped = jnp.clip(ratio, 1.0 - cfg.cliprange, 1.0 + cfg.cliprange)
  pg_BxT = jnp.maximum(-a * ratio, -a * clipped)
  pg = jnp.sum(pg_BxT * m) / n
  rkl_BxT = kd.rkl(
      student_logits_BxTxV,
      jax.lax.stop_gradient(teacher_logits_BxTxV),
      temperature=cfg.temperature,
  )
  reg = jnp.sum(jnp.where(m > 0, rkl_BxT, 0.0)) / n
  loss = pg + (reg if cfg.single_step else 0.0) + cfg.lm_coef * pt_loss
  metrics = {
      "minillm_pg": pg,
      "minillm_reg": reg,
      "minillm_reward": jnp.sum(rewards(rollout, m, cfg)) / n,
      "minillm_w": jnp.sum(w * m) / n,
      "minillm_clipped": jnp.sum((ratio != clipped) * m) / n,
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def metric_zeros() -> dict[str, Array]:
  """The metrics of :func:`minillm_loss`, zero (a scan's initial sums)."""
  z = jnp.zeros((), jnp.float32)
  names = ("pg", "reg", "reward", "w", "clipped")
  return {f"minillm_{k}": z for k in names}


# ----------------------------------------------------------------------------
# The strategy.


@dataclasses.dataclass(frozen=True)
class MiniLLM(strategy.Strategy):
  """Teacher-mixed rollouts for :func:`minillm_loss`.

  Each step's batch is a rollout, its rows with their ``rollout_*``
  log-probs (fresh every ``minillm_ppo_epochs`` steps, reused in between),
  plus the step's dataset batch under ``lm_*`` keys.

  Attributes:
    sampler: the run's sampling parts.
    objective: MiniLLM's constants; ``alpha`` mixes the sampler, the train
      step reads the rest.
    minillm_ppo_epochs: updates per rollout.
    batch_size: the rollout's rows (the run's ``batch_size``).
  """

  kind = "minillm"
  sampler: Sampler
  objective: Config = Config()
  minillm_ppo_epochs: int = 1
  batch_size: int = 0

  def init(self, seed, threshold=0.0, initial_val_loss=0.0):
    """The state before step 0, with a zero rollout when one is reused."""
    state = super().init(seed, threshold, initial_val_loss)
    if self.minillm_ppo_epochs <= 1:
      return state
    shape = (self.batch_size, self.sampler.max_length)
    rollout = {k: jnp.zeros(shape, dt) for k, dt in batches.DTYPES.items()}
    for name in RECORDS:
      rollout[f"rollout_{name}"] = jnp.zeros(shape, jnp.float32)
    return state._replace(rollout=rollout)

  def __call__(self, params, rest, teacher_state, batch, state, step):
    """A fresh rollout every ``minillm_ppo_epochs`` steps, else the last one.

    Either way the dataset batch of this step rides along under ``lm_*``.
    """
    batch = strategy.text(batch)
    info = strategy.no_metrics()
    key = strategy.step_keys(state.key, step)[1]
    fresh = lambda _: self.rollout(params, rest, teacher_state, batch, key)
    if self.minillm_ppo_epochs <= 1:
      rollout, stats = fresh(None)
    else:
      reuse = lambda _: (
          state.rollout,
          dict(info, onpolicy=info["onpolicy"] + 1),
      )
      rollout, stats = jax.lax.cond(
          step % self.minillm_ppo_epochs == 0, fresh, reuse, None
      )
      state = state._replace(rollout=rollout)
    out = dict(rollout)
    out.update({LM_PREFIX + k: v for k, v in batch.items()})
    return out, state, dict(info, **stats)

  def rollout(self, params, rest, teacher_state, batch, key):
    """Teacher-mixed rows and their rollout log-probs (``rollout_*``)."""
    s = self.sampler
    prompt_BxP, mask_BxP = s.prompts(batch)
    tokens_BxN, records = generate(
        s.student(params, rest),
        s.teacher(teacher_state),
        prompt_BxP,
        mask_BxP,
        key,
        alpha=self.objective.alpha,
        **s.settings._asdict(),
    )
    rows = s.rows(prompt_BxP, mask_BxP, tokens_BxN)
    out = s.as_batch(rows, batch)
    L = s.max_length
    for name in RECORDS:
      values = align(records[name], rows.prompt_len_B, rows.length_B, L)
      out[f"rollout_{name}"] = sharding.constrain(values, ("batch", None))
    one = jnp.ones((), jnp.float32)
    gen_B = rows.length_B - rows.prompt_len_B
    return out, dict(
        onpolicy=one,
        generated=one,
        gen_len=jnp.mean(gen_B, dtype=jnp.float32),
        skd_replaced=jnp.zeros((), jnp.float32),
    )
