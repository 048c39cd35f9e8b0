"""Cross-encoder training batches: each record becomes a *candidate group* of text pairs.

A cross-encoder reads a query and a candidate together, so its batch holds pairs, not texts.
Record i of a batch gives row i a group of G pairs, all starting with its ``text_a``:

    (a, b)                       a scored pair (``score``): G = 1, the label is the score
    (a, b_1) .. (a, b_m)         its positive(s): label 1 (an empty positive slot is masked)
    (a, n_1) .. (a, n_k)         its hard negatives (``text_n``): label 0
    (a, b of row i+1) ..         ``in_batch_negatives`` more: the next rows' first positives,
                                 label 0 (sentence-transformers' CrossEncoder
                                 MultipleNegativesRankingLoss samples negatives the same way)

The batch is an ``embedjax.data.batch.Batch`` whose one side ``a`` holds the group's pairs
(lead ``(rows, G)``): padded tokens ``(rows, G, T)`` or, with ``packing``, their ``text_index``
into the batch's ``PackedRows``; its ``hashes`` are the candidates' text hashes, 0 on an empty
slot, on padding rows, and on an in-batch negative that is one of the row's positives or
judged relevant to its query (``relevant``), so losses mask those. ``labels`` is
``(rows, G)``; ``teacher`` (records with teacher scores) is ``(rows, 1 + k)``, aligned with
the positive and the hard negatives. Everything downstream (hosts agreeing on shapes,
sharding rows over devices, resuming the iterator) treats it as any other batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from embedjax.data.batch import Batch, PackedRows, Side
from embedjax.data.pipeline import Packing, as_record, text_hash
from embedjax.tokenize import Tokenizer


@dataclasses.dataclass(frozen=True)
class PairFormat:
    """How records become pairs: ``template`` (decoders: ``"...{first}...{second}..."`` formats a
    pair into one text; None: the tokenizer's pair encoding, ``[CLS] a [SEP] b [SEP]`` with
    token types for BERT) and ``in_batch_negatives`` (other rows' positives added to each group)."""

    template: str | None = None
    in_batch_negatives: int = 0

    def __post_init__(self):
        if self.in_batch_negatives < 0:
            raise ValueError(f"in_batch_negatives must be >= 0, got {self.in_batch_negatives}")
        if self.template is not None:
            try:
                self.template.format(first="", second="")
            except (KeyError, IndexError) as e:
                raise ValueError(f"template {self.template!r} may only use the fields {{first}} and {{second}}") from e


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    return value if isinstance(value, tuple) else (value,)


def candidate_groups(records: Sequence[dict], indices: Sequence[int], in_batch_negatives: int = 0):
    """``(texts, labels, hashes)`` per record: the group's candidate texts (None: an empty slot),
    their labels and hashes (0: masked), as the module docstring lays them out. Every record must
    give the same group size; ValueError names the first record that does not."""
    if in_batch_negatives and in_batch_negatives >= len(records):
        raise ValueError(f"in_batch_negatives={in_batch_negatives} needs more than {in_batch_negatives} records per "
                         f"host batch, got {len(records)}")
    firsts = [next((t for t in _as_tuple(r.get("text_b")) if t is not None), None) for r in records]
    groups = []
    for row, (record, index) in enumerate(zip(records, indices)):
        positives = _as_tuple(record.get("text_b"))
        if not positives:
            raise ValueError(f"record {index} has no text_b: a cross-encoder trains on (text_a, text_b) pairs")
        negatives = _as_tuple(record.get("text_n"))
        if "score" in record:
            if len(positives) != 1 or negatives:
                raise ValueError(f"record {index}: a scored record must be one pair (text_a, text_b, score)")
            labels = [record["score"]]
        else:
            labels = [1.0] * len(positives) + [0.0] * len(negatives)
        texts = [*positives, *negatives]
        hashes = [0 if t is None else text_hash(t) for t in texts]
        keep_out = {h for h in hashes[:len(positives)] if h} | set(record.get("relevant", ()))
        for step in range(1, in_batch_negatives + 1):
            other = firsts[(row + step) % len(records)]
            h = 0 if other is None else text_hash(other)
            texts.append(other)
            labels.append(0.0)
            hashes.append(0 if h in keep_out else h)  # a false negative: masked
        groups.append((texts, labels, hashes))
    sizes = {len(g[0]) for g in groups}
    if len(sizes) > 1:
        bad = next(i for i, g in zip(indices, groups) if len(g[0]) != len(groups[0][0]))
        raise ValueError(f"record {bad} gives {len(groups[indices.index(bad)][0])} candidates, record {indices[0]} "
                         f"gives {len(groups[0][0])}: every record of a batch needs as many positives and negatives")
    return groups


def collate_pairs(items: Sequence[tuple[int, Any]], tokenizer: Tokenizer, rows: int, *,
                  pair_format: PairFormat = PairFormat(), preprocess: Callable[[str], str] | None = None,
                  packing: Packing | None = None) -> Batch:
    """(index, record) pairs -> one cross-encoder ``Batch`` of ``rows`` rows (module docstring).

    ``preprocess`` (e.g. lower-casing) applies to both texts of a pair, not to the hashes. Every
    pair of the batch is padded to one length (the bucket of the longest), or packed.
    """
    n = len(items)
    if n > rows:
        raise ValueError(f"{n} records do not fit in a batch of {rows} rows")
    records = [as_record(r) for _, r in items]
    indices = [i for i, _ in items]
    groups = candidate_groups(records, indices, pair_format.in_batch_negatives)
    size = len(groups[0][0])
    prep = (lambda t: t) if preprocess is None else preprocess
    pairs = [(prep(r["text_a"]), prep("" if t is None else t)) for r, (texts, _, _) in zip(records, groups)
             for t in texts]
    if pair_format.template is not None:
        encodings = tokenizer.encode([pair_format.template.format(first=a, second=b) for a, b in pairs])
    else:
        encodings = tokenizer.encode(pairs)
    labels = np.zeros((rows, size), np.float32)
    hashes = np.zeros((rows, size), np.int32)
    for row, (_, row_labels, row_hashes) in enumerate(groups):
        labels[row], hashes[row] = row_labels, row_hashes
    teacher = None
    if "teacher" in records[0]:
        teacher = np.zeros((rows, len(records[0]["teacher"])), np.float32)
        for row, (index, record) in enumerate(zip(indices, records)):
            if len(record["teacher"]) != teacher.shape[1]:
                raise ValueError(f"record {index} has {len(record['teacher'])} teacher scores, record {indices[0]} "
                                 f"has {teacher.shape[1]}")
            teacher[row] = record["teacher"]
    packed = None
    if packing is not None:
        rows_ = tokenizer.pack(encodings, packing.length, packing.rows_multiple)
        packed = PackedRows(ids=rows_.input_ids, types=rows_.token_type_ids, segments=rows_.segment_ids,
                            positions=rows_.positions)
        text_index = np.zeros(rows * size, np.int32)  # padding rows point at pair 0 (hash 0: masked)
        text_index[:len(encodings)] = np.arange(len(encodings))
        side = Side(hashes=hashes, text_index=text_index.reshape(rows, size))
    else:
        padded = tokenizer.pad(encodings, rows * size)
        shaped = lambda x: x.reshape(rows, size, x.shape[-1])  # noqa: E731
        side = Side(hashes=hashes, ids=shaped(padded.input_ids), mask=shaped(padded.attention_mask),
                    types=shaped(padded.token_type_ids))
    index = np.full(rows, -1, np.int32)
    index[:n] = indices
    return Batch(a=side, packed=packed, labels=labels, teacher=teacher, valid=np.arange(rows) < n, index=index)


__all__ = ["PairFormat", "candidate_groups", "collate_pairs"]
