"""How much of RTN's W4A4KV4 gap other choice rules would have closed on trainings already measured (issue 23).

Reads the JSON tables of `demos/spinquant_compare.py --score_candidates` (every candidate scored on the held-out train
windows that make the choice and, as `report`, on validation) and replays three rules on them, without running a
model:
- held-out: the code's rule, the lowest held-out loss among the candidates clearly below no rotation (`clear`);
- simplest within k SE: among those, the ones whose held-out loss is within k standard errors (of the held-out best's
  gain over no rotation) of the best, the one with the fewest data-fitted parts (learned R1 and R2, S4, S1 and S2,
  the shift), then the lowest held-out loss (the "one standard error" rule of model selection);
- validation best: the candidate lowest on validation, an upper bound that no rule without validation can pass.
Candidates of opt-in flags (--learn_with_s4) are left out, so each file offers the default code's candidates.

    python bench/spinquant_choice_rules.py                 # the 18 GPU trainings of the BPE model the rules were
                                                           # first replayed on (bench/results/spinquant_choice_rules)
    python bench/spinquant_choice_rules.py --files='bench/results/x/*.json' --k=0.5,1,2
"""
import argparse
import glob
import json
import os
import re
import statistics
import sys

DEFAULT = ",".join(f"bench/results/{d}/*.json" for d in (
    "spinquant_shift_gptq_gpu", "spinquant_seeds_gpu", "spinquant_kl_choice_gpu", "spinquant_learn_with_s4_gpu"))
OPT_IN = ("learned with S4 from identity", "learned from identity, then with S4")  # --learn_with_s4's candidates
GOAL = 70.0


def fitted_parts(name):
    """How many parts of a candidate are fitted to calibration data: learned R1 (and R2), S4, S1 and S2, the shift."""
    parts = 0
    if name.startswith("learned"):
        parts += 2 if re.search(r"\b(all|R1\+R2)\b", name) else 1
    return parts + ("S4" in name) + 2 * ("S1+S2" in name) + ("shift" in name)


def training(path):
    """(label, full precision loss, RTN loss, [candidates]) of one JSON table, or None where it has no scored list."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    fp = [r["loss"] for r in rows if r.get("method") == "full precision"]
    rtn = [r["loss"] for r in rows if str(r.get("method", "")).startswith("RTN, no rotation")]
    lists = [r["candidates"] for r in rows if r.get("candidates")]
    if not (fp and rtn and lists) or not all("report" in c for c in lists[0]):
        return None
    label = f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"
    return label, fp[0], rtn[0], [c for c in lists[0] if not c["name"].startswith(OPT_IN)]


def choose(candidates, k=None):
    """The held-out rule (k None) or the simplest candidate within k standard errors of its choice."""
    clear = [c for c in candidates if c.get("clear")]
    best = min(clear, key=lambda c: c["heldout_loss"])
    if k is None or not best.get("standard_errors"):
        return best
    se = best["gain"] / best["standard_errors"]
    near = [c for c in clear if c["heldout_loss"] <= best["heldout_loss"] + k * se]
    return min(near, key=lambda c: (fitted_parts(c["name"]), c["heldout_loss"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", default=DEFAULT, help="comma-separated globs of spinquant_compare.py JSON tables")
    p.add_argument("--k", default="1", help="comma-separated standard-error widths of the simplest-within rule")
    args = p.parse_args(argv)
    try:
        ks = [float(v) for v in args.k.split(",")]
    except ValueError:
        sys.exit(f"spinquant_choice_rules.py: error: --k={args.k}: expected comma-separated numbers, e.g. 0.5,1")
    paths = sorted({f for pattern in args.files.split(",") for f in glob.glob(pattern)})
    rows = [t for t in map(training, paths) if t is not None]
    if not rows:
        sys.exit(f"spinquant_choice_rules.py: error: --files={args.files}: no JSON table with scored candidates")
    rules = [("held-out (the code's)", None)] + [(f"simplest within {k:g} SE", k) for k in ks]
    head = [r[0] for r in rules] + ["validation best"]
    print("share of RTN's W4A4KV4 gap closed on validation, by the candidate each rule keeps\n")
    print("| training | gap (nats) | " + " | ".join(head) + " |")
    print("|---|---:|" + "---|" * len(head))
    shares = {h: [] for h in head}
    for label, fp, rtn, candidates in rows:
        def share(c):
            return 100 * (rtn - c["report"]) / (rtn - fp)
        kept = [choose(candidates, k) for _, k in rules] + [min(candidates, key=lambda c: c["report"])]
        cells = []
        for h, c in zip(head, kept):
            shares[h].append(share(c))
            cells.append(f"{share(c):.0f}% {c['name']}")
        print(f"| {label} | {rtn - fp:.4f} | " + " | ".join(cells) + " |")
    print(f"\n| over {len(rows)} trainings | " + " | ".join(head) + " |")
    print("|---|" + "---:|" * len(head))
    print(f"| at least {GOAL:.0f}% | " + " | ".join(f"{sum(s >= GOAL for s in shares[h])}" for h in head) + " |")
    print("| mean | " + " | ".join(f"{statistics.mean(shares[h]):.1f}%" for h in head) + " |")
    print("| lowest | " + " | ".join(f"{min(shares[h]):.0f}%" for h in head) + " |")


if __name__ == "__main__":
    main()
