"""The method table and the demo: statistics against NumPy transcriptions,
the Markdown, the claims, and a reduced benchmark run end to end."""

import json
import os

import numpy as np
import pytest

from experiments import demo
from experiments.table import (
    claims,
    figure,
    methods,
    report,
    runs,
    scoring,
    stats,
)
from kdjax import evaluation, training
from kdjax.config import files as config_files
from kdjax.config import recipe, spec
import tiny_run

RunResult = scoring.RunResult
DATA = "synthetic_instruct"


def _result(
    rouge, validity=10.0, greedy=20.0, examples=None, curve=None, rouge_std=1.0
):
  examples = np.full(4, rouge) if examples is None else np.asarray(examples)
  return RunResult(
      sampled={
          DATA: {
              "rougeL": rouge,
              "rougeL_std": rouge_std,
              "validity": validity,
              "validity_std": 0.5,
          }
      },
      greedy={
          DATA: {"rougeL": greedy, "validity": greedy, "validity_std": 0.0}
      },
      examples=examples,
      curve=curve or [(10, 2.0), (20, 1.5)],
  )


# ----------------------------------------------------------------------------
# Configs and the registry.


def test_config_for_applies_seed_scale_and_typed_overrides():
  c = methods.config_for(
      "akl", "tiny", 20, ["loss.hp.mu=0.7", "optim.lr=0.01", "num_steps=5"]
  )
  assert c.seed == 20 and c.data.name == "synthetic_instruct"
  assert c.loss.hp.mu == 0.7 and c.optim.lr == 0.01 and c.num_steps == 5
  assert methods.config_for("sft", "paper", 10).loss.kd_ratio == 0.0
  with pytest.raises(ValueError, match="method 'akll' is unknown"):
    methods.config_for("akll", "tiny", 10)


def test_every_student_trains_on_the_teachers_data_and_budget():
  teacher = config_files.experiment("sft_gpt2").get_config("tiny_teacher")
  students = [
      methods.config_for(m, "tiny", 10)
      for m in methods.available(methods.TABLE)
  ]
  assert teacher.data.train_limit == 0
  for c in students:
    assert (c.data.name, c.data.train_limit) == (teacher.data.name, 0)
    assert (c.num_steps, c.batch_size, c.optim.lr) == (300, 16, 3e-3)
    assert c.student.model_overrides.n_embd == 48
  assert teacher.student.model_overrides.n_embd == 96


def test_cached_teacher_rows_read_a_cache_of_their_encoding(tmp_path):
  top16 = methods.config_for("fkl_top16", "tiny", 20)
  sampled = methods.config_for("fkl_sampled", "tiny", 20)
  assert top16.teacher.source == sampled.teacher.source == "cache"
  assert (top16.teacher.cache.encoding, top16.teacher.cache.k) == ("topk", 16)
  assert sampled.teacher.cache.encoding == "sampled"
  assert sampled.teacher.cache.num_samples == 12
  assert top16.loss.name == sampled.loss.name == "fkl"
  assert methods.config_for("fkl", "tiny", 20).teacher.source == "live"
  # Top-k caches are shared by the seeds; sampled ones draw with the seed.
  root = str(tmp_path)
  assert runs.cache_dir(top16, root) == f"{root}/caches/topk16"
  assert runs.cache_dir(sampled, root) == f"{root}/caches/sampled12_s20"


def test_unregistered_configs_drop_out(monkeypatch):
  monkeypatch.setitem(
      methods.METHODS, "nothing", methods.Method("no_such_config_gpt2")
  )
  assert methods.available(["sft", "nothing", "akl"]) == ["sft", "akl"]


