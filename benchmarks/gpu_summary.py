"""The summary table of one benchmarks/gpu_check.sh run, from what its parts left in OUT.

    python benchmarks/gpu_summary.py OUT [TOTAL_S]

Reads OUT/parts.tsv (part, status, seconds, limit), the parts' logs (pytest's
last line, the benchmarks' JSON lines), OUT/million.jsonl and
OUT/train_e2e.json; prints one markdown table (each check: passed/failed and
seconds; each benchmark: its ratio against PyTorch or its limit, and memory)
and writes it to OUT/summary.md, everything read to OUT/summary.json. Exit
status 0 when every part passed (or had nothing to run), else 1.
"""
import json
import re
import sys
from pathlib import Path



def json_lines(path, key=None, value=None):
    """The JSON objects of a log's lines (those with record[key] == value)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if key is None or record.get(key) == value:
                out.append(record)
    return out


def pytest_line(path):
    """pytest's closing counts ('12 passed, 3 skipped'), or the log's last line."""
    if not path.exists():
        return "no log"
    lines = path.read_text(errors="replace").strip().splitlines()
    for line in reversed(lines):
        m = re.search(r"(\d+ (passed|failed|skipped|deselected|error|errors)\b.*?) in [\d.]+s", line)
        if m:
            return m.group(1)
    return lines[-1][:120] if lines else "empty log"


def mb(x):
    return "-" if x is None else f"{x:,.0f} MB"


def env_result(out):
    path = out / "env.log"
    if not path.exists():
        return "no log"
    text = path.read_text(errors="replace")
    gpu = re.search(r"^cupy .*$", text, re.M)
    torch = re.search(r"^torch .*$", text, re.M)
    dry = "dry: NumPy in place of CuPy" if "dry: NumPy" in text else ""
    return "; ".join(x for x in (gpu and gpu.group(0), torch and torch.group(0), dry) if x)


def classifier_result(out, data):
    rows = json_lines(out / "classifier.log", "benchmark", "classifier_step")
    if not rows:
        return "no result"
    r = rows[-1]
    data["classifier"] = r
    return (f"N = {r['N']:,}, B = {r['B']}: refimpl {1e3 * r['refimpl_s']:.1f} ms, PyTorch "
            f"{1e3 * r['torch_s']:.1f} ms: **{r['ratio']:.2f}x PyTorch** (goal >= 1.0); memory "
            f"{mb(r['refimpl_peak_mb'])} vs {mb(r['torch_peak_mb'])}")


def resnet_result(out, data):
    rows = json_lines(out / "resnet.log", "benchmark", "resnet_step")
    if not rows:
        return "no result"
    r = rows[-1]
    data["resnet"] = r
    return (f"width {r['width']}, batch {r['batch']}: refimpl {1e3 * r['refimpl_s']:.1f} ms "
            f"({r['refimpl_img_per_s']:,.0f} img/s), PyTorch ({r['fastest_torch']}) "
            f"{1e3 * r[r['fastest_torch'] + '_s']:.1f} ms: **{r['ratio']:.2f}x PyTorch** "
            f"(goal >= 0.5); memory {mb(r.get('refimpl_peak_mb'))} vs {mb(r.get('torch_peak_mb'))}")


def million_rows(out, data):
    """[(name, status, seconds, result)] of the million-way run's parts."""
    records = json_lines(out / "million.jsonl")
    data["million"] = records
    rows = []
    for r in records:
        part = r["part"]
        ok = r.get("ok")
        status = "skipped" if ok is None and part != "setup" else (
            "passed" if ok or part == "setup" else "FAILED")
        if part == "setup":
            text = (f"N = {r['N']:,} at {r['size']}x{r['size']}, width {r['width']}, D = {r['D']}, "
                    f"B = {r['B']}, K = {r['K']}; fp32 GEMM {r['fp32_gemm_tflops']} TFLOP/s; dry run "
                    f"total {mb(r['dry_run_total_mb'])}")
        elif part == "prior":
            text = (f"{r['instances_per_s']:,} instances/s; memory {mb(r['peak_mb'])} (formula "
                    f"{mb(r['formula_mb'])})")
        elif part in ("neighbours", "ring2") and ok is not None and "seconds" in r:
            memory = (f"memory {mb(r['peak_mb'])} (formula {mb(r['formula_mb'])}); "
                      f"{r['sample_rows']} rows by brute force: cosines within "
                      f"{r['sample_worst_similarity_difference']:.1e}" if part ==
                      "neighbours" else
                      f"memory per rank {', '.join(mb(x) for x in r['peak_mb_per_rank'])} "
                      f"(formula {', '.join(mb(x) for x in r['formula_mb_per_rank'])}); rows "
                      f"equal to P = 1: {100 * r['rows_equal_to_P1']:.3f}%, similarities within "
                      f"{r['worst_similarity_difference']:.1e}")
            text = (f"P = {r['P']}: {r['fraction_of_gemm_limit']:.2f} of the GEMM limit "
                    f"({r['gemm_limit_s']} s); {memory}")
        elif part == "steps":
            cut = " (cut by the budget)" if r["cut_by_budget"] else ""
            text = (f"{r['steps']} of {r['asked']} steps{cut}, {1e3 * r['step_s']:.1f} ms/step, "
                    f"{r['img_per_s']:,.0f} img/s, loss {r['loss_first']:.3f} -> "
                    f"{r['loss_last']:.3f}; memory {mb(r['peak_mb'])} (formula "
                    f"{mb(r['formula_mb'])})")
        elif part == "knn":
            text = f"bank {r['bank']:,}, queries {r['queries']:,}; memory {mb(r['peak_mb'])}"
        else:
            text = r.get("skipped") or r.get("error", "")[-200:].replace("\n", " ").replace("|", ",")
        rows.append((f"million: {part}", status, r.get("seconds"), text))
    return rows


