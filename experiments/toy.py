"""Shared pieces of the toy experiments: targets, one training loop, error measures, plots.

Every toy fits a student distribution ``q`` to a fixed target ``p`` by minimising a
kdjax divergence (student logits first, teacher logits second) with optax. The
student is either a free logit vector over ``V`` classes (the AKL paper's Figure 2
toy) or a parametric family, e.g. a single Gaussian evaluated on a grid, whose
normalised grid values turn every kdjax divergence into a quadrature of the
continuous one. One training loop (:func:`fit`) serves both: ``lax.scan`` over the
steps, jitted, recording the parameters after every step.

Head and tail follow the AKL paper (arXiv 2404.02657, rule "akl" of
``kd.akl_weights``): sort ``p`` descending; the head is the largest prefix whose
cumulative teacher mass is ≤ μ = 0.5, and always at least the top-1 class; the
rest is the tail. Head (tail) error is ``Σ_{v ∈ head (tail)} |p_v − q_v|``.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import divergences as kd

Array = jax.Array

TEACHER_SHAPES = ("peaked", "long_tailed", "multi_modal")
METHOD_COLORS = {
    "fkl": "tab:orange",
    "rkl": "tab:green",
    "akl": "tab:red",
    "tvd": "tab:purple",
    "fkl_rkl": "tab:brown",
}
FIGURES_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "figures"
)


# ----------------------------------------------------------------------------
# Targets.


def teacher_logits(shape: str, vocab: int, seed: int = 0) -> Array:
  """Logits of a teacher distribution over ``vocab`` classes.

  * ``peaked``: one class holds about 60% of the mass, the rest is a random
    low-level background (a confident next-token distribution).
  * ``long_tailed``: Zipf, ``p_k ∝ k^-1.1`` over a random permutation of the
    classes (a few head tokens and a long tail of rare ones).
  * ``multi_modal``: three discretised Gaussian bumps of different heights and
    widths over the class index plus a small floor (several plausible tokens).
  """
  if vocab < 4:
    raise ValueError(
        f"vocab={vocab} is too small for a toy teacher; use vocab >= 4."
    )
  rng = np.random.default_rng(seed)
  idx = np.arange(vocab, dtype=np.float64)
  if shape == "peaked":
    logits = rng.normal(0.0, 1.0, vocab)
    top = rng.integers(vocab)
    rest = np.exp(np.delete(logits, top)).sum()
    logits[top] = np.log(1.5 * rest)  # p_top = 1.5 / 2.5 = 60% of the mass
  elif shape == "long_tailed":
    logits = -1.1 * np.log1p(rng.permutation(vocab))
  elif shape == "multi_modal":
    density = np.full(vocab, 1e-3)
    for centre, width, height in (
        (0.2, 0.04, 1.0),
        (0.55, 0.06, 0.6),
        (0.85, 0.03, 0.8),
    ):
      density += height * np.exp(-0.5 * ((idx / vocab - centre) / width) ** 2)
    logits = np.log(density)
  else:
    raise ValueError(
        f"unknown teacher shape {shape!r}; choose one of {TEACHER_SHAPES}."
    )
  return jnp.asarray(logits, jnp.float32)


def student_logits(vocab: int, seed: int = 1, scale: float = 1.0) -> Array:
  """The shared initial student: i.i.d. ``N(0, scale²)`` logits."""
  return scale * jax.random.normal(jax.random.key(seed), (vocab,), jnp.float32)


def gaussian_logits(params: Array, grid: Array) -> Array:
  """Log-density (up to a constant) of ``N(mean, exp(log_std)²)`` on ``grid``.

  ``params = [mean, log_std]``. Softmax over the grid normalises it, so a kdjax
  divergence of these logits is the Riemann-sum quadrature of the continuous
  divergence on a uniform grid.
  """
  mean, log_std = params[0], params[1]
  return -0.5 * ((grid - mean) / jnp.exp(log_std)) ** 2


def mixture_logits(
    grid: Array,
    means: Sequence[float],
    stds: Sequence[float],
    weights: Sequence[float],
) -> Array:
  """Log-density of a Gaussian mixture on ``grid`` (normalised densities)."""
  means, stds, weights = (
      jnp.asarray(a, jnp.float32) for a in (means, stds, weights)
  )
  z = (grid[:, None] - means) / stds
  log_comp = -0.5 * z**2 - jnp.log(stds) - 0.5 * jnp.log(2 * jnp.pi)
  return jax.nn.logsumexp(log_comp + jnp.log(weights), axis=-1)


# ----------------------------------------------------------------------------
# Divergences and the training loop.


def divergence(name: str, mu: float = 0.5, rule: str = "akl") -> Callable:
  """The kdjax divergence ``name`` as ``f(student_logits, teacher_logits) -> scalar``."""
  fn = kd.get(name)
  if name == "akl":
    fn = functools.partial(fn, mu=mu, rule=rule)
  return fn


@functools.lru_cache(maxsize=None)
def optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """``sgd`` or ``adam`` from optax, by name.

  Cached: the transformation is a static argument of the jitted loop, so reusing
  one object per setting avoids a recompilation per fit.
  """
  if name == "sgd":
    return optax.sgd(learning_rate)
  if name == "adam":
    return optax.adam(learning_rate)
  raise ValueError(f"unknown optimizer {name!r}; choose 'sgd' or 'adam'.")


@functools.partial(
    jax.jit, static_argnames=("loss_name", "model", "tx", "steps")
)
def _fit(params0, teacher, grid, *, loss_name, model, tx, steps):
  loss_fn = divergence(loss_name)

  def objective(params):
    return loss_fn(model(params, grid), teacher)

  def step(carry, _):
    params, opt_state = carry
    grads = jax.grad(objective)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), params

  _, history = jax.lax.scan(
      step, (params0, tx.init(params0)), None, length=steps
  )
  return jnp.concatenate([params0[None], history], axis=0)


def _free_logits(params: Array, grid: Array) -> Array:
  del grid
  return params


def fit(
    loss_name: str,
    params0: Array,
    teacher: Array,
    steps: int,
    tx: optax.GradientTransformation,
    model: Callable = _free_logits,
    grid: Array | None = None,
) -> Array:
  """Minimises ``loss_name(model(params, grid), teacher)`` with ``tx``.

  One step = one epoch (the whole target is the batch). Returns the parameters
  before training and after each step, shape ``[steps + 1, *params0.shape]``:
  row ``e`` is the student after epoch ``e``. ``model`` defaults to free logits.
  """
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1.")
  grid = jnp.zeros(()) if grid is None else grid
  return _fit(
      params0,
      teacher,
      grid,
      loss_name=loss_name,
      model=model,
      tx=tx,
      steps=steps,
  )


def fit_gaussian(
    loss_name: str,
    params0: Array,
    teacher: Array,
    grid: Array,
    steps: int,
    tx: optax.GradientTransformation,
) -> dict:
  """A single Gaussian (:func:`gaussian_logits`) fitted on ``grid``.

  Returns ``{"history" [steps + 1, 2], "mean", "std", "q"}``: the parameters
  after every step (float64), the fitted mean and standard deviation, and the
  fit's quadrature weights on the grid.
  """
  history = np.asarray(
      fit(loss_name, params0, teacher, steps, tx, gaussian_logits, grid),
      np.float64,
  )
  return dict(
      history=history,
      mean=float(history[-1, 0]),
      std=float(np.exp(history[-1, 1])),
      q=probs(gaussian_logits(jnp.asarray(history[-1]), grid)),
  )


# ----------------------------------------------------------------------------
# Measures (NumPy float64: these are the reported numbers).


def probs(logits) -> np.ndarray:
  """float64 softmax over the last axis."""
  logits = np.asarray(logits, np.float64)
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def kl(p, q) -> np.ndarray:
  """``KL(p‖q)`` over the last axis, float64 (0·log 0 = 0)."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  terms = np.where(
      p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0
  )
  return terms.sum(axis=-1)


