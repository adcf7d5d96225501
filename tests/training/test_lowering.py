"""Every jitted program of a run lowers for TPU and CUDA, on a CPU-only host.

``jax.export`` traces each program once and lowers it for both platforms
(``platforms=("tpu", "cuda")``): a primitive without a lowering there, a
CPU-only custom call or a host callback fails here, before any accelerator
sees the program. The programs are the ones a run jits: the train step of
each training mode, the on-policy strategies' batch makers (their decoding
loops), the eval step, :func:`kdjax.sampling.generate`, the optimizer's
init, the checkpoint checksums and the teacher cache's forward pass.
Their inputs are ``ShapeDtypeStruct`` trees with the live arrays' shardings:
nothing is compiled or run.
"""

import dataclasses
import re

from flax import nnx
import jax
from jax import export
import jax.numpy as jnp
import pytest

from kdjax import checksums, sampling, sharding, transfer
from kdjax.cache import build as cache_build
from kdjax.cache import store
from kdjax.config import spec as spec_lib
from kdjax.training import step as step_lib
import tiny_run

PLATFORMS = ("tpu", "cuda")
# Custom-call targets that only a CPU runtime provides (host callbacks).
CPU_ONLY = ("xla_python_cpu_callback", "xla_ffi_python_cpu_callback")

# name -> (config, overrides): one tiny run per training mode.
RUNS = {
    "fkl": ("fkl_gpt2", {}),
    "akl": ("akl_gpt2", {}),
    "taid": ("taid_gpt2", {}),
    "sinkhorn": ("sinkhorn_gpt2", {}),  # ott-jax's solver loop
    "uld_xtok": ("uld_xtok_gpt2", {}),
    "features": ("features_gpt2", {}),
    "attention": ("attention_gpt2", {}),
    "multiteacher": ("multiteacher_gpt2", {}),  # two teachers, mixed
    "gkd": ("gkd_gpt2", {}),
    "distillm": ("distillm_gpt2", {}),
    "skd": ("skd_gpt2", {}),
    "minillm": ("minillm_gpt2", {}),
    # Eight devices: FSDP-sharded params, the batch over data x fsdp.
    "akl_fused_fsdp": (
        "akl_gpt2",
        {"loss.impl": "fused", "mesh.data": 2, "mesh.fsdp": 4},
    ),
}
# name -> (run, loss overrides): that run's models, data and state, with
# the step of the overridden loss (all these overrides change).
LOSS_VARIANTS = {
    "fkl_fused": ("fkl", {"loss.impl": "fused"}),
    "akl_fused": ("akl", {"loss.impl": "fused"}),
    "select": ("akl", {"loss.select.fraction": 0.5}),
}
SHARDED = {"akl_fused_fsdp": 8}
OFF_POLICY = (
    "fkl",
    "fkl_fused",
    "akl",
    "akl_fused",
    "taid",
    "select",
    "sinkhorn",
)
TRANSFER = ("features", "attention")  # hidden-state / attention terms
ON_POLICY = ("gkd", "distillm", "skd", "minillm")


