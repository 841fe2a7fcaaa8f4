"""Image-quality data: the built-in benchmark and loaders of the standard IQA datasets.

Everything here produces `IQARecord`s (`records.py`), so the rest of mechbiqa
(training, caching activations, studies) reads any data set the same way:

- `benchmark.py` builds and loads the offline built-in benchmark, from
  `photos.py` (reference photos shipped inside installed packages),
  `distortions.py` (KADID-style distortions and their KADID ratings) and
  `descriptions.py` (Q-Pathway-style text).
- `scales.py` holds each dataset's score scale (`DATASET_SCALES`) and
  `normalise(score, dataset)`, the one map to the common 0-1 rating.
- `loaders.py` reads a user's local copy of KonIQ-10k, SPAQ, LIVE Challenge,
  CSIQ, KADID-10k, AGIQA-3k and Q-Align / Q-Instruct JSON files.

IQA metrics (SRCC, PLCC, ...) and full-reference measures are in `mechbiqa.metrics`.
"""

from __future__ import annotations

from mechbiqa.data.benchmark import (
    Benchmark,
    BenchmarkConfig,
    BenchmarkMismatchError,
    build_benchmark,
    full_reference_agreement,
    load_benchmark,
)
from mechbiqa.data.descriptions import describe
from mechbiqa.data.distortions import DEFAULT_DISTORTIONS, DISTORTIONS, apply_distortion
from mechbiqa.data.loaders import DatasetFormatError, load_dataset
from mechbiqa.data.photos import find_photos, load_photo
from mechbiqa.data.records import LEVEL_WORDS, IQARecord, level_word, level_word_edges
from mechbiqa.data.scales import DATASET_SCALES, DatasetScale, UnknownDatasetError, normalise

__all__ = [
    "DATASET_SCALES",
    "Benchmark",
    "BenchmarkConfig",
    "BenchmarkMismatchError",
    "DEFAULT_DISTORTIONS",
    "DISTORTIONS",
    "DatasetFormatError",
    "DatasetScale",
    "IQARecord",
    "LEVEL_WORDS",
    "UnknownDatasetError",
    "apply_distortion",
    "build_benchmark",
    "describe",
    "find_photos",
    "full_reference_agreement",
    "level_word",
    "level_word_edges",
    "load_benchmark",
    "load_dataset",
    "load_photo",
    "normalise",
]
