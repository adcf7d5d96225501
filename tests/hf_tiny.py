"""Tiny random PyTorch transformers models saved as HF checkpoints (test helper)."""

import numpy as np

GPT2_KW = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
LLAMA_KW = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def _save(model, path):
  model.eval()
  model.save_pretrained(path)
  return model


def gpt2(path, seed=0, **kw):
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = transformers.GPT2Config(**{**GPT2_KW, **kw})
  return _save(transformers.GPT2LMHeadModel(cfg), path)


WINDOW = 5  # sliding window of the tiny families: sequences run longer
_GEMMA_KW = dict(
    head_dim=16,  # explicit, not hidden_size // heads
    query_pre_attn_scalar=12,
    sliding_window=WINDOW,
    initializer_range=0.2,  # logits large enough for the soft-caps to act
    eos_token_id=None,  # Gemma's EOS 1 ranks high in these: generate on
)
# name -> (config class, model class, fields over LLAMA_KW): one tiny
# transformers model per LLaMA-style family.
DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
            tie_word_embeddings=True,
        ),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(sliding_window=WINDOW),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,  # layer 0 global, layer 1 windowed
            tie_word_embeddings=True,
        ),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            _GEMMA_KW, attn_logit_softcapping=1.0, final_logit_softcapping=2.0
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            _GEMMA_KW,
            sliding_window_pattern=2,  # layer 0 windowed, layer 1 global
            rope_local_base_freq=100.0,
            rope_scaling=dict(rope_type="linear", factor=2.0),
        ),
    ),
}


def decoder(name, path, seed=0, **kw):
  """The tiny random transformers model of family ``name`` (DECODERS),
  saved to ``path``; norms and biases randomised so their maps are tested."""
  import torch
  import transformers

  cfg_cls, model_cls, extra = DECODERS[name]
  torch.manual_seed(seed)
  cfg = getattr(transformers, cfg_cls)(**{**LLAMA_KW, **extra, **kw})
  model = getattr(transformers, model_cls)(cfg)
  with torch.no_grad():  # HF inits norms to 1 (Gemma: 0) and biases to 0
    for n, p in model.named_parameters():
      if "norm" in n or n.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return _save(model, path)


def llama(path, seed=0, **kw):
  return decoder("llama", path, seed, **kw)


def torch_logits(model, ids, attention_mask=None, position_ids=None):
  import torch

  with torch.no_grad():
    kw = {}
    if attention_mask is not None:
      kw["attention_mask"] = torch.tensor(
          np.asarray(attention_mask), dtype=torch.long
      )
    if position_ids is not None:
      kw["position_ids"] = torch.tensor(np.asarray(position_ids))
    out = model(torch.tensor(np.asarray(ids)), **kw)
  return out.logits.float().numpy()


def left_padded(rng, vocab, lengths, width):
  """Left-padded ids, mask and positions (cumsum - 1) for the given lengths."""
  ids = rng.randint(1, vocab, (len(lengths), width))
  mask = np.arange(width)[None, :] >= width - np.asarray(lengths)[:, None]
  ids = np.where(mask, ids, 0)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  return ids, mask, pos