def e2e_result(out, data):
    path = out / "train_e2e.json"
    if not path.exists():
        return "no result"
    r = json.loads(path.read_text())
    data["train_e2e"] = r
    return (f"refimpl-train {r['train_img_per_s']:,.0f} img/s vs the step alone "
            f"{r['step_img_per_s']:,.0f} img/s: **{r['ratio']:.2f}** (width {r['width']}, "
            f"B = {r['B']}, {r['size']}x{r['size']})")


def main(out, total_s=None):
    out = Path(out)
    parts = []
    if (out / "parts.tsv").exists():
        for line in (out / "parts.tsv").read_text().splitlines():
            name, status, seconds, limit = line.split("\t")
            parts.append((name, status, float(seconds), int(limit)))
    data = {"parts": [dict(zip(("part", "status", "seconds", "limit_s"), p)) for p in parts]}
    results = {"env": lambda: env_result(out),
               "mpi-cuda": lambda: "; ".join(sorted(set(re.findall(
                   r"^== (2 ranks.*)$", (out / "mpi-cuda.log").read_text(), re.M))))
               if (out / "mpi-cuda.log").exists() else "no log",
               "classifier": lambda: classifier_result(out, data),
               "resnet": lambda: resnet_result(out, data),
               "train-e2e": lambda: e2e_result(out, data),
               "million": lambda: "its parts, one a row below" if (out / "million.jsonl").exists()
               else "no result"}
    table = ["| part | status | seconds | result |", "|---|---|---:|---|"]
    for name, status, seconds, limit in parts:
        if name.startswith("tests-"):
            result = pytest_line(out / f"{name}.log")
        elif name in results:
            try:
                result = results[name]()
            except (KeyError, ValueError, TypeError) as e:
                result = f"unreadable result ({e!r})"
        else:
            result = ""
        if not result or result == "no result":  # the log's last line says why
            log = out / f"{name}.log"
            lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            result = (result + ": " if result else "") + (lines[-1][-160:] if lines else "")
        result = result.replace("|", ",")
        table.append(f"| {name} | {status} | {seconds:.0f} | {result} |")
        if name == "million":
            for sub, sub_status, sub_s, text in million_rows(out, data):
                table.append(f"| {sub} | {sub_status} | "
                             f"{'' if sub_s is None else f'{sub_s:.0f}'} | {text} |")
    total = total_s if total_s is not None else sum(p[2] for p in parts)
    failed = [p[0] for p in parts if p[1] not in ("passed", "skipped")]
    failed += [r[0] for r in million_rows(out, {}) if r[1] == "FAILED"]
    table.append(f"| **total** | {'passed' if not failed else 'FAILED: ' + ', '.join(failed)} | "
                 f"{total:.0f} | wall time; the checks ran side by side, the benchmarks one at a time |")
    text = "\n".join(table)
    print(text)
    (out / "summary.md").write_text(text + "\n")
    data["failed"] = failed
    (out / "summary.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    return 1 if failed or not parts else 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python benchmarks/gpu_summary.py OUT [TOTAL_S]")
    sys.exit(main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) == 3 else None))
