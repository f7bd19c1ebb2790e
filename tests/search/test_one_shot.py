"""A hands-off study (no space, no warm start, no fine-tune in the study file) starts with the peers'
one-call answers: int8 everywhere, static and dynamic, post-training (real study, ONNX Runtime, SQLite)."""

from __future__ import annotations

import yaml
from conftest import ROOT
from optuna.trial import TrialState

from autocompress.config import load_config
from autocompress.search import open_run
from autocompress.search.one_shot import DYNAMIC, STATIC, linear_heavy, one_shot_plans
from autocompress.search.runner import execute_trial


def test_the_first_trials_of_a_hands_off_study_are_int8_everywhere_post_training(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the default space file, as a study without ``space`` finds it
    study = {
        "name": "handsoff",
        "task": {
            "name": "mnist1d_transformer",
            "options": {"dim": 16, "depth": 2, "heads": 2, "teacher_epochs": 1, "num_samples": 400},
        },
        # timed in this process (no timing worker): no latency is checked here
        "backend": {"options": {"timing": {"warmup_s": 0.02, "min_s": 0.05, "max_s": 0.2}, "isolate": False}},
        "budgets": {"max_metric_drop": 0.05},
        "trials": {"n": 4},
        "output": str(tmp_path / "run"),
    }
    (tmp_path / "h.yaml").write_text(yaml.safe_dump(study))
    lines: list[str] = []
    with open_run(load_config(tmp_path / "h.yaml"), log=lines.append) as (ctx, st):
        assert ctx.config.finetune.trains()  # the study fine-tunes by default: these trials do not
        waiting = st.get_trials(states=(TrialState.WAITING,))
        assert [t.user_attrs["planned"]["name"] for t in waiting[:2]] == [STATIC, DYNAMIC]
        assert all(t.user_attrs.get("post_training") for t in waiting[:2])
        assert not any(t.user_attrs.get("post_training") for t in waiting[2:])
        assert any("planned start 'int8 static everywhere'" in s and "(post-training)" in s for s in lines)
        inventory = {i.name: i.kind for i in ctx.inventory}
        for mode in ("static", "dynamic"):
            asked = st.ask()
            state, metrics, reason = execute_trial(ctx, st, asked)
            assert state == TrialState.COMPLETE, reason
            trial = st.get_trials()[asked.number]
            plan = trial.user_attrs["plan"]
            assert (
                plan["steps"] == 0 and metrics["finetune_losses"] == [] and metrics["seconds"]["train"] < 0.05
            )
            for name, kind in inventory.items():
                layer = plan["layers"][name]
                assert layer["bits"] == 8, (mode, name)
                want = "dynamic" if mode == "dynamic" and kind == "Linear" else "static"
                assert layer["quant_mode"] == want, (mode, name)
            assert metrics["layer_bits"] and set(metrics["layer_bits"].values()) == {8}


def _info(name, kind, macs):
    from autocompress.inventory import LayerInfo

    fields = {f: None for f in LayerInfo.__dataclass_fields__}
    return LayerInfo(**{**fields, "name": name, "kind": kind, "macs": macs})


def test_a_cnn_gets_the_static_answer_only_and_a_linear_heavy_model_both():
    from autocompress.space import SearchSpace

    space = SearchSpace.from_file(ROOT / "autocompress/search_spaces/default.yaml")
    profile = {"rows": [], "baseline": {"metric": 0.9, "latency_ms": 1.0, "size_bytes": 1000}}
    cnn = [_info("conv1", "Conv2d", 1000), _info("conv2", "Conv2d", 1000), _info("fc", "Linear", 10)]
    plans = one_shot_plans(space, cnn, profile)
    assert [p.name for p in plans] == [STATIC] and plans[0].predicted["unprofiled"]
    assert plans[0].layers == {n: {"bits": 8} for n in ("conv1", "conv2", "fc")} and plans[0].post_training
    enc = [_info("emb", "Embedding", 0), _info("q", "Linear", 500), _info("conv", "Conv1d", 400)]
    plans = {p.name: p for p in one_shot_plans(space, enc, profile)}
    assert plans[DYNAMIC].layers == {"emb": {"bits": 8}, "q": {"bits": 8, "quant_mode": "dynamic"}}
    assert "conv" in plans[STATIC].layers and linear_heavy(enc, plans[DYNAMIC].layers)
    row = {"layer": "*", "setting": "all 8-bit dynamic", "status": "ok", "speedup": 1.4, "metric_drop": 0.002}
    row.update(size_ratio=3.0, latency_ms=0.7, size_bytes=333)
    predicted = {p.name: p for p in one_shot_plans(space, enc, {**profile, "rows": [row]})}[DYNAMIC].predicted
    assert predicted["speedup"] == 1.4 and "unprofiled" not in predicted
