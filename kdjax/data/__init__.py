"""kdjax data: TFDS builders (array_record, no TensorFlow) and the grain pipeline.

Importing this package registers the builders ``dolly``, ``instruct_jsonl`` and
``synthetic_instruct`` with TFDS. TensorFlow is never imported: builders are
written with ``file_format="array_record"`` and read with ``as_data_source``.
"""

from kdjax.data.dolly import Dolly
from kdjax.data.instruct_jsonl import InstructJsonl, InstructJsonlConfig
from kdjax.data.sources import builder, load_source
from kdjax.data.synthetic import SyntheticInstruct

__all__ = [
    "Dolly",
    "InstructJsonl",
    "InstructJsonlConfig",
    "SyntheticInstruct",
    "builder",
    "load_source",
]
