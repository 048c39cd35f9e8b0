"""infonce's multi-positive, qrels-aware, false-negative-aware, multi-direction and hardness
options against a naive NumPy loop written here and against sentence-transformers itself;
gradients; the batch sharded over 8 devices."""
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentence_transformers.sentence_transformer.losses as stl  # the `test` extra: imported, never skipped
import torch
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from embedjax import losses as L

pytestmark = pytest.mark.fast_compile  # checks logic against NumPy references, not speed (conftest.py)

RNG = np.random.default_rng(7)
ALL4 = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


# ---------------------------------------------------------------- naive reference


def np_cos(x, y):
    nx = math.sqrt(sum(float(v) ** 2 for v in x))
    ny = math.sqrt(sum(float(v) ** 2 for v in y))
    return sum(float(x[t]) * float(y[t]) for t in range(len(x))) / (max(nx, 1e-12) * max(ny, 1e-12))


def np_lse(values):
    mx = max(values)
    return mx + math.log(sum(math.exp(v - mx) for v in values))


def np_contrastive(a, p, n=None, *, scale=20.0, pmask=None, a_ids=None, p_ids=None, n_ids=None, rel=None,
                   rel_mask=None, all_positives=False, directions=("query_to_doc",), fn_margin=None,
                   fn_relative=None, guide=None, hardness=0.0, hardness_mode="all_negatives"):
    """The documented loss, one row and one candidate at a time (float64)."""
    b = len(a)
    p = p if p.ndim == 3 else p[:, None]
    m, k = p.shape[1], 0 if n is None else n.shape[1]
    ga, gp, gn = guide if guide is not None else (a, p, n)
    gp = gp if gp.ndim == 3 else gp[:, None]
    if guide is not None and fn_margin is None and fn_relative is None:
        fn_margin = 0.0
    fn_on = fn_margin is not None or fn_relative is not None

    def real(i, j):
        return pmask is None or bool(pmask[i][j])

    docs = []  # every candidate document: [slots of query 0, ..., slots of query B-1, negatives ...]
    for i in range(b):
        for jj in range(m):
            docs.append(dict(v=p[i, jj], g=gp[i, jj], query=i, slot=True, real=real(i, jj),
                             id=None if p_ids is None else int(np.reshape(p_ids, (b, m))[i][jj])))
    for i in range(b):
        for kk in range(k):
            docs.append(dict(v=n[i, kk], g=gn[i, kk], query=i, slot=False, real=True,
                             id=None if n_ids is None else int(n_ids[i][kk])))

    def own(i):  # ids that are never a negative of query i
        ids = set()
        if a_ids is not None:
            ids.add(int(a_ids[i]))
        if p_ids is not None:
            ids |= {d["id"] for d in docs if d["query"] == i and d["slot"] and d["real"]}
        if rel is not None:
            ids |= {int(rel[i][t]) for t in range(len(rel[i])) if rel_mask is None or rel_mask[i][t]}
        return ids

    def penalised(i, d):
        own_doc = d["query"] == i
        return {"hard_negatives": own_doc and not d["slot"], "in_batch_negatives": not own_doc,
                "all_negatives": not (own_doc and d["slot"])}[hardness_mode]

    rows = []  # (query, target doc indices)
    slot_index = {(i, jj): i * m + jj for i in range(b) for jj in range(m)}
    for i in range(b):
        real_slots = [slot_index[i, jj] for jj in range(m) if real(i, jj)]
        if all_positives and m > 1:
            if real_slots:
                rows.append((i, real_slots))
        else:
            rows.extend((i, [c]) for c in real_slots)

    total = 0.0
    for i, targets in rows:
        thr = min(np_cos(ga[i], docs[c]["g"]) for c in targets)

        def false_negative(rule_score):
            return fn_on and ((fn_margin is not None and rule_score > thr + fn_margin)
                              or (fn_relative is not None and rule_score > fn_relative * thr))

        def q2d_logit(c):
            s = np_cos(a[i], docs[c]["v"])
            return scale * s + (hardness * s if hardness and penalised(i, docs[c]) else 0.0)

        entries = []
        for c, d in enumerate(docs):  # query_to_doc
            if c in targets:
                entries.append(q2d_logit(c))
            elif (d["real"] and not (d["query"] == i and d["slot"] and not (all_positives and m > 1))
                  and d["id"] not in own(i) and not false_negative(np_cos(ga[i], d["g"]))):
                entries.append(q2d_logit(c))
        if "query_to_query" in directions:
            for l in range(b):
                if (l != i and (a_ids is None or int(a_ids[l]) not in own(i))
                        and not false_negative(np_cos(ga[i], ga[l]))):
                    entries.append(scale * np_cos(a[i], a[l]))
        target = docs[targets[0]]
        if "doc_to_query" in directions:
            for l in range(b):
                keep = l == i or (
                    (a_ids is None or a_ids[l] != a_ids[i])
                    and (target["id"] is None or target["id"] not in own(l))
                    and not false_negative(np_cos(ga[l], target["g"]))
                )
                if keep:
                    entries.append(scale * np_cos(a[l], target["v"]))
        if "doc_to_doc" in directions:
            for d in docs:
                if (d["query"] != i and d["real"] and d["id"] not in own(i)
                        and not false_negative(np_cos(target["g"], d["g"]))):
                    entries.append(scale * np_cos(target["v"], d["v"]))
        total += np_lse(entries) - np_lse([q2d_logit(c) for c in targets])
    return total / len(rows)


