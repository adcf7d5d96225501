"""TFDS builder ``synthetic_instruct``: the embedded benchmark, no download.

Examples come from :mod:`kdjax.data.synthetic_tasks` (seeded, pure Python), so
every machine builds identical files. Fields: instruction, input, response (one
sampled valid answer), task, valid_answers (every accepted answer, for exact
validity next to ROUGE-L).
"""

from __future__ import annotations

from absl import logging
import tensorflow_datasets as tfds

from kdjax.data import synthetic_tasks


class SyntheticInstruct(tfds.core.GeneratorBasedBuilder):
  """Embedded instruction tasks with one or many valid answers."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "14 task families, 24000/1000/500, seed 10."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {
                "instruction": tfds.features.Text(),
                "input": tfds.features.Text(),
                "response": tfds.features.Text(),
                "task": tfds.features.Text(),
                "valid_answers": tfds.features.Sequence(tfds.features.Text()),
            }
        ),
        metadata=tfds.core.MetadataDict(
            seed=synthetic_tasks.SEED,
            single_answer_tasks=list(synthetic_tasks.SINGLE_ANSWER),
            many_answer_tasks=list(synthetic_tasks.MANY_ANSWERS),
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {
        split: self._generate_examples(split)
        for split in synthetic_tasks.SPLIT_SIZES
    }

  def _generate_examples(self, split):
    examples = synthetic_tasks.generate(split)
    logging.info("synthetic_instruct/%s: %d examples", split, len(examples))
    for i, ex in enumerate(examples):
      yield i, ex.as_dict()
