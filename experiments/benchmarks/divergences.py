"""Loss + gradient benchmark of every token-level divergence and implementation.

    python -m experiments.benchmarks.divergences            # N=4096, V=50257
    python -m experiments.benchmarks.divergences --n 2048 --vocab 128256
    python -m experiments.benchmarks.divergences --quick    # tiny shapes, CI

For each divergence and implementation (autodiff, fast, chunked, and a PyTorch
MiniLLM/DistiLLM-style version when torch is importable) it measures the
fwd+bwd wall time of ``grad(mean(D))`` (median over repeats, after compilation)
and, for the JAX ones, XLA's temporary bytes from
``jit(...).lower(...).compile().memory_analysis()``. Two ratios put them on the
hardware's scale: (a) time / time of the jitted ``student - teacher`` on the same
arrays (reads both inputs once and writes one [N, V] array: the traffic a loss
with its gradient cannot avoid), (b) temporary bytes / bytes of one [N, V]
float32 array. Prints a table and writes JSON to experiments/benchmarks/results/.

Inputs: float32 student logits ``2·N(0,1)``; teacher logits ``2·N(0,1)`` with
+12 on 4 tokens per row, an LM-like peaked teacher (the top-64 mass crosses
μ = 0.5 in most rows, so AKL mostly stays on its top-k path; the unresolved
fraction is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.divergences import core, fast, fused

DIVERGENCES = ("fkl", "rkl", "fkl_rkl", "skl", "srkl", "jsd", "tvd", "akl")
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def make_logits(n: int, vocab: int, seed: int = 0):
  k_s, k_t = jax.random.split(jax.random.key(seed))
  student = 2.0 * jax.random.normal(k_s, (n, vocab), jnp.float32)
  teacher = 2.0 * jax.random.normal(k_t, (n, vocab), jnp.float32)
  return student, teacher.at[:, :4].add(12.0)


def _median_time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # warm-up (and compilation if lazy)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _jax_case(fn, args, repeats: int) -> dict:
  compiled = jax.jit(fn).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  return {"time_s": _median_time(compiled, args, repeats), "temp_bytes": temp}


def jax_loss_grad(name: str, impl: str, chunk_size: int):
  if impl == "autodiff":
    per_token = getattr(core, name)
  elif impl == "fast":
    per_token = getattr(fast, name)
  else:
    per_token = lambda s, t: fused.chunked(name, s, t, chunk_size=chunk_size)
  return jax.grad(lambda s, t: jnp.mean(per_token(s, t)))


# ----------------------------------------------------------------------------
# PyTorch, written the way MiniLLM / DistiLLM / AKL.py write it: float32
# softmaxes, masked_fill of inf slots, sum over the vocabulary.


def torch_losses():
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel

  def probs(s, t):
    inf = torch.isinf(s) | torch.isinf(t)
    return (F.softmax(s, -1, dtype=torch.float32),
            F.log_softmax(s, -1, dtype=torch.float32),
            F.softmax(t, -1, dtype=torch.float32),
            F.log_softmax(t, -1, dtype=torch.float32), inf)

  def kl(w, log_w, log_v, inf):
    return (w * (log_w - log_v)).masked_fill(inf, 0).sum(-1)

  def fkl(s, t):
    _, lq, p, lp, inf = probs(s, t)
    return kl(p, lp, lq, inf)

  def rkl(s, t):
    q, lq, _, lp, inf = probs(s, t)
    return kl(q, lq, lp, inf)

  def fkl_rkl(s, t):
    q, lq, p, lp, inf = probs(s, t)
    return 0.5 * kl(p, lp, lq, inf) + 0.5 * kl(q, lq, lp, inf)

  def skl(s, t, alpha=0.1):
    q, _, p, lp, inf = probs(s, t)
    return kl(p, lp, torch.log(alpha * p + (1 - alpha) * q), inf)

  def srkl(s, t, alpha=0.1):
    q, lq, p, _, inf = probs(s, t)
    return kl(q, lq, torch.log((1 - alpha) * p + alpha * q), inf)

  def jsd(s, t, beta=0.5):
    q, lq, p, lp, inf = probs(s, t)
    log_m = torch.log(beta * p + (1 - beta) * q)
    return beta * kl(p, lp, log_m, inf) + (1 - beta) * kl(q, lq, log_m, inf)

  def tvd(s, t):
    q, _, p, _, inf = probs(s, t)
    return 0.5 * (p - q).abs().masked_fill(inf, 0).sum(-1)

  def akl(s, t, mu=0.5):  # AKL.py get_ratio + two get_kl calls
    q, lq, p, lp, inf = probs(s, t)
    with torch.no_grad():
      p_sorted, idx = torch.sort(p, dim=-1, descending=True)
      q_sorted = torch.gather(q.detach(), -1, idx)
      err = (p_sorted - q_sorted).abs()
      tail = torch.cumsum(p_sorted, -1) > mu
      tail[:, 0] = False
      g_head = torch.sum(err * ~tail, -1)
      g_tail = torch.sum(err * tail, -1)
      w_head = g_head / (g_head + g_tail)
    return w_head * kl(p, lp, lq, inf) + (1 - w_head) * kl(q, lq, lp, inf)

  return dict(fkl=fkl, rkl=rkl, fkl_rkl=fkl_rkl, skl=skl, srkl=srkl, jsd=jsd,
              tvd=tvd, akl=akl)


def _torch_case(loss, student, teacher, repeats: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  s = torch.from_numpy(np.array(student)).requires_grad_(True)
  t = torch.from_numpy(np.array(teacher))

  def step():
    s.grad = None
    loss(s, t).mean().backward()
    return s.grad

  step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {"time_s": statistics.median(times), "temp_bytes": None}


def _torch_available() -> bool:
  try:
    import torch  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def run(n: int, vocab: int, repeats: int, chunk_size: int,
        divergences=DIVERGENCES, with_torch: bool = True) -> dict:
  student, teacher = make_logits(n, vocab)
  floor = _jax_case(lambda s, t: s - t, (student, teacher), repeats)
  one_array = n * vocab * 4
  with_torch = with_torch and _torch_available()
  torch_fns = torch_losses() if with_torch else {}
  rows = []
  for name in divergences:
    for impl in ("autodiff", "fast", "chunked") + (("torch",) if with_torch
                                                   else ()):
      if impl == "torch":
        result = _torch_case(torch_fns[name], student, teacher, repeats)
      else:
        result = _jax_case(jax_loss_grad(name, impl, chunk_size),
                           (student, teacher), repeats)
      result.update(divergence=name, impl=impl,
                    time_vs_floor=result["time_s"] / floor["time_s"],
                    temp_vs_nv_f32=(None if result["temp_bytes"] is None else
                                    result["temp_bytes"] / one_array))
      rows.append(result)
      print(_format_row(result), flush=True)
  return {
      "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}, "
                f"{platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cpus)",
      "jax": jax.__version__, "n": n, "vocab": vocab, "repeats": repeats,
      "chunk_size": chunk_size, "floor_s": floor["time_s"],
      "akl_unresolved_fraction": float(fast.akl_unresolved_fraction(teacher)),
      "rows": rows,
  }


def _format_row(r: dict) -> str:
  temp = "-" if r["temp_vs_nv_f32"] is None else f"{r['temp_vs_nv_f32']:.2f}"
  return (f"{r['divergence']:8s} {r['impl']:9s} {r['time_s'] * 1e3:10.1f} ms "
          f"{r['time_vs_floor']:7.2f}x floor   temp {temp:>6s} x [N,V] f32")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=4096, help="tokens N")
  parser.add_argument("--vocab", type=int, default=50257,
                      help="vocabulary V (128256 for Llama-3)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--chunk_size", type=int, default=32,
                      help="tokens per chunk of the chunked impl")
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes (N=64, V=512, 2 repeats)")
  parser.add_argument("--no_torch", action="store_true")
  parser.add_argument("--divergences", nargs="+", default=list(DIVERGENCES),
                      choices=DIVERGENCES)
  parser.add_argument("--out", default=None, help="JSON path")
  args = parser.parse_args(argv)
  if args.quick:
    args.n, args.vocab, args.repeats, args.chunk_size = 64, 512, 2, 16
  print(f"device: {jax.devices()[0]} ({jax.default_backend()}); "
        f"N={args.n} V={args.vocab}")
  result = run(args.n, args.vocab, args.repeats, args.chunk_size,
               tuple(args.divergences), with_torch=not args.no_torch)
  print(f"floor (jit student - teacher): {result['floor_s'] * 1e3:.1f} ms; "
        f"AKL rows on the exact fallback: "
        f"{result['akl_unresolved_fraction']:.3f}")
  out = args.out or os.path.join(
      RESULTS, f"divergences_{jax.default_backend()}_{args.n}x{args.vocab}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {out}")
  return result


if __name__ == "__main__":
  main()
