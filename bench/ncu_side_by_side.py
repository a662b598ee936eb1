"""Two or more kernels' Nsight Compute metrics side by side: the raw pages (`ncu -i REPORT --page raw --csv`, one
kernel each, as `bash bench/inference_gpu.sh prefill_ncu_peer` writes them) cut to the metrics whose names match
--patterns, one row per metric, one column per report, as a markdown table.

    python bench/ncu_side_by_side.py ours.csv cublas.csv --names=ours,cuBLAS
    python bench/ncu_side_by_side.py a.csv b.csv --patterns='tensor,shared' > table.md
"""
import argparse
import csv
import re
import sys

PATTERNS = (r"^gpu__time_duration\.sum$", r"^sm__cycles_(active|elapsed)\.avg$",
            r"^launch__(grid_size|block_size|cluster_size|registers_per_thread|shared_mem_per_block)$",
            r"^sm__pipe_tensor_cycles_active\.avg\.pct_of_peak_sustained_(active|elapsed)$",
            r"^smsp__issue_active\.avg\.pct_of_peak_sustained_active$",
            r"^l1tex__data_pipe_lsu_wavefronts_mem_shared(_op_ld|_op_st)?\.sum(\.pct_of_peak_sustained_elapsed)?$",
            r"^l1tex__data_bank_conflicts_pipe_lsu_mem_shared(_op_ld|_op_st)?\.sum$",
            r"^l1tex__m_xbar2l1tex_read_bytes\.sum$", r"^lts__throughput\.avg\.pct_of_peak_sustained_elapsed$",
            r"^dram__bytes_read\.sum$")


def read(path):
    """{metric: (unit, value)} of the one kernel in an ncu raw-page CSV (the first kernel where there are more)."""
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    try:
        header = next(i for i, row in enumerate(rows) if "Kernel Name" in row)
    except StopIteration:
        raise ValueError(f"{path}: not an ncu raw page (no 'Kernel Name' column); expected the output of "
                         "`ncu -i REPORT --page raw --csv`") from None
    names, units = rows[header], rows[header + 1] if header + 1 < len(rows) else []
    values = [row for row in rows[header + 2:] if len(row) == len(names)]
    if not values:
        raise ValueError(f"{path}: the raw page has no kernel's row")
    return {name: (units[i] if i < len(units) else "", values[0][i]) for i, name in enumerate(names)}


def table(reports, labels, patterns=PATTERNS):
    """Markdown lines: the metrics of any report matching any pattern (regular expressions), in the first report's
    order, with their unit and each report's value ('-' where a report lacks it)."""
    regexes = [re.compile(p) for p in patterns]
    names = []
    for report in reports:
        names += [n for n in report if n not in names and any(r.search(n) for r in regexes)]
    out = ["| metric | unit | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for name in names:
        unit = next((r[name][0] for r in reports if name in r), "")
        out.append(f"| {name} | {unit} | " + " | ".join(r[name][1] if name in r else "-" for r in reports) + " |")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="ncu raw pages as CSV (--page raw --csv), one kernel each")
    p.add_argument("--names", default="", help="comma-separated column labels, one per CSV (default: the files)")
    p.add_argument("--patterns", default="", help="comma-separated regular expressions of metric names (default: "
                   "time, cycles, launch, tensor pipe, shared memory, L2 and DRAM bytes)")
    args = p.parse_args()
    labels = [n for n in args.names.split(",") if n] or args.csv
    if len(labels) != len(args.csv):
        sys.exit(f"ncu_side_by_side.py: error: --names has {len(labels)} labels for {len(args.csv)} files")
    try:
        patterns = [re.compile(q).pattern for q in args.patterns.split(",") if q] or PATTERNS
    except re.error as e:
        sys.exit(f"ncu_side_by_side.py: error: --patterns: {e}")
    try:
        reports = [read(path) for path in args.csv]
    except (OSError, ValueError) as e:
        sys.exit(f"ncu_side_by_side.py: error: {e}")
    print("\n".join(table(reports, labels, patterns)))


if __name__ == "__main__":
    main()
