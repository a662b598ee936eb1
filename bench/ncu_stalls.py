"""Nsight Compute's source page (`ncu -i REPORT --page source --csv --print-source sass`, as
`bash bench/inference_gpu.sh prefill_ncu` writes it) cut to what a reader of a warp-specialized kernel needs: per
SASS instruction its line, executions, warp stall samples and top two stall reasons, and the samples at each wait
on an mbarrier (the `@!P BRA` after a `SYNCS.PHASECHK...TRYWAIT`, where a waiting warp's samples land) with the
barrier's shared-memory address, so the partitions' waits can be told apart.

    python bench/ncu_stalls.py bench/results/prefill_ncu_h100_sass.csv > sass.txt
    python bench/ncu_stalls.py REPORT.csv --waits      # only the waits, with their barrier addresses
"""
import argparse
import csv
import re


def read(path):
    """[(line, source, executed, samples, [(reason, samples), ...])] from ncu's source-page CSV."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    header = next(i for i, row in enumerate(rows) if row[:2] == ["Address", "Source"])
    names = rows[header]
    col = {name: i for i, name in enumerate(names)}
    reasons = [n for n in names if n.startswith("stall_") and "Not Issued" not in n]
    out = []
    for n, row in enumerate(rows[header + 1:]):
        if len(row) < len(names):
            continue
        samples = int(row[col["Warp Stall Sampling (All Samples)"]] or 0)
        top = sorted(((int(row[col[r]] or 0), r[len("stall_"):]) for r in reasons), reverse=True)[:2]
        out.append((n, row[col["Source"]].strip(), row[col["Instructions Executed"]], samples,
                    [(name, v) for v, name in top if v]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", help="ncu's source page as CSV (--page source --csv --print-source sass)")
    p.add_argument("--waits", action="store_true", help="only the mbarrier waits and where their samples land")
    args = p.parse_args()
    lines = read(args.csv)
    total = sum(samples for _, _, _, samples, _ in lines)
    print(f"# {len(lines)} SASS instructions, {total} warp stall samples; line, executed, samples, top reasons, SASS")
    for k, (n, source, executed, samples, top) in enumerate(lines):
        if args.waits:
            barrier = re.search(r"TRYWAIT\s+\S+,\s*\[([^\]]+)\]", source)
            if barrier and k + 1 < len(lines):
                after = lines[k + 1]
                print(f"{n}\t{executed}\t{samples + after[3]}\t[{barrier.group(1)}]\t{source}")
            continue
        reasons = ", ".join(f"{name} {v}" for name, v in top)
        print(f"{n}\t{executed}\t{samples}\t{reasons}\t{source}")


if __name__ == "__main__":
    main()
