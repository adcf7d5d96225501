"""A tired researcher's slips at ``python -m kdjax.train`` / ``kdjax.evaluate``.

Each command is the real CLI in a subprocess. It must end with exactly one
``error: ...`` line naming the value and the fix (no traceback), exit 2 for a
usage error and 1 for a runtime one, and leave the workdir as it was: absent
here, so the corrected command starts instead of being refused as "a
different run". Every case fails before anything compiles.
"""

import json
import os
import shutil

import pytest

import commands
from commands import ROOT, assert_one_error, listing, run_cli
from kdjax.config import recipe
import tiny_run

TINY = "configs/akl_gpt2.py:tiny,steps=10"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli_train")
  tiny_run.make_teacher(str(root / "teacher"))
  return root


def _train(root, tmp_path, *overrides, config=TINY, cwd=ROOT, env=None):
  workdir = tmp_path / "w"
  args = [
      f"--config={config}",
      f"--workdir={workdir}",
      f"--config.data.data_dir={tiny_run.data_dir()}",
      *overrides,
  ]
  if config.startswith(TINY.split(":")[0]) and ":tiny" in config:
    args.insert(2, f"--config.teacher.path={root / 'teacher'}")
  rc, out, err = run_cli("kdjax.train", *args, cwd=cwd, env=env)
  assert not os.path.exists(workdir), listing(workdir)
  return rc, out, err


def _hf_config_dir(path, **cfg):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(
      json.dumps(
          {"model_type": "gpt2", "vocab_size": 257, "n_positions": 512, **cfg}
      )
  )
  return str(path)


# One case per way a command line goes wrong: the flag parser (unknown field,
# unparsable value), a range, a field of another divergence, a limit of the
# student and an unknown choice. Every other value check is tested on the
# config in-process (tests/config/test_checks.py).
@pytest.mark.parametrize(
    "overrides,words",
    [
        (
            ("--config.optim.lrr=1e-3",),
            (
                "--config.optim.lrr",
                "no field 'lrr'",
                "did you mean --config.optim.lr?",
            ),
        ),
        (
            ("--config.loss.hp.mu=1.5",),
            (
                "loss.hp.mu=1.5 is outside [0, 1] for akl",
                "--config.loss.hp.mu=0.5",
            ),
        ),
        (
            ("--config.loss.hp.beta=0.1",),
            ("'beta' belongs to jsd", "configs/jsd_gpt2.py"),
        ),
        (
            ("--config.optim.lr=abc",),
            ("--config.optim.lr=abc", "could not convert string to float"),
        ),
        (
            ("--config.data.max_length=1024",),
            ("data.max_length=1024 exceeds the 512 positions of the student",),
        ),
        (("--config.loss.name=kl",), ("loss.name='kl' is unknown",)),
    ],
)
def test_usage_errors_exit_2(root, tmp_path, overrides, words):
  rc, _, err = _train(root, tmp_path, *overrides)
  assert rc == 2, err
  assert_one_error(err, *words)


def test_a_config_that_does_not_exist_lists_configs(root, tmp_path):
  rc, _, err = _train(root, tmp_path, config="configs/akl_gtp2.py:tiny")
  assert rc == 2, err
  assert_one_error(
      err,
      "config file configs/akl_gtp2.py does not exist",
      "configs/ holds abkd_gpt2.py, akl_gpt2.py",
  )


def test_the_design_card_command_trains_from_a_clone(tmp_path):
  """``python -m kdjax.train --config=configs/akl_gpt2.py:tiny,steps=2
  --workdir=W``, typed as is at the root of a clone (its ``configs/`` and
  shipped tiny teacher, nothing else), trains and exports the student.

  The embedded dataset is copied in where the tiny configs keep it, prepared
  already (the test run's shared copy): preparing it is the same code every
  other tiny run in the suite goes through."""
  clone = tmp_path / "clone"
  shutil.copytree(os.path.join(ROOT, "configs"), clone / "configs")
  teacher = os.path.join("experiments", "assets", "tiny_teacher")
  shutil.copytree(os.path.join(ROOT, teacher), clone / teacher)
  shutil.copytree(tiny_run.data_dir(), clone / recipe.TINY_DATA_DIR)
  rc, out, err = run_cli(
      "kdjax.train",
      "--config=configs/akl_gpt2.py:tiny,steps=2",
      "--workdir=W",
      cwd=clone,
  )
  assert rc == 0, err
  assert "done: 2 steps" in out
  rows = [json.loads(l) for l in (clone / "W" / "metrics.jsonl").open()]
  assert max(r["step"] for r in rows) == 2
  assert (clone / "W" / "hf" / "model.safetensors").is_file()


def test_config_arg_typo(root, tmp_path):
  rc, _, err = _train(root, tmp_path, config="configs/akl_gpt2.py:tiy")
  assert rc == 2, err
  assert_one_error(err, "config arg 'tiy' is unknown", "tiny")


