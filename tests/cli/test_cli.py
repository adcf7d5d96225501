"""The command-line tools' error contract, through the real CLIs.

Every bad command is run as a subprocess and must end with exactly one
``error: ...`` line on stderr (no traceback), exit 2 for usage errors and 1
for runtime ones, and leave the directory it would write exactly as it was.
Each case fails before anything is compiled, so each costs an interpreter
start.
"""

import os

import pytest

from commands import ROOT, assert_one_error, listing, run_cli
from kdjax import cli

# ----------------------------------------------------------------------------
# kdjax.data.prepare


@pytest.mark.parametrize(
    "args,code,words",
    [
        (("--data_dir=d",), 2, ("--dataset", "must have a value")),
        (
            ("--dataset=dolly2", "--data_dir=d"),
            2,
            ("--dataset=dolly2 is unknown", "synthetic_instruct"),
        ),
        (
            ("--dataset=instruct_jsonl", "--path=empty.jsonl", "--data_dir=d"),
            1,
            ("data file empty.jsonl is empty",),
        ),
        (
            ("--dataset=instruct_jsonl", "--path=none.jsonl", "--data_dir=d"),
            1,
            ("data file none.jsonl does not exist",),
        ),
        (
            ("--dataset=instruct_jsonl", "--path=bad.jsonl", "--data_dir=d"),
            1,
            ("bad.jsonl:1", "malformed", "--skip_bad"),
        ),
        (
            ("--dataset=synthetic_instruct", "--data_dir=d", "--dataa=1"),
            2,
            ("Unknown command line flag 'dataa'", "data_dir"),
        ),
    ],
)
def test_prepare_bad_input(tmp_path, args, code, words):
  (tmp_path / "empty.jsonl").write_text("\n")
  (tmp_path / "bad.jsonl").write_text('{"prompt": "x"\n')
  before = listing(tmp_path)
  rc, _, err = run_cli("kdjax.data.prepare", *args, cwd=tmp_path)
  assert rc == code, err
  assert_one_error(err, *words)
  assert listing(tmp_path) == before  # the data dir was not even created


def test_prepare_unwritable_data_dir(tmp_path):
  if os.geteuid() == 0:
    pytest.skip("root writes through permissions")
  locked = tmp_path / "locked"
  locked.mkdir(mode=0o500)
  rc, _, err = run_cli(
      "kdjax.data.prepare",
      "--dataset=synthetic_instruct",
      f"--data_dir={locked}/d",
      cwd=tmp_path,
  )
  assert rc == 1
  assert_one_error(
      err, "permission denied", "choose a directory you can " "write to"
  )


# ----------------------------------------------------------------------------
# The helper itself.


def test_unknown_override_keeps_did_you_mean():
  e = AttributeError('\'lrr\'\nDid you mean "lr" instead of "lrr"?')
  msg = cli.unknown_override(e, ["x", "--config.optim.lrr=1e-3"])
  assert msg == (
      "--config.optim.lrr: the config has no field 'lrr'; did you "
      "mean --config.optim.lr?"
  )


def test_unknown_hyper_parameter_points_at_the_config_that_has_it():
  msg = cli.unknown_override(
      AttributeError("'beta'"), ["x", "--config.loss.hp.beta=0.1"]
  )
  assert "'beta' belongs to jsd" in msg
  assert "--config=configs/jsd_gpt2.py" in msg


def test_a_missing_config_file_lists_the_configs_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  with pytest.raises(cli.UsageError) as e:
    cli.check_config_file("configs/akl_gtp2.py:tiny")
  msg = str(e.value)
  assert msg.startswith("config file configs/akl_gtp2.py does not exist;")
  assert "akl_gpt2.py, akl_llama.py" in msg and "\n" not in msg
  monkeypatch.chdir(tmp_path)  # not a clone: say where to run from
  with pytest.raises(cli.UsageError, match="there is no configs/ folder in"):
    cli.check_config_file("configs/akl_gpt2.py")


def test_bugs_keep_their_traceback_user_errors_do_not():
  def raise_from(module_file, exc):
    code = compile("def f():\n  raise exc\n", module_file, "exec")
    ns = {"exc": exc}
    exec(code, ns)  # pylint: disable=exec-used
    try:
      ns["f"]()
    except Exception as e:  # pylint: disable=broad-except
      return e

  inside = os.path.join(ROOT, "kdjax", "trainer.py")
  outside = os.path.join(ROOT, "site-packages", "jax", "core.py")
  assert cli.classify(raise_from(inside, ValueError("x"))) == 1
  assert cli.classify(raise_from(outside, ValueError("x"))) is None
  assert cli.classify(raise_from(outside, TypeError("x"))) is None
  assert cli.classify(raise_from(outside, PermissionError(13, "no"))) == 1
  from kdjax.config import checks

  assert cli.classify(checks.ConfigError("x")) == 2
  assert cli.classify(checks.MissingInputError("x")) == 1


def test_prepare_data_dir_under_a_file(tmp_path):
  (tmp_path / "afile").write_text("x")
  rc, _, err = run_cli(
      "kdjax.data.prepare",
      "--dataset=synthetic_instruct",
      "--data_dir=afile/d",
      cwd=tmp_path,
  )
  assert rc == 1, err
  assert_one_error(err, "afile", "choose another path")
