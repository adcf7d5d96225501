"""The method table and the demo's reporting (training itself: test_trainer.py)."""

import json
import os

import pytest

from experiments import demo, run_table


def test_config_for_applies_seed_scale_and_typed_overrides():
  c = run_table.config_for("akl", "tiny", 20, ["loss.hp.mu=0.7",
                                               "optim.lr=0.01", "num_steps=5"])
  assert c.seed == 20 and c.data.name == "synthetic_instruct"
  assert c.loss.hp.mu == 0.7 and c.optim.lr == 0.01 and c.num_steps == 5
  assert run_table.config_for("sft", "paper", 10).loss.kd_ratio == 0.0
  with pytest.raises(ValueError, match="method 'akll' is unknown"):
    run_table.config_for("akll", "tiny", 10)


def test_table_mean_and_std_over_seeds_with_the_paper_row():
  results = {"akl": [{"dolly": {"rougeL": 20.0}}, {"dolly": {"rougeL": 22.0}}],
             "mystery": [{"dolly": {"rougeL": 1.0}}]}
  text = run_table.table(results, ["dolly"], paper=True)
  lines = text.splitlines()
  assert lines[0].startswith("| method | dolly rougeL | paper dolly")
  assert "| akl | 21.00 ± 1.00 | 23.88 | 19.15 | 21.97 |" in lines
  assert "| mystery | 1.00 ± 0.00 | – | – | – |" in lines


def test_score_reuses_a_finished_evaluation(tmp_path):
  c = run_table.config_for("fkl", "tiny", 10)
  os.makedirs(tmp_path / "eval")
  summary = {"synthetic_instruct": {"rougeL": 12.5, "validity": 10.0}}
  (tmp_path / "eval" / "summary.json").write_text(json.dumps(summary))
  assert run_table.score(c, str(tmp_path)) == summary  # no model needed


def test_demo_table_and_figure(tmp_path):
  runs = {}
  for name, ces in {"sft": (3.0, 2.0), "akl": (2.5, 1.5)}.items():
    w = tmp_path / name
    w.mkdir()
    rows = [{"step": 10, "ce": ces[0]}, {"step": 20, "ce": ces[1],
                                         "val_ce": ces[1] + 0.1}]
    (w / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs[name] = (None, str(w))
  png = tmp_path / "fig.png"
  demo.curves(runs, str(png))
  assert png.stat().st_size > 10_000
  text = demo.summary_table({"sft": {"rougeL": 10.04, "validity": 9.0}},
                            {"sft": 2.1})
  assert "| sft | 2.100 | 10.0 | 9.0 |" in text