def test_protocols():
  c = methods.config_for("fkl", "tiny", 10)
  sampled = scoring.protocol_config(c, "sampled")
  greedy = scoring.protocol_config(c, "greedy")
  assert (sampled.eval.greedy, sampled.eval.seeds) == (False, "10,20,30,40,50")
  assert (greedy.eval.greedy, greedy.eval.seeds) == (True, "10")
  assert c.eval.greedy  # the original is untouched
  p = spec.protocol_from_config(sampled)
  assert (p.temperature, p.top_k, p.top_p, p.no_repeat_ngram_size) == (
      1.0,
      0,
      1.0,
      6,
  )
  with pytest.raises(ValueError, match="protocol 'beam'"):
    scoring.protocol_config(c, "beam")


# ----------------------------------------------------------------------------
# Statistics.


def _bootstrap_reference(a, b, indices):
  """Loop transcription: per resample the mean paired difference, then the
  linear-interpolation percentiles of the sorted means and the p-value."""
  d = [x - y for x, y in zip(a, b)]
  means = sorted(sum(d[i] for i in row) / len(row) for row in indices)

  def percentile(q):
    pos = q / 100 * (len(means) - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(means) - 1)
    return means[lo] + (means[hi] - means[lo]) * (pos - lo)

  below = sum(m <= 0 for m in means) / len(means)
  above = sum(m >= 0 for m in means) / len(means)
  return (
      sum(d) / len(d),
      percentile(2.5),
      percentile(97.5),
      min(1.0, 2 * min(below, above)),
  )


def test_paired_bootstrap_matches_a_loop_transcription():
  rng = np.random.default_rng(3)
  a, b = rng.uniform(0, 100, 40), rng.uniform(0, 100, 40) - 5
  idx = stats.resample_indices(40, 500, seed=7)
  got = stats.paired_bootstrap(a, b, indices_BxN=idx)
  np.testing.assert_allclose(
      [got.delta, got.low, got.high, got.p],
      _bootstrap_reference(a, b, idx),
      rtol=1e-12,
  )
  # Same seed, same draws: the default path is the explicit one.
  assert stats.paired_bootstrap(a, b, num_samples=500, seed=7) == got


def test_paired_bootstrap_exact_small_case():
  # d = (0, 1, 2): the 27 equally likely resamples have sums 0..6 with counts
  # 1, 3, 6, 7, 6, 3, 1. Only (0, 0, 0) has mean <= 0, so p = 2/27; it holds
  # 1/27 > 2.5 % of the mass and (2, 2, 2) too, so the interval is [0, 2].
  got = stats.paired_bootstrap(
      np.array([0.0, 1.0, 2.0]), np.zeros(3), num_samples=200_000, seed=0
  )
  assert got.delta == 1.0
  np.testing.assert_allclose(got.p, 2 / 27, atol=0.003)
  assert (got.low, got.high) == (0.0, 2.0) and not got.significant


def test_paired_bootstrap_constant_shift_and_bad_input():
  got = stats.paired_bootstrap(np.arange(5.0) + 2, np.arange(5.0))
  assert (got.delta, got.low, got.high, got.p) == (2.0, 2.0, 2.0, 0.0)
  assert str(got) == "+2.00 [+2.00, +2.00]*"
  same = stats.paired_bootstrap(np.ones(5), np.ones(5))
  assert same.p == 1.0 and not same.significant
  with pytest.raises(ValueError, match="equal-length 1-D"):
    stats.paired_bootstrap(np.ones(3), np.ones(4))


def test_mean_std_is_ddof_0():
  assert stats.mean_std([1, 2, 3, 4]) == (2.5, np.sqrt(1.25))


# ----------------------------------------------------------------------------
# Markdown and claims.


