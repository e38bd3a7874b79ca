"""Rank-GRPO against the paper's baselines and ablations on the tiny recommender: Recall@K and NDCG@K step by step.

    python benchmarks/quality.py            # 5 methods x 4 seeds x 80 steps, N = 6: about 7 minutes on one core
    python benchmarks/quality.py --quick    # 1 seed, 4 steps: the smoke run CI makes (about a minute)
    python benchmarks/quality.py --save     # also write the JSON under benchmarks/results/ (else benchmarks/out/)

The paper (arXiv 2510.20150) trains on conversational recommendation and compares Rank-GRPO (a ratio per item,
an advantage per rank) with GRPO and GSPO trained on one reward per list, and ablates the unit of the ratio. Here
each method is one ``ObjectiveSpec`` (``rankgrpo_kernels.objective`` maps them to the paper's rows) in the same
hand-written loop (``rankgrpo_kernels.adapters.plain``), on the tiny recommender of ``integrations/`` (32 titles in 4
genres; a prompt asks for N titles of a genre like a seed title; the relevant titles are the other 7 of the genre;
a 2-layer Llama warm-started to write lists that follow the genre only partly). Per seed every method starts from
the same warm-started model and draws the same prompts; only the objective differs. Training reward: per-rank hits
(``item_hits``); the list methods turn them into the list's DCG. Loss: ``--loss-type`` (default bnpo, the released
code's) with the released clip range, beta 1e-3 against the warm-started model, each batch used for two updates.

Evaluation: every ``--eval-every`` steps, ``--eval-samples`` sampled lists (temperature 1, a fixed seed) for each
held-out prompt (every fourth prompt, never trained on), scored by ``recommender.evaluate_lists`` (the authors'
protocol) against the prompt's relevant titles, the seed title as seen, the 32 titles as the catalogue. The tiny
titles carry no year, so each title gets a fixed made-up year before the protocol parses ``Title (Year)``.

Printed: for each method the final Recall@K and NDCG@K (mean and spread over seeds), its final NDCG@N minus the first
method's (Rank-GRPO's) on the same seed (mean and spread of the paired differences: the seeds' warm starts differ far
more than the methods do), and the first evaluated step at which the mean NDCG@N over seeds reaches
``--target-ndcg``. The JSON holds every evaluation of every run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root: integrations.tiny_recommender

from integrations.tiny_recommender import (  # noqa: E402
    ALL_TITLES, CATALOGUE, build_tiny_recommender, quiet_cpu_run,
)
from rankgrpo_kernels.adapters.plain import (  # noqa: E402
    completion_logprobs, rank_grpo_loss_for_model, rank_grpo_step_inputs, trim_completions,
)
from rankgrpo_kernels.objective import ObjectiveSpec  # noqa: E402
from rankgrpo_kernels.recommender import Catalog, evaluate_lists, item_hits  # noqa: E402

METHODS = {  # the paper's rows (rankgrpo_kernels/objective.py)
    "rank-grpo": ObjectiveSpec(importance_sampling_level="item"),
    "token ratio": ObjectiveSpec(importance_sampling_level="token"),
    "sequence ratio": ObjectiveSpec(importance_sampling_level="sequence"),
    "grpo (list dcg)": ObjectiveSpec(importance_sampling_level="token", list_reward="dcg"),
    "gspo (list dcg)": ObjectiveSpec(importance_sampling_level="sequence", list_reward="dcg"),
}
YEARS = {title: 1980 + 3 * n for n, title in enumerate(ALL_TITLES)}  # made up, distinct beyond the tolerance of 2


def sample(model, tokenizer, prompts: list[str], per_prompt: int, max_new_tokens: int) -> list[list[int]]:
    """``per_prompt`` completions (temperature 1) for each prompt, rows ``[g*G, (g+1)*G)`` for prompt g."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        sequences = model.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   max_new_tokens=max_new_tokens, num_return_sequences=per_prompt,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return trim_completions(sequences, encoded["input_ids"].shape[1], tokenizer.eos_token_id)


