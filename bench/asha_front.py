"""Which trials of a finished study would early stopping have stopped, and were they on the final
NLL x MI Pareto front?  Replays every trial's evaluations, in the order they were reported, through
ASHA's rule on val_nll alone and with ``scheduler.keep: [val_mi_loo]`` (studies/outcomes.py), for
a study run without early stopping (e.g. the default with ``scheduler.grace_period`` = its number
of evaluations).  Used to choose the default study's scheduler (docs/default-study-design.md).

    python bench/asha_front.py ROOT/ray_results/STUDY [--grace 2] [--rf 2]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvae_core.metrics.names import pareto_mask  # noqa: E402
from studies.outcomes import AshaRule  # noqa: E402
from studies.spaces import describe  # noqa: E402


def read_trials(experiment: Path) -> dict[str, list[dict]]:
    trials = {}
    for result in sorted(experiment.glob("*/result.json")):
        records = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if records:
            trials[records[0]["trial_id"]] = records
    return trials


def replay(trials: dict[str, list[dict]], grace: int, rf: int, keep: dict[str, str]) -> dict[str, int]:
    """-> trial id -> the evaluation at which the rule stops it (absent: never)."""
    max_t = max(len(records) for records in trials.values())
    rule = AshaRule(grace, rf, max_t, "min", metric="val_nll", steps=int(max(r[-1]["step"] for r in trials.values())),
                    keep=keep)
    reports = sorted(((r["timestamp"], r["time_total_s"], tid, r) for tid, records in trials.items() for r in records),
                     key=lambda item: item[:2])
    stopped: dict[str, int] = {}
    for _, _, tid, record in reports:
        if tid in stopped:
            continue
        n = int(record["training_iteration"])
        if rule.decide(tid, n, int(record["step"]), record["val_nll"], record):
            stopped[tid] = n
    return stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="the study's Ray experiment folder (ROOT/ray_results/STUDY)")
    parser.add_argument("--grace", type=int, default=2)
    parser.add_argument("--rf", type=int, default=2)
    args = parser.parse_args()
    trials = read_trials(args.experiment)
    if not trials:
        raise SystemExit(f"no trial results under {args.experiment}")
    finals = {tid: records[-1] for tid, records in trials.items()}
    ids = sorted(finals, key=lambda t: finals[t]["val_nll"])
    front = {tid for tid, on in zip(ids, pareto_mask([[finals[t]["val_nll"], finals[t]["val_mi_loo"]] for t in ids],
                                                     ["min", "max"])) if on}
    rules = {"ASHA on val_nll": {}, "ASHA, keep val_mi_loo": {"val_mi_loo": "max"}}
    stops = {name: replay(trials, args.grace, args.rf, keep) for name, keep in rules.items()}
    print(f"{len(trials)} trials, grace {args.grace}, reduction factor {args.rf}; final metrics of the unstopped run")
    header = f"{'trial':<10} {'config':<34} {'seed':>4} {'NLL':>7} {'KL':>5} {'MI':>5} {'AU':>3} front  " + "  ".join(
        f"{name:>22}" for name in rules)
    print(header)
    for tid in ids:
        r = finals[tid]
        cells = "  ".join(f"{('stopped@' + str(stops[name][tid])) if tid in stops[name] else 'runs on':>22}"
                          for name in rules)
        print(f"{tid:<10} {describe(r['config']):<34} {r['config'].get('train.seed', ''):>4} {r['val_nll']:7.2f} "
              f"{r['val_kl']:5.2f} {r['val_mi_loo']:5.2f} {r['val_au']:3.0f} {'*' if tid in front else '':^5}  {cells}")
    for name in rules:
        lost = sorted(front & set(stops[name]))
        print(f"{name}: stops {len(stops[name])} trials, {len(lost)} of the {len(front)} on the front"
              + (f" ({', '.join(lost)})" if lost else ""))


if __name__ == "__main__":
    main()
