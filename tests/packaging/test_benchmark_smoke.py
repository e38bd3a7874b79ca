"""The benchmark runs end to end on tiny CPU shapes: one process per provider, each checked against eager before it
is timed in the rounds, the GEMM rows, the breakdown of ours, the JSON fields, the plot and the results summary; the
realistic workload's generator (shares, advantages from the library's functions, the three settings), the dense
workload, and TRL's chunked log-probs as a peer. The round scheduler itself: test_bench_rounds.py."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from ..helpers import load_benchmark_module


@pytest.fixture(scope="module")
def bench():
    return load_benchmark_module("run")  # its modules import as child, batches, providers, ...


@pytest.fixture(scope="module")
def child(bench):
    import child

    return child


def _report(tmp_path):
    (json_file,) = tmp_path.glob("bench_*.json")
    return json.loads(json_file.read_text())


def test_tiny_cpu_run(bench, tmp_path, capsys):
    """The dense workload: today's batch and table (no setting column, the 3 and 4 GEMMs rows)."""
    assert bench.main(["--device", "cpu", "--workload", "dense", "--shapes", "64x4001@256", "--providers",
                       "eager,torch,torch-recompute,cuda", "--reps", "2", "--breakdown", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| custom-64x4001@256 | torch |" in table and "| custom-64x4001@256 | 3 GEMMs |" in table
    assert "skipped: " in table and "Segmentation of 64 rows" in table and "| GEMM calls |" in table
    assert "| shape | provider | fwd+bwd ms (p20-p80) | x 3 GEMM (p20-p80) | time vs eager (p20-p80) |" in table
    assert "Rounds: custom-64x4001@256: 2 rounds in " in table
    report = _report(tmp_path)
    assert report["workload"]["kind"] == "dense" and report["workloads"] is None
    assert set(report["workload"]["settings"]) == {"released"}
    env = report["environment"]
    for field in ("date", "command", "git_sha", "torch", "device", "python", "liger_kernel", "cut_cross_entropy",
                  "wall_seconds", "load_average", "load_average_end"):
        assert field in env
    record = report["rounds"]["custom-64x4001@256"]
    assert record["rounds"] == 2 and record["seconds"] > 0 and record["failed"] is None
    rows = {r["provider"]: r for r in report["results"]}
    assert rows["cuda"]["status"].startswith("skipped")
    for name in ("eager", "torch", "torch-recompute"):
        row = rows[name]
        assert row["status"] == "ok", row
        for key in ("fwd_bwd_ms", "tokens_per_s", "peak_mib", "time_vs_eager", "memory_vs_eager", "vs_three_gemm",
                    "vs_four_gemm", "three_gemm_ms", "first_call_ms"):
            assert row[key] > 0, (name, key)
        assert len(row["fwd_bwd_runs_ms"]) == 2 and row["max_rel_error"] < 1e-3
        assert row["vs_three_gemm_p20"] <= row["vs_three_gemm"] <= row["vs_three_gemm_p80"]
        assert row["ours"] == (name != "eager")
    assert rows["eager"]["time_vs_eager"] == rows["eager"]["time_vs_eager_p80"] == 1.0  # within each round
    assert rows["eager"]["max_rel_error"] == 0.0
    assert "breakdown" not in rows["eager"]  # eager is not ours
    assert all("setting" not in r for r in report["results"]) and rows["eager"]["positions"] == 256
    # The GEMM floor measured in the same run, in its own rows.
    three, four = rows["3 GEMMs"], rows["4 GEMMs"]
    assert three["status"] == four["status"] == "ok" and three["vs_three_gemm"] == 1.0
    assert four["fwd_bwd_ms"] > three["fwd_bwd_ms"] and set(three["gemm_ms"]) == {"logits", "d_hidden", "d_weight"}
    # Where ours spends its time: the logits once on the fused path (3 GEMMs), recomputed on the other (4).
    for name, gemms in (("torch", 3), ("torch-recompute", 4)):
        split = rows[name]["breakdown"]
        assert split["backend"] == "torch" and split["gemm_calls"] == gemms, split
        parts = [split[k] for k in ("gemm_ms", "row_pass_ms", "segment_loss_ms", "rest_ms")]
        assert all(p >= 0 for p in parts) and split["gemm_ms"] > 0 and split["row_pass_ms"] > 0
        assert sum(parts) == pytest.approx(split["wall_ms"], rel=0.05)
    assert report["segmentation"]["speedup"] > 1
    if "matplotlib" in sys.modules or importlib.util.find_spec("matplotlib"):
        assert list(tmp_path.glob("bench_*.png"))


def test_a_run_cut_short_keeps_its_finished_shapes(bench, tmp_path, capsys, monkeypatch):
    """The JSON is rewritten after each shape: a run cut in its second shape leaves the first one's rows, marked
    incomplete, and the summary leaves such a run out."""
    import sweep

    import summarize

    real, done = sweep.Sweep.shape, []

    def shape(self, head):
        if done:  # the cut: what a kill in the second shape leaves behind
            raise KeyboardInterrupt
        done.append(head.key)
        return real(self, head)

    monkeypatch.setattr(sweep.Sweep, "shape", shape)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--shapes", "16x503@64,16x1003@64", "--providers", "eager,torch",
                    "--settings", "beta0", "--reps", "1", "--no-segmentation", "--no-breakdown", "--out",
                    str(tmp_path)])
    capsys.readouterr()
    report = _report(tmp_path)
    assert report["complete"] is False and not list(tmp_path.glob("*.tmp"))
    assert {r["shape"] for r in report["results"]} == {"custom-16x503@64"} == set(report["rounds"])
    assert {r["provider"]: r["status"] for r in report["results"]}["torch"] == "ok"
    assert summarize.reports(tmp_path) == []


