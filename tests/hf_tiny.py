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


def llama(path, seed=0, **kw):
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(**{**LLAMA_KW, **kw})
  model = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():  # HF inits norms to 1: randomise so the map is tested
    for n, p in model.named_parameters():
      if "norm" in n:
        p.add_(0.1 * torch.randn_like(p))
  return _save(model, path)


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
