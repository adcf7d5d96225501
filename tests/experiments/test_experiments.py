"""The toy experiments reproduce (or honestly fail to reproduce) the papers' claims.

Each experiment runs once in its --quick mode (module-scoped fixtures); the tests
assert the claims on its returned numbers, and the shared helpers against NumPy
references written from the math.
"""

import os
import runpy
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import commands
from commands import ROOT
from experiments import (
    gaussian_mixture,
    head_tail,
    toy,
    toy_convergence,
    tvd_outliers,
)


def _run_main(module, tmp_path_factory, *extra):
  out = tmp_path_factory.mktemp(module.__name__.split(".")[-1])
  results = module.main(["--quick", "--out", str(out), *extra])
  return results, out


# ----------------------------------------------------------------------------
# Helpers against references written from the math.


def test_head_mask_is_the_akl_paper_head():
  # sorted: 0.35 (S=0.35), 0.30 (S=0.65 > 0.5, tail), ...
  np.testing.assert_array_equal(
      toy.head_mask([0.1, 0.3, 0.25, 0.35]), [False, False, False, True]
  )
  # cumulative mass exactly 0.5 stays in the head
  # (binary fractions: the cumulative sums are exact)
  np.testing.assert_array_equal(
      toy.head_mask([0.25, 0.25, 0.25, 0.125, 0.125]),
      [True, True, False, False, False],
  )


def test_head_mask_top1_always_in_head_and_ties_by_lower_index():
  np.testing.assert_array_equal(
      toy.head_mask([0.1, 0.7, 0.2]), [False, True, False]
  )
  np.testing.assert_array_equal(
      toy.head_mask([0.3, 0.3, 0.3, 0.1]), [True, False, False, False]
  )


def test_head_mask_agrees_with_kd_akl_weights():
  # kd.akl_weights(rule="akl") splits |p − q| into the same head and tail.
  from kdjax import divergences as kd

  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.full(40, 0.3))
  q = rng.dirichlet(np.full(40, 1.0))
  head, tail = toy.head_tail_errors(p, q)
  w_head, _ = kd.akl_weights(
      jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32)
  )
  np.testing.assert_allclose(float(w_head), head / (head + tail), rtol=1e-4)


def test_head_tail_errors_reference():
  p = np.array([0.5, 0.3, 0.2])
  q = np.array([[0.2, 0.3, 0.5], [0.5, 0.3, 0.2]])
  head, tail = toy.head_tail_errors(p, q)  # head = {0}
  np.testing.assert_allclose(head, [0.3, 0.0])
  np.testing.assert_allclose(tail, [0.3, 0.0])


def test_fit_sgd_step_matches_the_analytic_fkl_gradient():
  # docs/divergences.md "Forward KL": ∂FKL/∂s = q − p, so one SGD step is
  # s − lr (q − p).
  teacher = toy.teacher_logits("long_tailed", 16, seed=3)
  init = toy.student_logits(16, seed=4)
  history = toy.fit("fkl", init, teacher, 2, toy.optimizer("sgd", 0.5))
  s = np.asarray(init, np.float64)
  p = toy.probs(teacher)
  for epoch in (1, 2):
    s = s - 0.5 * (toy.probs(s) - p)
    np.testing.assert_allclose(
        np.asarray(history[epoch]), s, rtol=1e-5, atol=1e-6
    )


def test_fit_gaussian_fkl_reaches_moment_matching():
  grid = jnp.linspace(-10.0, 10.0, 801)
  teacher = toy.mixture_logits(grid, (-1.0, 2.0), (1.0, 0.5), (0.3, 0.7))
  history = toy.fit(
      "fkl",
      jnp.asarray([0.0, 0.0]),
      teacher,
      400,
      toy.optimizer("adam", 0.05),
      model=toy.gaussian_logits,
      grid=grid,
  )
  mean = 0.3 * -1 + 0.7 * 2
  var = 0.3 * (1 + 1) + 0.7 * (0.25 + 4) - mean**2
  np.testing.assert_allclose(float(history[-1, 0]), mean, atol=0.02)
  np.testing.assert_allclose(
      float(np.exp(history[-1, 1])), np.sqrt(var), atol=0.02
  )