def tv(p, q) -> np.ndarray:
  """Total variation ``½ Σ |p − q|`` over the last axis."""
  return 0.5 * np.abs(
      np.asarray(p, np.float64) - np.asarray(q, np.float64)
  ).sum(-1)


def head_mask(p, mu: float = 0.5) -> np.ndarray:
  """AKL-paper head of a 1-D ``p``: the top classes whose cumulative mass is ≤ μ.

  The top-1 class is always in the head; ties are broken by lower index.
  """
  p = np.asarray(p, np.float64)
  order = np.argsort(-p, kind="stable")
  in_head = np.cumsum(p[order]) <= mu
  in_head[0] = True
  mask = np.zeros(p.shape, bool)
  mask[order[in_head]] = True
  return mask


def head_tail_errors(p, q, mu: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """``(Σ_head |p − q|, Σ_tail |p − q|)`` for ``q`` of shape ``[..., V]``."""
  head = head_mask(p, mu)
  err = np.abs(np.asarray(q, np.float64) - np.asarray(p, np.float64))
  return err[..., head].sum(-1), err[..., ~head].sum(-1)


# ----------------------------------------------------------------------------
# Reporting.


def parser(
    description: str, epochs: int, seeded: bool = True
) -> argparse.ArgumentParser:
  """The command line every experiment shares: --quick, --epochs, --out (--seed).

  ``seeded=False`` for experiments without randomness (grid quadrature).
  """
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument(
      "--quick",
      action="store_true",
      help="small settings for tests and CI (seconds on a CPU)",
  )
  ap.add_argument(
      "--epochs",
      type=int,
      default=None,
      help=f"training epochs (default {epochs}; smaller with --quick)",
  )
  ap.add_argument(
      "--out",
      default=None,
      help="folder for the figure (default experiments/figures)",
  )
  if seeded:
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of targets and init"
    )
  return ap


