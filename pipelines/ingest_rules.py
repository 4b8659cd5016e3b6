"""The ingest quarantine rules, declared once: what makes a raw item or event row bad, in which
order the checks run, and which of several rows sharing a key is kept.

Both ingest implementations are built from these tables: the Spark job (:mod:`pipelines.ingest`)
turns each rule into a Spark ``Column`` expression, the single-process one
(:mod:`pipelines.ingest_local`) into a pandas boolean mask. A rule is written in a tiny
vocabulary of predicates (:class:`Blank`, :class:`Missing`, :class:`GivenButUnparsed`,
:class:`NotOneOf`, :class:`NotAmong`) whose two translations sit side by side in this file,
so that adding a check, reordering two, or changing what a word means changes both
implementations at once.

Rules run on the *canonical raw* columns (:mod:`pipelines.ingest_canonical` and its pandas
twin): ``item_ext``, ``title``, ``created_raw`` / ``created_ts``; ``user_ext``, ``item_ext``,
``ts``, ``value`` / ``value_raw``, ``weight`` / ``weight_raw``, ``__raw_ts``; ``tag``. Each table
is checked in three phases:

1. the row rules, in order; a row gets the reason of the first rule that holds;
2. among rows still valid, one per key is kept (:class:`KeepOnePerKey`), the others are
   ``duplicate_key``;
3. items only: the media of rows still valid are decoded (:func:`pipelines.media.validate_media`,
   reasons :data:`MEDIA_REASONS`).

:func:`describe_rules` renders the tables as the list in :mod:`pipelines.ingest`'s docstring
(a test keeps the two equal).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Mapping, Optional

import numpy as np
import pandas as pd

from pipelines.media import Reason

if TYPE_CHECKING:  # the pandas implementation must not need pyspark
    from pyspark.sql import Column, DataFrame

#: Reasons that :func:`pipelines.media.validate_media` gives, in the order it checks.
MEDIA_REASONS = (Reason.IMAGE_NOT_FOUND, Reason.UNDECODABLE_IMAGE, Reason.IMAGE_TOO_LARGE,
                 Reason.IMAGE_TOO_SMALL, Reason.VIDEO_NOT_FOUND, Reason.UNDECODABLE_VIDEO)

#: How canonical columns are named in the docstring (the raw column a person wrote).
_SHOWN = {"item_ext": "item_id", "user_ext": "user_id", "created_raw": "created_at",
          "created_ts": "created_at", "__raw_ts": "ts", "weight_raw": "weight"}


def _shown(column: str, modes: Optional[tuple[str, ...]]) -> str:
    if column in ("value", "value_raw") and modes and len(modes) == 1:
        return modes[0]
    return _SHOWN.get(column, column)


def _fractional(df: "DataFrame", column: str) -> bool:
    from pyspark.sql import types as T

    return isinstance(df.schema[column].dataType, (T.FloatType, T.DoubleType))


# ------------------------------------------------------------------------- the vocabulary
# Each predicate says when a row is bad. ``spark`` gives a boolean Column (null counts as false,
# as in ``F.when``); ``pandas`` a boolean Series without nulls. ``describe`` is the docstring text.


@dataclass(frozen=True)
class Blank:
    """The column is null, empty, or only spaces (Spark's ``trim`` strips spaces only)."""

    column: str

    def spark(self, df: "DataFrame") -> "Column":
        from pyspark.sql import functions as F

        c = F.col(self.column)
        return c.isNull() | (F.trim(c) == "")

    def pandas(self, frame: pd.DataFrame, id_sets: Mapping[str, pd.Series]) -> pd.Series:
        import pyarrow as pa
        import pyarrow.compute as pc

        text = pa.array(frame[self.column].to_numpy(dtype=object), pa.string(), from_pandas=True)
        blank = pc.equal(pc.utf8_length(pc.utf8_trim(text, characters=" ")), 0)
        return pd.Series(pc.fill_null(blank, True).to_numpy(zero_copy_only=False),
                         index=frame.index)

    def describe(self, modes=None) -> str:
        return f"{_shown(self.column, modes)} blank"


@dataclass(frozen=True)
class Missing:
    """The parsed value is null, or NaN for a floating-point column."""

    column: str

    def spark(self, df: "DataFrame") -> "Column":
        from pyspark.sql import functions as F

        c = F.col(self.column)
        return (c.isNull() | F.isnan(c)) if _fractional(df, self.column) else c.isNull()

    def pandas(self, frame: pd.DataFrame, id_sets: Mapping[str, pd.Series]) -> pd.Series:
        return frame[self.column].isna()  # NaN, None and NaT alike

    def describe(self, modes=None) -> str:
        return f"{_shown(self.column, modes)} not a number"


@dataclass(frozen=True)
class Unparsed:
    """The column (a parsed time) is null: the raw value was absent or did not parse."""

    column: str

    def spark(self, df: "DataFrame") -> "Column":
        return Missing(self.column).spark(df)

    def pandas(self, frame: pd.DataFrame, id_sets: Mapping[str, pd.Series]) -> pd.Series:
        return Missing(self.column).pandas(frame, id_sets)

    def describe(self, modes=None) -> str:
        return f"{_shown(self.column, modes)} missing or not a time"


@dataclass(frozen=True)
class GivenButUnparsed:
    """A raw value was given (not null) but its parsed value is null or NaN: an optional column
    may be absent, but what is there must parse."""

    raw: str
    parsed: str

    def spark(self, df: "DataFrame") -> "Column":
        from pyspark.sql import functions as F

        return F.col(self.raw).isNotNull() & Missing(self.parsed).spark(df)

    def pandas(self, frame: pd.DataFrame, id_sets: Mapping[str, pd.Series]) -> pd.Series:
        return frame[self.raw].notna() & Missing(self.parsed).pandas(frame, id_sets)

    def describe(self, modes=None) -> str:
        return f"{_shown(self.raw, modes)} given but does not parse"


@dataclass(frozen=True)
class NotOneOf:
    """The value is missing (null, NaN) or not one of ``values``."""

    column: str
    values: tuple

    def spark(self, df: "DataFrame") -> "Column":
        from pyspark.sql import functions as F

        return Missing(self.column).spark(df) | ~F.col(self.column).isin(*self.values)

    def pandas(self, frame: pd.DataFrame, id_sets: Mapping[str, pd.Series]) -> pd.Series:
        s = frame[self.column]
        return s.isna() | ~s.isin(list(self.values))

    def describe(self, modes=None) -> str:
        shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in self.values)
        return f"{_shown(self.column, modes)} not one of {shown}"


