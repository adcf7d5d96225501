"""The shipped tiny BPE is what its command makes."""

import json
import os

from commands import ROOT
from experiments import tiny_bpe


def test_the_shipped_tiny_bpe_is_reproduced():
  shipped = os.path.join(ROOT, "experiments", "assets", "tiny_bpe")
  with open(os.path.join(shipped, "tokenizer.json"), encoding="utf-8") as f:
    want = json.load(f)
  got = json.loads(tiny_bpe.train().to_str())
  assert got == want
  assert got["added_tokens"][0]["content"] == "<|endoftext|>"
  assert len(got["model"]["vocab"]) == tiny_bpe.VOCAB_SIZE
