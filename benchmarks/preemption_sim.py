"""Expected GPU-hours of the B6 recipe on preemptible nodes, with and without mid-epoch
checkpoints: a Monte-Carlo simulation on a fake clock (nothing is trained or timed).

Assumptions (all stated in the result files):

* epoch lengths: a B6 epoch at 448 px with every block trainable takes 27 min on a P100 (the
  figure from issue #15); other stages scale by forward FLOPs (224 px: 3.4 / 13.7 GFLOPs) and by
  the trainable share ``u`` (a step costs 1/3 + 2/3 u of a full step, validation 1/3 per image,
  as in docs/performance.md section 5), with 12.4k training and 3.1k validation images;
* the stages, epochs, sizes and unfreeze shares are read from ``configs/recipe_b6.yaml``;
* a checkpoint (save + upload + pointer) costs ``--checkpoint-s`` seconds (default 10: a ~300 MB
  B6 checkpoint at the 137 MB/s measured in benchmarks/results/gcs_throughput.md is ~2.2 s of
  upload; the rest is a stated allowance for serialisation and a real bucket);
* preemptions arrive as a Poisson process (exponential times between them) with the given mean;
  after each one the stage restarts in ``--restart-min`` minutes (new node, image pull, model
  load: billed GPU time) from its last committed checkpoint;
* a preemption during a checkpoint write loses that checkpoint unless SIGTERM handling applies;
* with SIGTERM handling a checkpoint of the current step is written inside the 30 s grace
  period (it fits: cost <= grace), so no work is redone; without it (today's behaviour, or a
  kill without notice) the work since the last committed checkpoint is redone.

Strategies: ``epoch`` (today: epoch-end checkpoints, SIGTERM abandons the epoch), ``epoch +
SIGTERM`` (the new default ``checkpoint.every: epoch``), ``auto`` (Young/Daly interval, no
notice used: the SIGKILL case), ``auto + SIGTERM``. The auto interval is
`carclassifier.checkpoint_policy.young_daly_interval`, the function the trainer uses.

    python -m benchmarks.preemption_sim [--runs 1000] [--checkpoint-s 10] [--restart-min 3]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import write_results
from carclassifier.checkpoint_policy import young_daly_interval
from carclassifier.config import CheckpointConfig, load_config

RECIPE = Path(__file__).resolve().parent.parent / "configs" / "recipe_b6.yaml"
EPOCH_448_MIN = 27.0  # issue #15: B6 at 448 px on a P100
TRAIN_IMAGES, VAL_IMAGES = 12_400, 3_100
GFLOPS = {224: 3.4, 448: 13.7}
GRACE_S = 30.0
MTBF_HOURS = (None, 8.0, 4.0, 2.0, 1.0, 0.5)
STRATEGIES = ("epoch", "epoch + SIGTERM", "auto", "auto + SIGTERM")


@dataclass
class Stage:
    name: str
    epochs: int
    epoch_min: float


def recipe_stages() -> list[Stage]:
    """The B6 recipe's stages with their simulated epoch lengths (P100 minutes)."""
    config = load_config(RECIPE)

    def units(unfreeze: float) -> float:
        return TRAIN_IMAGES * (1 / 3 + 2 / 3 * unfreeze) + VAL_IMAGES / 3

    per_unit = EPOCH_448_MIN / units(1.0)
    return [
        Stage(
            s.name,
            s.epochs,
            per_unit * units(s.unfreeze) * GFLOPS[config.stage_image_size(s)] / GFLOPS[448],
        )  # fmt: skip
        for s in config.stages
    ]


def simulate_stage(
    stage: Stage, interval_min: float | None, sigterm: bool, cost_min: float,
    mtbf_min: float | None, restart_min: float, rng: np.random.Generator,
) -> dict[str, float]:  # fmt: skip
    """One stage under one strategy on a fake clock: GPU minutes, work redone, checkpointing."""
    work = stage.epochs * stage.epoch_min
    clock = lost = checkpointing = 0.0
    committed, preemptions = 0.0, 0
    while True:
        budget = rng.exponential(mtbf_min) if mtbf_min else math.inf  # until the next preemption
        position, since = committed, 0.0  # compute position, pod time used in this attempt
        last = committed
        while True:
            next_epoch_end = (math.floor(position / stage.epoch_min + 1e-9) + 1) * stage.epoch_min
            target = min(next_epoch_end, work)
            if interval_min is not None:
                target = min(target, last + interval_min)
            if since + (target - position) > budget:  # preempted while computing
                position += budget - since
                break
            since += target - position
            position = target
            if since + cost_min > budget:  # preempted while checkpointing: not committed
                break  # (with SIGTERM handling it completes in the grace period, below)
            since += cost_min
            checkpointing += cost_min
            committed = last = position
            if position >= work - 1e-9:
                return {"gpu_min": clock + since, "lost_min": lost, "checkpoint_min": checkpointing,
                        "preemptions": preemptions}  # fmt: skip
        clock += budget
        preemptions += 1
        if sigterm and cost_min * 60 <= GRACE_S:
            clock += cost_min  # the checkpoint written in the grace period
            checkpointing += cost_min
            committed = position
        else:
            lost += position - committed
        clock += restart_min