def test_table_mean_std_over_training_seeds_and_deltas():
  results = {
      "sft": {
          10: _result(20.0, examples=[20, 20, 20, 20]),
          20: _result(22.0, examples=[22, 22, 22, 22]),
      },
      "fkl": {
          10: _result(24.0, validity=12.0, examples=[24, 24, 24, 24]),
          20: _result(26.0, validity=14.0, examples=[26, 26, 26, 26]),
      },
  }
  lines = report.table(results, DATA, teacher=_result(30.0)).splitlines()
  assert lines[0].startswith("| model | seeds | ROUGE-L (sampled) |")
  assert lines[2] == (
      "| teacher | – | 30.00 ± 1.00 | 10.00 ± 0.50 | "
      "20.00 ± 0.00 | 1.500 | – | – |"
  )
  assert lines[3] == (
      "| sft | 10,20 | 21.00 ± 1.00 | 10.00 ± 0.00 | "
      "20.00 ± 0.00 | 1.500 ± 0.000 | – | "
      "-4.00 [-4.00, -4.00]* |"
  )
  assert lines[4] == (
      "| fkl | 10,20 | 25.00 ± 1.00 | 13.00 ± 1.00 | "
      "20.00 ± 0.00 | 1.500 ± 0.000 | +4.00 [+4.00, +4.00]* "
      "| – |"
  )
  # One training seed (the demo): ± is the spread over the sampling seeds.
  demo_lines = report.table(
      {"sft": {10: _result(20.0, rouge_std=0.7)}}, DATA, spread="sampling"
  ).splitlines()
  assert demo_lines[2].startswith("| sft | 10 | 20.00 ± 0.70 | 10.00 ± 0.50 |")


def test_claims_verdicts():
  ex = lambda v: np.array([v - 1.0, v, v + 1.0, v])
  curve = lambda g: [(50, 2.0 + g), (300, 1.5 + g / 10)]
  results = {
      "sft": {10: _result(20.0, examples=ex(20.0))},
      "fkl": {10: _result(23.0, examples=ex(23.0), curve=curve(0.2))},
      "rkl": {10: _result(23.0, examples=ex(23.0), curve=curve(0.0))},
      "akl": {10: _result(24.0, examples=ex(24.0))},
  }
  # A row the paper does not have is in the table, not in claim 1.
  results["gkd"] = {10: _result(15.0, examples=ex(15.0))}
  one, two, three = claims.claims(results, DATA, num_samples=2000)
  assert one.reproduced and "3 of the paper's 3 KD students" in one.evidence
  assert "gkd" not in one.evidence
  assert two.reproduced and "AKL ≥ FKL in 1 of 1 seeds" in two.evidence
  assert three.reproduced
  assert "+0.200 at step 50, +0.020 at step 300" in three.evidence
  results["akl"] = {10: _result(19.0, examples=ex(19.0))}
  one, two, _ = claims.claims(results, DATA, num_samples=2000)
  assert one.reproduced is False and "2 significantly" in one.evidence
  assert two.reproduced is False
  assert str(two).startswith("- **AKL ≥ FKL and AKL ≥ RKL**: not reproduced")
  assert claims.claims({"sft": results["sft"]}, DATA)[1].reproduced is None


def test_replace_block(tmp_path):
  path = tmp_path / "README.md"
  begin, end = report.BLOCK
  path.write_text(f"intro\n{begin}\nold\n{end}\noutro\n")
  assert report.replace_block(str(path), "new | table")
  assert path.read_text() == f"intro\n{begin}\nnew | table\n{end}\noutro\n"
  (tmp_path / "plain.md").write_text("no markers")
  assert not report.replace_block(str(tmp_path / "plain.md"), "x")
  assert not report.replace_block(str(tmp_path / "missing.md"), "x")


def test_score_reuses_a_finished_evaluation(tmp_path):
  c = methods.config_for("fkl", "tiny", 10)
  out = tmp_path / "eval_sampled"
  out.mkdir()
  summary = {DATA: {"rougeL": 12.5, "validity": 10.0}}
  (out / "summary.json").write_text(json.dumps(summary))
  row = {"scores": {"10": {"rougeL": 0.5}, "20": {"rougeL": 0.25}}}
  (out / f"{DATA}.jsonl").write_text(json.dumps(row) + "\n")
  assert scoring.score(c, str(tmp_path)) == summary  # no model needed
  np.testing.assert_allclose(scoring.example_scores(str(out), DATA), [37.5])


