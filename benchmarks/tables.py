"""The README's benchmark tables, from the JSON lines that ``make bench`` wrote.

    python benchmarks/tables.py runs/bench/latest.jsonl

``make bench`` runs every benchmark with its output going to the console and
to runs/bench/latest.jsonl, then this script, which prints Markdown: the
ResNet-18 step against PyTorch in both memory formats (also for
``bench_resnet_step.py --scaling`` output), the convolutions and
augmentation, the classifier step, and the communication check, each with
the load average the benchmark recorded. The README's tables are pasted
from it, so a figure there can be traced to a run. Lines it does not know (a benchmark's machine record, text) are skipped.
"""
import argparse
import json
import sys


def read_records(path):
    """The JSON objects of a file of JSON lines, in order; other lines skipped."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return records


def _load(r):
    """'load 1.2-1.9, others 0.05 cores' from a record's load fields (common.load_record)."""
    known = [v for v in (r.get("load_before"), r.get("load_after")) if v is not None]
    parts = [f"load {min(known):.1f}-{max(known):.1f}"] if known else []
    if r.get("other_cpu_cores") is not None:
        parts.append(f"others {r['other_cpu_cores']:.2f} cores")
    if r.get("steal_cores"):
        parts.append(f"steal {r['steal_cores']:.2f}")
    text = ", ".join(parts)
    return text + " (LOADED: do not trust)" if r.get("loaded") else text


def step_table(records):
    """Markdown rows of bench_resnet_step.py's configurations (default or --scaling)."""
    steps = [r for r in records if r.get("benchmark") == "resnet_step"]
    if not steps:
        return []
    rows = ["| threads | width | batch | refimpl img/s | PyTorch NCHW img/s | ratio: wall (CPU) "
            "| PyTorch channels_last img/s | ratio: wall (CPU) | load |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
        rows.append(
            f"| {r['threads']} | {r['width']} | {r['batch']} | {r['refimpl_img_per_s']:.1f} "
            f"| {r['torch_img_per_s']:.1f} | {r['ratio_nchw']:.2f} ({r['cpu_ratio_nchw']:.2f}) "
            f"| {r['torch_cl_img_per_s']:.1f} | {r['ratio_cl']:.2f} ({r['cpu_ratio_cl']:.2f}) "
            f"| {_load(r)} |")
    return rows


def summary_table(records):
    """Markdown rows: the convolutions and augmentation."""
    rows = []
    for r in (r for r in records if r.get("benchmark") == "conv_all"):
        rows.append(
            f"| `bench_conv.py`: every conv of the ResNet-18 CIFAR step, fwd + bwd, "
            f"count-weighted | width {r['width']}, batch {r['batch']} "
            f"| {r['total_speed_ratio']:.2f} "
            f"| ms: refimpl {r['refimpl_fwd_ms'] + r['refimpl_bwd_ms']:.0f}, "
            f"PyTorch {r['torch_fwd_ms'] + r['torch_bwd_ms']:.0f}; {_load(r)} |")
    for r in (r for r in records if r.get("benchmark") == "augment"):
        rows.append(
            f"| `bench_augment.py`: augmentation vs Pillow per image, {r['threads']} thread "
            f"| {r['size']}x{r['size']}, batch {r['batch']} | {r['ratio']:.2f} "
            f"| img/s: refimpl {r['refimpl_img_per_s']:,.0f}, "
            f"Pillow {r['pillow_img_per_s']:,.0f}; {_load(r)} |")
    if not rows:
        return []
    return ["| benchmark | configuration | ratio (refimpl / PyTorch speed) | detail |",
            "|---|---|---|---|"] + rows


def classifier_table(records):
    """Markdown rows of bench_classifier.py's steps (CPU and GPU alike)."""
    steps = [r for r in records if r.get("benchmark") == "classifier_step"]
    if not steps:
        return []
    rows = ["| device | N | P | refimpl s/step | fraction of GEMM limit | PyTorch dense s | ratio "
            "| PyTorch blocked s | ratio | system CPU s: refimpl, dense | refimpl peak MB "
            "per rank | dense peak MB | memory ratio | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
        frac = r.get("fraction_of_gemm_limit")
        blocked = r.get("torch_blocked_s")
        rows.append(
            f"| {r['device']} | {r['N']:,} | {r['P']} | {r['refimpl_s']:.3f} "
            f"| {'' if frac is None else f'{frac:.2f}'} | {r['torch_s']:.3f} | {r['ratio']:.2f} "
            f"| {'' if blocked is None else f'{blocked:.3f}'} "
            f"| {'' if blocked is None else format(r['ratio_blocked'], '.2f')} "
            f"| {r['refimpl_sys_s']:.2f}, {r['torch_sys_s']:.2f} "
            f"| {r['refimpl_peak_mb']:,.0f} | {r['torch_peak_mb']:,.0f} "
            f"| {r['memory_ratio']:.3f} | {_load(r)} |")
    return rows


def comm_lines(records):
    """One line: how many communication configurations matched the formula."""
    comm = [r for r in records if r.get("benchmark") == "comm_bytes"]
    if not comm:
        return []
    good = sum(bool(r["match"]) for r in comm)
    ps = sorted({r["P"] for r in comm})
    return [f"`bench_comm_bytes.py`: {good} of {len(comm)} configurations (P = "
            f"{', '.join(map(str, ps))}) send exactly docs/design.md's bytes per rank."]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("jsonl", help="the JSON lines make bench wrote (runs/bench/latest.jsonl)")
    args = ap.parse_args(argv)
    try:
        records = read_records(args.jsonl)
    except OSError as e:
        sys.exit(f"tables.py: cannot read {args.jsonl}: {e.strerror}")
    if not records:
        sys.exit(f"tables.py: {args.jsonl} holds no benchmark records (JSON lines)")
    blocks = [step_table(records), summary_table(records), classifier_table(records),
              comm_lines(records)]
    print("\n\n".join("\n".join(b) for b in blocks if b))


if __name__ == "__main__":
    main()
