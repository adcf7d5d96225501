"""The tiny byte-level BPE of ``configs/uld_xtok_gpt2.py:tiny``'s student.

Trained with the ``tokenizers`` library on the ``synthetic_instruct``
training split as the tiny runs format it (the ``compact`` prompt template
followed by the response), with GPT-2's byte-level pre-tokenizer and
``<|endoftext|>`` as its EOS. The asset in ``experiments/assets/tiny_bpe``
was made by

  python -m experiments.tiny_bpe --out=experiments/assets/tiny_bpe

and is deterministic: the same command writes the same ``tokenizer.json``.
"""

from __future__ import annotations

import argparse
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kdjax.data import synthetic_tasks, template
from kdjax.data import tokenizer as tokenizer_lib

VOCAB_SIZE = 512


def texts() -> list[str]:
  """The training split's prompts and responses, as the tiny runs read them."""
  return [
      template.prompt(ex.instruction, ex.input, "compact") + ex.response
      for ex in synthetic_tasks.generate("train")
  ]


def train(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=[tokenizer_lib.EOS_TOKEN],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(texts(), trainer)
  return tok


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="experiments/assets/tiny_bpe")
  parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "tokenizer.json")
  train(args.vocab_size).save(path)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