def rand(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def j(x):
    return None if x is None else jnp.asarray(x)


def ours(a, p, n=None, *, pmask=None, a_ids=None, p_ids=None, n_ids=None, rel=None, rel_mask=None, guide=None, **kw):
    return L.infonce(j(a), j(p), j(n), positive_mask=j(pmask), anchor_ids=j(a_ids), positive_ids=j(p_ids),
                     negative_ids=j(n_ids), relevant_ids=j(rel), relevant_mask=j(rel_mask),
                     guide=None if guide is None else tuple(j(g) for g in guide), **kw)


# ---------------------------------------------------------------- a batch with everything in it

B, M, D, DG = 6, 3, 16, 12


def make_batch(k, seed=0):
    """B queries with M slots (padded, row 4 without any real one), k hard negatives, ids with
    repeated texts and qrels, and a guide of another width. Repeated texts are near copies (not
    bit copies), so the false-negative rule never sits exactly on its threshold."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.normal(size=s).astype(np.float32)
    topic = r(B, D)
    p = topic[:, None] + 0.5 * r(B, M, D)  # a query and its positives share a topic: a realistic spread
    a = topic + 0.5 * r(B, D)
    n = r(B, k, D) if k else None
    p[1, 1] = p[0, 1] + 0.01 * r(D)  # query 0's second positive is also query 1's
    a[5] = a[2] + 0.01 * r(D)  # queries 2 and 5 are the same text
    pmask = np.ones((B, M), bool)
    pmask[0, 2] = pmask[3, 1] = pmask[3, 2] = False
    pmask[4] = False
    a_ids = np.array([100, 101, 102, 103, 104, 102])
    p_ids = np.arange(B * M).reshape(B, M)  # id 0 is a real id
    p_ids[1, 1] = p_ids[0, 1]
    n_ids = None if not k else 50 + np.arange(B * k).reshape(B, k)
    rel = np.array([[0, 1, 11, 0], [3, 4, 1, 0], [6, 7, 0, 0], [9, 3, 0, 0], [12, 0, 0, 0], [15, 16, 6, 7]])
    rel_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    if k:
        rel[3, 2], rel_mask[3, 2] = n_ids[1, 0], True  # another query's hard negative is relevant to query 3
        rel[2, 2], rel_mask[2, 2] = 0, True  # id 0 (query 0's first positive) is relevant to query 2
    proj = r(D, DG)
    guide = (a @ proj + 0.3 * r(B, DG), p @ proj + 0.3 * r(B, M, DG), None if not k else n @ proj + 0.3 * r(B, k, DG))
    ids = dict(a_ids=a_ids, p_ids=p_ids, n_ids=n_ids, rel=rel, rel_mask=rel_mask)
    return a, p, n, pmask, ids, guide


CASES = {
    # one positive per query; every id mask; the four directions; hardness on in-batch negatives
    "m1_ids_all4_hard_inbatch": dict(m1=True, ids=True, directions=ALL4, hardness=9.0,
                                     hardness_mode="in_batch_negatives"),
    # padded slots, qrels, one row per slot, four directions, an absolute margin
    "each_ids_all4_margin": dict(ids=True, directions=ALL4, fn_margin=-0.2),
    # CoDiEmb multi-positive rows, query_to_query, relative rule, hardness on hard negatives
    "all_ids_q2q_relative_hard": dict(ids=True, all_positives=True, directions=ALL4[:2], fn_relative=0.95, scale=5.0,
                                      hardness=5.0, hardness_mode="hard_negatives"),
    # guide with both rules, symmetric pair of directions, hardness everywhere
    "each_guide_both_rules_d2q": dict(ids=True, guide=True, directions=("query_to_doc", "doc_to_query"),
                                      fn_margin=-0.1, fn_relative=0.9, hardness=3.0),
    # multi-positive rows read the guide, no ids
    "all_guide_margin": dict(guide=True, all_positives=True, fn_margin=0.1),
    # no ids at all, doc_to_doc, the guide alone (fn_margin 0 implied)
    "each_noids_d2d_guide_hard_inbatch": dict(guide=True, directions=("query_to_doc", "doc_to_doc"), hardness=2.0,
                                              hardness_mode="in_batch_negatives"),
}


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_naive(name, k):
    case = dict(CASES[name])
    a, p, n, pmask, ids, guide = make_batch(k)
    kw = {}
    if case.pop("m1", False):
        p, pmask, guide = p[:, 0], None, (guide[0], guide[1][:, 0], guide[2])
        ids = dict(ids, p_ids=ids["p_ids"][:, 0])
    else:
        kw["pmask"] = pmask
    if case.pop("ids", False):
        kw.update(ids)
    if case.pop("guide", False):
        kw["guide"] = guide
    kw.update(case)
    got = float(ours(a, p, n, **kw))
    np.testing.assert_allclose(got, np_contrastive(a, p, n, **kw), rtol=1e-5)
    if "fn_margin" in kw or "fn_relative" in kw or "guide" in kw:  # the rule masks something here
        plain = {key: v for key, v in kw.items() if key not in ("fn_margin", "fn_relative", "guide")}
        assert abs(np_contrastive(a, p, n, **plain) - got) > 1e-4  # 10x the tolerance at least


def test_default_layouts_agree():
    """(B, 1, D) positives = (B, D); all_positives with one slot = one row per slot; no mask = all real."""
    a, p, n, _, ids, _ = make_batch(2)
    p1 = p[:, :1]
    base = float(ours(a, p1[:, 0], n, p_ids=ids["p_ids"][:, 0]))
    np.testing.assert_allclose(float(ours(a, p1, n, p_ids=ids["p_ids"][:, :1])), base, rtol=1e-6)
    np.testing.assert_allclose(float(ours(a, p1, n, p_ids=ids["p_ids"][:, :1], all_positives=True)), base, rtol=1e-6)
    np.testing.assert_allclose(float(ours(a, p1, n, pmask=np.ones((B, 1), bool), p_ids=ids["p_ids"][:, :1])), base,
                               rtol=1e-6)


# ---------------------------------------------------------------- against sentence-transformers


def st_mnrl(a, p, n, **kw):
    loss = stl.MultipleNegativesRankingLoss(None, **kw)  # the model is only used by forward
    cols = [a, p] + ([] if n is None else [n[:, t] for t in range(n.shape[1])])  # ST: one column per negative
    cols = [torch.from_numpy(np.ascontiguousarray(c)) for c in cols]
    with torch.no_grad():
        return float(loss.compute_loss_from_embeddings(cols, None))


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("directions", [ALL4, ("query_to_doc", "doc_to_query")])
def test_mnrl_directions_and_hardness_vs_st(directions, k):
    a, p, n = rand(8, 16), rand(8, 16), rand(8, k, 16) if k else None
    a = p + 0.8 * a
    for mode, strength in ((None, 0.0), ("in_batch_negatives", 9.0), ("hard_negatives", 5.0), ("all_negatives", 3.0)):
        want = st_mnrl(a, p, n, scale=20.0, directions=directions, partition_mode="joint",
                       hardness_mode=mode, hardness_strength=strength)
        got = float(ours(a, p, n, directions=directions, hardness=strength, hardness_mode=mode or "all_negatives"))
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=str(mode))


ST_GIST = sys.modules[stl.GISTEmbedLoss.__module__]


def st_gist(monkeypatch, student, guide, *, temperature, margin, strategy, contrast_anchors, contrast_positives):
    """sentence-transformers' GISTEmbedLoss.forward on precomputed embeddings: no models, no
    tokenizers. ``embed_columns(model, features)`` is replaced by "the model is the embeddings"."""
    loss = stl.GISTEmbedLoss.__new__(stl.GISTEmbedLoss)
    torch.nn.Module.__init__(loss)
    loss.model, loss.guide = [torch.from_numpy(x) for x in student], [torch.from_numpy(x) for x in guide]
    loss.temperature, loss.similarity_fct = temperature, torch.nn.CosineSimilarity(dim=-1)
    loss.must_retokenize, loss.gather_across_devices = False, False
    loss.margin_strategy, loss.margin = strategy, margin
    loss.contrast_anchors, loss.contrast_positives = contrast_anchors, contrast_positives
    loss.cross_entropy_loss = torch.nn.CrossEntropyLoss()
    monkeypatch.setattr(ST_GIST, "embed_columns", lambda model, features: model)
    with torch.no_grad():
        return float(loss([{} for _ in student], None))


def test_gist_vs_st(monkeypatch):
    """GISTEmbed = our query_to_doc (+ query_to_query = its anchor-anchor block, + doc_to_doc =
    its positive-positive block) with ``guide``, ``scale = 1 / temperature`` and ``fn_margin =
    -margin`` (absolute strategy; GIST masks guide score > guide positive score - margin).

    Where they differ: GIST's positive-positive block holds positives only, our doc_to_doc every
    doc of the other queries, their hard negatives too: with hard negatives we compare without
    it. GIST's relative strategy masks > s_pos - |s_pos| * margin, our fn_relative > r * s_pos:
    the same with r = 1 - margin while every guide positive score is >= 0 (checked). GIST has
    no doc_to_query block (ours masks there too)."""
    rng = np.random.default_rng(3)
    r = lambda *s: rng.normal(size=s).astype(np.float32)
    b, d, dg = 8, 16, 12
    p, n = r(b, d), r(b, d)
    a = p + 1.5 * r(b, d)  # losses well above zero: float32 relative error stays small
    gp, gn = r(b, dg), r(b, dg)
    ga = gp + 1.2 * r(b, dg)  # a guide unsure enough to flag some in-batch candidates
    gpos = [np_cos(ga[i], gp[i]) for i in range(b)]
    assert min(gpos) > 0
    for margin in (0.0, 0.1):
        want = st_gist(monkeypatch, (a, p), (ga, gp), temperature=0.05, margin=margin, strategy="absolute",
                       contrast_anchors=True, contrast_positives=True)
        got = float(ours(a, p, scale=20.0, directions=("query_to_doc", "query_to_query", "doc_to_doc"),
                         guide=(ga, gp, None), fn_margin=-margin))
        np.testing.assert_allclose(got, want, rtol=1e-5)
        # One hard negative each: GIST without its positive-positive block.
        want = st_gist(monkeypatch, (a, p, n), (ga, gp, gn), temperature=0.05, margin=margin, strategy="absolute",
                       contrast_anchors=True, contrast_positives=False)
        got = float(ours(a, p, n, directions=("query_to_doc", "query_to_query"), guide=(ga, gp, gn), fn_margin=-margin))
        np.testing.assert_allclose(got, want, rtol=1e-5)
    want = st_gist(monkeypatch, (a, p), (ga, gp), temperature=0.05, margin=0.2, strategy="relative",
                   contrast_anchors=False, contrast_positives=False)
    got = float(ours(a, p, guide=(ga, gp, None), fn_relative=0.8))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Discriminating: the guide masks something (our default guide rule = GIST's margin 0).
    assert abs(float(ours(a, p, guide=(ga, gp, None))) - float(ours(a, p))) > 1e-3


# ---------------------------------------------------------------- gradients


def test_gradients_multi_positive_fn_rule_directions():
    a, p, n, pmask, ids, _ = make_batch(2, seed=1)
    with jax.enable_x64(True):
        a, p, n = (jnp.asarray(x, jnp.float64) for x in (a, p, n))
        kw = dict(positive_mask=j(pmask), anchor_ids=j(ids["a_ids"]), positive_ids=j(ids["p_ids"]),
                  negative_ids=j(ids["n_ids"]), relevant_ids=j(ids["rel"]), relevant_mask=j(ids["rel_mask"]),
                  scale=5.0, fn_margin=-0.2)  # no hardness: its stop_gradient term is not the numeric slope

        check_grads(lambda a, p, n: L.infonce(a, p, n, directions=ALL4, **kw), (a, p, n), order=1, modes=("rev",))
        check_grads(lambda a, p, n: L.infonce(a, p, n, directions=ALL4[:2], all_positives=True, **kw), (a, p, n),
                    order=1, modes=("rev",))

        # Masked everywhere -> zero gradient: the padded slots, and a hard negative relevant to every query.
        rel = np.concatenate([ids["rel"], np.full((B, 1), ids["n_ids"][3, 1])], axis=1)
        rel_mask = np.concatenate([ids["rel_mask"], np.ones((B, 1), bool)], axis=1)
        kw.update(relevant_ids=j(rel), relevant_mask=j(rel_mask))
        gp, gn = jax.grad(lambda p, n: L.infonce(a, p, n, directions=ALL4, **kw), argnums=(0, 1))(p, n)
        assert np.all(np.asarray(gp)[~pmask] == 0) and np.all(np.asarray(gp)[pmask].any(axis=-1))
        assert np.all(np.asarray(gn)[3, 1] == 0) and np.asarray(gn)[3, 0].any()


# ---------------------------------------------------------------- 8 devices


def test_sharded_equals_single_device():
    """Global batch of 16 over 8 devices: same loss and gradients, m = 2 with padding, qrels,
    both rules, a guide, the four directions."""
    assert len(jax.devices()) == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    row = NamedSharding(mesh, P("data"))
    b, m, k = 16, 2, 1
    a, p, n = rand(b, 8), rand(b, m, 8), rand(b, k, 8)
    a = p[:, 0] + 0.7 * a
    p[5, 1] = p[2, 0]  # one text, two queries' positive
    pmask = np.ones((b, m), bool)
    pmask[[1, 6, 11], 1] = False
    a_ids, p_ids, n_ids = np.arange(b) + 1000, np.arange(b * m).reshape(b, m), 500 + np.arange(b * k).reshape(b, k)
    p_ids[5, 1] = p_ids[2, 0]
    rel = np.stack([p_ids[:, 0], p_ids[(np.arange(b) + 3) % b, 0]], axis=1)
    rel_mask = np.zeros((b, 2), bool)
    rel_mask[:, 0] = rel_mask[::3, 1] = True
    guide = (rand(b, 12), rand(b, m, 12), rand(b, k, 12))
    batch = (a, p, n, pmask, a_ids, p_ids, n_ids, rel, rel_mask) + guide

    def objective(a, p, n, pmask, a_ids, p_ids, n_ids, rel, rel_mask, ga, gp, gn):
        return L.infonce(a, p, n, positive_mask=pmask, anchor_ids=a_ids, positive_ids=p_ids, negative_ids=n_ids,
                         relevant_ids=rel, relevant_mask=rel_mask, guide=(ga, gp, gn), directions=ALL4,
                         fn_margin=0.05, fn_relative=0.95, hardness=1.0)

    grad_fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2)))
    want_v, want_g = grad_fn(*map(j, batch))
    args = [jax.device_put(x, row) for x in batch]
    assert not args[0].sharding.is_fully_replicated
    got_v, got_g = grad_fn(*args)
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
    want = np_contrastive(a, p, n, pmask=pmask, a_ids=a_ids, p_ids=p_ids, n_ids=n_ids, rel=rel, rel_mask=rel_mask,
                          guide=guide, directions=ALL4, fn_margin=0.05, fn_relative=0.95, hardness=1.0)
    np.testing.assert_allclose(float(got_v), want, rtol=1e-5)


# ---------------------------------------------------------------- behaviour and errors


def test_relevant_ids_remove_a_positive_sitting_in_another_row():
    """Query 0 has two relevant docs; its second is query 1's positive. As a negative of query 0
    it costs; declared relevant it is masked and the loss drops."""
    p = rand(6, 16)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    a = p + 0.3 * rand(6, 16)
    a[0] = p[0] + p[1]  # query 0 is as close to one relevant doc as to the other: its row costs >= log 2
    p_ids = np.array([0, 1, 2, 3, 4, 5])
    rel = np.array([[0, 1]] + [[i, 0] for i in range(1, 6)])
    rel_mask = np.array([[True, True]] + [[True, False]] * 5)
    without = float(ours(a, p, p_ids=p_ids, scale=5.0))
    with_rel = float(ours(a, p, p_ids=p_ids, rel=rel, rel_mask=rel_mask, scale=5.0))
    assert with_rel < without - 0.05  # row 0 (of 6) paid about log 2 for the tie
    np.testing.assert_allclose(with_rel, np_contrastive(a, p, p_ids=p_ids, rel=rel, rel_mask=rel_mask, scale=5.0),
                               rtol=1e-5)


@pytest.mark.parametrize("kw, message", [
    (dict(directions=("query_to_query",)), "query_to_doc"),
    (dict(directions=("query_to_doc", "doc_to_everything")), "unknown directions"),
    (dict(hardness_mode="hardest"), "hardness_mode"),
    (dict(hardness=-1.0), "hardness"),
    (dict(symmetric=True, directions=("query_to_doc", "doc_to_query")), "symmetric"),
    (dict(symmetric=True, m=2), "symmetric"),
    (dict(all_positives=True, m=2, directions=("query_to_doc", "doc_to_query")), "all_positives"),
    (dict(all_positives=True, m=2, directions=("query_to_doc", "doc_to_doc")), "all_positives"),
    (dict(m=2, positive_mask=np.ones((4, 3), bool)), "positive_mask"),
    (dict(m=2, positive_ids=np.arange(4)), "positive_ids"),
    (dict(relevant_mask=np.ones((4, 2), bool)), "relevant_ids"),
    (dict(relevant_ids=np.arange(4)), "relevant_ids"),
    (dict(relevant_ids=np.zeros((4, 2), int), relevant_mask=np.ones((4, 3), bool)), "relevant_mask"),
    (dict(guide=(np.ones((4, 5)), np.ones((4, 5)), np.ones((4, 5)))), "guide negatives"),
    (dict(guide=(np.ones((4, 5)), np.ones((4, 2, 5)), None)), "guide positives"),
    (dict(guide=np.ones((4, 5))), "guide must be a tuple"),
    (dict(bad_positives=True), "positives"),
])
def test_bad_options_raise(kw, message):
    kw = dict(kw)
    m = kw.pop("m", 1)
    a, p = jnp.ones((4, 8)), jnp.ones((4, 8) if m == 1 else (4, m, 8))
    if kw.pop("bad_positives", False):
        p = jnp.ones((4, 7))
    with pytest.raises(ValueError, match=message):
        L.infonce(a, p, **kw)


def test_without_in_batch_negatives_only_the_own_documents_compete():
    """NV-Embed's second stage: row (i, j) scores b_ij against query i's own hard negatives (its other
    positive slots masked), nothing of the other queries; a plain float64 loop."""
    rng = np.random.default_rng(7)
    b, m, k, d = 5, 2, 2, 8
    a, p, n = (rng.normal(size=s).astype(np.float32) for s in ((b, d), (b, m, d), (b, k, d)))
    pmask = np.ones((b, m), bool)
    pmask[2, 1] = False
    total, rows = 0.0, 0
    for i in range(b):
        for slot in range(m):
            if not pmask[i, slot]:
                continue
            logits = [20.0 * np_cos(a[i], p[i, slot])] + [20.0 * np_cos(a[i], n[i, c]) for c in range(k)]
            total += np_lse(logits) - logits[0]
            rows += 1
    got = L.infonce(j(a), j(p), j(n), positive_mask=j(pmask), in_batch_negatives=False)
    np.testing.assert_allclose(float(got), total / rows, rtol=1e-5)
    assert float(got) < float(L.infonce(j(a), j(p), j(n), positive_mask=j(pmask)))  # fewer candidates
    with pytest.raises(ValueError, match="in_batch_negatives=False keeps each query's own documents"):
        L.infonce(j(a), j(p[:, 0]), directions=("query_to_doc", "doc_to_query"), in_batch_negatives=False)
