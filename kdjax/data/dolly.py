"""TFDS builder for databricks-dolly-15k with the MiniLLM split.

Online, the official JSONL is fetched through the TFDS download manager; offline,
put ``databricks-dolly-15k.jsonl`` in ``manual_dir``. The split is a seeded,
deterministic permutation (docs/data.md "The Dolly split"): 1,000 validation,
500 test, the
rest train. MiniLLM ships its own processed split; a regenerated one differs
from the published runs, so the seed is recorded in the dataset metadata.
"""

from __future__ import annotations

import hashlib
from typing import Any

from absl import logging
import tensorflow_datasets as tfds

from kdjax.data import jsonl

URL = (
    "https://huggingface.co/datasets/databricks/databricks-dolly-15k/"
    "resolve/main/databricks-dolly-15k.jsonl"
)
FILENAME = "databricks-dolly-15k.jsonl"
SPLIT_SEED = 10  # the recipe's seed (docs/training.md "The paper recipe")
NUM_VALIDATION = 1000
NUM_TEST = 500


def parse(obj: dict[str, Any]) -> dict[str, str]:
  """One Dolly line -> record; ``context`` may be absent (empty)."""
  return {
      "instruction": jsonl.text_field(obj, "instruction"),
      "context": jsonl.text_field(obj, "context", required=False),
      "response": jsonl.text_field(obj, "response"),
      "category": jsonl.text_field(obj, "category", required=False),
  }


def stable_order(n: int, seed: int) -> list[int]:
  """A permutation of range(n) fixed by ``seed`` on every machine and version.

  Sorting by SHA-256 of ``"seed:i"`` depends on no PRNG implementation.
  """
  return sorted(
      range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest()
  )


def split_records(
    records: list[dict[str, str]],
    *,
    seed: int,
    num_validation: int,
    num_test: int,
) -> dict[str, list[dict[str, str]]]:
  """Seeded split: the first ``num_validation`` of a stable permutation are
  validation, the next ``num_test`` test, the rest train."""
  if len(records) <= num_validation + num_test:
    raise ValueError(
        f"Dolly has {len(records)} usable records, not more than validation + "
        f"test = {num_validation + num_test}; check the input file."
    )
  order = stable_order(len(records), seed)
  cut = num_validation + num_test
  return {
      "validation": [records[i] for i in order[:num_validation]],
      "test": [records[i] for i in order[num_validation:cut]],
      "train": [records[i] for i in order[cut:]],
  }


class Dolly(jsonl.Builder):
  """databricks-dolly-15k: instruction, context, response, category."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "MiniLLM-style 1000/500/rest split, seed 10."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Offline: download {URL} and place {FILENAME} in the manual_dir "
      "(python -m kdjax.data.prepare --dataset=dolly --manual_dir=DIR). "
      "Online, no manual step is needed."
  )

  TEXT = ("instruction", "context", "response", "category")
  HOMEPAGE = "https://huggingface.co/datasets/databricks/databricks-dolly-15k"

  def _split_generators(self, dl_manager):
    path = self._local_file(dl_manager)
    if path is None:
      from kdjax import hub  # pylint: disable=g-import-not-at-top

      if not hub.hub_reachable():
        raise FileNotFoundError(
            f"{FILENAME} is not prepared and huggingface.co is unreachable; "
            f"on a machine with network download {URL} into a directory DIR "
            "and prepare with --manual_dir=DIR (data.manual_dir)."
        )
      logging.info("No %s in manual_dir; downloading %s", FILENAME, URL)
      path = dl_manager.download(URL)
    counts = jsonl.Counts()
    records = jsonl.read_jsonl(
        path, parse, skip_bad=self._skip_bad, counts=counts
    )
    splits = split_records(
        records,
        seed=SPLIT_SEED,
        num_validation=NUM_VALIDATION,
        num_test=NUM_TEST,
    )
    self.info.metadata.update(
        counts=dict(counts),
        split_seed=SPLIT_SEED,
        split_sizes={k: len(v) for k, v in splits.items()},
    )
    logging.info(
        "Dolly: %s; split sizes %s",
        dict(counts),
        self.info.metadata["split_sizes"],
    )
    return {
        name: self._generate_examples(recs) for name, recs in splits.items()
    }

  def _local_file(self, dl_manager):
    """The manually placed file, or None when there is no manual_dir."""
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError:  # manual_dir not given or empty: go online
      return None
    path = manual_dir / FILENAME
    if not path.exists():
      raise FileNotFoundError(
          f"manual_dir {manual_dir} has no {FILENAME}; download {URL} into it "
          "or leave manual_dir unset to download."
      )
    return path
