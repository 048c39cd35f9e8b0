"""Distillation losses: a student learns a teacher's scores or embeddings.

Score distillation (the teacher scored (query, candidate) pairs offline, e.g. a cross-encoder):

* ``margin_mse``: MarginMSE (Hofstaetter et al., arXiv:2010.02666): regress the student's
  margins s(q, p) - s(q, n_j) onto the teacher's; sentence-transformers' ``MarginMSELoss``.
* ``listwise_kl``: per query, KL between the teacher's and the student's softmax over the
  candidates [p, n_1..n_k] (RocketQAv2 arXiv:2110.07367, Tevatron); sentence-transformers'
  ``DistillKLDivLoss`` up to its temperature convention (see ``listwise_kl``).

Embedding distillation (the teacher's embeddings of the same texts):

* ``embedding_mse``: sentence-transformers' ``MSELoss`` (Reimers & Gurevych, arXiv:2004.09813).
* ``embedding_cosine``: mean 1 - cos, sentence-transformers' ``EmbedDistillLoss("cosine")``.
* ``similarity_mse``: MSE between the in-batch cosine similarity matrices, so the student may
  be narrower than the teacher.

Teacher scores and embeddings are targets: they carry no gradient (``stop_gradient``, as
sentence-transformers detaches its labels).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from embedjax import similarity as sim
from embedjax.losses import rerank


def _target(x):
    return jax.lax.stop_gradient(sim.as_float32(x))


def _candidates(name, q, p, n, similarity=None):
    """``(B, 1 + k, D)``: the positive then the k negatives of every query. With a token metric
    (``similarity.TokenMaxSim``) the documents' width may differ from the queries'."""
    if n is None:
        raise ValueError(f"{name}: needs negatives n, (B, D) or (B, k, D); got None")
    same_width = similarity is None or isinstance(similarity, str)  # a metric object reads rows of any width
    if q.ndim != 2 or p.ndim != 2 or p.shape[0] != q.shape[0] or (same_width and p.shape != q.shape):
        raise ValueError(f"{name}: q and p must both be (B, D) embeddings, got {q.shape} and {p.shape}")
    if n.ndim == 2:
        n = n[:, None, :]
    if n.ndim != 3 or n.shape[0] != q.shape[0] or n.shape[2] != p.shape[1]:
        raise ValueError(f"{name}: n must be (B, D) or (B, k, D) with B={q.shape[0]}, D={p.shape[1]}; "
                         f"got {n.shape}")
    return jnp.concatenate([p[:, None, :], n], axis=1)


def _student_scores(q, cands, similarity):
    """s(q_i, c_ij): ``(B, D), (B, m, D) -> (B, m)`` in float32 or wider."""
    return sim.pairwise(sim.as_float32(q)[:, None, :], sim.as_float32(cands), similarity)


def margin_mse(q, p, n, teacher, *, similarity="dot"):
    """MarginMSE (arXiv:2010.02666), numerically sentence-transformers' ``MarginMSELoss``.

        L = mean_{i, j} [ (s(q_i, p_i) - s(q_i, n_ij)) - (t_ip - t_ij) ]^2

    over the B queries and k negatives (one mean over all B * k margins, torch's ``MSELoss``).

    Args:
      q, p: (B, D) query and positive (first document) embeddings.
      n: (B, D) one negative (second document) per query, or (B, k, D) k of them.
      teacher: the teacher's scores, as in sentence-transformers: (B, 1 + k) scores
        [t(q, p), t(q, n_1), ..., t(q, n_k)]; or (B, k) margins t(q, p) - t(q, n_j)
        already taken ((B,) too when k = 1). Carries no gradient.
      similarity: a ``embedjax.similarity.pairwise`` metric for the student; "dot" as
        sentence-transformers (the teacher margins are on the teacher's own scale, which
        an unnormalised dot product can match; a cosine student cannot exceed margin 2).

    Returns:
      The scalar mean squared margin error.
    """
    cands = _candidates("margin_mse", q, p, n, similarity)
    b, k = cands.shape[0], cands.shape[1] - 1
    t = _target(teacher)
    if t.shape == (b, k + 1):
        t = t[:, :1] - t[:, 1:]
    elif t.shape == (b,) and k == 1:
        t = t[:, None]
    elif t.shape != (b, k):
        raise ValueError(f"margin_mse: teacher must be ({b}, {k + 1}) scores [t(q,p), t(q,n_1..n_{k})] or "
                         f"({b}, {k}) margins t(q,p) - t(q,n_j); got {t.shape}")
    s = _student_scores(q, cands, similarity)
    margins = s[:, :1] - s[:, 1:]
    return jnp.mean(jnp.square(margins - t))


def listwise_kl(q, p, n, teacher, *, scale=20.0, teacher_temperature=1.0, similarity="cosine",
                normalize_scores=False):
    """Listwise score distillation: per query, KL from the teacher's to the student's softmax.

        L = mean_i KL( softmax(t_i / teacher_temperature) || softmax(scale * s(q_i, c_i)) )

    over the candidates c_i = [p_i, n_i1, ..., n_ik] of query i (RocketQAv2 / Tevatron-style
    listwise distillation, arXiv:2110.07367).

    Relation to sentence-transformers' ``DistillKLDivLoss(similarity_fct, temperature,
    student_temperature=st, teacher_temperature=tt)``: theirs is
    ``st^2 * mean_i KL(softmax(t_i / tt) || softmax(s_i / st))`` (the st^2 is Hinton's gradient
    scale compensation). So ours == theirs / st^2 with ``st = 1 / scale``, ``tt =
    teacher_temperature``; with ``scale = 1`` (their default temperature 1.0) and
    ``similarity="dot"`` (their default) the two are the same number. Our default is the
    usual contrastive setting instead: cosine scores times 20.

    Args:
      q, p: (B, D) query and positive embeddings.
      n: (B, D) or (B, k, D) negatives (k >= 1: one candidate alone gives a constant loss).
      teacher: (B, 1 + k) teacher scores [t(q, p), t(q, n_1), ..., t(q, n_k)]; a score of
        -inf excludes that candidate (zero target mass). Carries no gradient.
      scale: multiplies the student scores (1 / student temperature).
      teacher_temperature: divides the teacher scores; match it to their spread.
      similarity: a ``embedjax.similarity.pairwise`` metric for the student.
      normalize_scores: min-max normalise each query's student scores to [0, 1] before the
        scale (PyLate's ``Distillation(normalize_scores=True)``, its default for ColBERT).

    Returns:
      The scalar mean over queries of the KL divergence (>= 0).
    """
    cands = _candidates("listwise_kl", q, p, n, similarity)
    b, m = cands.shape[:2]
    t = _target(teacher)
    if t.shape != (b, m):
        raise ValueError(f"listwise_kl: teacher must be ({b}, {m}) scores [t(q,p), t(q,n_1..n_{m - 1})]; "
                         f"got {t.shape}")
    return rerank.listwise_kl(_student_scores(q, cands, similarity), t, scale=scale,
                              teacher_temperature=teacher_temperature, normalize_scores=normalize_scores)


def _check_same_width(name, student, teacher):
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"{name}: student and teacher embeddings must have the same size D, got "
            f"{student.shape[-1]} and {teacher.shape[-1]}; to distil into a narrower student use "
            "similarity_mse (compares in-batch similarity matrices, any D)")
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student and teacher shapes differ: {student.shape} vs {teacher.shape}")


def embedding_mse(student, teacher):
    """Mean over all elements of (student - teacher)^2: sentence-transformers' ``MSELoss``.

    Args:
      student, teacher: (..., D) embeddings of the same texts, the same shape. The teacher
        carries no gradient.

    Returns:
      The scalar MSE. Raises ValueError if the widths D differ (see ``similarity_mse``).
    """
    _check_same_width("embedding_mse", student, teacher)
    return jnp.mean(jnp.square(sim.as_float32(student) - _target(teacher)))


def embedding_cosine(student, teacher):
    """Mean over rows of 1 - cos(student, teacher): ``EmbedDistillLoss(distance_metric="cosine")``.

    Args:
      student, teacher: (..., D) embeddings of the same texts, the same shape (teacher: no
        gradient).

    Returns:
      A scalar in [0, 2]; insensitive to each row's norm. ValueError if the widths D differ.
    """
    _check_same_width("embedding_cosine", student, teacher)
    return jnp.mean(1.0 - sim.cosine_pairwise(sim.as_float32(student), _target(teacher)))


def similarity_mse(student, teacher):
    """MSE between the student's and the teacher's in-batch cosine similarity matrices.

        L = mean_{i, j} (cos(s_i, s_j) - cos(t_i, t_j))^2

    Only the geometry of the batch is matched, so D may differ (a narrower student).

    Args:
      student: (..., Ds) student embeddings; leading axes are flattened to N rows.
      teacher: (..., Dt) teacher embeddings of the same N texts, same leading shape (no
        gradient).

    Returns:
      The scalar mean over the (N, N) entries (the diagonal included: it is 1 on both sides).
    """
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(f"similarity_mse: student and teacher must embed the same texts: leading shapes "
                         f"{student.shape[:-1]} and {teacher.shape[:-1]} differ")
    s = sim.as_float32(student).reshape(-1, student.shape[-1])
    t = _target(teacher).reshape(-1, teacher.shape[-1])
    return jnp.mean(jnp.square(sim.cosine_matrix(s, s) - sim.cosine_matrix(t, t)))
