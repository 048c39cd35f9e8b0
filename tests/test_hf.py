"""Checkpoint import: layouts (single, sharded, prefixed, hub cache), clear errors, export round trip."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from embedjax import hf
from embedjax.encoders import bert
from test_encoders import make_tiny, random_batch, torch_hidden


def _same_params(a, b):
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_sharded_safetensors_with_index(tmp_path):
    model = make_tiny("bert", tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    one, _, _ = hf.load_checkpoint(tmp_path / "one")
    sharded, _, _ = hf.load_checkpoint(tmp_path / "sharded")
    _same_params(one, sharded)


def test_task_model_with_prefix_and_heads_loads_the_encoder(tmp_path):
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    mlm = transformers.BertForMaskedLM(cfg).eval()  # keys 'bert.*' plus an 'cls.*' head
    mlm.save_pretrained(tmp_path, safe_serialization=True)
    assert any(k.startswith("bert.") for k in load_file(str(tmp_path / "model.safetensors")))
    params, ecfg, _ = hf.load_checkpoint(tmp_path)
    ids, mask, types = random_batch(np.random.default_rng(0), ecfg)
    want = torch_hidden(mlm.bert, ids, mask, types)
    got = np.asarray(bert.apply(params, ecfg, ids, mask, token_type_ids=types))
    valid = mask[None, :, :, None] > 0
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=2e-5)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    make_tiny("bert", tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["encoder.layer.1.attention.self.key.weight"]
    state["encoder.layer.1.attention.self.rotary.weight"] = np.zeros(3, np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(hf.CheckpointError) as err:
        hf.load_checkpoint(tmp_path)
    msg = str(err.value)
    assert "missing (1): ['encoder.layer.1.attention.self.key.weight']" in msg
    assert "unexpected (1): ['encoder.layer.1.attention.self.rotary.weight']" in msg


def test_shape_mismatch_with_config_is_reported(tmp_path):
    make_tiny("bert", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(hf.CheckpointError, match=r"'up'\]\['kernel'\]: checkpoint \(3, 32, 64\) vs config \(3, 32, 48\)"):
        hf.load_checkpoint(tmp_path)


def test_unsupported_architecture_and_bad_files(tmp_path):
    make_tiny("bert", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2Model"]}))
    with pytest.raises(ValueError, match=r"unsupported architecture model_type='gpt2' \(architectures=\['GPT2Model'\]\)"):
        hf.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert",\n "hidden_size": }')
    with pytest.raises(hf.CheckpointError, match=r"config.json: invalid JSON at line 2"):
        hf.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(hf.CheckpointError, match=r"no \*\.safetensors weights \(found \[.*'pytorch_model.bin'\]\)"):
        hf.load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face hub id"):
        hf.load_checkpoint(tmp_path / "does not exist")


def test_unsupported_sentence_transformers_module_is_refused(minilm_path, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(minilm_path, d, ignore=shutil.ignore_patterns("model.safetensors"))
    modules = json.loads((d / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (d / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(hf.CheckpointError, match="module 'sentence_transformers.models.Dense' is not supported"):
        hf.read_sentence_transformers(d)


def test_hub_id_resolves_through_the_huggingface_hub_cache(minilm_path, tmp_path, monkeypatch):
    """The online code path (huggingface_hub.snapshot_download), served from a local cache offline."""
    import embedjax

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--mini" / "snapshots" / "0123abcd"
    shutil.copytree(minilm_path, snapshot, ignore=shutil.ignore_patterns("model.safetensors"))
    (snapshot / "model.safetensors").symlink_to(minilm_path / "model.safetensors")
    (cache / "models--acme--mini" / "refs").mkdir()
    (cache / "models--acme--mini" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache), raising=False)
    enc = embedjax.load_pretrained("acme/mini")
    assert enc.path == snapshot and enc.pooling == "mean"
    with pytest.raises(FileNotFoundError, match="acme/absent: not a local directory, and the Hugging Face hub download failed"):
        embedjax.load_pretrained("acme/absent")


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_export_round_trip_loads_in_pytorch(arch, tmp_path):
    """state_dict_from_params writes what transformers loads and runs identically."""
    make_tiny(arch, tmp_path / "src")
    params, cfg, _ = hf.load_checkpoint(tmp_path / "src")
    params = jax.tree.map(lambda x: x + 0.01, params)  # not the source weights
    out = tmp_path / "out"
    out.mkdir()
    save_file(hf.state_dict_from_params(params, cfg), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_hf()))
    model = transformers.AutoModel.from_pretrained(str(out), add_pooling_layer=False).eval()
    ids, mask, types = random_batch(np.random.default_rng(3), cfg)
    want = torch_hidden(model, ids, mask, types)
    got = np.asarray(bert.apply(params, cfg, ids, mask, token_type_ids=types))
    valid = mask[None, :, :, None] > 0
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, want, 0), atol=2e-5)