def abstract(tree):
  """``tree`` with ``ShapeDtypeStruct`` leaves (shape, dtype, sharding)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=getattr(x, "sharding", None)
      ),
      tree,
  )


def lowered(fn, *args, **jit_kwargs) -> export.Exported:
  """``jax.jit(fn, **jit_kwargs)`` exported for :data:`PLATFORMS` on ``args``.

  Checks that the program is lowered for both platforms, calls no CPU-only
  target, and has the outputs ``fn`` traces to.
  """
  jitted = jax.jit(fn, **jit_kwargs)
  exported = export.export(jitted, platforms=PLATFORMS)(*args)
  assert exported.platforms == PLATFORMS
  text = exported.mlir_module()
  assert exported.mlir_module_serialized and "func.func public @main" in text
  assert not [t for t in CPU_ONLY if t in text]
  want = jax.tree.leaves(jax.eval_shape(fn, *args))
  got = jax.tree.leaves(exported.out_avals)
  assert [(a.shape, a.dtype) for a in got] == [(w.shape, w.dtype) for w in want]
  return exported


class Runs:
  """Tiny runs built on first use and shared by every test of the module."""

  def __init__(self, root: str):
    self.root = root
    self._built = {}

  def __call__(self, name: str):
    """``(run, mesh, (state, batch, teacher_state))``, the arguments
    abstract."""
    if name in LOSS_VARIANTS and name not in self._built:
      base, overrides = LOSS_VARIANTS[name]
      run, mesh, args = self(base)
      c = tiny_run.config(RUNS[base][0], self.root, **overrides)
      s = spec_lib.from_config(c)
      step = dataclasses.replace(run.step, loss_cfg=s.loss)
      self._built[name] = (
          dataclasses.replace(run, spec=s, step=step),
          mesh,
          args,
      )
    if name not in self._built:
      config, overrides = RUNS[name]
      c = tiny_run.config(config, self.root, **overrides)
      n = SHARDED.get(name)
      run, mesh = tiny_run.built(c, self.root, n and jax.devices()[:n])
      teacher = None if run.teacher is None else nnx.state(run.teacher)
      batch = step_lib.put_batch(run.train_data.dataset[0], mesh)
      self._built[name] = run, mesh, abstract((run.state, batch, teacher))
    return self._built[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return Runs(str(tmp_path_factory.mktemp("lowering")))


def _train(run, mesh, state, batch, teacher):
  """The train step as the loop jits it: the state and health donated, the
  new state on the old one's shardings; every state buffer is reused."""
  health = jax.eval_shape(step_lib.Health.init)
  weights = transfer.weights(run.spec.loss)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  args = (state, batch, teacher, health, weights)
  with jax.set_mesh(mesh):
    exported = lowered(
        run.step.train,
        *args,
        donate_argnums=(0, 3),
        out_shardings=(shardings, None, None),
    )
  assert set(range(len(jax.tree.leaves(state)))) <= donated(exported)
  return exported


def donated(exported: export.Exported) -> set[int]:
  """Positions, among the flattened arguments, of those whose buffers the
  program's outputs reuse (``tf.aliasing_output``)."""
  main = next(
      line
      for line in exported.mlir_module().splitlines()
      if "func.func public @main" in line
  )
  args = re.findall(r"%arg\d+: [^%]*", main)
  # Leading arguments the platform-dispatching module adds (the platform).
  extra = sum("jax.global_constant" in a for a in args)
  return {i - extra for i, a in enumerate(args) if "tf.aliasing_output" in a}


@pytest.mark.parametrize(
    "name", OFF_POLICY + ("uld_xtok", "multiteacher") + TRANSFER
)
def test_the_train_step_lowers(runs, name):
  run, mesh, (state, batch, teacher) = runs(name)
  _train(run, mesh, state, batch, teacher)


@pytest.mark.multi_device
def test_the_sharded_train_and_eval_steps_lower(runs):
  """On eight devices: the exported programs are partitioned over them."""
  run, mesh, (state, batch, teacher) = runs("akl_fused_fsdp")
  train = _train(run, mesh, state, batch, teacher)
  with jax.set_mesh(mesh):
    evaluated = lowered(run.step.eval, state, batch, teacher)
  params = [x.sharding.spec for x in jax.tree.leaves(state.params)]
  assert any(spec != jax.P() for spec in params)  # FSDP shards them
  for exported in (train, evaluated):
    assert exported.nr_devices == 8
    (got_state, got_batch, *_), _ = jax.tree.unflatten(
        exported.in_tree, exported.in_shardings_jax(mesh)
    )
    assert [x.spec for x in jax.tree.leaves(got_state.params)] == params
    assert got_batch["input_ids"].spec == batch["input_ids"].sharding.spec


@pytest.mark.parametrize(
    "name, encoding", [("akl", "topk"), ("fkl", "sampled")]
)
def test_the_train_step_on_a_cached_teacher_lowers(runs, name, encoding):
  """No teacher model: the batch carries its sparse fields ``[B, L, k]``
  (a sampled cache serves FKL only)."""
  run, mesh, (state, batch, _) = runs(name)
  width = 4
  dtypes = dict(
      teacher_ids=jnp.int32,
      teacher_log_probs=jnp.float32,
      teacher_weights=jnp.float32,
  )
  on_rows = batch["input_ids"].sharding
  cached = dict(batch)
  for k in store.FIELDS[encoding]:
    cached[k] = jax.ShapeDtypeStruct(
        (*batch["input_ids"].shape, width), dtypes[k], sharding=on_rows
    )
  step = dataclasses.replace(run.step, teacher_graphdef=None)
  with jax.set_mesh(mesh):
    lowered(
        step.train, state, cached, None, jax.eval_shape(step_lib.Health.init)
    )


