"""What every generating strategy shares: models, prompts out, rows back in.

:class:`Sampler` holds a run's static sampling parts (settings, lengths, the
models' graph definitions) and does, inside the jitted step, what each
strategy needs around its decoding loop: the student (eval mode) and teacher
merged from their states, the batch's prompts left-padded, the generated
tokens turned back into training rows (:mod:`kdjax.onpolicy.batches`) laid
along the batch axis, and rows into a batch of the dataset's keys, dtypes
and layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from flax import nnx
import jax

from kdjax import sampling, sharding
from kdjax.onpolicy import batches

Array = jax.Array
# ``generate(prompt_BxP, mask_BxP) -> (tokens_BxN, extra)``.
Generate = Callable[[Array, Array], tuple[Array, Any]]


def new_tokens(cfg, max_length: int, max_prompt_length: int) -> int:
  """``onpolicy.max_new_tokens``, 0 meaning what the rows leave room for."""
  return cfg.max_new_tokens or max_length - max_prompt_length


def settings(
    cfg,
    *,
    eos_id: int,
    stop_ids: Sequence[int],
    max_length: int,
    max_prompt_length: int,
) -> sampling.Settings:
  """Sampling settings of the generated responses: any of ``stop_ids`` ends
  a row (:func:`kdjax.data.tokenizer.stop_ids`), ``eos_id`` pads it."""
  return sampling.make_settings(
      max_new_tokens=new_tokens(cfg, max_length, max_prompt_length),
      greedy=False,
      temperature=float(cfg.temperature),
      top_k=int(cfg.top_k),
      top_p=float(cfg.top_p),
      stop_ids=stop_ids,
      pad_id=eos_id,
  )


def _on_batch_axis(tree):
  return jax.tree.map(
      lambda x: sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1)),
      tree,
  )


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A run's sampling parts (static; hashable for ``jax.jit``).

  Attributes:
    settings: how responses are sampled (:func:`settings`); its
      ``stop_ids`` end a response.
    prompt_length: the left-padded prompt width (``data.max_prompt_length``).
    max_length: the training rows' length (``data.max_length``).
    eos_id: the padding of prompts and rows.
    student_graphdef: the student's graph definition (params and rest split).
    teacher_graphdef: the teacher's, or None when no strategy decodes with it.
  """

  settings: sampling.Settings
  prompt_length: int
  max_length: int
  eos_id: int
  student_graphdef: Any
  teacher_graphdef: Any = None

  def student(self, params, rest) -> nnx.Module:
    student = nnx.merge(self.student_graphdef, params, rest)
    student.eval()
    return student

  def teacher(self, teacher_state) -> nnx.Module:
    return nnx.merge(self.teacher_graphdef, teacher_state)

  def prompts(self, batch: dict) -> tuple[Array, Array]:
    """The batch's prompts, left-padded to ``prompt_length``, and masks."""
    return batches.prompts_from_batch(batch, self.prompt_length, self.eos_id)

  def rows(self, prompt_BxP, mask_BxP, tokens_BxN) -> batches.Rows:
    """``prompt ‖ tokens`` through the first stop id, as training rows."""
    return batches.response_rows(
        prompt_BxP,
        mask_BxP,
        tokens_BxN,
        max_length=self.max_length,
        eos_id=self.eos_id,
        stop_ids=self.settings.stop_ids,
    )

  def generate_rows(
      self, batch: dict, generate: Generate
  ) -> tuple[batches.Rows, Any]:
    """Rows answering ``batch``'s prompts, on the batch axis, and ``extra``.

    ``generate(prompt_BxP, mask_BxP)`` returns the tokens and whatever else
    its decoding loop records.
    """
    prompt_BxP, mask_BxP = self.prompts(batch)
    tokens_BxN, extra = generate(prompt_BxP, mask_BxP)
    return _on_batch_axis(self.rows(prompt_BxP, mask_BxP, tokens_BxN)), extra

  def sample_rows(self, model: nnx.Module, batch: dict, key) -> batches.Rows:
    """Rows of ``model``'s samples (:func:`kdjax.sampling.generate`)."""
    rows, _ = self.generate_rows(
        batch,
        lambda prompt_BxP, mask_BxP: (
            sampling.generate(
                model, prompt_BxP, mask_BxP, key, **self.settings._asdict()
            ),
            None,
        ),
    )
    return rows

  def as_batch(self, rows: batches.Rows, like: dict) -> dict:
    """The training batch of ``rows``: ``like``'s keys and dtypes."""
    out = batches.to_batch(rows, self.eos_id)
    return {
        k: sharding.constrain(out[k].astype(like[k].dtype), ("batch", None))
        for k in like
    }
