"""Evaluation encodes on every device: 8 devices (and 2 hosts x 4 devices) give the 1-device embeddings
and the same metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from embedjax import distributed, sharding
from embedjax.eval import base
from conftest import subprocess_xla_flags  # tests/ is on sys.path

pytestmark = pytest.mark.fast_compile  # checks logic, not speed or PyTorch parity (conftest.py)

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["A man is playing a flute.", "", "Two dogs run on the beach while the sun sets behind the hills.",
         "x", "A woman slices an onion."] * 7


def test_encode_on_eight_devices_is_the_one_device_encode(minilm):
    assert jax.local_device_count() == 8
    one = minilm.encode(TEXTS, batch_size=16)  # the default device
    eight = minilm.encode(TEXTS, batch_size=16, mesh=sharding.local_mesh())
    np.testing.assert_allclose(eight, one, atol=1e-6)
    np.testing.assert_allclose(base.encode(minilm, TEXTS, batch_size=16), one, atol=1e-6)
    # prompts, depth truncation and batch sizes that are not a multiple of 8 shard the same way
    kw = dict(prompt="query: ", num_layers=3)
    np.testing.assert_allclose(base.encode(minilm, TEXTS, batch_size=5, **kw),
                               minilm.encode(TEXTS, batch_size=5, **kw), atol=1e-6)


def test_encode_follows_the_checkpoint_normalisation(minilm):
    """As SentenceTransformer.encode: unit vectors exactly when the checkpoint has a Normalize module."""
    import dataclasses

    assert minilm.normalize  # all-MiniLM-L6-v2 has a Normalize module
    np.testing.assert_allclose(np.linalg.norm(base.encode(minilm, TEXTS[:5]), axis=1), 1.0, atol=1e-5)
    raw = dataclasses.replace(minilm, normalize=False)
    got = base.encode(raw, TEXTS[:5])
    np.testing.assert_allclose(got, minilm.encode(TEXTS[:5], normalize=False), rtol=1e-5, atol=1e-5)  # norms ~4
    assert np.abs(np.linalg.norm(got, axis=1) - 1).max() > 0.1


def _launch(out: Path, model, evals: dict, processes: int, devices: int = 8, cross_encoder: Path | None = None):
    script = REPO / "tests" / "eval_on_hosts.py"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": subprocess_xla_flags(devices // processes),
           **({"CROSS_ENCODER": str(cross_encoder)} if cross_encoder else {})}
    env.pop(distributed.COORDINATOR_ENV, None)
    from test_multihost import free_port  # noqa: E402  (tests/ is on sys.path)

    port = free_port()
    extra = lambda i: [str(port), str(processes), str(i)] if processes > 1 else []  # noqa: E731
    args = [sys.executable, str(script), str(out), str(model), json.dumps(evals)]
    procs = [subprocess.Popen(args + extra(i), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    try:
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(np.load(f"{out}.process{i}.npz")["embeddings"], json.loads(Path(f"{out}.process{i}.json").read_text()))
            for i in range(processes)]


def test_two_hosts_encode_and_evaluate_like_one(tiny_model, tiny_cross_encoder, small_dev, small_beir, tmp_path):
    """2 processes x 2 devices: each host encodes its share; every host ends with the full
    embeddings and the metrics of 1 process x 8 devices (2 x 2 rather than 2 x 4: gloo makes every
    device a rank of each collective, see test_multihost.launch), retrieval's corpus sharded over both
    hosts' devices (binary too), and a cross-encoder's reranking of the top 20 (each host scores
    a share of the pairs)."""
    evals = {"dev": {"type": "sts", "path": str(small_dev), "format": "stsb"},
             "ir": {"type": "retrieval", "path": str(small_beir), "split": "dev", "k_values": (1, 10),
                    "quantize": ("binary",)}}
    [(want, one)] = _launch(tmp_path / "one", tiny_model, evals, processes=1, cross_encoder=tiny_cross_encoder)
    assert one["process_count"] == 1 and one["devices"] == 8
    assert {"dev/cosine_spearman", "ir/ndcg@10", "ir/ndcg@10@binary", "ir/rerank@20/ndcg@10"} <= one["metrics"].keys()
    two = _launch(tmp_path / "two", tiny_model, evals, processes=2, devices=4, cross_encoder=tiny_cross_encoder)
    for embeddings, result in two:
        assert result["process_count"] == 2 and result["devices"] == 4
        np.testing.assert_allclose(embeddings, want, atol=1e-6)
        assert result["metrics"].keys() == one["metrics"].keys()
        for key, value in one["metrics"].items():
            assert result["metrics"][key] == pytest.approx(value, abs=1e-4), key  # x100 scores of 1e-6-equal vectors
