"""Loss + gradient benchmark of every token-level divergence against its peers.

    python -m experiments.benchmarks.divergences            # N=2048, V=50257
    python -m experiments.benchmarks.divergences --n 1024 --vocab 128256
    python -m experiments.benchmarks.divergences --quick    # tiny shapes, CI
    python -m experiments.benchmarks.divergences --flat     # AKL's worst case

For each divergence it measures the fwd+bwd wall time of ``grad(mean(D))`` of
the default ``kd.<name>`` (and, with ``--with_reference``, the autodiff
``kd.reference.<name>``) and XLA's temporary bytes from
``jit(...).lower(...).compile().memory_analysis()``, and the same loss and
backward pass of the peers' PyTorch code on the same arrays
(``torch.set_num_threads`` = the CPU count JAX uses):

* ``distillm``: DistiLLM's ``distillm/losses.py`` (jongwooko/distillm),
  rewritten here with the same tensor ops in the same order (the peer is no
  installable package);
* ``akl.py``: AKL's ``get_ratio`` + two ``get_kl`` calls, rewritten likewise;
* ``abkd``: ABKD's ``ab_div`` (ghwang-s/abkd), rewritten likewise;
* ``trl``: TRL's own ``GKDTrainer.generalized_jsd_loss`` (the ``bench``
  extra), for jsd; skipped when trl is not importable.

Ratios put them on the hardware's scale: time / time of the jitted
``student - teacher`` (reads both inputs once and writes one [N, V] array: the
traffic a loss with its gradient cannot avoid), measured interleaved with each
candidate (repeats alternate floor and candidate; each takes its minimum), and
temporary bytes / bytes of one [N, V] float32 array. Prints a table and writes
JSON to experiments/benchmarks/results/.

Inputs: float32 student logits ``2·N(0,1)``; teacher logits ``2·N(0,1)`` with
+12 on 4 tokens per row, an LM-like peaked teacher (AKL mostly stays on its
top-k path; the unresolved fraction is reported). ``--flat`` drops the +12: a
flat teacher (high temperature, early in training), whose every AKL row takes
the exact threshold search.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import divergences as kd

# name -> hyper-parameters, chosen to match the peers' defaults.
DIVERGENCES = {
    "fkl": {},
    "rkl": {},
    "fkl_rkl": {"weight": 0.1},  # distillm lam = 0.9
    "skl": {"alpha": 0.1},
    "srkl": {"alpha": 0.1},
    "jsd": {"beta": 0.1},  # distillm js_distance lam = 0.9
    "tvd": {},
    "akl": {"mu": 0.5},
    "abkd": {"alpha": 0.2, "beta": 0.7},
}
RESULTS = os.path.join(os.path.dirname(__file__), "results")

# Transcendental functions per [N, V] entry of fwd+bwd (exp, log, expm1), the
# compute bound once memory traffic is in cache: 2 (log-partitions) + the
# formula's forward and backward.
TRANSCENDENTALS = {
    "fkl": 6,
    "rkl": 6,
    "fkl_rkl": 6,
    "skl": 10,
    "srkl": 10,
    "jsd": 10,
    "tvd": 7,
    "akl": 6,
    "abkd": 10,
}


def make_logits(n: int, vocab: int, seed: int = 0, flat: bool = False):
  k_s, k_t = jax.random.split(jax.random.key(seed))
  student = 2.0 * jax.random.normal(k_s, (n, vocab), jnp.float32)
  teacher = 2.0 * jax.random.normal(k_t, (n, vocab), jnp.float32)
  return student, teacher if flat else teacher.at[:, :4].add(12.0)


def _interleaved(fn, floor, args, repeats: int) -> tuple[float, float]:
  """Minimum wall times of ``fn`` and ``floor``, alternated."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(floor(*args))
  best, best_floor = float("inf"), float("inf")
  for _ in range(repeats):
    for which in (0, 1):
      start = time.perf_counter()
      jax.block_until_ready((floor if which else fn)(*args))
      elapsed = time.perf_counter() - start
      if which:
        best_floor = min(best_floor, elapsed)
      else:
        best = min(best, elapsed)
  return best, best_floor


