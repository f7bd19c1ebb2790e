"""Does fine-tuning recover what post-training compression of a trained encoder lost?

A small BERT encoder (hidden 128, 4 layers, 4 heads, FFN 512, sequence 64) is first trained here with
masked-language modelling on stdlib docstrings (so that its weights have learned something: a config-
initialized encoder's FFN is close to linear noise and loses little to any removal), then used as the
teacher of a sentence-embedding task as users hold one: its mean-pooled token embeddings (``output:
mean_pooling``), scored by fidelity (mean cosine to the teacher's embeddings) on held-out sentences.

For each plan (FFN neurons removed by structured pruning, attention heads removed) it prints the
fidelity of the post-training model (the plan applied, no optimizer step) and of the same plan
fine-tuned the hands-off way (cosine to the teacher's embedding + the encoder blocks' hidden-state KD,
the learning rate :func:`autocompress.finetune_policy.auto_lr` picks), for a few step counts.

With ``--mpnet``, the teacher is the real all-mpnet-base-v2 of ``benchmarks/real_models.py --setup``
(cached under ``--root``) on BBC News articles (the task of ``autocompress.examples.pretrained:mpnet_bbc``,
fidelity on the first ``--eval-samples`` eval articles), and the plans remove FFN neurons only (MPNet's
attention has no head pruning here).

Usage::

    python benchmarks/finetune_recovery.py              # about 2 minutes on 2 cores
    python benchmarks/finetune_recovery.py --steps 50 200
    python benchmarks/finetune_recovery.py --mpnet --steps 20 60 --eval-samples 128   # ~20 min
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch
from torch.utils.data import DataLoader

from autocompress.examples._text import encode, stdlib_sentences
from autocompress.finetune_policy import auto_lr
from autocompress.holdout import holdout_scores
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.tasks import Task

VOCAB, SEQ, HIDDEN, LAYERS, HEADS, FFN = 2048, 64, 128, 4, 4, 512
MASK_ID = 4


def _batches(samples: list[dict], batch: int) -> list[dict]:
    return [
        {k: torch.stack([s[k] for s in samples[i : i + batch]]) for k in ("input_ids", "attention_mask")}
        for i in range(0, len(samples), batch)
    ]


def pretrain(texts: list[str], steps: int, seed: int = 0) -> torch.nn.Module:
    """A BertModel trained ``steps`` steps of masked-language modelling (15% of the tokens masked)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=SEQ,
        attn_implementation="eager",
    )
    mlm = transformers.BertForMaskedLM(cfg)
    data = _batches(encode(texts, VOCAB, SEQ), 32)
    opt = torch.optim.AdamW(mlm.parameters(), lr=5e-4)
    g = torch.Generator().manual_seed(seed)
    mlm.train()
    for step in range(steps):
        b = data[step % len(data)]
        ids = b["input_ids"].clone()
        pick = (torch.rand(ids.shape, generator=g) < 0.15) & (b["attention_mask"] == 1) & (ids > 4)
        labels = torch.where(pick, ids, torch.full_like(ids, -100))
        ids[pick] = MASK_ID
        loss = mlm(input_ids=ids, attention_mask=b["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  MLM step {step}: loss {loss.item():.3f}")
    return mlm.bert.eval()


def _plans(n_steps: int) -> dict[str, Plan]:
    ffn = {
        f"encoder.layer.{i}.intermediate.dense": LayerPlan(sparsity=0.5, sparsity_kind="structured")
        for i in range(LAYERS)
    }
    heads = {f"encoder.layer.{i}.attention.output.dense": LayerPlan(heads_kept=0.5) for i in range(LAYERS)}
    kw = {"steps": n_steps, "kd_features": "hidden", "kd_feature_weight": 1.0}
    return {
        "FFN neurons -50%": Plan(layers=ffn, **kw),
        "heads -50%": Plan(layers=heads, **kw),
        "FFN -50% + heads -50%": Plan(layers={**ffn, **heads}, **kw),
    }


def _mpnet_plans(fractions: list[float]) -> dict[str, Plan]:
    kw = {"kd_features": "hidden", "kd_feature_weight": 1.0}
    return {
        f"FFN neurons -{f:.0%}": Plan(
            layers={
                f"encoder.encoder.layer.{i}.intermediate.dense": LayerPlan(
                    sparsity=f, sparsity_kind="structured"
                )
                for i in range(12)
            },
            **kw,
        )
        for f in fractions
    }


def mpnet_task(root: str, eval_samples: int):
    """The real all-mpnet-base-v2 task on BBC News and its teacher (the model as users hold it)."""
    from autocompress.examples.pretrained import mpnet_bbc

    task = mpnet_bbc(root=root, eval_samples=eval_samples)
    return task, task.teacher()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 200])
    ap.add_argument("--mpnet", action="store_true", help="the real all-mpnet-base-v2 on BBC News instead")
    ap.add_argument("--root", default="runs/_checkpoints", help="real_models.py --setup's cache folder")
    ap.add_argument("--eval-samples", type=int, default=128, help="--mpnet: eval articles scored")
    ap.add_argument("--remove", type=float, nargs="+", default=[0.25], help="--mpnet: FFN fractions removed")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.mpnet:
        return run_mpnet(args)
    texts = stdlib_sentences(1400)
    t0 = time.perf_counter()
    print(f"pretraining the encoder ({args.pretrain_steps} MLM steps on {len(texts)} docstrings)")
    teacher = pretrain(texts[:1000], args.pretrain_steps)
    print(f"  {time.perf_counter() - t0:.0f} s")
    train = DataLoader(
        [{k: s[k] for k in ("input_ids", "attention_mask")} for s in encode(texts[:1000], VOCAB, SEQ)],
        batch_size=16,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    held = _batches(encode(texts[1000:1400], VOCAB, SEQ), 32)
    task = Task(name="enc", model=teacher, train=train, eval=held, metric="fidelity", output="mean_pooling")
    lr = auto_lr(teacher, pretrained=True)
    print(
        f"loss {task.loss_kind()} + hidden-state KD; lr {lr:g}; batch 16; fidelity on {len(texts) - 1000} held-out sentences"
    )
    recovery_table(task, teacher, _plans(0), args.steps, lr, t0)


def recovery_table(
    task, teacher, plans: dict[str, Plan], steps: list[int], lr: float, t0: float, progress=False
):
    """Per plan, the fidelity post-training and after each of ``steps`` fine-tune steps, printed as a table
    (with ``progress``, a line per model as it is scored)."""
    print(f"{'plan':<24} {'post-training':>13} " + " ".join(f"{f'{n} steps':>10}" for n in steps))
    for name, plan in plans.items():
        row = []
        for n in [0, *steps]:
            t = time.perf_counter()
            out = compress(task, teacher, dataclasses.replace(plan, steps=n, lr=lr), threads=2, batch_size=16)
            row.append(holdout_scores([out.model], task, task.eval_split, teacher)[0])
            if progress:
                print(
                    f"  {name}, {n} steps: fidelity {row[-1]:.4f} ({time.perf_counter() - t:.0f} s)",
                    flush=True,
                )
        print(f"{name:<24} {row[0]:>13.4f} " + " ".join(f"{v:>10.4f}" for v in row[1:]))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 2 threads; {time.perf_counter() - t0:.0f} s"
    )


def run_mpnet(args) -> None:
    t0 = time.perf_counter()
    task, teacher = mpnet_task(args.root, args.eval_samples)
    lr = auto_lr(teacher, pretrained=True)
    print(
        f"all-mpnet-base-v2 on BBC News: loss {task.loss_kind()} + hidden-state KD; lr {lr:g}; batch 16; "
        f"fidelity on {args.eval_samples} eval articles"
    )
    recovery_table(task, teacher, _mpnet_plans(args.remove), args.steps, lr, t0, progress=True)


if __name__ == "__main__":
    main()