def with_years(text: str) -> str:
    """Each line naming a catalogue title as ``Title (Year)``; other lines as they are (the protocol drops them)."""
    return "\n".join(f"{line.strip()} ({YEARS[line.strip()]})" if line.strip() in YEARS else line
                     for line in text.split("\n"))


class Evaluation:
    """Held-out prompts and their ground truth; ``__call__`` scores a model's sampled lists by the protocol."""

    def __init__(self, rows: list[dict], rec_num: int, samples: int, ks: tuple[int, ...]):
        self.rows, self.rec_num, self.samples, self.ks = rows, rec_num, samples, ks
        self.ground_truth = [[(t, YEARS[t]) for t in row["relevant"]] for row in rows for _ in range(samples)]
        self.seen = [sorted(set(CATALOGUE[row["genre"]]) - set(row["relevant"])) for row in rows
                     for _ in range(samples)]
        self.catalog = Catalog(YEARS.items())

    def __call__(self, model, tokenizer) -> dict[str, float]:
        with torch.random.fork_rng():  # the same draws at every evaluation, the training's left alone
            torch.manual_seed(1234)
            was_training = model.training
            model.eval()
            completions = sample(model, tokenizer, [row["prompt"] for row in self.rows], self.samples,
                                 8 * self.rec_num + 8)
            model.train(was_training)
        texts = [with_years(text) for text in tokenizer.batch_decode(completions, skip_special_tokens=True)]
        return evaluate_lists(texts, self.ground_truth, self.seen, self.catalog, self.ks).as_dict()


def train(method: ObjectiveSpec, world, reference, train_rows, evaluate: Evaluation, args, seed: int) -> dict:
    """One run of the plain loop from the warm-started model; the evaluations at steps 0, eval_every, ... and the
    last."""
    model = copy.deepcopy(world.model).train()
    tokenizer, N, G = world.tokenizer, args.rec_num, args.num_generations
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()
    curve = [{"step": 0, **evaluate(model, tokenizer)}]
    for step in range(1, args.steps + 1):
        rows = rng.sample(train_rows, args.prompts_per_step)
        completions = sample(model, tokenizer, [row["prompt"] for row in rows], G, 8 * N + 8)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        hits = [item_hits(text, row["relevant"], N) for text, row in zip(texts, [r for r in rows for _ in range(G)])]
        prompt_ids = [tokenizer(row["prompt"])["input_ids"] for row in rows for _ in range(G)]
        batch = rank_grpo_step_inputs(tokenizer, prompt_ids, completions, hits, num_generations=G, rec_num=N,
                                      objective=method)
        old = completion_logprobs(model, batch)  # the behaviour policy: the second update is off-policy
        ref = completion_logprobs(reference, batch)
        for _update in range(2):
            loss, _ = rank_grpo_loss_for_model(model, batch, old_logps=old, ref_logps=ref, beta=1e-3,
                                               loss_type=args.loss_type)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, **evaluate(model, tokenizer)})
    return {"curve": curve, "seconds": time.perf_counter() - start}