@pytest.mark.slow  # torch.compile and Liger's compiled loss: a minute on a cold inductor cache, seconds on a warm one
def test_every_available_peer_is_checked_against_eager(bench, child, tmp_path, capsys):
    peers = ("compile", "liger", "cce")
    # The realistic workload at beta 0: no old or reference log-probs (each peer's on-policy path).
    assert bench.main(["--device", "cpu", "--shapes", "32x1001@128", "--providers", ",".join(("eager",) + peers),
                       "--settings", "beta0", "--reps", "1", "--no-segmentation", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    rows = {r["provider"]: r for r in _report(tmp_path)["results"]}
    package = {"compile": "torch", "liger": "liger_kernel", "cce": "cut_cross_entropy"}
    for name in peers:
        if importlib.util.find_spec(package[name]) is None:
            assert rows[name]["status"] == f"skipped: package {package[name]} not installed"
            continue
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["max_rel_error"] <= child.TOLERANCE[torch.float32] and row["fwd_bwd_ms"] > 0
        assert row["peak_mib"] > 0 and row["time_vs_eager"] > 0 and "breakdown" not in row


def test_a_provider_that_disagrees_is_reported_wrong_and_not_timed(bench, child, tmp_path, monkeypatch):
    """In this process: the yardstick's worker, then one provider's worker as its own process would run it."""
    import providers
    from batches import DENSE

    job = child.Job(bench.parse_shape("16x503@64"), torch.float32, torch.device("cpu"), DENSE, tmp_path, reps=2,
                    breakdown=True, fwd=True, token_level=True)
    child.Reference(job).setup()
    assert {p.name for p in (tmp_path / "released").iterdir()} == {"eager.pt", "token_level.pt"}

    def off_by_one_percent(batch):
        eager = providers.PROVIDERS["eager"].build(batch)
        return lambda: 1.01 * eager()

    monkeypatch.setitem(providers.PROVIDERS, "scaled", providers.Provider("eager x 1.01", off_by_one_percent))
    scaled = child.Provider("scaled", job)
    row = scaled.setup()["rows"]["released"]
    assert row["status"].startswith("wrong: relative error 1.0") and "peak_mib" not in row
    assert row["max_rel_error"] == pytest.approx(0.01, rel=1e-3) and not row["ours"]
    with pytest.raises(KeyError):  # nothing to time
        scaled.visit("released")
    ours = child.Provider("torch", job)
    row = ours.setup()["rows"]["released"]
    assert row["status"] == "ok" and row["fwd_ms"] > 0 and row["breakdown"]["gemm_calls"] == 3 and row["ours"]
    assert ours.visit("released")["seconds"] > 0


def test_a_failing_worker_is_reported(bench, tmp_path):
    """A worker process that cannot start says why; a sweep reports it in the provider's rows and goes on."""
    from rounds import Process, WorkerFailed
    from sweep import RUN_PY

    worker = Process([sys.executable, str(RUN_PY), "--child", "no-such-provider", "--shapes", "16x503@64",
                                   "--ref-dir", str(tmp_path)], timeout=120)
    with pytest.raises(WorkerFailed, match=r"^exit 1: .*no-such-provider"):
        worker.ask("setup")
    worker.close()


def test_gpu_check_names_only_known_providers_and_shapes(bench):
    gpu_check = load_benchmark_module("gpu_check")
    names = gpu_check.PROVIDERS.split(",") + gpu_check.REALISTIC_PROVIDERS.split(",")
    assert set(names) <= set(bench.PROVIDERS)
    for required in ("eager", "triton", "cuda", "triton-recompute", "trl", "liger", "cce"):
        assert required in names
    assert bench.parse_shape(gpu_check.REALISTIC_SHAPE).vocab == 151936
    shapes = [bench.parse_shape(s) for s in gpu_check.GPU_SHAPES.split(",")]
    assert [(s.hidden, s.vocab, s.tokens) for s in shapes] == [(896, 151936, 16384), (3072, 128256, 16384)]


def test_summary_comes_from_the_json(tmp_path):
    summarize = load_benchmark_module("summarize")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{summarize.BEGIN}\nold\n{summarize.END}\nend\n")
    results = tmp_path / "results"
    results.mkdir()
    assert "No results are committed yet" in summarize.update(readme, summarize.summary(results))
    assert "No CPU run is committed yet" in summarize.readme_summary(results)
    split = dict(backend="torch", wall_ms=20.0, gemm_ms=12.0, row_pass_ms=5.0, segment_loss_ms=1.0, rest_ms=2.0,
                 gemm_calls=3, clock="cpu")
    rows = [dict(shape="s@1", provider="3 GEMMs", status="ok", fwd_bwd_ms=10.0, vs_three_gemm=1.0, time_vs_eager=0.2),
            dict(shape="s@1", provider="triton", status="ok", fwd_bwd_ms=12.5, peak_mib=64.0, time_vs_eager=0.4,
                 memory_vs_eager=0.01, vs_three_gemm=1.2),
            dict(shape="s@1", provider="torch", status="ok", fwd_bwd_ms=20.0, peak_mib=128.0, time_vs_eager=0.8,
                 memory_vs_eager=0.02, vs_three_gemm=2.0, three_gemm_ms=10.0, breakdown=split),
            dict(shape="s@1", provider="liger", status="wrong: relative error 3.0e-01 > 5e-02")]
    env = dict(gpu="NVIDIA H100", device="cuda", date="2026-11-26", torch="2.13.0", triton="3.9.0", git_sha="abc",
               command="python benchmarks/gpu_check.py", liger_kernel="0.8.5", cut_cross_entropy="25.1.1")
    (results / "bench_r.json").write_text(json.dumps(dict(environment=env, dtype="bfloat16", results=rows)))
    text = summarize.update(readme, summarize.summary(results))
    assert "| shape | provider | fwd+bwd ms | x 3 GEMM | time vs eager | extra peak MiB | memory vs eager |" in text
    assert "| s@1 | triton | 12.5 | 1.20 | 0.40 | 64 | 0.010 |" in text
    assert "| s@1 | 3 GEMMs | 10.0 | 1.00 | 0.20 |  |  |" in text
    assert "| s@1 | liger | wrong: relative error 3.0e-01 > 5e-02 |" in text
    assert "| s@1 | torch | 20.0 | 12.0 (60%) | 5.0 (25%) | 1.0 (5%) | 2.0 (10%) | 3 | 10.0 |" in text
    assert "NVIDIA H100" in text and "liger-kernel 0.8.5" in text
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    # A realistic report: the setting column, the ratio to the GEMMs over the loss tokens, the workload's shares.
    rows = [dict(shape="s@1", setting="beta0", provider="torch", status="ok", fwd_bwd_ms=20.0, peak_mib=8.0,
                 vs_three_gemm=2.0, vs_three_gemm_loss_tokens=20.0, time_vs_eager=0.5, memory_vs_eager=0.1)]
    shares = dict(prompts=1, generations=8, rows=8, row_length=250, positions=2000, completion_tokens=1600,
                  padding_share=0.2, zero_advantage_share=0.9, gradient_share_beta0=0.1, zero_advantage_rank_share=0.95,
                  hits_per_list=0.6, items_emitted_mean=19.2, early_stop_share=0.1, overflow_share=0.1,
                  settings={"beta0": dict(gemm_tokens=200, clip_fraction=0.0, clip_ratio_region=0.0, ratio_mean=1.0)})
    (results / "bench_r.json").write_text(json.dumps(dict(environment=env, dtype="bfloat16", results=rows,
                                                          workload=dict(kind="realistic"), workloads={"s@1": shares})))
    text = summarize.update(readme, summarize.summary(results))
    assert "| s@1 | beta0 | torch | 20.0 | 2.00 | 20.00 | 0.50 | 8 | 0.100 |" in text
    assert "| s@1 | 1 x 8 | 8 x 250 | 2000 | 1600 | 20.0% | 90.0% | 10.0% |" in text and "workload realistic" in text
    assert "| s@1 | beta0 | 200 | 10.0% |" in text
    # The README: the latest run of each kind of device, time against eager per setting, ours against the floors.
    rows[0].update(ours=True, vs_three_gemm_p20=1.9, vs_three_gemm_p80=2.2)
    (results / "bench_r.json").write_text(json.dumps(dict(
        environment=env, dtype="bfloat16", results=rows, reps=20, rounds={"s@1": dict(rounds=20)},
        labels=dict(torch="rankgrpo fused (ours)"), workload=dict(kind="realistic"), workloads={"s@1": shares})))
    text = summarize.readme_summary(results)
    assert text.startswith("No CPU run is committed yet.") and "on NVIDIA H100 (bfloat16, 20 rounds" in text
    assert "| provider | beta0 | extra peak MiB | memory vs eager |" in text
    assert "| rankgrpo fused (ours) | 0.50 | 8 | 0.100 |" in text
    assert "rankgrpo fused (ours) against the three LM-head GEMMs" in text and "2.00 (1.90-2.20) over all" in text


# --- the realistic workload -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workload(bench):
    import workload  # run.py put benchmarks/ on the path

    return workload


def test_realistic_workload_is_built_as_the_trainer_builds_it(workload):
    from rankgrpo_kernels import line_table, rank_advantages, rank_rewards, segment_items, token_advantages

    layout = workload.make_layout(vocab=503, prompts=3, seed=0)
    B, T = layout.target_ids.shape
    assert B == 3 * workload.GENERATIONS
    mask = layout.completion_mask
    lengths = mask.sum(1)
    assert int(lengths.max()) == T and bool((mask == (torch.arange(T) < lengths[:, None])).all())  # right-padded
    tok = workload.BenchTokenizer(503)
    assert bool((layout.target_ids[~mask] == tok.pad_token_id).all())
    assert bool((layout.target_ids.gather(1, (lengths - 1)[:, None]) == tok.eos_token_id).all())  # EOS in the mask
    # Items from the library's segmentation, advantages from its reward functions, as RankGRPOTrainer does.
    segments = segment_items(layout.target_ids, mask, line_table(tok, 503), workload.REC_NUM,
                             eos_token_id=tok.eos_token_id, skip_blank_lines=True)
    assert torch.equal(layout.item_ids, segments.item_ids)
    advantages = rank_advantages(rank_rewards(layout.hits, "exp_inf"), workload.GENERATIONS, scale="group")
    assert torch.equal(layout.rank_advantages, advantages)
    assert torch.equal(layout.advantages, token_advantages(advantages, segments, length_shaping=True))
    emitted = segments.items_emitted
    assert bool((emitted < workload.REC_NUM).any()) or bool(segments.overflow_mask.any())
    stats = workload.layout_stats(layout)
    assert 0 < stats["padding_share"] < 0.5 and 0.5 < stats["zero_advantage_share"] < 1
    assert 0 < stats["gradient_share_beta0"] < 1 - stats["padding_share"]
    assert stats["positions"] == B * T and stats["completion_tokens"] == int(mask.sum())
    # Ranks that no completion of a group hit have advantage exactly 0 for the whole group.
    grouped = layout.hits.view(3, workload.GENERATIONS, -1)
    missed = (grouped == 0).all(1).repeat_interleave(workload.GENERATIONS, 0)
    assert bool(missed.any()) and bool((layout.rank_advantages[missed] == 0).all())
    # Tokens that enter a GEMM: fewer at beta = 0 (items with advantage 0 everywhere drop out).
    loss_tokens = int((mask & (layout.item_ids >= 0)).sum())
    counts = {n: workload.gemm_tokens(layout, s) for n, s in workload.SETTINGS.items()}
    assert counts["beta1e-3"] == loss_tokens and 0 < counts["beta0"] == counts["offpolicy"] < loss_tokens
    assert counts["beta0"] == stats["gradient_tokens_beta0"]


def test_every_setting_builds_a_batch(bench, workload):
    import batches

    shape, cpu = bench.parse_shape("16x503@256"), torch.device("cpu")
    for name, setting in workload.SETTINGS.items():
        batch = batches.REALISTIC.batch(shape, name, torch.float32, cpu)
        assert batch.setting == name and batch.settings == setting.loss_settings()
        assert batch.settings["loss_type"] == "bnpo" and batch.settings["epsilon_low"] == 0.06
        inputs = batch.loss_inputs
        assert (inputs["old_logps"] is not None) == setting.old_logps
        assert (inputs["ref_logps"] is not None) == setting.ref_logps
        stats = batches.clip_stats(batch.logps, inputs, setting)
        if name == "offpolicy":
            assert stats["clip_fraction"] > 0.2 and stats["clip_ratio_region"] > 0
        else:
            assert stats["clip_fraction"] < 0.05
        assert ("kl" in stats) == setting.ref_logps
    assert workload.SETTINGS["beta0"].beta == 0 and workload.SETTINGS["beta1e-3"].beta == 1e-3


def test_tiny_realistic_run(bench, child, tmp_path, capsys):
    """The default workload end to end at one setting: its GEMM rows, both ratios, the shares and TRL's peer. The
    head is wide enough (V = 8000) that the GEMMs over the 17% of positions the loss needs take clearly less than
    over all of them, in every round, on a busy machine too: each ratio is taken within a round."""
    assert bench.main(["--device", "cpu", "--shapes", "64x8000@256", "--providers", "eager,torch,trl",
                       "--settings", "offpolicy", "--reps", "3", "--no-segmentation", "--no-breakdown",
                       "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| custom-64x8000@256 | offpolicy | 3 GEMMs (loss tokens) |" in table
    assert "| x 3 GEMM (p20-p80) | x 3 GEMM (loss tokens) (p20-p80) |" in table
    assert "| padding share | zero-advantage share |" in table
    report = _report(tmp_path)
    assert report["workload"]["kind"] == "realistic" and set(report["workload"]["settings"]) == {"offpolicy"}
    shares = report["workloads"]["custom-64x8000@256"]
    assert shares["padding_share"] > 0 and shares["zero_advantage_share"] > 0 and shares["prompts"] == 1
    assert shares["settings"]["offpolicy"]["clip_fraction"] > 0.2
    rows = {r["provider"]: r for r in report["results"]}
    assert all(r["setting"] == "offpolicy" for r in rows.values())
    every, needed = rows["3 GEMMs (all positions)"], rows["3 GEMMs (loss tokens)"]
    assert every["gemm_tokens"] == shares["positions"] and needed["gemm_tokens"] == shares["gradient_tokens_beta0"]
    assert needed["gemm_tokens"] < every["gemm_tokens"] / 4
    assert len(every["fwd_bwd_runs_ms"]) == len(needed["fwd_bwd_runs_ms"]) == 3
    for name in ("eager", "torch", "trl"):
        row = rows[name]
        if name == "trl" and importlib.util.find_spec("trl") is None:
            assert row["status"] == "skipped: package trl not installed"
            continue
        assert row["status"] == "ok", row
        assert row["max_rel_error"] <= child.TOLERANCE[torch.float32] and row["positions"] == shares["positions"]
        assert row["vs_three_gemm_loss_tokens"] > 1.5 * row["vs_three_gemm"] > 0
        assert row["gemm_tokens"] == needed["gemm_tokens"] and row["time_vs_eager"] > 0


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed")
def test_trl_peer_matches_eager_with_reference_log_probs(bench, child, tmp_path):
    """In this process: TRL's ChunkedLogProbFunction + our loss at beta 1e-3 (old and reference log-probs)."""
    from batches import Work

    job = child.Job(bench.parse_shape("16x503@256"), torch.float32, torch.device("cpu"), Work(settings=("beta1e-3",)),
                    tmp_path)
    child.Reference(job).setup()
    row = child.Provider("trl", job).setup()["rows"]["beta1e-3"]
    assert row["status"] == "ok" and row["max_rel_error"] < 1e-4 and row["setting"] == "beta1e-3"


def test_trl_refusal_says_why(bench, monkeypatch):
    import importlib.metadata

    import providers

    refuse, cpu = providers.PROVIDERS["trl"].refuse, torch.device("cpu")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    assert refuse(cpu, torch.float32) == "package trl not installed"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.21.0")
    assert "needs trl >= 1.16" in refuse(cpu, torch.float32)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.16.0")
    assert refuse(cpu, torch.float32) is None


def test_ours_run_where_the_backend_registry_says(bench):
    """Every registered backend is benchmarked, and each of ours refuses exactly as the registry does."""
    import providers

    from rankgrpo_kernels import backends

    ours = [p for p in providers.PROVIDERS.values() if p.backend is not None]
    assert {p.backend for p in ours} == set(backends.names())
    for device in (torch.device("cpu"), torch.device("cuda")):
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for provider in ours:
                assert provider.refuse(device, dtype) == backends.refusal(provider.backend, device, dtype)