def simulate(runs: int, cost_s: float, restart_min: float, seed: int = 0) -> dict:
    """Mean GPU-hours of the whole recipe per strategy and MTBF over ``runs`` runs."""
    stages = recipe_stages()
    bounds = CheckpointConfig()  # the default auto bounds
    rows = []
    for mtbf_h in MTBF_HOURS:
        mtbf_min = None if mtbf_h is None else mtbf_h * 60
        interval_min = (
            young_daly_interval(cost_s, (mtbf_min or 10**9) * 60, bounds.min_minutes * 60,
                                bounds.max_minutes * 60) / 60
        )  # fmt: skip
        row = {"mtbf_hours": mtbf_h, "auto_interval_min": round(interval_min, 2)}
        for strategy in STRATEGIES:
            rng = np.random.default_rng([seed, int((mtbf_h or 0) * 60)])
            interval = interval_min if strategy.startswith("auto") else None
            totals = []
            for _ in range(runs):
                parts = [simulate_stage(s, interval, "SIGTERM" in strategy, cost_s / 60,
                                        mtbf_min, restart_min, rng) for s in stages]  # fmt: skip
                totals.append({k: sum(p[k] for p in parts) for k in parts[0]})
            gpu_h = np.array([t["gpu_min"] for t in totals]) / 60
            row[strategy] = {
                "gpu_hours": round(float(gpu_h.mean()), 2),
                "gpu_hours_stderr": round(float(gpu_h.std(ddof=1) / math.sqrt(runs)), 3)
                if runs > 1
                else 0.0,
                "lost_hours": round(float(np.mean([t["lost_min"] for t in totals])) / 60, 2),
                "checkpoint_hours": round(
                    float(np.mean([t["checkpoint_min"] for t in totals])) / 60, 2
                ),
                "preemptions": round(float(np.mean([t["preemptions"] for t in totals])), 1),
            }
        rows.append(row)
    return {
        "what": "simulation on a fake clock (Monte Carlo), not a measurement",
        "assumptions": {
            "epoch_448_full_min_p100": EPOCH_448_MIN,
            "gflops": GFLOPS,
            "train_images": TRAIN_IMAGES,
            "val_images": VAL_IMAGES,
            "checkpoint_s": cost_s,
            "restart_min": restart_min,
            "grace_s": GRACE_S,
            "auto_bounds_min": [bounds.min_minutes, bounds.max_minutes],
            "preemptions": "Poisson, mean time between them = MTBF",
            "runs": runs,
            "seed": seed,
        },
        "stages": [
            {"name": s.name, "epochs": s.epochs, "epoch_min": round(s.epoch_min, 2)} for s in stages
        ],  # fmt: skip
        "rows": rows,
    }


def markdown(result: dict) -> list[str]:
    a = result["assumptions"]
    compute_h = sum(s["epochs"] * s["epoch_min"] for s in result["stages"]) / 60
    lines = [
        "# B6 recipe on preemptible GPUs: expected GPU-hours (simulation, fake clock)",
        "",
        f"**Simulated, not measured.** {a['runs']} Monte-Carlo runs per cell (seed {a['seed']}). "
        f"Assumed: B6 epoch at 448 px, all blocks trainable = {a['epoch_448_full_min_p100']:g} "
        f"min on a P100 (issue #15), other stages scaled by FLOPs and trainable share "
        f"({compute_h:.1f} h of compute for the 7 stages); checkpoint {a['checkpoint_s']:g} s; "
        f"restart after a preemption {a['restart_min']:g} min; SIGTERM grace {a['grace_s']:g} s; "
        "preemptions Poisson with mean time between them = MTBF.",
        "",
        "| MTBF | auto interval | preemptions | epoch (before #15) | epoch + SIGTERM | auto "
        "(no notice) | auto + SIGTERM | redone h: epoch / auto |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        mtbf = "none" if row["mtbf_hours"] is None else f"{row['mtbf_hours']:g} h"
        cells = [
            f"{row[s]['gpu_hours']:.2f} ± {row[s]['gpu_hours_stderr']:.2f}" for s in STRATEGIES
        ]
        lines.append(
            f"| {mtbf} | {row['auto_interval_min']:.1f} min | {row['epoch']['preemptions']:.1f} | "
            + " | ".join(cells)
            + f" | {row['epoch']['lost_hours']:.2f} / {row['auto']['lost_hours']:.2f} |"
        )
    lines += [
        "",
        "GPU-hours include checkpoint writes and restarts; ± is the standard error of the mean.",
        "'auto (no notice)' is what mid-epoch checkpoints alone give when a node is lost without",
        "SIGTERM (or the grace period is too short); '+ SIGTERM' writes a checkpoint of the",
        "current step in the grace period, which the 10 s cost fits.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--checkpoint-s", type=float, default=10.0)
    parser.add_argument("--restart-min", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="100 runs")
    args = parser.parse_args()
    result = simulate(100 if args.quick else args.runs, args.checkpoint_s, args.restart_min)
    write_results("preemption_sim", result, markdown(result))


if __name__ == "__main__":
    main()
