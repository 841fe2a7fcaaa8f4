"""The score scale of each IQA dataset, and the one map from a dataset's own score to the common 0-1 rating.

Every place that turns a dataset's MOS or DMOS into mechbiqa's common
currency (``IQARecord.mos01``: 0-1, higher is better) reads the scale from
`DATASET_SCALES`: the loaders of `mechbiqa.data.loaders`, the Q-Align JSON
reader (which picks each entry's scale from the entry's own source, so a file
that mixes KonIQ, SPAQ and KADID rates each on its own scale), and the
evaluation of `mechbiqa.analysis.evaluation` (which pools data sets on the 0-1
scale only). Ranges and directions are those of ``shared/reference/iqa_data.md``
section 3 (the original releases and Q-Align's JSON copies).

A dataset is named by its canonical key (``"koniq10k"``) or an alias
(``"koniq"``, ``"KonIQ-10k"``, the image folder name Q-Align uses); `resolve`
maps any of them to the key. A name that is not known raises
`UnknownDatasetError`, which lists the known names; callers with another
dataset pass its scale explicitly (`parse_scale` reads ``NAME=LOW,HIGH``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "DATASET_ALIASES",
    "DATASET_SCALES",
    "DatasetScale",
    "UnknownDatasetError",
    "normalise",
    "parse_scale",
    "resolve",
    "scale_of",
]


@dataclass(frozen=True, slots=True)
class DatasetScale:
    """The range and direction of a dataset's score.

    Attributes:
        low: Nominal lowest score.
        high: Nominal highest score.
        higher_is_better: False for DMOS datasets (CSIQ, LIVE).
    """

    low: float | int
    high: float | int
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        """Check that the range is finite and not empty."""
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"a score scale needs finite low < high, got ({self.low}, {self.high})")

    @property
    def range(self) -> tuple[float, float]:
        """``(low, high)``, as `IQARecord.scale` stores it."""
        return (self.low, self.high)

    def normalise(self, score: float, *, clip: bool = True) -> float:
        """The score on the 0-1 scale, higher is better.

        Args:
            score: A score on this scale.
            clip: Clip to [0, 1] (as `IQARecord.mos01` does); False keeps scores a
                dataset places slightly outside its nominal range (LIVE's
                realigned DMOS) apart, which rank correlations need.
        """
        x = (float(score) - self.low) / (self.high - self.low)
        if not self.higher_is_better:
            x = 1.0 - x
        return min(1.0, max(0.0, x)) if clip else x


#: Canonical dataset key -> its score scale. KonIQ is MOS_zscore (0-100, the usual
#: choice and Q-Align's); its 1-5 ``MOS`` column is a different score (see `load_koniq10k`).
DATASET_SCALES: Mapping[str, DatasetScale] = MappingProxyType(
    {
        "koniq10k": DatasetScale(0.0, 100.0),
        "spaq": DatasetScale(0.0, 100.0),
        "livec": DatasetScale(0.0, 100.0),
        "kadid10k": DatasetScale(1.0, 5.0),
        "agiqa3k": DatasetScale(0.0, 5.0),
        "tid2013": DatasetScale(0.0, 9.0),
        "csiq": DatasetScale(0.0, 1.0, higher_is_better=False),
        "live": DatasetScale(0.0, 100.0, higher_is_better=False),
        "ava": DatasetScale(1.0, 10.0),
    }
)

#: Other spellings of the canonical keys: dataset names as papers write them and the
#: image folder names of Q-Align's JSON files (``koniq/``, ``kadid10k/``, ``agi-cgi/``).
DATASET_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "koniq": "koniq10k",
        "kadid": "kadid10k",
        "agi": "agiqa3k",
        "agiqa": "agiqa3k",
        "agicgi": "agiqa3k",
        "clive": "livec",
        "livechallenge": "livec",
        "liveitw": "livec",
        "tid": "tid2013",
        "liveiqa": "live",
    }
)


class UnknownDatasetError(ValueError, KeyError):
    """A dataset name that mechbiqa has no scale (or loader) for; the message lists the known names.

    A `ValueError` (studies turn those into one line) and a `KeyError` (a failed lookup).
    """

    def __str__(self) -> str:
        """The message itself (a KeyError would show its repr)."""
        return str(self.args[0]) if self.args else ""


def _key(name: str) -> str:
    return re.sub(r"[\s_\-.]", "", str(name).lower())


def resolve(name: str, extra: Iterable[str] = ()) -> str | None:
    """The canonical key of a dataset name or alias (case, ``-``, ``_`` and spaces ignored), else None.

    Args:
        name: A dataset name, alias or image folder name.
        extra: Further names to accept as they are (user-given scales).
    """
    key = _key(name)
    for other in extra:
        if _key(other) == key:
            return other
    if key in DATASET_SCALES:
        return key
    return DATASET_ALIASES.get(key)


def known_names() -> list[str]:
    """Canonical keys then aliases, for error messages."""
    return sorted(DATASET_SCALES) + sorted(DATASET_ALIASES)


def scale_of(dataset: str) -> DatasetScale:
    """The scale of a dataset named by its key or an alias.

    Raises:
        UnknownDatasetError: If the name is not known (the message lists the known names).
    """
    key = resolve(dataset)
    if key is None:
        raise UnknownDatasetError(
            f"unknown dataset {dataset!r}: no score scale known for it; known: {sorted(DATASET_SCALES)} "
            f"(aliases {sorted(DATASET_ALIASES)}). For another dataset give its scale, e.g. "
            f"--scale {dataset}=LOW,HIGH"
        )
    return DATASET_SCALES[key]


def normalise(score: float, dataset: str, *, clip: bool = True) -> float:
    """A dataset's own score on the common 0-1 scale, higher is better.

    Args:
        score: The MOS / DMOS as the dataset gives it.
        dataset: Its key or an alias (``"koniq10k"``, ``"kadid"``, ``"csiq"``, ...).
        clip: Clip to [0, 1], as `IQARecord.mos01` does.

    Raises:
        UnknownDatasetError: If the dataset is not known.
    """
    return scale_of(dataset).normalise(score, clip=clip)


def parse_scale(spec: str) -> tuple[str, DatasetScale]:
    """Read a command-line scale ``NAME=LOW,HIGH`` (append ``,lower`` for a DMOS, lower is better).

    Examples: ``cgi=0,5``, ``live=0,100,lower``.

    Raises:
        ValueError: If the text is not of that form (the message shows the form).
    """
    form = "NAME=LOW,HIGH or NAME=LOW,HIGH,lower (e.g. cgi=0,5)"
    name, sep, rest = spec.partition("=")
    parts = [p.strip() for p in rest.split(",")]
    if not sep or not name.strip() or len(parts) not in (2, 3):
        raise ValueError(f"scale {spec!r} is not {form}")
    if len(parts) == 3 and parts[2].lower() not in ("lower", "higher"):
        raise ValueError(f"scale {spec!r}: the third part must be 'lower' or 'higher'; the form is {form}")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"scale {spec!r}: LOW and HIGH must be numbers; the form is {form}") from None
    higher = len(parts) == 2 or parts[2].lower() == "higher"
    return name.strip(), DatasetScale(low, high, higher_is_better=higher)