@dataclass(frozen=True)
class NotAmong:
    """The value is not in the id set ``id_set`` (a second table, passed by name). The Spark
    classifier left-joins the set as the flag column :attr:`flag`; a null key is never among."""

    column: str
    id_set: str
    #: The id set for a reader ("the items input").
    described_as: str

    @property
    def flag(self) -> str:
        return f"_among_{self.id_set}"

    def spark(self, df: "DataFrame") -> "Column":
        from pyspark.sql import functions as F

        return F.col(self.flag).isNull()

    def pandas(self, frame: pd.DataFrame, id_sets: Mapping[str, pd.Series]) -> pd.Series:
        s = frame[self.column]
        return s.isna() | ~s.isin(id_sets[self.id_set])

    def describe(self, modes=None) -> str:
        return f"{_shown(self.column, modes)} not in {self.described_as}"


Predicate = Blank | Missing | Unparsed | GivenButUnparsed | NotOneOf | NotAmong


# ------------------------------------------------------------------------- rules and tables


@dataclass(frozen=True)
class Rule:
    """One quarantine check: rows where ``when`` holds get ``reason``, with the value of the
    ``detail`` column (as a string) as the human detail."""

    reason: str
    when: Predicate
    detail: Optional[str] = None
    #: Label modes the rule applies in (``label``, ``rating``, ``implicit``); None: all.
    label_modes: Optional[tuple[str, ...]] = None

    def applies(self, mode: Optional[str]) -> bool:
        return self.label_modes is None or mode is None or mode in self.label_modes

    def describe(self) -> str:
        text = f"{self.reason} ({self.when.describe(self.label_modes)}"
        if self.label_modes:
            text += f"; {'/'.join(self.label_modes)} mode"
        return text + ")"


