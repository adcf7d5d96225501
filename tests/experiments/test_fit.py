"""experiments/benchmarks/fit.py: the train step compiled on abstract inputs."""

from flax import nnx
import jax
import pytest

from experiments.benchmarks import fit
from kdjax import models, sharding
from kdjax.config import files as config_files
from kdjax.config import recipe

akl_gpt2 = config_files.experiment("akl_gpt2")
akl_llama = config_files.experiment("akl_llama")


def _gpt2_count(V, P, L, d) -> int:
  """GPT-2 parameters: tied embeddings, per layer 12 d^2 weights + 13 d biases/norms."""
  return V * d + P * d + L * (12 * d * d + 13 * d) + 2 * d


def test_paper_configs_map_to_presets_of_the_published_sizes():
  assert fit.presets(akl_gpt2.get_config()) == ("gpt2", "gpt2-xl")
  assert fit.presets(akl_llama.get_config()) == ("tinyllama-1.1b", "llama-7b")
  # Published parameter counts (HF model cards / transformers num_parameters).
  want = {
      "gpt2": 124_439_808,
      "gpt2-xl": 1_557_611_200,
      "tinyllama-1.1b": 1_100_048_384,
      "llama-7b": 6_738_415_616,
  }
  # Blocks are alike, so the count is affine in the depth L: built at depths
  # 1 and 2 (tracing a full-depth init costs time quadratic in its depth),
  # extended to the preset's own L.
  for name, n in want.items():
    depth = "n_layer" if name.startswith("gpt2") else "num_hidden_layers"
    L = getattr(models.preset_config(name), depth)
    one, two = (_abstract_count(name, **{depth: k}) for k in (1, 2))
    assert one + (L - 1) * (two - one) == n, name


