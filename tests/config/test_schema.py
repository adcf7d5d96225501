"""The config schema: declarations, what is derived from them, docs/config.md."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

import commands
from kdjax.config import reference, schema, spec
from kdjax.config.schema import field, group

ROOT = pathlib.Path(commands.ROOT)


@dataclasses.dataclass(frozen=True)
class _Inner:
  rate: float = field(0.5, "a rate", at_least=0, below=1)
  mode: str = field("a", "a mode", choices=("a", "b"))


@dataclasses.dataclass(frozen=True)
class _Toy:
  count: int = field(3, "a count", identity=True, at_least=1)
  every: int = field(-1, "a cadence", above=0, special={-1: "auto", 0: "off"})
  seeds: tuple[int, ...] = field("1,2", "seeds", resolve=spec.integers)
  extra: dict = field({}, "free keys")
  inner: _Inner = group(_Inner, "inner", identity=True)
  later: _Inner = group(_Inner, "optional", optional=True)


def test_a_declared_group_yields_defaults_table_and_part():
  assert schema.defaults(_Toy).to_dict() == {
      "count": 3,
      "every": -1,
      "seeds": "1,2",
      "extra": {},
      "inner": {"rate": 0.5, "mode": "a"},
  }
  table = schema.table(_Toy)
  assert [k for k, d in table.items() if d.identity] == [
      "count",
      "inner",
      "inner.rate",
      "inner.mode",
  ]
  part = schema.build(_Toy, {"count": 5, "seeds": "7", "inner": {"rate": 0.1}})
  assert part == _Toy(count=5, seeds=(7,), inner=_Inner(rate=0.1))
  assert _Toy().seeds == (1, 2)  # the part's default is the resolved one


@pytest.mark.parametrize(
    "key,value,sentence",
    [
        ("count", 0, "count=0 must be an integer >= 1; pass --config.count=3."),
        (
            "count",
            2.0,
            "count=2.0 must be an integer >= 1; pass --config.count=3.",
        ),
        (
            "count",
            True,
            "count=True must be an integer >= 1; pass --config.count=3.",
        ),
        (
            "every",
            -2,
            "every=-2 must be -1 (auto), 0 (off) or a positive integer; pass "
            "--config.every=-1.",
        ),
        (
            "seeds",
            "1,x",
            "seeds='1,x' is not a comma-separated list of integers; pass "
            "--config.seeds=1,2.",
        ),
        (
            "inner.rate",
            1.0,
            "inner.rate=1.0 must be in [0, 1); pass --config.inner.rate=0.5.",
        ),
        (
            "inner.rate",
            float("nan"),
            "inner.rate=nan must be in [0, 1); pass --config.inner.rate=0.5.",
        ),
        (
            "inner.mode",
            "c",
            "inner.mode='c' is unknown: mode must be one of ('a', 'b'); pass "
            "--config.inner.mode=a.",
        ),
        ("extra", 3, "extra=3 must be a mapping; pass --config.extra={}."),
    ],
)
def test_a_value_outside_its_rule_is_one_sentence(key, value, sentence):
  assert schema.problem(schema.table(_Toy)[key], value) == sentence


def test_values_inside_the_rule_pass():
  t = schema.table(_Toy)
  for key, value in (
      ("count", 1),
      ("every", 0),
      ("every", 7),
      ("inner.rate", 0),
      ("inner.mode", "b"),
      ("seeds", "4, 5"),
  ):
    assert schema.problem(t[key], value) is None, (key, value)


def test_a_bad_value_fails_resolution_with_its_key():
  with pytest.raises(ValueError, match=r"^seeds='x' is not a comma-separated"):
    schema.build(_Toy, {"seeds": "x"})


def test_every_field_has_help_and_its_default_passes_its_rule():
  for key, decl in spec.FIELDS.items():
    assert decl.help and "\n" not in decl.help, key
    if isinstance(decl, schema.Field):
      assert schema.problem(decl, decl.default) is None, key


def test_the_defaults_are_the_paper_setup():
  # docs/training.md "The paper recipe".
  c = spec.defaults()
  assert (c.optim.lr, c.optim.lr_min, c.optim.weight_decay, c.optim.clip) == (
      5e-4,
      1e-7,
      0.01,
      1.0,
  )
  assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.warmup_steps) == (
      0.9,
      0.999,
      1e-8,
      0,
  )
  assert (c.batch_size, c.num_epochs, c.seed, c.loss.kd_ratio) == (
      32,
      20,
      10,
      0.5,
  )
  assert (c.data.max_length, c.data.max_prompt_length) == (512, 256)
  assert (c.teacher.dtype, c.student.init) == ("bfloat16", "gpt2")
  assert "onpolicy" not in c  # added by the on-policy configs only


def test_the_choices_are_what_the_runtime_implements():
  from kdjax.cache import codec
  from kdjax.onpolicy import distillm, skd, strategies

  assert spec.ONPOLICY_KINDS == strategies.KINDS
  assert spec.REPLAY_RATIOS == distillm.REPLAY_RATIOS
  assert spec.SKD_RESAMPLE == skd.RESAMPLE
  assert spec.CACHE_ENCODINGS == codec.ENCODINGS
  assert spec.CACHE_MAX_SAMPLES == codec.MAX_SAMPLES


def test_the_config_system_imports_nothing_above_it():
  code = (
      "import sys\n"
      "from kdjax.config import checks, files, identity, recipe, reference\n"
      "from kdjax.config import schema, spec\n"
      "spec.defaults(); identity.IDENTITY; reference.markdown()\n"
      "above = ('kdjax.onpolicy', 'kdjax.training', 'kdjax.cache',\n"
      "         'kdjax.models', 'kdjax.evaluation.harness')\n"
      "print(sorted(m for m in sys.modules if m.startswith(above)))\n"
  )
  assert commands.run_python(code).strip() == "[]"


def test_the_config_reference_page_is_the_schema():
  page = (ROOT / "docs" / "config.md").read_text()
  assert page == reference.markdown(), (
      "docs/config.md is stale; regenerate it with "
      "python -m kdjax.config.reference > docs/config.md"
  )
  for key, decl in spec.FIELDS.items():
    if isinstance(decl, schema.Field):
      assert f"| `{key}` |" in page, key
