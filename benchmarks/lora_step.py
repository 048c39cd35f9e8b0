"""One LoRA training step on a decoder: embedjax vs PEFT (+ sentence-transformers), same model, same batches.

A tiny random Qwen3-shaped checkpoint (``embedjax.tiny.write_random_checkpoint``: hidden 256,
4 layers, 8 query heads sharing 2 key/value heads, head_dim 32, intermediate 768, a ~2k BPE
vocabulary learnt from the STS-B and SICK sentences) is written once to a temporary directory;
then, in ONE process, on the SAME (anchor, positive) token batches (STS-B train pairs scored
>= 4, every text padded to one length, the EOS appended for last-token pooling), three
trainers each run the same sequence of steps:

* **embedjax**: ``lora.attach`` (rank 16, alpha 32, every attention and MLP projection),
  ``lora.partition`` into adapters (``state.params``) and the frozen base, InfoNCE (scale 20,
  in-batch negatives: ``objective.loss="infonce"``), AdamW on the adapters alone
  (``embedjax.train.optim.make_optimizer``), one jitted ``train_step`` with the state donated
  and the base passed as ``frozen``.
* **peft**: ``transformers.AutoModel`` of the same directory + ``peft.get_peft_model`` with
  ``LoraConfig(r=16, lora_alpha=32, target_modules=q/k/v/o/gate/up/down_proj)``, the same
  pooling and in-batch InfoNCE written in torch (sentence-transformers'
  MultipleNegativesRankingLoss semantics: cosine x 20, cross-entropy, anchors against all
  positives), ``torch.optim.AdamW`` over the trainable (adapter) params.
* **peft + sentence-transformers**: a ``SentenceTransformer`` (``Transformer`` module on the
  same directory + ``Pooling``) with the adapter added through its PEFT integration
  (``SentenceTransformer.add_adapter``) and the library's own ``MultipleNegativesRankingLoss``.

Before timing, the adapters embedjax drew are copied into both PyTorch models (via the PEFT
file ``lora.save_peft`` writes) with B set nonzero, and the forward passes are checked to
agree (embeddings and loss within ``--tol``, float32), so the timings compare one computation.
Every trainer gets the same warm-up steps, then ``--rounds`` rounds of ``--steps`` timed steps
each, the trainers alternating round by round (load drift hits all alike); the median step is
reported, with the PyTorch / embedjax ratio. ``torch.set_num_threads`` = the core count (XLA's
CPU client uses every core). bfloat16 (``--dtypes bfloat16``): embedjax's compute dtype (params
and optimizer state float32, bf16 matmuls), ``torch.autocast("cpu", torch.bfloat16)`` for the
PyTorch peers. The losses after the last step are printed too: the same steps on the same data
should land on nearly the same loss. ``MFU``: the embedjax step's model FLOPs
(``embedjax.train.flops``: XLA's cost analysis of the compiled step; the same computation for
every trainer, so one numerator for all rows) over each trainer's median step time, against the
device's peak for the dtype (on CPU a measured matmul peak).

    python benchmarks/lora_step.py                              # float32, batch 32 pairs, length 64
    python benchmarks/lora_step.py --dtypes float32 bfloat16 --batch 64 --seq-len 32
    python benchmarks/lora_step.py --hidden 512 --layers 8 --intermediate 1536 --heads 16 --kv-heads 4
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs.base import DATA  # noqa: E402  ($EMBEDJAX_DATA, else ../shared/data)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ST_POOLING = {"last_token": "lasttoken", "mean": "mean"}
_ADAPTER_PARAM = re.compile(r"(layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.lora_([AB])\.(?:default\.)?weight$")


def read_texts_and_pairs(seed: int, min_score: float):
    """(sentences for the tokenizer, shuffled (anchor, positive) pairs from STS-B train)."""
    import numpy as np

    from embedjax.data import readers

    stsb = [r for f in ("sts-train.csv", "sts-dev.csv") for r in readers.read_stsb(DATA / "stsb" / f)]
    sick = readers.read_sick(DATA / "sick" / "SICK_train.txt")
    texts = [t for r in [*stsb, *sick] for t in (r.text_a, r.text_b)]
    train = [r for r in readers.read_stsb(DATA / "stsb" / "sts-train.csv") if r.score >= min_score]
    order = np.random.default_rng(seed).permutation(len(train))
    return texts, [(train[i].text_a, train[i].text_b) for i in order]


def make_batches(tokenizer, pairs, batch: int, n_batches: int, seq_len: int, pad_id: int):
    """``n_batches`` ``embedjax.data.batch.Batch``es of sides a and b with int32 ids and masks, each
    (batch, seq_len), right-padded; the tokenizer truncates to ``seq_len`` (keeping the appended EOS)."""
    import numpy as np

    from embedjax.data.batch import Batch, Side

    out, real = [], []
    for k in range(n_batches):
        chunk = [pairs[(k * batch + i) % len(pairs)] for i in range(batch)]
        sides = {}
        for side, texts in (("a", [p[0] for p in chunk]), ("b", [p[1] for p in chunk])):
            ids = np.full((batch, seq_len), pad_id, np.int32)
            mask = np.zeros((batch, seq_len), np.int32)
            for row, enc in enumerate(tokenizer.encode(texts)):
                n = min(len(enc.ids), seq_len)
                ids[row, :n], mask[row, :n] = enc.ids[:n], 1
            sides[side] = Side(ids=ids, mask=mask)
        out.append(Batch(**sides))
        real.append(int(sides["a"].mask.sum() + sides["b"].mask.sum()))
    return out, statistics.mean(real)


def copy_adapters(module, tensors) -> int:
    """Copies the PEFT-file tensors (``base_model.model.<module>.lora_A.weight`` (r, in) / ``lora_B``
    (out, r)) into every LoRA param of a PyTorch module tree; returns how many were copied.
    Freezes everything else (only the adapters train)."""
    import torch

    by_module = {}
    for key, value in tensors.items():
        m = _ADAPTER_PARAM.search(key)
        by_module[(m[1], m[2])] = value
    copied = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            m = _ADAPTER_PARAM.search(name)
            p.requires_grad_(m is not None)
            if m is None:
                continue
            value = torch.from_numpy(by_module[(m[1], m[2])])
            if tuple(p.shape) != tuple(value.shape):
                raise ValueError(f"{name}: shape {tuple(p.shape)} vs the adapter file's {tuple(value.shape)}")
            p.copy_(value)
            copied += 1
    if copied != len(tensors):
        raise ValueError(f"copied {copied} adapter tensors into the torch model, the PEFT file has {len(tensors)}")
    return copied


def torch_pool(hidden, mask, pooling: str):
    """Last-token (the last position whose mask is 1) or masked-mean pooling, as embedjax.pooling."""
    import torch

    if pooling == "last_token":
        t = mask.shape[1]
        idx = t - 1 - torch.argmax(torch.flip(mask, dims=[1]).to(torch.int64), dim=1)
        return hidden[torch.arange(hidden.shape[0]), idx]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def torch_infonce(za, zb, scale: float = 20.0):
    """MultipleNegativesRankingLoss: cross-entropy of scale * cos(a_i, b_j) with target j = i."""
    import torch
    import torch.nn.functional as F

    za, zb = za.float(), zb.float()
    logits = scale * F.normalize(za, dim=-1) @ F.normalize(zb, dim=-1).T
    return F.cross_entropy(logits, torch.arange(za.shape[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size learnt from STS-B + SICK")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--batch", type=int, default=32, help="(anchor, positive) pairs per step")
    ap.add_argument("--seq-len", type=int, default=64, help="every text padded (truncated) to this many tokens")
    ap.add_argument("--pooling", default="last_token", choices=sorted(ST_POOLING))
    ap.add_argument("--batches", type=int, default=8, help="distinct batches, cycled through the steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per trainer (embedjax compiles here)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per trainer per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the trainers alternate round by round")
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=("float32", "bfloat16"))
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--tol", type=float, default=1e-4, help="max |diff| of the float32 forwards (embeddings, loss)")
    ap.add_argument("--peers", nargs="+", default=["peft", "peft+st"], choices=("peft", "peft+st"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import peft
    import torch
    import transformers
    from safetensors.numpy import load_file

    import sentence_transformers
    from embedjax import lora, load_pretrained, tiny
    from embedjax.embed import embed
    from embedjax.train import flops, optim
    from embedjax.train.objective import Objective, batch_loss
    from embedjax.train.state import TrainState
    from embedjax.train.step import train_step

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tmp = tempfile.TemporaryDirectory(prefix="lora_step_")
    ckpt, adapter_dir = Path(tmp.name) / "qwen3", Path(tmp.name) / "adapter"

    texts, pairs = read_texts_and_pairs(args.seed, 4.0)
    t0 = time.perf_counter()
    tiny.write_random_checkpoint(
        ckpt, "qwen3", texts=texts, vocab_size=args.vocab, seed=args.seed, hidden_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, intermediate_size=args.intermediate, max_position_embeddings=max(512, args.seq_len))
    enc = load_pretrained(ckpt, pooling=args.pooling, max_length=args.seq_len)
    batches, real = make_batches(enc.tokenizer, pairs, args.batch, args.batches, args.seq_len, enc.cfg.pad_token_id)
    print(f"checkpoint written in {time.perf_counter() - t0:.1f} s: qwen3, hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads}/{args.kv_heads} heads x {args.head_dim}, intermediate {args.intermediate}, vocab "
          f"{enc.cfg.vocab_size}; {args.pooling} pooling, EOS appended: {enc.tokenizer.appends_eos}")
    print(f"{args.batches} batches of {args.batch} pairs x {args.seq_len} tokens per text "
          f"({2 * args.batch * args.seq_len} token slots/step, {real:.0f} real)")
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, peft {peft.__version__}, "
          f"sentence-transformers {sentence_transformers.__version__}")

    # ---- embedjax: adapters on every projection, B nonzero so the check sees them
    spec = lora.LoraSpec(rank=args.rank, alpha=args.alpha)
    params, cfg = lora.attach(enc.params, enc.cfg, spec, jax.random.key(args.seed))
    rng = np.random.default_rng(args.seed + 1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(0.0, 0.02, x.shape), x.dtype)
        if lora._path_str(path).endswith("lora_b") else x, params)
    lora.save_peft(adapter_dir, params, cfg, base_model_name_or_path=str(ckpt))
    tensors = load_file(str(adapter_dir / lora.ADAPTER_WEIGHTS))
    trainable, frozen = lora.partition(params)
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    n_all = sum(x.size for x in jax.tree.leaves(params))
    objective = Objective(loss="infonce", loss_kwargs=(("scale", 20.0), ("symmetric", False)),
                          pooling=args.pooling, dropout=False)
    total = args.warmup + args.rounds * args.steps
    tx, _ = optim.make_optimizer({"learning_rate": args.lr, "warmup": 0, "decay": "constant", "weight_decay": 0.01,
                                  "clip_norm": 0.0, "accumulate": 1, "b1": 0.9, "b2": 0.999, "eps": 1e-8}, total)

    # ---- PyTorch peers, the same adapters copied in
    def peft_model():
        base = transformers.AutoModel.from_pretrained(ckpt, dtype=torch.float32)
        model = peft.get_peft_model(base, peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                          target_modules=TARGETS))
        copy_adapters(model, tensors)
        return model.train()

    def st_model():
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

        body = Transformer(str(ckpt), max_seq_length=args.seq_len, model_kwargs={"dtype": torch.float32})
        model = SentenceTransformer(modules=[body, Pooling(args.hidden, pooling_mode=ST_POOLING[args.pooling])],
                                    device="cpu")
        model.add_adapter(peft.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                          target_modules=TARGETS))
        copy_adapters(model, tensors)
        return model.train()

    torch_batches = [{name: {"input_ids": torch.from_numpy(side.ids).long(),
                             "attention_mask": torch.from_numpy(side.mask).long()} for name, side in b.sides.items()}
                     for b in batches]

    def peft_forward(model, tb):
        za, zb = (torch_pool(model(**tb[s]).last_hidden_state, tb[s]["attention_mask"], args.pooling) for s in "ab")
        return za, zb, torch_infonce(za, zb)

    def st_features(tb):
        return [tb[s] for s in "ab"]

    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    peers = {}
    if "peft" in args.peers:
        m = peft_model()
        peers["peft"] = {"model": m, "loss": lambda tb, m=m: peft_forward(m, tb)[2]}
    if "peft+st" in args.peers:
        m = st_model()
        mnrl = MultipleNegativesRankingLoss(m, scale=20.0)
        peers["peft+st"] = {"model": m, "loss": lambda tb, f=mnrl: f(st_features(tb), None)}
    n_torch = {name: sum(p.numel() for p in peer["model"].parameters() if p.requires_grad)
               for name, peer in peers.items()}
    print(f"trainable params: embedjax {n_train:,} of {n_all:,}; "
          + ", ".join(f"{k} {v:,}" for k, v in n_torch.items()))

    # ---- the forwards agree (float32)?
    b0, tb0 = batches[0], torch_batches[0]
    key = jax.random.key(0)
    za = np.asarray(embed(params, cfg, b0.a.ids, b0.a.mask, pooling=args.pooling, normalize=False))
    zb = np.asarray(embed(params, cfg, b0.b.ids, b0.b.mask, pooling=args.pooling, normalize=False))
    loss = float(batch_loss(params, cfg, objective, b0, key))
    ok = True
    with torch.no_grad():
        outs = {}
        if "peft" in peers:
            outs["peft"] = [x.numpy() if x.ndim else float(x) for x in peft_forward(peers["peft"]["model"], tb0)]
        if "peft+st" in peers:
            st = peers["peft+st"]["model"]
            outs["peft+st"] = [st(f)["sentence_embedding"].numpy() for f in st_features(tb0)]
            outs["peft+st"].append(float(peers["peft+st"]["loss"](tb0)))
    for name, (ta, tb_, tl) in outs.items():
        d_emb = max(float(np.abs(za - ta).max()), float(np.abs(zb - tb_).max()))
        d_loss = abs(loss - tl)
        good = d_emb <= args.tol and d_loss <= args.tol
        ok &= good
        print(f"forward check vs {name}: max |embedding diff| {d_emb:.2e} (max |embedding| "
              f"{float(np.abs(za).max()):.2f}), loss {loss:.6f} vs {tl:.6f} (diff {d_loss:.2e}): "
              f"{'agree' if good else 'DISAGREE'} within {args.tol:g}")
    if not ok:
        sys.exit("the forwards disagree: the timings would not compare the same computation")

    # ---- timing
    fresh_torch = {"peft": peft_model, "peft+st": st_model}
    results = []
    for dtype in args.dtypes:
        cfg_d = dataclasses.replace(cfg, dtype=dtype)
        step = jax.jit(functools.partial(train_step, enc_cfg=cfg_d, objective=objective, tx=tx), donate_argnums=0)
        state = TrainState.create(jax.tree.map(lambda x: x.copy(), trainable), tx, args.seed)
        jb = [jax.device_put(b) for b in batches]
        work, note = flops.step_work(step.lower(state, jb[0], frozen).compile(), jb[0], cfg_d)  # one shape: every step
        peak, where = flops.run_peak(dtype, 1)
        print(f"[{dtype}] model FLOPs per step: {work.describe()}{'; ' + note if note else ''}; peak "
              f"{'unknown' if peak is None else f'{peak / 1e12:.3f} TFLOP/s'} ({where})", flush=True)
        counter = {"embedjax": 0}
        last = {}

        def jax_step(state):
            i = counter["embedjax"]
            counter["embedjax"] += 1
            t = time.perf_counter()
            state, m = step(state, jb[i % len(jb)], frozen)
            jax.block_until_ready((state, m))
            return state, time.perf_counter() - t, float(m["loss"])

        models = {}
        for name in peers:
            model = peers[name]["model"] if dtype == args.dtypes[0] else fresh_torch[name]()
            if name == "peft+st":
                mnrl = MultipleNegativesRankingLoss(model, scale=20.0)
                loss_fn = lambda tb, f=mnrl: f(st_features(tb), None)
            else:
                loss_fn = lambda tb, m=model: peft_forward(m, tb)[2]
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                    weight_decay=0.01, eps=1e-8)
            models[name] = (loss_fn, opt)
            counter[name] = 0

        def torch_step(name):
            loss_fn, opt = models[name]
            i = counter[name]
            counter[name] += 1
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                loss = loss_fn(torch_batches[i % len(torch_batches)])
            loss.backward()
            opt.step()
            return time.perf_counter() - t, float(loss.detach())

        times = {name: [] for name in ["embedjax", *peers]}
        t = time.perf_counter()
        for w in range(args.warmup):
            state, dt, last["embedjax"] = jax_step(state)
            if w == 0:
                print(f"[{dtype}] embedjax first step (compile + run): {dt:.1f} s", flush=True)
        for name in peers:
            for _ in range(args.warmup):
                _, last[name] = torch_step(name)
        for r in range(args.rounds):
            for _ in range(args.steps):
                state, dt, last["embedjax"] = jax_step(state)
                times["embedjax"].append(dt)
            for name in peers:
                for _ in range(args.steps):
                    dt, last[name] = torch_step(name)
                    times[name].append(dt)
            print(f"[{dtype}] round {r + 1}/{args.rounds}: "
                  + ", ".join(f"{k} {1000 * statistics.median(v[-args.steps:]):.1f} ms" for k, v in times.items()),
                  flush=True)
        print(f"[{dtype}] wall {time.perf_counter() - t:.0f} s; loss after {total} steps: "
              + ", ".join(f"{k} {v:.4f}" for k, v in last.items()), flush=True)
        base = statistics.median(times["embedjax"])
        for name, ts in times.items():
            q = statistics.quantiles(ts, n=4)
            med = statistics.median(ts)
            utilisation = flops.mfu(work.flops / med, peak)
            results.append((name, dtype, 1000 * med, 1000 * q[0], 1000 * q[2], args.batch / med, med / base,
                            "-" if utilisation is None else f"{utilisation:.1%}"))

    print(f"\n| trainer | dtype | ms/step (median of {args.rounds * args.steps}) | p25 - p75 | pairs/s | "
          "ms / embedjax ms | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|")
    label = {"embedjax": "embedjax (jit, donated, frozen base)", "peft": "transformers + peft, torch InfoNCE",
             "peft+st": "sentence-transformers + peft (add_adapter), MNRL"}
    for name, dtype, med, q1, q3, eps, ratio, utilisation in results:
        print(f"| {label[name]} | {dtype} | {med:.1f} | {q1:.1f} - {q3:.1f} | {eps:.0f} | {ratio:.2f}x | "
              f"{utilisation} |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