@dataclass(frozen=True)
class SortKey:
    """One key of the order that picks the kept row; nulls always sort last."""

    column: str
    descending: bool = False

    def describe(self) -> str:
        return f"{'highest' if self.descending else 'smallest'} {_shown(self.column, None)}"


@dataclass(frozen=True)
class KeepOnePerKey:
    """Among rows still valid, keep the first by ``order`` of each ``key``; the others are
    ``duplicate_key`` with ``detail`` (a template: ``{column}`` is replaced by the row's value).
    Rows equal on the whole order are interchangeable: which one is kept is not defined."""

    key: tuple[str, ...]
    order: tuple[SortKey, ...]
    detail: str
    reason: str = Reason.DUPLICATE_KEY

    def detail_parts(self) -> list[tuple[str, bool]]:
        """The detail template as ``(text, is_column)`` parts."""
        import string

        parts = []
        for literal, column, _, _ in string.Formatter().parse(self.detail):
            if literal:
                parts.append((literal, False))
            if column:
                parts.append((column, True))
        return parts

    def describe(self) -> str:
        key = ", ".join(_shown(c, None) for c in self.key)
        order = ", then ".join(k.describe() for k in self.order)
        return f"{self.reason} (same {key}; the row with the {order} is kept)"


@dataclass(frozen=True)
class LabelMode:
    """Where an event's 0/1 label comes from: the ``label`` column, ``rating`` >= the
    threshold, or nothing (implicit feedback: every event is a positive)."""

    name: Literal["label", "rating", "implicit"]
    #: The raw column holding the value; None for implicit feedback.
    column: Optional[str]

    def spark_label(self, value: "Column", threshold: float) -> "Column":
        """The label as a double column (0.0 / 1.0 for rows that passed the rules)."""
        from pyspark.sql import functions as F

        if self.name == "rating":
            return (value >= F.lit(threshold)).cast("double")
        if self.name == "implicit":
            return F.lit(1.0)
        return value

    def pandas_label(self, value: pd.Series, threshold: float) -> pd.Series:
        if self.name == "rating":
            return (value >= threshold).astype(np.float64).where(value.notna())
        if self.name == "implicit":
            return pd.Series(1.0, index=value.index)
        return value


#: The label modes in the order they are looked for among the events' columns.
LABEL_MODES = (LabelMode("label", "label"), LabelMode("rating", "rating"),
               LabelMode("implicit", None))


def label_mode_of(columns, feedback: str = "auto") -> LabelMode:
    """The label mode of raw events with these columns: the first whose column is present, or
    implicit feedback whatever the columns when ``feedback`` (``source.feedback``) says so."""
    if feedback == "implicit":
        return label_mode("implicit")
    for mode in LABEL_MODES:
        if mode.column is None or mode.column in columns:
            return mode
    raise AssertionError("LABEL_MODES ends with the implicit mode")


def label_mode(name: str) -> LabelMode:
    return next(m for m in LABEL_MODES if m.name == name)