def test_kl_and_tv_reference():
  p, q = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])
  np.testing.assert_allclose(toy.kl(p, q), np.log(2.0))
  np.testing.assert_allclose(toy.tv(p, q), 0.5)


def test_bad_inputs_name_the_value():
  with pytest.raises(ValueError, match="unknown teacher shape 'flat'"):
    toy.teacher_logits("flat", 10)
  with pytest.raises(ValueError, match="vocab=2"):
    toy.teacher_logits("peaked", 2)
  with pytest.raises(ValueError, match="steps=0"):
    toy.fit("fkl", jnp.zeros(4), jnp.zeros(4), 0, toy.optimizer("sgd", 1.0))
  with pytest.raises(ValueError, match="'lbfgs'"):
    toy.optimizer("lbfgs", 1.0)


# ----------------------------------------------------------------------------
# Claim (1): FKL, RKL (and AKL) reach the same optimum on discrete targets.


@pytest.fixture(scope="module")
def convergence(tmp_path_factory):
  return _run_main(toy_convergence, tmp_path_factory)


def test_all_methods_converge_to_the_teacher(convergence):
  results, out = convergence
  assert len(results) == 9
  for (shape, method), r in results.items():
    assert r["kl_1"] > 0.3, (shape, method)  # far from p after one epoch ...
    assert r["kl_last"] < 1e-3, (
        shape,
        method,
        r["kl_last"],
    )  # ... equal at 200
  assert os.path.getsize(out / "toy_convergence.png") > 10_000


# ----------------------------------------------------------------------------
# Claim (2): early on FKL fits the head and RKL the tail.


@pytest.fixture(scope="module")
def head_tail_curves():
  return head_tail.run(settings=((500, 3.0), (50, 1.0)), epochs=3)


def test_fkl_fits_head_rkl_fits_tail_with_a_large_vocabulary(head_tail_curves):
  # V=500, init scale 3 (student mass spread over teacher-rare classes): the
  # claim holds at epoch 1, by a clear margin.
  curves = head_tail_curves
  assert head_tail.claim_at(curves, 500, 3.0, 1) == (True, True)
  fkl, rkl = curves[500, 3.0, "fkl"], curves[500, 3.0, "rkl"]
  assert rkl["head"][1] - fkl["head"][1] > 0.1
  assert fkl["tail"][1] - rkl["tail"][1] > 0.1


def test_small_vocabulary_rkl_does_not_fit_the_tail_first(head_tail_curves):
  # Does NOT reproduce for V=50 with a mild init: FKL, moving the head up, also
  # drains the over-estimated tail through the softmax normaliser faster than
  # RKL does, so FKL's tail error is the smaller one. Reported in NOTES.
  assert head_tail.claim_at(head_tail_curves, 50, 1.0, 1) == (True, False)
  assert head_tail.claim_at(head_tail_curves, 50, 1.0, 3) == (True, False)


def test_head_tail_cli(tmp_path):
  curves = head_tail.main(["--quick", "--epochs", "3", "--out", str(tmp_path)])
  assert head_tail.claim_at(curves, 500, 3.0, 1) == (True, True)
  assert (tmp_path / "head_tail.png").exists()


# ----------------------------------------------------------------------------
# Claim (3): mean-seeking vs mode-seeking needs a single Gaussian on a mixture.


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
  return _run_main(gaussian_mixture, tmp_path_factory)