def _abstract_count(name: str, **overrides) -> int:
  """Parameters of preset ``name`` (with ``overrides``), built abstractly."""
  model = nnx.eval_shape(
      lambda: models.create(name, rngs=nnx.Rngs(0), **overrides)
  )
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.multi_device
@pytest.mark.slow
def test_fit_of_a_small_gpt2_step_on_eight_devices():
  c = akl_gpt2.get_config("tiny")
  c.batch_size, c.data.max_length = 8, 64
  # Dropout on, as in the paper's GPT-2 student (its RNG counters advance
  # inside the gradient: this step once failed to trace).
  c.student.model_overrides.resid_pdrop = 0.1
  data, fsdp = 2, 4
  mesh = sharding.make_mesh(data, fsdp)
  teacher_shape = dict(vocab_size=257, **recipe.TINY_TEACHER_MODEL)
  r = fit.fit(c, mesh, "tiny-gpt2", "tiny-gpt2", teacher_shape)

  s = c.student.model_overrides
  V, L, d = s.vocab_size, s.n_layer, s.n_embd
  P = models.preset_config("tiny-gpt2").n_positions
  assert r["param_count"] == _gpt2_count(V, P, L, d)
  # FSDP splits every matrix's embed dimension 4 ways; biases and norms
  # (13 d per layer + the final norm's 2 d) stay whole on every device.
  sharded = V * d + P * d + L * 12 * d * d
  assert r["params"] == 4 * (sharded // fsdp + L * 13 * d + 2 * d)
  assert r["params"] == pytest.approx(4 * r["param_count"] / fsdp, rel=0.05)
  # Adam's two moments are sharded like the params (+ the int32 step counts).
  assert 2 * r["params"] <= r["opt_state"] <= 2 * r["params"] + 64
  t = teacher_shape
  t_count = _gpt2_count(V, P, t["n_layer"], t["n_embd"])
  assert r["teacher"] == pytest.approx(4 * t_count / fsdp, rel=0.05)
  # XLA's own per-device argument size agrees with the shard arithmetic.
  ours = r["params"] + r["opt_state"] + r["teacher"] + r["batch"]
  assert r["arguments"] == pytest.approx(ours, rel=0.01)
  assert r["temp"] > 0 and r["outputs"] > 0 and r["aliased"] > 0
  assert r["peak"] > r["arguments"] and r["fits_on_gb"] == 16
  # FLOPs per device ~ (6 N_student + 2 N_teacher) x tokens / devices (the
  # matmul count of forward + backward and a teacher forward; attention and
  # the losses add a little).
  tokens = c.batch_size * c.data.max_length
  want = (6 * r["param_count"] + 2 * t_count) * tokens / (data * fsdp)
  assert want * 0.9 < r["flops"] < want * 1.4
  assert "fits on: 16 GB" in fit.report("tiny", r)


@pytest.mark.multi_device
@pytest.mark.slow
def test_fit_from_a_teacher_cache_holds_no_teacher_and_reads_its_fields():
  c = akl_gpt2.get_config("tiny")
  c.batch_size, c.data.max_length = 8, 64
  c.teacher.source, c.teacher.cache.k = "cache", 16
  mesh = sharding.make_mesh(2, 4)
  teacher_shape = dict(vocab_size=257, **recipe.TINY_TEACHER_MODEL)
  r = fit.fit(c, mesh, "tiny-gpt2", "tiny-gpt2", teacher_shape)
  assert r["teacher"] == 0
  # Per device: its 1 of 8 rows of ids/labels/positions/attention (int32) and
  # the loss mask (float32), plus the top-16 ids (int32) and log-probs (f32).
  tokens = c.batch_size * c.data.max_length // 8
  assert r["batch"] == tokens * (5 * 4 + 2 * 16 * 4)
  # FLOPs ~ 6 N_student x tokens: no teacher forward.
  want = 6 * r["param_count"] * tokens
  assert want * 0.9 < r["flops"] < want * 1.4


def _lora_config(rank: int):
  c = akl_gpt2.get_config("tiny")
  c.batch_size, c.data.max_length = 8, 64
  c.student.lora.rank = rank
  return c


@pytest.mark.multi_device
def test_a_lora_students_optimizer_state_covers_its_adapters_only():
  from experiments.benchmarks import aot  # pylint: disable=g-import-not-at-top

  c = _lora_config(4)
  mesh = sharding.make_mesh(2, 4)
  with jax.set_mesh(mesh):
    step, (state, *_) = aot.abstract_run(
        c, mesh, student_preset="tiny-gpt2", teacher_preset=None
    )
  s = c.student.model_overrides
  L, d = s.n_layer, s.n_embd
  # r (in + out) over c_attn (d, 3d), attn c_proj (d, d), c_fc (d, 4d) and
  # mlp c_proj (4d, d), every layer: replicated, float32.
  adapters = L * 4 * (4 * d + 2 * d + 5 * d + 5 * d)
  assert sum(x.size for x in jax.tree.leaves(step.trained(state.params))) == (
      adapters
  )
  assert fit.shard_bytes(state.params) > 4 * adapters  # the frozen base too
  # Adam's two moments of the adapters alone (+ the int32 step counts).
  assert 2 * 4 * adapters <= fit.shard_bytes(state.opt_state)
  assert fit.shard_bytes(state.opt_state) <= 2 * 4 * adapters + 64


@pytest.mark.multi_device
@pytest.mark.slow
def test_fit_of_a_lora_student_counts_its_adapters_moments():
  c = _lora_config(4)
  mesh = sharding.make_mesh(2, 4)
  teacher_shape = dict(vocab_size=257, **recipe.TINY_TEACHER_MODEL)
  r = fit.fit(c, mesh, "tiny-gpt2", "tiny-gpt2", teacher_shape)
  assert r["trained_count"] < r["param_count"] / 10
  assert 2 * 4 * r["trained_count"] <= r["opt_state"]
  assert r["opt_state"] <= 2 * 4 * r["trained_count"] + 64
  ours = r["params"] + r["opt_state"] + r["teacher"] + r["batch"]
  assert r["arguments"] == pytest.approx(ours, rel=0.01)
  assert "trained)" in fit.report("tiny lora", r)