# ----------------------------------------------------------------------------
# The reduced benchmark, end to end (the pipeline, not the ranking).


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bench"))
  mp = pytest.MonkeyPatch()
  mp.setattr(scoring, "SAMPLING_SEEDS", "10,20")

  def config_fn(method, seed):
    c = tiny_run.config(
        methods.METHODS[method].module,
        root,
        steps=4,
        **{"export_hf": True, "eval.every_steps": 2, "eval.max_new_tokens": 6},
    )
    c.seed = seed
    return c

  names, seeds = ("sft", "fkl"), (10, 20)
  results = runs.run_all(names, seeds, root, config_fn=config_fn, limit=8)
  yield root, config_fn, results
  mp.undo()


def test_reduced_benchmark_tables_what_the_runs_wrote(reduced):
  root, _, results = reduced
  assert list(results) == ["sft", "fkl"]
  for method, by_seed in results.items():
    assert list(by_seed) == [10, 20]
    for seed, r in by_seed.items():
      workdir = os.path.join(root, runs.run_name(method, seed))
      with open(os.path.join(workdir, "eval_sampled", "summary.json")) as f:
        summary = json.load(f)[DATA]
      assert summary["seeds"] == [10, 20] and summary["num_examples"] == 8
      # The headline number is the mean of the per-example scores.
      np.testing.assert_allclose(r.sampled[DATA]["rougeL"], r.examples.mean())
      assert r.greedy[DATA]["seeds"] == [10]
      assert [s for s, _ in r.curve] == [2, 4]
      with open(os.path.join(workdir, "summary.json")) as f:
        assert r.train_seconds == json.load(f)["seconds"] > 0
  text = report.report(results, DATA, num_samples=200)
  total = sum(
      r.train_seconds for by_seed in results.values() for r in by_seed.values()
  )
  assert f"summed over the 4 runs: {total / 60:.1f} min" in text
  sft = [
      run["rougeL"]
      for run in (results["sft"][s].sampled[DATA] for s in (10, 20))
  ]
  assert f"| sft | 10,20 | {np.mean(sft):.2f} ± {np.std(sft):.2f} |" in text
  assert text.count("at this scale") == 3


def test_reduced_benchmark_resumes_without_training(reduced, monkeypatch):
  root, config_fn, results = reduced

  def refuse(*args, **kwargs):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(training, "train_and_evaluate", refuse)
  monkeypatch.setattr(evaluation, "run", refuse)
  again = runs.run_all(
      ["sft", "fkl"], [10, 20], root, config_fn=config_fn, limit=8
  )
  # A table of what has finished: rkl never ran here, it is left out.
  partial = runs.run_all(
      ["sft", "rkl"],
      [10],
      root,
      config_fn=config_fn,
      limit=8,
      finished_only=True,
  )
  assert list(partial) == ["sft"]
  for m in again:
    for s in again[m]:
      np.testing.assert_array_equal(
          again[m][s].examples, results[m][s].examples
      )


def test_figures(reduced, tmp_path):
  root, _, results = reduced
  png = tmp_path / "table.png"
  figure.figure(results, DATA, str(png), teacher=results["fkl"][10])
  assert png.stat().st_size > 10_000
  demo_png = tmp_path / "demo.png"
  demo.curves(
      {m: os.path.join(root, runs.run_name(m, 10)) for m in results},
      str(demo_png),
  )
  assert demo_png.stat().st_size > 10_000


def test_shipped_teacher_is_small_and_documented():
  path = recipe.TINY_TEACHER
  size = os.path.getsize(os.path.join(path, "model.safetensors"))
  assert size < 10_000_000
  for name in demo.TEACHER_FILES:
    assert os.path.exists(os.path.join(path, name)), name
  with open(os.path.join(path, "train_config.json")) as f:
    config = json.load(f)
  assert config["data"]["train_limit"] == 0
  assert config["num_steps"] == recipe.TINY_TEACHER_STEPS