def jax_loss_grad(name: str, impl: str):
  per_token = kd.get(name, impl)
  hp = DIVERGENCES[name]
  return jax.grad(lambda s, t: jnp.mean(per_token(s, t, **hp)))


# ----------------------------------------------------------------------------
# The peers' PyTorch code. DistiLLM, AKL.py and ABKD are rewrites with the
# peer's tensor ops in the peer's order (mask: every token counts).


def torch_peers() -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  def mean(x):
    mask = torch.ones_like(x).view(-1)
    return torch.sum(x.view(-1) * mask, dim=0) / torch.sum(mask, dim=0)

  def forward_kl(logits, teacher_logits):
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(logits)
    student_logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    prod_probs = torch.masked_fill(
        teacher_probs * student_logprobs, inf_mask, 0
    )
    return -mean(torch.sum(prod_probs, dim=-1))

  def reverse_kl(logits, teacher_logits):
    student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    student_logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    teacher_logprobs = F.log_softmax(
        teacher_logits, dim=-1, dtype=torch.float32
    )
    inf_mask = torch.isinf(teacher_logits) | torch.isinf(logits)
    prod_probs = torch.masked_fill(
        student_probs * teacher_logprobs, inf_mask, 0
    )
    prod_probs -= torch.masked_fill(
        student_probs * student_logprobs, inf_mask, 0
    )
    return -mean(torch.sum(prod_probs, dim=-1))

  def symmetric_kl(logits, teacher_logits, lam=0.9):
    return (1 - lam) * forward_kl(logits, teacher_logits) + lam * reverse_kl(
        logits, teacher_logits
    )

  def mixed(logits, teacher_logits, w_teacher):
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    mixed_probs = w_teacher * teacher_probs + (1 - w_teacher) * student_probs
    return teacher_probs, student_probs, torch.log(mixed_probs)

  def js_distance(logits, teacher_logits, lam=0.9):
    teacher_probs, student_probs, mixed_logprobs = mixed(
        logits, teacher_logits, 1 - lam
    )
    teacher_logprobs = F.log_softmax(
        teacher_logits, dim=-1, dtype=torch.float32
    )
    student_logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    prod_probs = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(
        student_probs * student_logprobs, inf_mask, 0
    )
    loss = lam * -mean(torch.sum(prod_probs, dim=-1))
    prod_probs = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(
        teacher_probs * teacher_logprobs, inf_mask, 0
    )
    return loss + (1 - lam) * -mean(torch.sum(prod_probs, dim=-1))

  def tv_distance(logits, teacher_logits):
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    prod_probs = 0.5 * torch.masked_fill(
        torch.abs(teacher_probs - student_probs), inf_mask, 0
    )
    return mean(torch.sum(prod_probs, dim=-1))

  def skewed_forward_kl(logits, teacher_logits, lam=0.1):
    teacher_probs, _, mixed_logprobs = mixed(logits, teacher_logits, lam)
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    prod_probs = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
    return -mean(torch.sum(prod_probs, dim=-1))

  def skewed_reverse_kl(logits, teacher_logits, lam=0.1):
    _, student_probs, mixed_logprobs = mixed(logits, teacher_logits, 1 - lam)
    student_logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    prod_probs = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(
        student_probs * student_logprobs, inf_mask, 0
    )
    return -mean(torch.sum(prod_probs, dim=-1))

  def get_ratio(teacher_logits, logits, mu=0.5):  # AKL.py
    teacher_logits = torch.masked_fill(
        teacher_logits, torch.isinf(teacher_logits), 0
    ).to(torch.float32)
    logits = torch.masked_fill(logits, torch.isinf(logits), 0).to(torch.float32)
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    student_probs = F.softmax(logits, dim=-1, dtype=torch.float32).detach()
    re_teacher_probs, idx = teacher_probs.sort(dim=-1, descending=True)
    re_student_probs = student_probs.gather(dim=-1, index=idx)
    errors = torch.abs(re_teacher_probs - re_student_probs)
    cum_sum = torch.cumsum(re_teacher_probs, dim=-1)
    mask = cum_sum > mu
    mask[..., 0] = False
    s1 = torch.masked_fill(errors, mask, 0.0).sum(dim=-1)
    s2 = torch.masked_fill(errors, ~mask, 0.0).sum(dim=-1)
    return s1 / (s1 + s2), s2 / (s1 + s2)

  def get_kl(teacher_logits, logits, inf_mask, ratio):
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    teacher_logprobs = F.log_softmax(
        teacher_logits, dim=-1, dtype=torch.float32
    )
    teacher_prod_probs = torch.masked_fill(
        teacher_probs * teacher_logprobs, inf_mask, 0
    )
    teacher_x = torch.sum(teacher_prod_probs, dim=-1).view(-1)
    logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    prod_probs = torch.masked_fill(teacher_probs * logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    return mean((teacher_x - x) * ratio.view(-1))

  def akl(logits, teacher_logits):
    inf_mask = torch.isinf(logits)
    h_ratio, l_ratio = get_ratio(teacher_logits, logits)
    return get_kl(teacher_logits, logits, inf_mask, h_ratio) + get_kl(
        logits, teacher_logits, inf_mask, l_ratio
    )

  def ab_div(logits, teacher_logits, alpha=0.2, beta=0.7):  # ABKD general case
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    divergence = torch.pow(teacher_probs, alpha)
    divergence = divergence * torch.pow(student_probs, beta)  # mul_ in place
    divergence = divergence.masked_fill(inf_mask, 0)
    tmp = torch.pow(teacher_probs, alpha + beta) * (alpha / (alpha + beta))
    divergence = divergence - tmp.masked_fill(inf_mask, 0)
    tmp = torch.pow(student_probs, alpha + beta) * (beta / (alpha + beta))
    divergence = divergence - tmp.masked_fill(inf_mask, 0)
    return mean(-torch.sum(divergence, dim=-1) / (alpha * beta))

  peers = {
      "fkl": {"distillm": forward_kl},
      "rkl": {"distillm": reverse_kl},
      "fkl_rkl": {"distillm": symmetric_kl},
      "skl": {"distillm": skewed_forward_kl},
      "srkl": {"distillm": skewed_reverse_kl},
      "jsd": {"distillm": js_distance},
      "tvd": {"distillm": tv_distance},
      "akl": {"akl.py": akl},
      "abkd": {"abkd": ab_div},
  }
  try:
    from trl.experimental.gkd import gkd_trainer  # pylint: disable=import-outside-toplevel
  except ImportError:
    gkd_trainer = None
  if gkd_trainer is not None:
    trl_jsd = gkd_trainer.GKDTrainer.generalized_jsd_loss
    peers["jsd"]["trl"] = lambda s, t: trl_jsd(s[None], t[None], beta=0.1)
  return peers


def _torch_case(loss, student, teacher, repeats: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel

  s = torch.from_numpy(np.array(student)).requires_grad_(True)
  t = torch.from_numpy(np.array(teacher))

  def step():
    s.grad = None
    loss(s, t).backward()
    return s.grad

  step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {"time_s": min(times), "temp_bytes": None}


def _torch_available() -> bool:
  try:
    import torch  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  torch.set_num_threads(os.cpu_count() or 1)
  return True


def run(
    n: int,
    vocab: int,
    repeats: int,
    divergences=tuple(DIVERGENCES),
    with_torch: bool = True,
    with_reference: bool = False,
    flat: bool = False,
) -> dict:
  student, teacher = make_logits(n, vocab, flat=flat)
  floor = jax.jit(lambda s, t: s - t).lower(student, teacher).compile()
  one_array = n * vocab * 4
  with_torch = with_torch and _torch_available()
  peers = torch_peers() if with_torch else {}
  rows = []
  for name in divergences:
    impls = ("auto",) + (("reference",) if with_reference else ())
    auto_time = None
    for impl in impls:
      compiled = (
          jax.jit(jax_loss_grad(name, impl)).lower(student, teacher).compile()
      )
      time_s, floor_s = _interleaved(
          compiled, floor, (student, teacher), repeats
      )
      temp = compiled.memory_analysis().temp_size_in_bytes
      auto_time = auto_time or time_s
      rows.append(
          dict(
              divergence=name,
              impl=impl,
              time_s=time_s,
              floor_s=floor_s,
              time_vs_floor=time_s / floor_s,
              temp_bytes=temp,
              temp_vs_nv_f32=temp / one_array,
              transcendentals=TRANSCENDENTALS[name],
          )
      )
      print(_format_row(rows[-1]), flush=True)
    for peer, loss in peers.get(name, {}).items():
      result = _torch_case(loss, student, teacher, repeats)
      result.update(
          divergence=name,
          impl=peer,
          time_vs_floor=None,
          temp_vs_nv_f32=None,
          kdjax_speedup=result["time_s"] / auto_time,
      )
      rows.append(result)
      print(_format_row(result), flush=True)
  return {
      "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}, "
      f"{platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cpus)",
      "jax": jax.__version__,
      "n": n,
      "vocab": vocab,
      "repeats": repeats,
      "teacher": "flat" if flat else "peaked",
      "akl_unresolved_fraction": float(kd.akl_unresolved_fraction(teacher)),
      "rows": rows,
  }


def _format_row(r: dict) -> str:
  if r["time_vs_floor"] is None:
    return (
        f"{r['divergence']:8s} {r['impl']:9s} {r['time_s'] * 1e3:10.1f} ms"
        f"   kdjax {r['kdjax_speedup']:5.1f}x faster"
    )
  return (
      f"{r['divergence']:8s} {r['impl']:9s} {r['time_s'] * 1e3:10.1f} ms "
      f"{r['time_vs_floor']:7.2f}x floor   temp "
      f"{r['temp_vs_nv_f32']:6.3f} x [N,V] f32"
  )


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=2048, help="tokens N")
  parser.add_argument(
      "--vocab",
      type=int,
      default=50257,
      help="vocabulary V (128256 for Llama-3)",
  )
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
      "--quick",
      action="store_true",
      help="tiny shapes (N=64, V=512, 2 repeats)",
  )
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument(
      "--flat",
      action="store_true",
      help="teacher 2·N(0,1) without the +12 peaks (AKL's exact fallback)",
  )
  parser.add_argument(
      "--with_reference",
      action="store_true",
      help="also time the autodiff kd.reference.<name>",
  )
  parser.add_argument(
      "--divergences",
      nargs="+",
      default=list(DIVERGENCES),
      choices=list(DIVERGENCES),
  )
  parser.add_argument("--out", default=None, help="JSON path")
  args = parser.parse_args(argv)
  if args.quick:
    args.n, args.vocab, args.repeats = 64, 512, 2
  print(
      f"device: {jax.devices()[0]} ({jax.default_backend()}); "
      f"N={args.n} V={args.vocab}"
  )
  result = run(
      args.n,
      args.vocab,
      args.repeats,
      tuple(args.divergences),
      with_torch=not args.no_torch,
      with_reference=args.with_reference,
      flat=args.flat,
  )
  print(
      f"AKL rows on the exact fallback: "
      f"{result['akl_unresolved_fraction']:.3f}"
  )
  out = args.out or os.path.join(
      RESULTS,
      f"divergences_{jax.default_backend()}_{args.n}x{args.vocab}"
      f"{'_flat' if args.flat else ''}.json",
  )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