@pytest.mark.parametrize("name", ON_POLICY)
def test_the_strategy_and_its_train_step_lower(runs, name):
  """The strategy's batch maker (its decoding loop), then the train step on
  the batch it makes (MiniLLM's carries its rollout's keys)."""
  run, mesh, (state, batch, teacher) = runs(name)
  source = abstract(run.source.init(0))
  args = (state.params, state.rest, teacher, batch, source, state.step)
  with jax.set_mesh(mesh):
    lowered(run.source.__call__, *args, donate_argnums=(4,))
    made, _, _ = jax.eval_shape(run.source.__call__, *args)
  _train(run, mesh, state, abstract(made), teacher)


@pytest.mark.parametrize("name", ["akl", "uld_xtok"])
def test_the_eval_step_lowers(runs, name):
  run, mesh, (state, batch, teacher) = runs(name)
  with jax.set_mesh(mesh):
    lowered(run.step.eval, state, batch, teacher)


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_new_tokens=4, greedy=True, stop_ids=(1, 2)),
        dict(max_new_tokens=4, greedy=False, top_k=5, top_p=0.9),
        dict(max_new_tokens=4, no_repeat_ngram_size=2),
    ],
    ids=["greedy", "sampled", "no_repeat"],
)
def test_the_sampler_lowers(runs, settings):
  """:func:`kdjax.sampling.generate` on the run's student (eval mode)."""
  run, mesh, (state, batch, _) = runs("akl")
  rows = batch["input_ids"]
  prompt, mask = (
      jax.ShapeDtypeStruct((rows.shape[0], 8), dtype, sharding=rows.sharding)
      for dtype in (jnp.int32, jnp.bool_)
  )
  key = abstract(jax.random.key(0))

  def generate(params, rest, prompt_BxP, mask_BxP, key):
    student = nnx.merge(run.step.graphdef, params, rest)
    student.eval()
    return sampling.generate(student, prompt_BxP, mask_BxP, key, **settings)

  with jax.set_mesh(mesh):
    lowered(generate, state.params, state.rest, prompt, mask, key)


@pytest.mark.parametrize(
    "identity",
    [dict(encoding="topk", k=4), dict(encoding="sampled", num_samples=4)],
    ids=["topk", "sampled"],
)
def test_the_teacher_cache_forward_lowers(runs, identity):
  """``python -m kdjax.cache_teacher``'s program: the teacher's sparse
  distributions of a batch."""
  run, mesh, (_, batch, teacher) = runs("akl")
  forward = cache_build._teacher_fn(
      dict(identity, temperature=1.0, seed=0), nnx.graphdef(run.teacher)
  )
  index = jax.ShapeDtypeStruct(
      batch["input_ids"].shape[:1],
      jnp.int32,
      sharding=sharding.batch_sharding(mesh, 1),
  )
  with jax.set_mesh(mesh):
    lowered(forward, teacher, batch, index)


def test_the_optimizer_init_and_checkpoint_hashes_lower(runs):
  """The state's set-up and the checksums every checkpoint records."""
  run, mesh, (state, _, _) = runs("akl")
  with jax.set_mesh(mesh):
    lowered(run.step.tx.init, run.step.trained(state.params))
    lowered(checksums._hashes, jax.tree.leaves(state))


def test_a_program_with_a_host_callback_does_not_lower(runs):
  """What the checks above catch: a CPU-only callback inside the step."""
  run, mesh, (state, batch, teacher) = runs("akl")

  def train(state, batch, teacher, health):
    mask = jax.pure_callback(
        lambda m: m,
        jax.ShapeDtypeStruct(batch["loss_mask"].shape, jnp.float32),
        batch["loss_mask"],
    )
    return run.step.train(state, dict(batch, loss_mask=mask), teacher, health)

  with jax.set_mesh(mesh), pytest.raises(NotImplementedError, match="callback"):
    lowered(train, state, batch, teacher, jax.eval_shape(step_lib.Health.init))