def spread(values: list[float], sign: str = "") -> str:
    """``mean ± std`` over seeds (std 0 for one seed); ``sign="+"`` shows the mean's sign."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{sign}.3f} ± {std:.3f}"


def summarise(runs: dict, ks: tuple[int, ...], target: float) -> tuple[list[str], dict]:
    """The printed table and its figures: final metrics over seeds, the final NDCG@max(K) paired with the first
    method's on the same seed (the seeds' warm starts differ more than the methods do), and the first step at which
    the seeds' mean NDCG@max(K) reaches ``target``."""
    k = max(ks)
    first_method = next(iter(runs.values()))
    lines = [f"{'method':<16} " + " ".join(f"{'NDCG@' + str(c):>14} {'Recall@' + str(c):>14}" for c in ks)
             + f"  {'NDCG@' + str(k) + ' - first':>15}  first step mean NDCG@{k} >= {target}"]
    summary = {}
    for name, seeds in runs.items():
        finals = [run["curve"][-1] for run in seeds.values()]
        steps = [point["step"] for point in next(iter(seeds.values()))["curve"]]
        mean_ndcg = [statistics.fmean(run["curve"][i][f"ndcg@{k}"] for run in seeds.values())
                     for i in range(len(steps))]
        first = next((step for step, value in zip(steps, mean_ndcg) if value >= target), None)
        paired = [run["curve"][-1][f"ndcg@{k}"] - first_method[seed]["curve"][-1][f"ndcg@{k}"]
                  for seed, run in seeds.items()]
        summary[name] = {
            "final": {metric: {"mean": statistics.fmean(f[metric] for f in finals),
                               "std": statistics.stdev([f[metric] for f in finals]) if len(finals) > 1 else 0.0}
                      for metric in finals[0] if metric != "step"},
            f"final_ndcg@{k}_minus_first_method": {"mean": statistics.fmean(paired),
                                                  "std": statistics.stdev(paired) if len(paired) > 1 else 0.0},
            "mean_ndcg_by_step": dict(zip(steps, mean_ndcg)), "first_step_reaching_target": first,
        }
        lines.append(f"{name:<16} " + " ".join(
            f"{spread([f[f'ndcg@{c}'] for f in finals]):>14} {spread([f[f'recall@{c}'] for f in finals]):>14}"
            for c in ks) + f"  {spread(paired, '+'):>15}  {'not reached' if first is None else first}")
    return lines, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 steps, 2 evaluation samples (CI)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=4, help="sampled lists per held-out prompt")
    parser.add_argument("--rec-num", type=int, default=6, help="N, the titles each list names")
    parser.add_argument("--ks", default="2,4,6", help="the cut-offs K, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"a subset of {list(METHODS)}")
    parser.add_argument("--loss-type", default="bnpo", choices=("grpo", "bnpo", "dr_grpo"))
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--target-ndcg", type=float, default=0.5, help="the NDCG@max(K) whose first step is shown")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny matrices: one is fastest)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out", help="where the JSON goes")
    parser.add_argument("--save", action="store_true", help="write the JSON under benchmarks/results/ too")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.eval_samples = 1, 4, 2, 2
    methods = {name.strip(): METHODS[name.strip()] for name in args.methods.split(",") if name.strip() in METHODS}
    unknown = [name for name in args.methods.split(",") if name.strip() not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    ks = tuple(int(k) for k in args.ks.split(","))
    quiet_cpu_run(args.threads)
    started = time.perf_counter()

    runs = {name: {} for name in methods}
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as folder:
            world = build_tiny_recommender(Path(folder) / "model", rec_num=args.rec_num, seed=seed)
        rows = world.rows
        train_rows = [row for n, row in enumerate(rows) if n % 4]
        evaluate = Evaluation([row for n, row in enumerate(rows) if n % 4 == 0], args.rec_num, args.eval_samples, ks)
        reference = copy.deepcopy(world.model).eval().requires_grad_(False)
        for name, method in methods.items():
            runs[name][seed] = train(method, world, reference, train_rows, evaluate, args, seed)
            final = runs[name][seed]["curve"][-1]
            print(f"seed {seed} {name:<16} NDCG@{max(ks)} {runs[name][seed]['curve'][0][f'ndcg@{max(ks)}']:.3f} -> "
                  f"{final[f'ndcg@{max(ks)}']:.3f} in {runs[name][seed]['seconds']:.0f} s "
                  f"({time.perf_counter() - started:.0f} s so far)", flush=True)

    lines, summary = summarise(runs, ks, args.target_ndcg)
    print("\n" + "\n".join(lines))
    record = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "ks": ks,
              "methods": {name: vars(spec) for name, spec in methods.items()}, "runs": runs, "summary": summary,
              "seconds": time.perf_counter() - started, "platform": platform.platform(),
              "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    folders = [args.out] + ([ROOT / "benchmarks" / "results"] if args.save else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"quality_cpu_{stamp}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
