"""Linear attention alone on the BERT study's encoder (``bert_encoder``: config-initialized BertModel, 6
layers, hidden 384, 12 heads, FFN 1536), at sequence 128 and 512: every attention block kernelized
(``attention: linear``), lowered by the onnxruntime backend in float, against the unchanged teacher's
artifact. Prints, side by side per sequence length: the latency speedup (ORT CPU, batch 1, 1 thread; the
teacher and both variants timed in one session, alternating blocks: ``Backend.measure_group``) and the
fidelity (mean cosine of the artifact's token embeddings to the teacher's, the study's metric) with its
drop, of the substitution post-training and after a short KD fine-tune (``kd.features``
hidden+attention). Then (``--study``) a small study at sequence 512 whose space holds the choice
per group of three blocks and fine-tunes each trial: whether the search put linear attention on its
front.

    python benchmarks/linear_attention.py [--seqs 128 512] [--epochs 2] [--study] [--study-only]

The checkpoint folder is the study's own (``runs/_checkpoints/bert_encoder``, created on first use).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from autocompress.backends import OnnxRuntimeBackend
from autocompress.backends.device_facts import cpu_has_any, cpu_info
from autocompress.examples.bert_encoder import bert_encoder
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.tasks.data import deployable

CHECKPOINT = "runs/_checkpoints/bert_encoder"
LAYERS = 6
SIZES: dict = {}  # --tiny: a 2-layer encoder of width 64 in a temporary folder (a check of the script itself)
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "amx_int8")


def _outputs() -> list[str]:
    return [f"encoder.layer.{i}.attention.output.dense" for i in range(SIZES.get("layers", LAYERS))]


def _group(lo: int, hi: int) -> str:
    """The attention output projections of blocks ``lo`` to ``hi - 1`` (a regular expression)."""
    return f"encoder\\.layer\\.({'|'.join(map(str, range(lo, hi)))})\\.attention\\.output\\.dense"


def _plan(epochs: int, lr: float) -> Plan:
    return Plan(
        layers={n: LayerPlan(attention="linear") for n in _outputs()},
        epochs=epochs,
        lr=lr,
        kd_features="hidden+attention",
        kd_alpha=0.5,
    )


def _fidelity(be, task, art, reference) -> float:
    return be.evaluate(art, task.eval_split.batches(None), task.metric_obj, reference)


def one_length(seq: int, epochs: int, lr: float, samples: tuple[int, int], tmp: Path) -> dict:
    """Teacher, linear post-training and linear after KD at one sequence length: latency and fidelity."""
    task = bert_encoder(
        checkpoint=SIZES.get("checkpoint", CHECKPOINT),
        seq_len=seq,
        train_samples=samples[0],
        eval_samples=samples[1],
        batch_size=8,
        **{k: v for k, v in SIZES.items() if k != "checkpoint"},
    )
    teacher = task.teacher().eval()
    ts = deployable(teacher, task.io)
    with torch.no_grad():
        reference = [ts(*x).float().numpy() for x, _ in task.eval_split.batches(None)]
    post = compress(task, teacher, _plan(0, lr)).model
    t0 = time.perf_counter()
    tuned = compress(task, teacher, _plan(epochs, lr), batch_size=8).model
    train_s = time.perf_counter() - t0
    be = OnnxRuntimeBackend(batch_size=1, threads=1)
    try:
        x = task.example_inputs()
        arts = {
            name: be.lower(deployable(m, task.io), x, {}, tmp / f"{seq}-{name}", io=task.io)
            for name, m in (("teacher", teacher), ("linear", post), ("linear+kd", tuned))
        }
        fid = {name: _fidelity(be, task, art, reference) for name, art in arts.items()}
        timed = be.measure_group([arts["linear"], arts["linear+kd"]], arts["teacher"], x)
    finally:
        be.close()
    return {"seq": seq, "fidelity": fid, "timed": timed, "train_s": train_s, "epochs": epochs}


def _report(rows: list[dict], header: bool = True) -> None:
    if header:
        print("sequence  variant      latency ms (teacher -> variant)   speedup   fidelity   drop")
    for r in rows:
        base = r["fidelity"]["teacher"]
        for name, (stats, ref) in zip(("linear", "linear+kd"), r["timed"], strict=True):
            speed = ref.median_ms / stats.median_ms
            fid = r["fidelity"][name]
            print(
                f"{r['seq']:>8}  {name:<10}  {ref.median_ms:9.2f} -> {stats.median_ms:9.2f} (n={stats.n}/{ref.n})"
                f"   {speed:6.3f}x   {fid:.5f}   {base - fid:+.5f}"
            )
        print(
            f"{'':>8}  (teacher's own fidelity {base:.4f}; KD fine-tune {r['epochs']} epochs, {r['train_s']:.0f} s)"
        )


def small_study(trials: int, epochs: int, lr: float) -> int:
    """A study at sequence 512 whose only choice is linear or softmax attention per group of three blocks
    (fine-tuned with hidden+attention KD): prints its front and whether linear attention is on it."""
    from autocompress import run_study
    from autocompress.config import load_config

    folder = Path(tempfile.mkdtemp(prefix="ac-linear-attention-"))
    layers = SIZES.get("layers", LAYERS)
    half = layers // 2
    try:
        cfg = load_config(
            Path(__file__).resolve().parents[1] / "autocompress/studies/bert_encoder.yaml",
            {
                "output": str(folder / "run"),
                "trials.n": trials,
                "trials.timeout_s": None,
                "trials.eval_samples": 16,
                "task.options.seq_len": 512,
                "task.options.train_samples": 32,
                "task.options.eval_samples": 16,
                "task.options.checkpoint": SIZES.get("checkpoint", CHECKPOINT),
                **{f"task.options.{k}": v for k, v in SIZES.items() if k != "checkpoint"},
                "finetune.epochs": epochs,
                "finetune.steps": None,
                "finetune.lr": lr,
                "finetune.batch_size": 8,
                "finetune.threads": 2,
                "space.overrides": {
                    "bits": {"fixed": 32},
                    "sparsity": {"fixed": 0.0},
                    "sparsity_kind": {"fixed": "structured"},
                    "rank_ratio": {"fixed": 1.0},
                    "heads_kept": {"fixed": 1.0},
                    "keep_layer": {"fixed": True},
                    "schedule": {
                        "kind": {"fixed": "one_shot"},
                        "start": {"fixed": 0.0},
                        "end": {"fixed": 1.0},
                    },
                    "kd": {
                        "temperature": {"fixed": 4.0},
                        "alpha": {"fixed": 0.5},
                        "features": {"fixed": "hidden+attention"},
                    },
                    "groups": {"attn_lo": _group(0, half), "attn_hi": _group(half, layers)},
                    "layers": {
                        ".*attention\\.output\\.dense": {
                            "attention": {"choices": ["softmax", "linear"]},
                            "heads_kept": {"fixed": 1.0},
                            "keep_layer": {"fixed": True},
                        }
                    },
                },
            },
        )
        result = run_study(cfg, log=lambda line: None)
        on_front = False
        print(f"study at sequence 512: {result.completed} trials; front (best metric first):")
        for m in result.front:
            linear = sorted(
                {n for n, lp in (m.plan.layers if m.plan else {}).items() if lp.attention == "linear"}
            )
            on_front = on_front or bool(linear)
            print(
                f"  trial {m.trial}: fidelity {m.metric:.5f} (drop {m.metric_drop:+.5f}), speedup "
                f"{m.speedup:.3f}x, linear attention on {len(linear)} of {SIZES.get('layers', LAYERS)} blocks"
            )
        print(f"linear attention on the front: {'yes' if on_front else 'no'}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--epochs", type=int, default=2, help="KD fine-tune epochs over the training samples")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--train-samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--study", action="store_true", help="also run the small study at sequence 512")
    ap.add_argument("--study-only", action="store_true")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, width-64 encoder: checks the script only")
    args = ap.parse_args()
    if args.tiny:
        tiny_dir = tempfile.mkdtemp(prefix="ac-tiny-bert-")
        SIZES.update(layers=2, hidden=64, heads=4, intermediate=128, vocab_size=2000)
        SIZES["checkpoint"] = str(Path(tiny_dir) / "bert")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    feats = ", ".join(f"{f} {'yes' if cpu_has_any((f,)) else 'no'}" for f in CPU_FEATURES)
    print(f"cpu: {cpu_info()['name']}, {cpu_info()['count']} cores; {feats}")
    if not args.study_only:
        print(
            f"BertModel {SIZES.get('layers', LAYERS)}x{SIZES.get('hidden', 384)} (config-initialized), "
            f"onnxruntime cpu float, batch 1, 1 thread; fidelity on {args.eval_samples} eval samples; every "
            "attention block linear (phi(x) = elu(x) + 1)"
        )
        with tempfile.TemporaryDirectory() as tmp:
            for i, seq in enumerate(args.seqs):  # each length printed as soon as it is measured
                row = one_length(
                    seq, args.epochs, args.lr, (args.train_samples, args.eval_samples), Path(tmp)
                )
                _report([row], header=i == 0)
                sys.stdout.flush()
    if args.study or args.study_only:
        return small_study(args.trials, 1, args.lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
