"""grain pipelines: records -> tokenized, length-bucketed host batches, with a checkpointable iterator.

A *source* is anything with ``len`` and random access: a list from ``embedjax.data.readers``
(``str`` / ``Pair`` / ``Triplet`` / ``ScoredPair`` / ``NLIPair`` / ``DistillRecord``), a list of
dicts, a TFDS data source of an embedjax builder (dicts of UTF-8 bytes) or
``tfds_builders.tfds_source``. Each record is normalised by ``as_record`` to
``{text_a[, text_b][, text_n][, score][, teacher]}``; ``text_n`` is one text or a tuple of k
texts (several hard negatives, the same k in every record).

Training (``train_pipeline``), one epoch = one pass over the data:

    source -> index every record -> shuffle (seed; a new permutation each epoch, the same
    on every host) -> global batches of global_batch_size consecutive examples (drop_remainder)
    -> this host's 1/host_count slice of each global batch (hosts disjoint; the global batch
    is the same whatever the host count) -> tokenize + pad -> repeat(num_epochs)

Shapes are per host (each host pads to its own longest text or packs its own texts):
``embedjax.distributed.global_batch`` agrees them across hosts before the batch becomes
one global array.

Evaluation (``eval_pipeline``): no shuffle, nothing dropped; host h reads the h-th
contiguous block of the source; every host yields the same number of batches (the last
ones padded, ``valid`` says which rows are real; ``index`` says which example a row is).

A batch is an ``embedjax.data.batch.Batch`` of numpy arrays, rows = the per-host batch size:
its sides ``a`` / ``b`` / ``n`` (from text_a / text_b / text_n) padded to
``tokenize.bucket_for(longest text)`` with the hash of each raw text (0 on padding rows), or,
packed, the batch's ``PackedRows`` and each side's text indices; ``labels`` (the records'
scores), ``teacher`` (their teacher scores: the positive's, then each negative's; 0 on
padding rows), ``valid`` (False on padding rows; eval only pads) and ``index`` (each row's
example in the source, -1 on padding). With ``include_prompt=False`` and a prompt on a side,
its ``pool`` mask (or the packed rows') is 0 on the prompt's ``Tokenizer.prompt_length``
leading tokens.

Instructions (``prompts``): ``{"a": query prompt, "b": document prompt, "n": ...}`` prefixed
to that side's texts before tokenization (e.g. ``{"a": "Instruct: {task}\nQuery: "}`` with
``task`` filled in; a side absent or "" gets none); hashes are of the texts without them.

Equal hashes mean equal texts (up to 2^-32 collisions), so a loss can mask duplicate
texts in the global batch instead of treating them as negatives.

``DataIterator`` is a ``grain.DatasetIterator``: ``get_state()`` is a small JSON-able dict
(``json.dumps`` it, or save the iterator itself with ``grain.checkpoint.CheckpointSave`` in
the same Orbax step as the train state) and ``set_state`` resumes at the next batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from embedjax.data.batch import Batch, PackedRows, Side
from embedjax.tokenize import Tokenizer

TEXT_FIELDS = ("text_a", "text_b", "text_n")
FIELDS = (*TEXT_FIELDS, "score", "teacher", "relevant")
SIDES = {"text_a": "a", "text_b": "b", "text_n": "n"}
DEFAULT_READ_OPTIONS = dict(num_threads=2, prefetch_buffer_size=4)


# ---------------------------------------------------------------------------- records


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def as_record(x: Any) -> dict[str, Any]:
    """A reader row, dict (str or bytes values) or string as
    ``{text_a[, text_b][, text_n][, score][, teacher][, relevant]}``.

    ``text_n`` (and ``text_b``) stays one ``str``, or becomes a tuple when it is a list / tuple /
    array of texts (several hard negatives, several positives; ``None`` in a tuple is an empty
    slot); ``teacher`` becomes a tuple of float; ``score`` a float; ``relevant`` (the hashes of
    every document relevant to the query, ``retrieval_training``) a tuple of int.
    """
    if isinstance(x, str):
        return {"text_a": x}
    if isinstance(x, bytes):
        return {"text_a": x.decode("utf-8")}
    if dataclasses.is_dataclass(x):
        x = {f: getattr(x, f) for f in FIELDS if hasattr(x, f)}
    if not isinstance(x, Mapping):
        raise TypeError(f"a record must be a str, a dict or a reader dataclass, got {type(x).__name__}")
    out = {}
    for field in FIELDS:
        if field in x:
            value = x[field]
            if field == "score":
                out[field] = float(value)
            elif field == "teacher":
                if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                    raise TypeError(f"teacher must be a list of 1 + k numbers, got {type(value).__name__} {value!r}")
                out[field] = tuple(float(v) for v in value)
            elif field == "relevant":
                out[field] = tuple(int(v) for v in value)
            elif field in ("text_b", "text_n") and isinstance(value, (list, tuple, np.ndarray)):
                out[field] = tuple(None if v is None else _text(v) for v in value)
            else:
                out[field] = _text(value)
    if "text_a" not in out:
        raise KeyError(f"record has no text_a (keys: {sorted(x)})")
    return out


def text_hash(text: str) -> int:
    """A stable int32 hash of ``text`` (blake2b; not Python's per-process salted ``hash``), never 0:
    0 marks a padding row or an empty slot."""
    value = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest(), "little", signed=True)
    return value or 1


def fields_of(source) -> tuple[str, ...]:
    """The fields of the first record, in ``FIELDS`` order (every record must have the same)."""
    if len(source) == 0:
        raise ValueError("the data source is empty")
    first = as_record(source[0])
    return tuple(f for f in FIELDS if f in first)


def side_prompts(prompts: Mapping[str, str] | None, task: str | None = None) -> dict[str, str]:
    """``{"a": ..., "b": ..., "n": ...}`` with every side present ("" = no prompt) and ``{task}``
    replaced by ``task`` (plain replacement: other braces stay as they are)."""
    prompts = dict(prompts or {})
    unknown = sorted(set(prompts) - set(SIDES.values()))
    if unknown:
        raise ValueError(f"prompts has unknown sides {unknown}; sides are 'a' (text_a), 'b' (text_b), 'n' (text_n)")
    out = {}
    for side in SIDES.values():
        prompt = prompts.get(side) or ""
        if "{task}" in prompt:
            if task is None:
                raise ValueError(f"the {side!r} prompt {prompt!r} has a {{task}} placeholder but no task was given")
            prompt = prompt.replace("{task}", task)
        out[side] = prompt
    return out


def _texts_per_record(values: Sequence, items: Sequence[tuple[int, Any]], field: str) -> int | None:
    """k when every value of ``field`` (text_n or text_b) is a tuple of k texts, None when every
    one is a single text; mixed forms or counts raise ValueError naming the first record that differs."""
    what = "negative(s)" if field == "text_n" else "positive slot(s)"

    def count(v):
        return len(v) if isinstance(v, tuple) else None

    k = count(values[0])
    for (index, _), v in zip(items, values):
        if count(v) != k:
            form = lambda c: "a single text" if c is None else f"{c} {what}"  # noqa: E731
            raise ValueError(f"record {index} has {form(count(v))} in {field}, expected {form(k)} as record "
                             f"{items[0][0]} (every record of a batch needs the same number of {what})")
    if k == 0:
        raise ValueError(f"record {items[0][0]} has an empty list in {field}; expected at least one text")
    return k


def _relevant_hashes(values: Sequence[tuple[int, ...]], rows: int) -> np.ndarray:
    """(rows, P) int32 hashes of each record's relevant documents, 0-padded; P is a power of two
    (>= 8) so that a run compiles for a few widths, not one per batch."""
    width = max(8, 1 << max(0, max(len(v) for v in values) - 1).bit_length())
    out = np.zeros((rows, width), np.int32)
    for row, v in enumerate(values):
        out[row, :len(v)] = v
    return out


def _teacher_scores(values: Sequence[tuple[float, ...]], k: int, items: Sequence[tuple[int, Any]],
                    rows: int) -> np.ndarray:
    """(rows, 1 + k) float32 teacher scores, 0 on padding rows; ``k`` negatives per record."""
    out = np.zeros((rows, 1 + k), np.float32)
    for row, ((index, _), v) in enumerate(zip(items, values)):
        if len(v) != 1 + k:
            raise ValueError(f"record {index} has {len(v)} teacher score(s), expected 1 + {k} (the positive's, then "
                             f"one per hard negative)")
        out[row] = v
    return out


def collate(
    items: Sequence[tuple[int, Any]],
    tokenizer: Tokenizer,
    rows: int,
    fields: Sequence[str],
    preprocess: Callable[[str], str] | None = None,
    common_length: bool = False,
    packing: Packing | None = None,
    prompts: Mapping[str, str] | None = None,
    include_prompt: bool = True,
) -> Batch:
    """(index, record) pairs -> one ``Batch`` of ``rows`` rows (``embedjax.data.batch``).

    Each side is padded to the length bucket of its own longest text, or with
    ``common_length`` every side to the bucket of the longest text of the batch (one
    shape per bucket instead of one per combination of buckets: fewer compilations).
    With ``packing`` every text of the batch goes into shared packed rows instead (see
    ``Packing``). ``prompts`` (``side_prompts``' form, already filled in) prefix each side's
    texts; ``preprocess`` (e.g. lower-casing) then applies to prompt + text before
    tokenization, not to the hash. With ``include_prompt=False`` a side with a prompt gets a
    ``pool`` mask (padded) or, packed, the rows get one: 0 on the prompt's
    ``tokenizer.prompt_length(preprocess(prompt))`` leading tokens, which pooling then skips
    (``Encoder.encode`` skips the same count).

    Records whose ``text_n`` is a tuple of k texts give the negative side a k axis: its
    tokens are (rows, k, Ln), its ``hashes`` and, packed, ``text_index`` (rows, k); row i holds
    record i's negatives in order. ``teacher`` scores (1 + k per record, k = 1 for a single-text
    ``text_n``, 0 without one) become ``Batch.teacher`` (rows, 1 + k).
    """
    prompts = dict(prompts or {})
    skips = {}  # side -> leading tokens pooling skips
    if not include_prompt:
        for side, prompt in prompts.items():
            n = tokenizer.prompt_length(prompt if preprocess is None else preprocess(prompt))
            if n:
                skips[side] = n
    n = len(items)
    if n > rows:
        raise ValueError(f"{n} records do not fit in a batch of {rows} rows")
    records = [as_record(r) for _, r in items]
    labels = teacher = relevant = None
    encoded: dict[str, tuple[list[str], list]] = {}  # field -> (texts, encodings), flat over a k axis
    groups: dict[str, int] = {}  # field -> k, for a side with k texts per record
    for field in fields:
        try:
            values = [r[field] for r in records]
        except KeyError:
            bad = next(i for (i, _), r in zip(items, records) if field not in r)
            raise KeyError(f"record {bad} has no {field} (expected the fields {tuple(fields)} of record 0)") from None
        if field == "score":
            labels = np.zeros(rows, np.float32)
            labels[:n] = values
            continue
        if field == "teacher":
            teacher = values  # needs k, known once text_n is read
            continue
        if field == "relevant":
            relevant = _relevant_hashes(values, rows)
            continue
        if field in ("text_b", "text_n") and values:
            k = _texts_per_record(values, items, field)
            if k is not None:
                groups[field] = k
                values = [t for v in values for t in v]  # record-major: row i's k texts are adjacent
        prompt = prompts.get(SIDES[field], "")
        texts = ["" if t is None else t for t in values]  # an empty slot: tokenized, hash 0, masked by losses
        texts = [prompt + t for t in texts] if prompt else texts
        texts = texts if preprocess is None else [preprocess(t) for t in texts]
        encoded[field] = (values, tokenizer.encode(texts))
    if teacher is not None:
        teacher = _teacher_scores(teacher, groups.get("text_n", 1 if "text_n" in encoded else 0), items, rows)
    lead = {field: (rows,) if field not in groups else (rows, groups[field]) for field in encoded}
    hashes = {}
    for field, (values, _) in encoded.items():
        h = np.zeros(int(np.prod(lead[field])), np.int32)
        h[:len(values)] = [0 if t is None else text_hash(t) for t in values]
        hashes[SIDES[field]] = h.reshape(lead[field])
    if packing is not None:
        packed, text_index = _packed(encoded, tokenizer, rows, packing, skips, groups)
        sides = {side: Side(hashes=hashes.get(side, hashes["a"]), text_index=index)  # a second view: text_a's hash
                 for side, index in text_index.items()}
    else:
        packed, sides = None, {}
        longest = max((len(e.ids) for _, encs in encoded.values() for e in encs), default=1) if common_length else 1
        for field, (_, encodings) in encoded.items():
            side, shape = SIDES[field], lead[field]
            padded = tokenizer.pad(encodings, int(np.prod(shape)), min_length=longest)
            shaped = lambda x: x.reshape(*shape, x.shape[-1])  # noqa: E731
            mask = shaped(padded.attention_mask)
            pool = None
            if side in skips:
                pool = mask.copy()
                pool[..., :skips[side]] = 0
            sides[side] = Side(hashes=hashes[side], ids=shaped(padded.input_ids), mask=mask,
                               types=shaped(padded.token_type_ids), pool=pool)
    index = np.full(rows, -1, np.int32)
    index[:n] = [i for i, _ in items]
    return Batch(**sides, packed=packed, labels=labels, teacher=teacher, relevant=relevant,
                 valid=np.arange(rows) < n, index=index)


@dataclasses.dataclass(frozen=True)
class Packing:
    """Sequence packing for training batches: every text of the batch (all sides) shares
    rows of ``length`` tokens (``Tokenizer.pack``), instead of each side padded to its
    longest text. On STS-B, 922 real tokens a step of 32 pairs take 1,024 packed slots
    against ~2,600 padded ones.

    ``rows_multiple``: the row count is rounded up to a multiple of it (the number of
    local devices, at least, so rows shard evenly). ``views=2`` packs each text_a twice
    (records without text_b): unsupervised SimCSE's two dropout views of one text.

    The batch then holds ``PackedRows`` and, per side, ``Side.text_index`` (rows,): the index
    of each example's text among the packed texts (padding examples point at text 0); hashes,
    labels, valid and index as usual.
    """

    length: int = 64
    rows_multiple: int = 1
    views: int = 1


def _packed(encoded: dict[str, tuple[list[str], list]], tokenizer: Tokenizer, rows: int,
            packing: Packing, skips: Mapping[str, int] | None = None,
            groups: Mapping[str, int] | None = None) -> tuple[PackedRows, dict[str, np.ndarray]]:
    """``(PackedRows, {side: text_index})`` of ``encoded`` ({field: (texts, encodings)}, flat over
    a side's k axis when ``groups[field] = k``): each text index (rows,) or (rows, k)."""
    texts, index, text_skip = [], {}, []
    skips, groups = dict(skips or {}), dict(groups or {})
    sides = [(SIDES[f], f) for f in encoded]
    if packing.views == 2 and "text_b" not in encoded:
        sides.insert(1, ("b", "text_a"))
    for side, field in sides:
        encodings = encoded[field][1]
        lead = (rows,) if field not in groups else (rows, groups[field])
        ids = np.zeros(int(np.prod(lead)), np.int32)  # padding examples point at text 0
        ids[:len(encodings)] = np.arange(len(texts), len(texts) + len(encodings))
        index[side] = ids.reshape(lead)
        texts.extend(encodings)
        text_skip.extend([skips.get(SIDES[field], 0)] * len(encodings))  # a view of text_a: text_a's prompt
    packed = tokenizer.pack(texts, packing.length, packing.rows_multiple)
    pool = None
    if skips:  # per token: 1 where pooling reads it (a text token past its prompt), 0 elsewhere
        skip = np.asarray([0, *text_skip], np.int32)[packed.segment_ids]
        pool = ((packed.segment_ids > 0) & (packed.positions >= skip)).astype(np.int32)
    rows_ = PackedRows(ids=packed.input_ids, types=packed.token_type_ids, segments=packed.segment_ids,
                       positions=packed.positions, pool=pool)
    return rows_, index


# ---------------------------------------------------------------------------- iterator


class DataIterator(grain.DatasetIterator):
    """A checkpointable iterator over host batches.

    ``get_state()`` -> ``{"next_batch", "epoch", "batch_in_epoch", "fingerprint", "grain"}``
    (ints and strings only); ``set_state`` refuses a state whose fingerprint (data size,
    seed, sharding, batch size, epochs, fields) differs from this pipeline's.
    """

    def __init__(self, dataset: grain.MapDataset, *, batches_per_epoch: int, num_epochs: int | None,
                 fingerprint: str, read_options: grain.ReadOptions | None = None):
        self.dataset = dataset
        self.batches_per_epoch = batches_per_epoch
        self.num_epochs = num_epochs
        self.fingerprint = fingerprint
        self._it = dataset.to_iter_dataset(read_options or grain.ReadOptions(**DEFAULT_READ_OPTIONS)).__iter__()
        super().__init__(self._it)
        self._next = 0

    def __next__(self) -> Batch:
        batch = next(self._it)
        self._next += 1
        return batch

    @property
    def num_batches(self) -> int | None:
        """Batches in all (None: repeats forever)."""
        return None if self.num_epochs is None else self.num_epochs * self.batches_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch of the next batch (0-based)."""
        return self._next // self.batches_per_epoch

    def get_state(self) -> dict[str, Any]:
        return {
            "next_batch": self._next,
            "epoch": self.epoch,
            "batch_in_epoch": self._next % self.batches_per_epoch,
            "fingerprint": self.fingerprint,
            "grain": self._it.get_state(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(f"iterator state is for another pipeline:\n  state:    {state.get('fingerprint')}\n"
                             f"  pipeline: {self.fingerprint}")
        self._it.set_state(dict(state["grain"]))
        self._next = int(state["next_batch"])


# ---------------------------------------------------------------------------- pipelines


def _shard(shard_options) -> tuple[int, int]:
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    index, count = int(shard_options.shard_index), int(shard_options.shard_count)
    if not 0 <= index < count:
        raise ValueError(f"shard_index {index} not in 0..{count - 1}")
    return index, count


def _host_batch(global_batch_size: int, count: int) -> int:
    if global_batch_size < 1 or global_batch_size % count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the host count {count}")
    return global_batch_size // count


def train_pipeline(
    source,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
    preprocess: Callable[[str], str] | None = None,
    read_options: grain.ReadOptions | None = None,
    common_length: bool = False,
    packing: Packing | None = None,
    prompts: Mapping[str, str] | None = None,
    task: str | None = None,
    include_prompt: bool = True,
    pairs=None,
    transform: Callable[[Batch], Batch] | None = None,
) -> DataIterator:
    """Shuffled, sharded, repeated training batches of ``global_batch_size / host count`` rows.

    Args:
      source: records with ``len`` and random access (see the module docstring).
      tokenizer: the encoder's ``embedjax.tokenize.Tokenizer``.
      global_batch_size: rows per step over all hosts; each host yields its share.
      seed: shuffle seed; epoch e uses a different permutation derived from it.
      num_epochs: None repeats forever.
      shard_options: this host's ``shard_index`` / ``shard_count``; default
        ``grain.sharding.ShardByJaxProcess`` (``jax.process_index()`` / ``process_count()``).
        Each epoch has ``len(source) // global_batch_size`` global batches; every host
        takes its slice of each, so all hosts run the same number of steps.
      preprocess: text transform before tokenization (lower-casing, a prompt prefix).
      read_options: grain prefetch threads / buffer (default 2 threads, 4 batches).
      common_length: pad every side of a batch to one length bucket (see ``collate``).
      packing: pack all texts of a batch into shared rows instead of padding (``Packing``).
      prompts: instructions per side, ``{"a": query prompt, "b": document prompt, "n": ...}``
        (absent / "": none), e.g. ``{"a": "Instruct: {task}\nQuery: "}``; ``{task}`` is
        replaced by ``task``.
      include_prompt: False: pooling skips each prompt's tokens (``{side}_pool`` / ``p_pool``
        batch fields; ``embedjax.train.objective`` reads them), as ``Encoder.encode`` does
        with the encoder's own ``include_prompt=False``.
      pairs: a ``cross_batches.PairFormat``: cross-encoder batches of candidate groups
        (``cross_batches.collate_pairs``) instead of texts; prompts do not apply.
      transform: applied to every host batch, e.g. ``colbert.ColbertFormat`` (ColBERT's markers,
        query expansion and score masks).
    """
    index, count = _shard(shard_options)
    rows = _host_batch(global_batch_size, count)
    fields = fields_of(source)
    prompts = side_prompts(prompts, task)
    n = len(source)
    batches = n // global_batch_size
    if batches == 0:
        raise ValueError(f"{n} examples are fewer than the global batch of {global_batch_size}: "
                         "no full batch to train on")
    # Global batch k is examples [k*B, (k+1)*B) of the epoch's permutation whatever the host
    # count; host h takes rows [h*B/c, (h+1)*B/c) of it (the h-th of every c consecutive
    # host-sized blocks). So 1 host and c hosts see the same global batches, step by step.
    ds = _shuffled(source, seed)[:batches * global_batch_size]
    if pairs is not None:
        from embedjax.data.cross_batches import collate_pairs

        batch_fn = lambda items: collate_pairs(items, tokenizer, rows, pair_format=pairs,  # noqa: E731
                                               preprocess=preprocess, packing=packing)
    else:
        batch_fn = lambda items: collate(items, tokenizer, rows, fields, preprocess, common_length,  # noqa: E731
                                         packing, prompts, include_prompt)
    if transform is not None:
        collated = batch_fn
        batch_fn = lambda items: transform(collated(items))  # noqa: E731
    ds = ds.batch(rows, drop_remainder=True, batch_fn=batch_fn)
    ds = ds[index::count].repeat(num_epochs)
    fingerprint = (f"train n={n} seed={seed} shard={index}/{count} host_batch={rows} "
                   f"epochs={num_epochs} fields={','.join(fields)}" + ("" if pairs is None else f" pairs={pairs}")
                   + ("" if transform is None else f" transform={transform}"))
    return DataIterator(ds, batches_per_epoch=batches, num_epochs=num_epochs, fingerprint=fingerprint,
                        read_options=read_options)


def _shuffled(source, seed: int) -> grain.MapDataset:
    """``(record index, record)`` in the order of one epoch's permutation; an index past the
    end continues into the next epoch's permutation (grain's repeat)."""
    n = len(source)
    if hasattr(source, "record_at"):  # records that draw (positives, negatives) anew each epoch
        # grain passes the index in the repeated stream: i // n is the epoch, whatever the host count
        ds = grain.MapDataset.range(n).map_with_index(lambda i, _: (i % n, source.record_at(i % n, i // n, seed)))
    else:
        ds = grain.MapDataset.source(source).map_with_index(lambda i, r: (i % n, r))
    return ds.seed(seed).shuffle()


def training_order(source, *, global_batch_size: int, seed: int) -> grain.MapDataset:
    """The records ``train_pipeline(source, ..., global_batch_size, seed)`` trains on, untokenized:
    element k is global step k's list of ``(record index, record)`` (every host's rows, in host
    order), for every epoch. For feeding another trainer the very same batches (a benchmark)."""
    batches = len(source) // global_batch_size
    if batches == 0:
        raise ValueError(f"{len(source)} examples are fewer than the global batch of {global_batch_size}")
    ds = _shuffled(source, seed)[:batches * global_batch_size]
    return ds.batch(global_batch_size, drop_remainder=True, batch_fn=list).repeat(None)


def eval_pipeline(
    source,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    shard_options: grain.sharding.ShardOptions | None = None,
    preprocess: Callable[[str], str] | None = None,
    read_options: grain.ReadOptions | None = None,
    prompts: Mapping[str, str] | None = None,
    task: str | None = None,
    include_prompt: bool = True,
) -> DataIterator:
    """One pass over ``source`` in order, nothing dropped, the last batches padded (``valid``).
    ``prompts`` / ``task`` / ``include_prompt``: as ``train_pipeline``'s.

    Host h of c reads examples ``[h * ceil(n / c), (h + 1) * ceil(n / c))``; every host
    yields ``ceil(ceil(n / c) / rows)`` batches so multi-host evaluation stays in step.
    """
    index, count = _shard(shard_options)
    rows = _host_batch(global_batch_size, count)
    fields = fields_of(source)
    prompts = side_prompts(prompts, task)
    n = len(source)
    per_host = -(-n // count)
    start, stop = min(n, index * per_host), min(n, (index + 1) * per_host)
    batches = -(-per_host // rows)

    def make(k: int) -> Batch:
        ids = range(start + k * rows, min(stop, start + (k + 1) * rows))
        return collate([(i, source[i]) for i in ids], tokenizer, rows, fields, preprocess, prompts=prompts,
                       include_prompt=include_prompt)

    ds = grain.MapDataset.range(batches).map(make)
    fingerprint = f"eval n={n} shard={index}/{count} host_batch={rows} fields={','.join(fields)}"
    return DataIterator(ds, batches_per_epoch=batches, num_epochs=1, fingerprint=fingerprint,
                        read_options=read_options)


def steps_per_epoch(num_examples: int, global_batch_size: int, host_count: int = 1) -> int:
    """Training steps in one epoch (what ``train_pipeline`` yields per epoch on each host)."""
    _host_batch(global_batch_size, host_count)  # validates the split
    return num_examples // global_batch_size


__all__ = ["DataIterator", "Packing", "as_record", "collate", "eval_pipeline", "fields_of", "side_prompts",
           "steps_per_epoch", "text_hash", "train_pipeline"]