def test_fkl_single_gaussian_sits_between_the_modes(mixture):
  results, out = mixture
  mean, std = gaussian_mixture.mixture_moments()
  assert (mean, round(std, 4)) == (0.0, round(np.sqrt(10.0), 4))
  for start in gaussian_mixture.INITS:
    r = results[start, "fkl"]
    np.testing.assert_allclose(r["mean"], mean, atol=0.02)
    np.testing.assert_allclose(r["std"], std, atol=0.02)
  assert (out / "gaussian_mixture.png").exists()


def test_rkl_single_gaussian_lands_on_one_mode_from_a_narrow_start(mixture):
  results, _ = mixture
  r = results["narrow", "rkl"]
  np.testing.assert_allclose(r["mean"], 3.0, atol=0.1)
  np.testing.assert_allclose(r["std"], 1.0, atol=0.1)
  np.testing.assert_allclose(
      r["rkl"], np.log(2.0), atol=0.01
  )  # half of p missed


def test_rkl_from_a_broad_start_stops_in_a_central_local_minimum(mixture):
  # Not the textbook picture: from N(0.5, 2²) RKL converges to a wide, centred
  # Gaussian, a genuine local minimum with a worse RKL than the mode fit.
  results, _ = mixture
  broad, narrow = results["broad", "rkl"], results["narrow", "rkl"]
  assert abs(broad["mean"]) < 0.05
  assert 2.5 < broad["std"] < 3.0
  assert broad["rkl"] > narrow["rkl"] + 0.1


# ----------------------------------------------------------------------------
# Claim (4): TVD is less sensitive to outliers than KL.


@pytest.fixture(scope="module")
def outliers(tmp_path_factory):
  return _run_main(tvd_outliers, tmp_path_factory)


def test_tvd_fit_is_less_moved_by_outliers_than_fkl(outliers):
  results, out = outliers
  fkl, tvd = results["fkl"], results["tvd"]
  mean, std = tvd_outliers.moment_match()
  np.testing.assert_allclose([fkl["mean"], fkl["std"]], [mean, std], atol=0.02)
  assert tvd["shift"] < 0.2 < 1.5 < fkl["shift"]
  assert tvd["tv_clean"] < fkl["tv_clean"] / 5
  assert (out / "tvd_outliers.png").exists()


def test_rkl_also_ignores_the_outliers(outliers):
  # Observed, not claimed by DistiLLM: mode-seeking RKL fits the clean bump.
  results, _ = outliers
  assert results["rkl"]["shift"] < 0.01


# ----------------------------------------------------------------------------
# Entry points and committed figures.


def test_script_runs_from_the_command_line(tmp_path):
  """``python experiments/<name>.py``, in a child process (its sys.path
  starts at the script's folder, not the repository)."""
  name = "tvd_outliers"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = commands.xla_flags()
  proc = subprocess.run(
      [
          sys.executable,
          os.path.join("experiments", f"{name}.py"),
          "--quick",
          "--epochs",
          "50",
          "--out",
          str(tmp_path),
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
  )
  _assert_ran(name, proc.stdout, tmp_path)


def test_module_runs_as_main(tmp_path, capsys, monkeypatch):
  """``python -m experiments.<name>``, run in this process (runpy is what
  ``-m`` uses); its --quick fits are the ``outliers`` fixture's programs."""
  name = "tvd_outliers"
  monkeypatch.setattr(sys, "argv", [name, "--quick", "--out", str(tmp_path)])
  runpy.run_module(f"experiments.{name}", run_name="__main__")
  _assert_ran(name, capsys.readouterr().out, tmp_path)


def _assert_ran(name, stdout, out):
  assert "TVD" in stdout and "TV(q, clean)" in stdout
  assert (out / f"{name}.png").exists()


@pytest.mark.parametrize(
    "name",
    [
        "toy_convergence",
        "head_tail",
        "gaussian_mixture",
        "tvd_outliers",
        "tiny_demo",
        "tiny_table",
    ],
)
def test_committed_figures_exist_and_are_small(name):
  path = os.path.join(ROOT, "experiments", "figures", f"{name}.png")
  assert 5_000 < os.path.getsize(path) < 200_000
