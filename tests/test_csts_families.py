"""C-STS's tri-encoder and quadruplet objective (embedjax/tri_head.py, losses.quadruplet,
embedjax.data.csts.training_records, the ``csts`` evaluator's family "tri"): the head and the loss
against NumPy, the training batch's loss against PyTorch embeddings of the tiny BERT with the head
and losses in NumPy, the export round trip, and the records' pairing of a sentence pair's two
conditions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import special, stats

import embedjax
from embedjax import losses, tri_head
from embedjax.data import pipeline
from embedjax.data.csts import CSTSExample, condition_pairs, read_csts, training_records
from embedjax.eval import suite
from embedjax.train.config import DataConfig
from embedjax.train.encoders import split_trainable
from embedjax.train.objective import Objective, batch_loss
from embedjax.train.tasks import packing_for

pytestmark = pytest.mark.fast_compile

EXAMPLES = [CSTSExample("A man rides a red bike.", "A woman rides a blue bike.", "the colour of the bike", 1.0),
            CSTSExample("A woman rides a blue bike.", "A man rides a red bike.", "the vehicle", 5.0),
            CSTSExample("Two dogs play in snow.", "Three dogs run on grass.", "the number of animals", 2.0),
            CSTSExample("Two dogs play in snow.", "Three dogs run on grass.", "the kind of animal", 4.5),
            CSTSExample("A chef cooks pasta.", "A cook boils noodles.", "the food", 3.0),
            CSTSExample("A chef cooks pasta.", "A cook boils noodles.", "the speed", 3.0),  # a tie: no order
            CSTSExample("A girl sings.", "A boy dances.", "the activity", 2.5)]  # one condition only


def _np_head(head, s, c):
    """The tri-encoder head in NumPy (tri_head's docstring): c' = W c + b; s * c', or
    gelu(W_f [s; c'] + b_f) with the exact (erf) GELU."""
    head = jax.tree.map(np.asarray, head)
    c = c @ head["condition"]["kernel"] + head["condition"]["bias"]
    if "combine" not in head:
        return s * c
    x = np.concatenate([s, c], axis=-1) @ head["combine"]["kernel"] + head["combine"]["bias"]
    return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def _np_cos(a, b):
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _random_head(kind, dim, seed):
    head = tri_head.init(jax.random.key(seed), dim, kind)
    k1, k2 = jax.random.split(jax.random.key(seed + 100))
    head["condition"]["kernel"] += 0.3 * jax.random.normal(k1, (dim, dim))  # away from the identity start
    head["condition"]["bias"] += 0.1 * jax.random.normal(k2, (dim,))
    if kind == "concat":  # pre-activations of order 1, where GELU's curve shows
        head["combine"]["kernel"] *= 30.0
    return head


@pytest.mark.parametrize("kind", tri_head.KINDS)
def test_tri_head_conditions_and_scores_like_numpy(kind):
    rng = np.random.default_rng(0)
    s1, s2, c = (rng.normal(size=(5, 8)).astype(np.float32) for _ in range(3))
    head = _random_head(kind, 8, 1)
    assert tri_head.kind_of(head) == kind
    np.testing.assert_allclose(tri_head.condition(head, s1, c), _np_head(head, s1, c), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(tri_head.score(head, s1, s2, c), _np_cos(_np_head(head, s1, c), _np_head(head, s2, c)),
                               rtol=2e-5, atol=1e-6)
    if kind == "hadamard":  # a fresh hadamard head is the plain product
        np.testing.assert_allclose(tri_head.condition(tri_head.init(jax.random.key(0), 8), s1, c), s1 * c, rtol=1e-6)
    with pytest.raises(ValueError, match="tri_head must be one of"):
        tri_head.init(jax.random.key(0), 8, "sum")


def test_quadruplet_loss_matches_numpy_and_its_gradient_checks():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    n = rng.normal(size=(6, 2, 5))
    for margin in (1.0, 0.2):
        expected = np.mean([max(0.0, margin + (1 - _np_cos(a[i], b[i])) - (1 - _np_cos(n[i, 0], n[i, 1])))
                            for i in range(6)])
        assert float(losses.quadruplet(a, b, n, margin=margin)) == pytest.approx(expected, rel=1e-5)
    check_grads(lambda a, b, n: losses.quadruplet(a, b, n, margin=0.5), (jnp.asarray(a), jnp.asarray(b), jnp.asarray(n)),
                order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match=r"\(B, 2, D\)"):
        losses.quadruplet(a, b, n[:, 0])


def test_records_pair_each_sentence_pairs_two_conditions():
    assert [(h.condition, lo.condition) for h, lo in condition_pairs(EXAMPLES)] == [
        ("the vehicle", "the colour of the bike"), ("the kind of animal", "the number of animals")]
    tri = training_records(EXAMPLES, "tri_quadruplets")
    # the higher-scored row's sentence order (the two rows of the bike pair list them reversed)
    assert tri[0] == {"text_a": "A woman rides a blue bike.", "text_b": "A man rides a red bike.",
                      "text_n": ("the vehicle", "the colour of the bike")}
    bi = training_records(EXAMPLES, "conditioned_quadruplets", template="{sentence} | {condition}")
    assert bi[1] == {"text_a": "Two dogs play in snow. | the kind of animal",
                     "text_b": "Three dogs run on grass. | the kind of animal",
                     "text_n": ("Two dogs play in snow. | the number of animals",
                                "Three dogs run on grass. | the number of animals")}
    assert training_records(EXAMPLES, "tri")[2] == {"text_a": EXAMPLES[2].sentence1, "text_b": EXAMPLES[2].sentence2,
                                                    "text_n": EXAMPLES[2].condition, "score": 2.0}
    with pytest.raises(ValueError, match="data.csts_records must be one of"):
        training_records(EXAMPLES, "triplets")


def _torch_embed(model_dir, texts):
    """Mean-pooled last hidden states of the tiny BERT in PyTorch (transformers), unnormalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(str(model_dir)), AutoModel.from_pretrained(str(model_dir)).eval()
    enc = tok(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state.numpy()
    mask = enc["attention_mask"].numpy()[..., None]
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("records,loss,kind", [("tri", "cosine_mse", "concat"),
                                               ("tri_quadruplets", "quadruplet", "hadamard")])
def test_tri_encoder_batch_loss_matches_pytorch_embeddings_and_numpy(tiny_model, records, loss, kind):
    """Records -> packed batch (side n: the condition, or a pair's two) -> batch_loss, against the
    tiny BERT's PyTorch embeddings put through the head and the loss in NumPy."""
    encoder = embedjax.load_pretrained(tiny_model, tri_head=kind, seed=3)
    encoder.params[tri_head.KEY] = _random_head(kind, 32, 4)
    rows = training_records(EXAMPLES, records)
    kwargs = {"label_range": (1.0, 5.0)} if loss == "cosine_mse" else {"margin": 0.3}
    objective = Objective(loss=loss, loss_kwargs=tuple(kwargs.items()), dropout=False, tri_head=True)
    data = DataConfig(kind="csts", train="-", pack_length=64)
    records = [pipeline.as_record(r) for r in rows]
    batch = pipeline.collate(list(enumerate(records)), encoder.tokenizer, len(rows), pipeline.fields_of(records),
                             packing=packing_for(data, objective))
    got = float(batch_loss(encoder.params, encoder.cfg, objective, batch.model_inputs(), jax.random.key(0)))

    head = encoder.params[tri_head.KEY]
    z = lambda field: _torch_embed(tiny_model, [r[field] for r in rows])  # noqa: E731
    za, zb = z("text_a"), z("text_b")
    if loss == "cosine_mse":
        c = z("text_n")
        cos = _np_cos(_np_head(head, za, c), _np_head(head, zb, c))
        expected = np.mean((cos - (np.array([r["score"] for r in rows]) - 1) / 4) ** 2)
    else:
        hi, lo = (_torch_embed(tiny_model, [r["text_n"][i] for r in rows]) for i in (0, 1))
        d_hi = 1 - _np_cos(_np_head(head, za, hi), _np_head(head, zb, hi))
        d_lo = 1 - _np_cos(_np_head(head, za, lo), _np_head(head, zb, lo))
        expected = np.mean(np.maximum(0.3 + d_hi - d_lo, 0))
    assert got == pytest.approx(expected, rel=1e-4)


def test_tri_encoder_exports_its_head_and_evaluates_like_numpy(tiny_model, tmp_path):
    """save_pretrained writes tri_head.safetensors; load_pretrained reads it back; the csts evaluator
    of family "tri" is scipy's Spearman of the NumPy-conditioned PyTorch embeddings."""
    encoder = embedjax.load_pretrained(tiny_model, tri_head="concat", seed=0)
    encoder.params[tri_head.KEY] = _random_head("concat", 32, 5)
    embedjax.save_pretrained(encoder, tmp_path / "tri")
    loaded = embedjax.load_pretrained(tmp_path / "tri")  # the export's head, with no argument
    for a, b in zip(jax.tree.leaves(encoder.params[tri_head.KEY]), jax.tree.leaves(loaded.params[tri_head.KEY])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="tri-encoder head is 'concat', not 'hadamard'"):
        embedjax.load_pretrained(tmp_path / "tri", tri_head="hadamard")
    assert tri_head.KEY not in embedjax.load_pretrained(tiny_model).params  # a bi-encoder stays one

    path = tmp_path / "c.csv"
    path.write_text("sentence1,sentence2,condition,label\n" +
                    "".join(f'"{e.sentence1}","{e.sentence2}","{e.condition}",{e.label}\n' for e in EXAMPLES))
    evaluator = suite.build("c", {"type": "csts", "path": str(path), "split": "all", "family": "tri", "batch_size": 8})
    got = dict(evaluator.run(loaded))
    head = encoder.params[tri_head.KEY]
    z = lambda field: _torch_embed(tiny_model, [getattr(e, field) for e in EXAMPLES])  # noqa: E731
    c = z("condition")
    cos = _np_cos(_np_head(head, z("sentence1"), c), _np_head(head, z("sentence2"), c))
    assert got["c/cosine_spearman"] == pytest.approx(100 * stats.spearmanr(cos, [e.label for e in EXAMPLES])[0],
                                                     abs=1e-4)
    assert read_csts(path)[0] == EXAMPLES[0]
    with pytest.raises(ValueError, match="needs a tri-encoder"):
        dict(evaluator.run(embedjax.load_pretrained(tiny_model)))
    with pytest.raises(ValueError, match=r"\['template'\] apply to family 'bi'"):
        suite.build("c", {"type": "csts", "path": str(path), "family": "tri", "template": "{sentence}"})


def test_lora_trains_the_tri_head_and_the_objective_refuses_what_it_cannot_condition():
    params = {"layer": {"kernel": np.zeros(2), "lora_a": np.zeros(2)}, tri_head.KEY: {"condition": {"kernel": 1.0}}}
    trainable, _ = split_trainable(params, adapters_only=True)
    assert trainable[tri_head.KEY]["condition"]["kernel"] is not None and trainable["layer"]["kernel"] is None
    declared = {"loss": "cosine_mse", "loss_kwargs": {}, "matryoshka_dims": (64,), "matryoshka_weights": None,
                "matryoshka_n_per_step": 0, "layers": None, "layer_kwargs": {}, "remat": False, "unroll": True,
                "dropout": True, "gradcache_chunk": 0, "aux_losses": {}, "distill": {"teacher": None, "weight": 0.0,
                                                                                       "loss": "mse"}, "guide": None,
                "negatives_exchange": "gathered"}
    with pytest.raises(ValueError, match="matryoshka_dims, distill and guide do not apply"):
        Objective.from_config(declared, "mean", tri_head=True)
    from embedjax.train.loss_specs import check_objective_data

    with pytest.raises(ValueError, match="reads each record's condition from text_n"):
        check_objective_data(Objective(loss="cosine_mse", tri_head=True), ("text_a", "text_b", "score"), [1.0])
    check_objective_data(Objective(loss="cosine_mse", loss_kwargs=(("label_range", (1.0, 5.0)),), tri_head=True),
                         ("text_a", "text_b", "text_n", "score"), [1.0, 5.0])
