r"""The one error path of kdjax's command-line tools.

``cli.run(main)`` replaces ``absl.app.run(main)``:

* a user error is a single ``error: ...`` line on stderr, no traceback:
  exit 2 for usage errors (an unknown or misspelt ``--config.`` override,
  with config_dict's "did you mean"; a value that does not parse; a config
  file that does not exist, listing what ``configs/`` holds; a :class:`kdjax.config.checks.ConfigError`), exit 1 for runtime ones
  (missing files, permissions, a full disk, a run that stopped for a reason
  the user must act on);
* a genuine bug (an exception raised outside kdjax's own checks) keeps its
  traceback, as does every error under ``--verbosity=1``;
* Ctrl-C or ``SIGTERM`` prints what is kept and the command that resumes
  (exit 130 or 143: ``128 + signal``).

What counts as a user error: an exception carrying ``exit_code``
(:class:`kdjax.config.checks.ConfigError`, the trainer's errors), any
``OSError`` (it names the path), and a ``ValueError``/``RuntimeError``/
``LookupError`` raised by kdjax code itself (the innermost frame is in the
``kdjax`` package), whose messages name the value and the fix.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import sys
import traceback
from typing import Any, Callable, NoReturn

from absl import app, flags, logging

from kdjax.config import files as config_files

USAGE, RUNTIME, INTERRUPTED = 2, 1, 130
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_OS_FIXES = {
    errno.EACCES: "choose a directory you can write to or fix its permissions",
    errno.EPERM: "choose a directory you can write to or fix its permissions",
    errno.ENOSPC: "free space there (or lower ckpt.max_to_keep) and re-run "
    "the same command",
    errno.EROFS: "choose a writable location",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a parent of the path is a file: choose another path",
    errno.EEXIST: "remove it or choose another path",
}


class UsageError(ValueError):
  """A command line that cannot work as typed (exit 2)."""

  exit_code = USAGE


def one_line(text: str) -> str:
  """``text`` with its whitespace runs (newlines included) made single spaces."""
  return re.sub(r"\s+", " ", str(text)).strip()


def resume_command(argv: list[str] | None = None) -> str:
  """The command line that re-runs this process (``python -m kdjax.x ...``)."""
  argv = list(sys.argv if argv is None else argv)
  main = sys.modules.get("__main__")
  module = getattr(getattr(main, "__spec__", None), "name", None)
  head = ["python", "-m", module] if module else ["python", argv[0]]
  return shlex.join(head + argv[1:])


def _verbose(argv: list[str]) -> bool:
  for a in argv:
    m = re.fullmatch(r"--(?:verbosity|v)=(-?\d+)", a)
    if m and int(m.group(1)) >= 1:
      return True
  return False


def fail(message: str, code: int = RUNTIME) -> NoReturn:
  """Prints ``error: message`` (one line) to stderr and exits with ``code``."""
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(code)


# ----------------------------------------------------------------------------
# Flag parsing.


def _config_values(argv: list[str]) -> list[str]:
  out = []
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      out.append(a.split("=", 1)[1])
    elif a == "--config" and i + 1 < len(argv):
      out.append(argv[i + 1])
  return out


def check_config_file(value: str) -> None:
  """One sentence, listing ``configs/``, when ``--config=FILE[:arg]`` names
  no file."""
  path = value.partition(":")[0]
  if not os.path.isfile(path):
    raise UsageError(config_files.missing_file_message(path))


def _override_for(key: str, argv: list[str]) -> str | None:
  for a in argv:
    if a.startswith("--config."):
      dotted = a[len("--config.") :].split("=", 1)[0]
      if key in dotted.split("."):
        return dotted
  return None


def unknown_override(e: Exception, argv: list[str]) -> str:
  """The sentence for an override whose key the config does not have."""
  text = e.args[0] if e.args else str(e)
  text = text.args[0] if isinstance(text, BaseException) and text.args else text
  text = str(text)
  m = re.match(r"""['"]*(?:Key ")?([^'"\s]+)""", text)
  key = m.group(1) if m else text
  hint = re.search(r'Did you mean "([^"]+)"', text)
  dotted = _override_for(key, argv) or key
  parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
  msg = f"--config.{dotted}: the config has no field {key!r}"
  if hint:
    better = f"{parent}.{hint.group(1)}" if parent else hint.group(1)
    return f"{msg}; did you mean --config.{better}?"
  if parent == "loss.hp":
    from kdjax.config import checks  # pylint: disable=g-import-not-at-top

    owners = checks.takers(key)
    if owners:
      config = f"{config_files.CONFIGS_DIR}/{owners[0]}_gpt2.py"
      return (
          f"{msg} (loss.hp holds the hyper-parameters of the config's own "
          f"divergence); {key!r} belongs to {', '.join(owners)}: start "
          f"from --config={config} and set --config.loss.hp.{key} there."
      )
    return f"{msg}, and no divergence takes {key!r}; check the spelling."
  return f"{msg}; check the spelling against the config file."