@dataclass(frozen=True)
class TableRules:
    """The ordered checks of one input table (see the module docstring for the phases)."""

    table: str
    rules: tuple[Rule, ...]
    keep_one: KeepOnePerKey
    media_reasons: tuple[str, ...] = field(default=())

    def rules_for(self, mode: Optional[str] = None) -> tuple[Rule, ...]:
        """The row rules that apply under a label mode (all of them for ``None``)."""
        return tuple(r for r in self.rules if r.applies(mode))

    def reasons(self, mode: Optional[str] = None) -> list[str]:
        """Every reason a row of this table can get under ``mode``, in check order."""
        out = [r.reason for r in self.rules_for(mode)]
        return out + [self.keep_one.reason, *self.media_reasons]

    def id_sets(self, mode: Optional[str] = None) -> list[NotAmong]:
        """The :class:`NotAmong` predicates of the rules (the id sets the classifier joins)."""
        return [r.when for r in self.rules_for(mode) if isinstance(r.when, NotAmong)]

    def describe(self) -> str:
        text = f"{self.table}: " + ", ".join(r.describe() for r in self.rules)
        text += f", then {self.keep_one.describe()}"
        if self.media_reasons:
            text += ", then media: " + ", ".join(self.media_reasons)
        return text + "."


# ------------------------------------------------------------------------- the tables

ITEM_RULES = TableRules(
    table="items",
    rules=(
        Rule(Reason.MISSING_ITEM_ID, Blank("item_ext")),
        Rule(Reason.MISSING_TITLE, Blank("title")),
        Rule(Reason.UNPARSEABLE_TIMESTAMP, GivenButUnparsed("created_raw", "created_ts"),
             detail="created_raw"),
    ),
    keep_one=KeepOnePerKey(key=("item_ext",),
                           order=(SortKey("created_ts"), SortKey("title")),
                           detail="item_id {item_ext} seen before"),
    media_reasons=MEDIA_REASONS,
)

EVENT_RULES = TableRules(
    table="events",
    rules=(
        Rule(Reason.MISSING_USER_ID, Blank("user_ext")),
        Rule(Reason.MISSING_ITEM_ID, Blank("item_ext")),
        Rule(Reason.UNPARSEABLE_TIMESTAMP, Unparsed("ts"), detail="__raw_ts"),
        Rule(Reason.INVALID_LABEL, NotOneOf("value", (0.0, 1.0)), detail="value_raw",
             label_modes=("label",)),
        Rule(Reason.INVALID_RATING, Missing("value"), detail="value_raw",
             label_modes=("rating",)),
        Rule(Reason.INVALID_WEIGHT, GivenButUnparsed("weight_raw", "weight"),
             detail="weight_raw"),
        Rule(Reason.UNKNOWN_ITEM, NotAmong("item_ext", "raw_item_ids", "the items input"),
             detail="item_ext"),
        Rule(Reason.ITEM_QUARANTINED,
             NotAmong("item_ext", "valid_item_ids", "the items that passed validation"),
             detail="item_ext"),
    ),
    keep_one=KeepOnePerKey(key=("user_ext", "item_ext", "ts"),
                           order=(SortKey("label", descending=True),
                                  SortKey("weight", descending=True)),
                           detail="same user, item, ts"),
)


TAG_RULES = TableRules(
    table="item_tags",
    rules=(
        Rule(Reason.MISSING_ITEM_ID, Blank("item_ext")),
        Rule(Reason.MISSING_TAG, Blank("tag")),
        Rule(Reason.UNPARSEABLE_TIMESTAMP, Unparsed("ts"), detail="__raw_ts"),
        Rule(Reason.UNKNOWN_ITEM, NotAmong("item_ext", "raw_item_ids", "the items input"),
             detail="item_ext"),
        Rule(Reason.ITEM_QUARANTINED,
             NotAmong("item_ext", "valid_item_ids", "the items that passed validation"),
             detail="item_ext"),
    ),
    keep_one=KeepOnePerKey(key=("item_ext", "user_ext", "tag"), order=(SortKey("ts"),),
                           detail="same item, author, tag"),
)


def describe_rules(width: int = 99) -> str:
    """The rule tables as the bulleted list of :mod:`pipelines.ingest`'s docstring."""
    lines = []
    for table in (ITEM_RULES, EVENT_RULES, TAG_RULES):
        lines += textwrap.wrap(table.describe(), width=width, initial_indent="* ",
                               subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(lines)