def grid_settings(
    description: str,
    epochs: int,
    quick_epochs: int,
    grid: int,
    quick_grid: int,
    argv=None,
) -> tuple[argparse.Namespace, int, int]:
  """The command line of a grid experiment (:func:`parser`, no seed) and
  its epochs and grid size: ``--epochs``, else the full or ``--quick``
  values."""
  args = parser(description, epochs, seeded=False).parse_args(argv)
  epochs = args.epochs or (quick_epochs if args.quick else epochs)
  return args, epochs, quick_grid if args.quick else grid


def format_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A plain fixed-width table; floats in 4 significant digits."""
  cells = [
      [f"{c:.4g}" if isinstance(c, float) else str(c) for c in row]
      for row in rows
  ]
  widths = [
      max(len(str(h)), *(len(r[i]) for r in cells))
      for i, h in enumerate(header)
  ]
  line = lambda r: "  ".join(str(c).rjust(w) for c, w in zip(r, widths))
  return "\n".join(
      [line(header), line(["-" * w for w in widths]), *map(line, cells)]
  )


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (scripts and CI)."""
  import matplotlib

  if not _in_notebook():
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _in_notebook() -> bool:
  return "ipykernel" in __import__("sys").modules


def save_figure(fig, out_dir: str | None, name: str, dpi: int = 80) -> str:
  """Writes ``<out_dir>/<name>.png`` (default experiments/figures) and closes it."""
  out_dir = out_dir or FIGURES_DIR
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.png")
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
  pyplot().close(fig)
  return path


def plot_bars(ax, p, qs: dict, title: str) -> None:
  """Teacher bars with one line of markers per student method."""
  x = np.arange(len(p))
  ax.bar(x, p, color="tab:blue", alpha=0.35, label="teacher p")
  for name, q in qs.items():
    ax.plot(x, q, ".", ms=4, color=METHOD_COLORS.get(name), label=name.upper())
  ax.set_title(title, fontsize=9)
  ax.set_xticks([])


def plot_gaussian_fit(ax, grid, method: str, result: dict) -> None:
  """The density of a :func:`fit_gaussian` result on ``grid``, labelled with
  its method and parameters."""
  ax.plot(
      grid,
      result["q"] / (grid[1] - grid[0]),
      color=METHOD_COLORS[method],
      label=f"{method.upper()}: N({result['mean']:.2f}, {result['std']:.2f}²)",
  )


def label_density(ax) -> None:
  """Axis labels and legend of a density plot over ``x``."""
  ax.set_xlabel("x")
  ax.set_ylabel("density")
  ax.legend(fontsize=7)


def plot_curves(
    ax, curves: dict, title: str, ylabel: str, log: bool = True
) -> None:
  """One curve per method over epochs (x = epoch index)."""
  for name, y in curves.items():
    ax.plot(
        np.arange(len(y)),
        y,
        color=METHOD_COLORS.get(name.split()[0]),
        ls="--" if "tail" in name else "-",
        label=name,
    )
  if log:
    ax.set_yscale("log")
  ax.set_title(title, fontsize=9)
  ax.set_xlabel("epoch")
  ax.set_ylabel(ylabel)
