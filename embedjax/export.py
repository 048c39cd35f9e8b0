"""Export an encoder as a Hugging Face / sentence-transformers directory.

The directory holds ``config.json`` + ``model.safetensors`` (loadable by transformers'
``AutoModel``), the tokenizer files, and the sentence-transformers modules (Transformer,
Pooling, Normalize), so ``SentenceTransformer(dir)`` and ``embedjax.load_pretrained(dir)``
both give the same embeddings.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from safetensors.numpy import save_file

from embedjax import hf

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "added_tokens.json")
# embedjax pooling -> sentence-transformers Pooling flag.
_ST_POOLING = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "weighted_mean": "pooling_mode_weightedmean_tokens",
    "last_token": "pooling_mode_lasttoken",
}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def save_pretrained(encoder, directory: str | Path, *, params=None, normalize: bool = True) -> Path:
    """Writes ``encoder`` (with ``params`` if given, e.g. trained ones) to ``directory``.

    The tokenizer files are copied from the checkpoint the encoder was loaded from.
    Returns the directory. Files are written next to whatever else is there (a
    training workdir keeps its checkpoints and metrics beside the export).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = encoder.params if params is None else params
    cfg = encoder.cfg
    tmp = directory / "model.safetensors.tmp"
    save_file(hf.state_dict_from_params(params, cfg), str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / "model.safetensors")  # atomic: never a half-written model file
    _write_json(directory / "config.json", {**cfg.to_hf(), "torch_dtype": "float32"})
    if encoder.path is not None and Path(encoder.path).resolve() != directory.resolve():
        for name in TOKENIZER_FILES:
            src = Path(encoder.path) / name
            if src.is_file():
                shutil.copyfile(src, directory / name)

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if encoder.pooling in _ST_POOLING:
        pool = {"word_embedding_dimension": cfg.hidden_size, **{flag: False for flag in _ST_POOLING.values()},
                _ST_POOLING[encoder.pooling]: True, "include_prompt": encoder.include_prompt}
        _write_json(directory / "1_Pooling" / "config.json", pool)
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    else:
        log.warning("pooling %r has no sentence-transformers equivalent: exported without a Pooling module "
                    "(embedjax.load_pretrained(dir, pooling=%r) reproduces it)", encoder.pooling, encoder.pooling)
    if normalize:
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    _write_json(directory / "modules.json", modules)
    _write_json(directory / "sentence_bert_config.json",
                {"max_seq_length": encoder.max_length, "do_lower_case": encoder.lowercase})
    _write_json(directory / "config_sentence_transformers.json",
                {"prompts": encoder.prompts, "default_prompt_name": encoder.default_prompt_name,
                 "similarity_fn_name": "cosine", "__version__": {"embedjax": __import__("embedjax").__version__}})
    return directory