def _config_file_error(text: str) -> str | None:
  """The exception line of a traceback that config_flags embedded in ``text``."""
  lines = [l for l in text.splitlines() if l.strip()]
  for line in reversed(lines):
    m = re.match(r"^(?:\w+\.)*(\w+(?:Error|Exception)): (.*)$", line.strip())
    if m:
      return m.group(2)
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """``flags.FLAGS(argv)`` with every failure as one usage sentence (exit 2)."""
  verbose = _verbose(argv)
  try:
    for value in _config_values(argv):
      check_config_file(value)
    return flags.FLAGS(argv)
  except UsageError as e:
    if verbose:
      raise
    fail(str(e), USAGE)
  except (AttributeError, KeyError) as e:  # config_dict: no such field
    if verbose:
      raise
    fail(unknown_override(e, argv), USAGE)
  except flags.Error as e:
    if verbose:
      raise
    text = str(e)
    inner = (
        _config_file_error(text)
        if "Error whilst parsing config file" in text
        else None
    )
    if inner is not None:
      fail(f"{_config_values(argv)[0]}: {inner}", USAGE)
    fail(f"{text} (see --helpshort)", USAGE)


# ----------------------------------------------------------------------------
# Running main.


def _raised_in_kdjax(e: BaseException) -> bool:
  tb = e.__traceback__
  last = None
  while tb is not None:
    last = tb.tb_frame.f_code.co_filename
    tb = tb.tb_next
  return (
      bool(last)
      and os.path.abspath(last).startswith(_PACKAGE_DIR + os.sep)
      and not last.endswith("cli.py")
  )


def classify(e: BaseException) -> int | None:
  """The exit code of a user error, or None for a bug (keep the traceback)."""
  code = getattr(e, "exit_code", None)
  if isinstance(code, int):
    return code
  if isinstance(e, app.UsageError):
    return USAGE
  if isinstance(e, OSError):
    return RUNTIME
  if isinstance(e, (ValueError, RuntimeError, LookupError)) and (
      _raised_in_kdjax(e)
  ):
    return RUNTIME
  return None


def message(e: BaseException) -> str:
  """One sentence for a user error."""
  if (
      isinstance(e, OSError)
      and e.strerror
      and not getattr(e, "exit_code", None)
  ):
    where = e.filename or ""
    fix = _OS_FIXES.get(e.errno, "check the path")
    return (
        f"{e.strerror.lower()}: {where}; {fix}."
        if where
        else (f"{e.strerror.lower()}; {fix}.")
    )
  return one_line(str(e) or type(e).__name__)


def interrupted_message(e: KeyboardInterrupt) -> str:
  """What a stop kept (a library's ``e.kept``) and the command that resumes."""
  kept = one_line(getattr(e, "kept", None) or "interrupted")
  return f"{kept}; re-run the same command to resume: {resume_command()}"


def guard(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """``main`` with user errors turned into one ``error:`` line."""

  def wrapped(argv):
    verbose = flags.FLAGS["verbosity"].value >= 1
    if not flags.FLAGS["verbosity"].present:  # orbax logs every file
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except KeyboardInterrupt as e:
      if verbose:
        traceback.print_exc()
      fail(interrupted_message(e), getattr(e, "exit_code", INTERRUPTED))
    except Exception as e:  # pylint: disable=broad-except
      code = classify(e)
      if code is None or verbose:
        raise
      fail(message(e), code)

  return wrapped


def run(main: Callable[[list[str]], Any]) -> None:
  """``absl.app.run(main)`` with kdjax's error contract (module docstring)."""
  app.run(guard(main), flags_parser=parse_flags)