def test_switching_divergence_drops_its_hyper_parameter(root, tmp_path):
  # The paper config (teacher not downloaded): the switch is accepted, the
  # run then stops on the missing teacher with the current hub CLI's command.
  rc, _, err = _train(
      root,
      tmp_path,
      "--config.loss.name=fkl",
      config="configs/akl_gpt2.py",
  )
  assert rc == 1, err
  assert "loss.hp.mu=0.5 dropped: fkl takes no 'mu'" in err
  msg = assert_one_error(
      err,
      "teacher checkpoint",
      "not found",
      "`hf download gpt2-xl",
      "--config.teacher.path=DIR",
  )
  assert "huggingface-cli" not in msg and "TypeError" not in err


def test_vocabulary_mismatch_recommends_no_broken_path(root, tmp_path):
  teacher = _hf_config_dir(tmp_path / "t300", vocab_size=300)
  for loss in ("akl", "uld"):
    rc, _, err = _train(
        root,
        tmp_path,
        f"--config.teacher.path={teacher}",
        f"--config.loss.name={loss}",
        "--config.loss.impl=reference",
    )
    assert rc == 2, err
    msg = assert_one_error(
        err,
        "teacher vocabulary 300 != student " "vocabulary 257",
        "share a tokenizer",
    )
    assert "--config.loss.name=uld" not in msg


def test_empty_and_missing_jsonl(root, tmp_path):
  empty = tmp_path / "train.jsonl"
  empty.write_text("")
  rc, _, err = _train(root, tmp_path, f"--config.data.name={empty}")
  assert rc == 2, err
  assert_one_error(err, f"data.name={str(empty)!r} is empty")
  rc, _, err = _train(root, tmp_path, f"--config.data.name={tmp_path}/x.jsonl")
  assert rc == 1, err
  assert_one_error(err, "no such file")


def test_workdir_that_cannot_be_created(root, tmp_path):
  (tmp_path / "afile").write_text("x")
  rc, _, err = run_cli(
      "kdjax.train",
      f"--config={TINY}",
      f"--workdir={tmp_path}/afile/run",
      f"--config.teacher.path={root / 'teacher'}",
      f"--config.data.data_dir={tiny_run.data_dir()}",
      cwd=ROOT,
  )
  assert rc == 1, err
  assert_one_error(err, f"{tmp_path}/afile/run", "choose another path")
  assert (tmp_path / "afile").read_text() == "x"


def test_evaluate_offline_fails_in_seconds(root, tmp_path):
  from kdjax import models

  model_dir = tmp_path / "model"
  models.save_hf(tiny_run.gpt2(vocab_size=50257), str(model_dir))
  before = listing(tmp_path)
  import time

  t0 = time.perf_counter()
  rc, _, err = run_cli(
      "kdjax.evaluate",
      "--config=configs/akl_gpt2.py",
      f"--checkpoint={model_dir}",
      "--limit=2",
      cwd=ROOT,
      env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
  )
  assert time.perf_counter() - t0 < 90  # interpreter start included
  assert rc == 1, err
  assert_one_error(err, "'gpt2'", "the hub is unreachable", "`hf download gpt2")
  assert listing(tmp_path) == before


def test_evaluate_missing_checkpoint(tmp_path):
  rc, _, err = run_cli(
      "kdjax.evaluate",
      "--config=configs/akl_gpt2.py:tiny",
      f"--checkpoint={tmp_path}/nothing",
      cwd=ROOT,
  )
  assert rc == 1, err
  assert_one_error(err, f"checkpoint {tmp_path}/nothing does not exist")
  assert listing(tmp_path) == []


def test_ctrl_c_names_the_kept_checkpoint_and_the_resume_command(
    root, tmp_path
):
  import signal
  import subprocess
  import sys
  import time

  workdir = tmp_path / "w"
  args = [
      sys.executable,
      "-m",
      "kdjax.train",
      "--config=configs/sft_gpt2.py:tiny,steps=500",
      f"--workdir={workdir}",
      f"--config.data.data_dir={tiny_run.data_dir()}",
      "--config.ckpt.every_steps=1000",  # only the stop saves
      "--config.log_every=1",
      "--config.eval.every_steps=1",
      "--config.eval.num_examples=0",
      "--config.eval.val_batches=1",
      "--config.data.train_limit=64",
      "--config.batch_size=8",
  ]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = commands.xla_flags()
  p = subprocess.Popen(
      args,
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  deadline = time.time() + 480  # data build + compile on a loaded CPU
  rows = workdir / "metrics.jsonl"
  while p.poll() is None and not (
      rows.exists() and len(rows.read_text().splitlines()) >= 2
  ):
    assert time.time() < deadline
    time.sleep(0.5)
  p.send_signal(signal.SIGINT)
  out, err = p.communicate(timeout=400)  # a save or compile may be in flight
  assert p.returncode == 130, err
  msg = assert_one_error(
      err,
      "interrupted at step",
      "is kept",
      f"{workdir}/ckpt",
      "resume",
      "python -m kdjax.train --config=configs/" "sft_gpt2.py:tiny,steps=500",
  )
  # The first Ctrl-C finishes the step in progress and saves it.
  assert "stopping after this step" in err
  stopped = int(msg.split("interrupted at step ")[1].split(";")[0])
  kept = int(msg.split("checkpoint of step ")[1].split()[0])
  assert kept == stopped >= 2 and (workdir / "ckpt" / str(kept)).exists()
  assert "validation step 1/500: val_loss" in out  # one line per validation
