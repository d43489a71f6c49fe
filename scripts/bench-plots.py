#!/usr/bin/env python3
"""Plot `make bench` output: scripts/bench-plots.py BENCH.jsonl [OUTDIR]
                      or print it as a Markdown table: --table BENCH.jsonl

Reads the benchmark's JSON lines (one figure per line: name, value, unit,
limit, ratio, ...; other lines are skipped) and writes PNG files to OUTDIR
(default docs/img):

  bench-throughput.png  every forward and reverse figure beside its limit
                        (the ratio printed on each bar)
  bench-latency.png     commit-to-destination latency distribution of each
                        latency scenario (pooled over the runs)
  bench-app-cost.png    pgbench tps of outbox_publish beside a plain INSERT

matplotlib comes from the harness's tool venv (scripts/install-deps.sh);
when this Python lacks it, the script runs itself again with the venv's.
"""

import json
import os
import sys

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    tools = os.environ.get("PGTRICKLE_TOOLS") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "pgtrickle-relay/tools",
    )
    venv_python = os.path.join(tools, "bin", "python")
    if os.path.exists(venv_python) and os.path.realpath(sys.prefix) != os.path.realpath(tools):
        os.execv(venv_python, [venv_python] + sys.argv)
    sys.exit("bench-plots: matplotlib is missing: run scripts/install-deps.sh")


def load(path):
    figures = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                o = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "name" in o and "value" in o:
                figures[o["name"]] = o  # a later run of a figure wins
    return figures


def short(name):
    for prefix in ("forward_", "reverse_"):
        if name.startswith(prefix):
            name = prefix[:-1] + " " + name[len(prefix):]
    return (
        name.replace("_200000_rows_x1_event", "")
        .replace("_to_inbox_200000", "")
        .replace("_batch", "")
        .replace("_", " ")
    )


def throughput(figs, out):
    rows = [
        f
        for n, f in figs.items()
        if n.startswith(("forward_", "reverse_"))
        and f.get("unit") == "events/s"
        and f.get("limit")
    ]
    if not rows:
        return None
    rows.sort(key=lambda f: (not f["name"].startswith("forward_"), f["name"]))
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.5))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [f["limit"] for f in rows], height=0.4,
            color="#cccccc", label="limit measured beside it")
    ax.barh([i - 0.2 for i in y], [f["value"] for f in rows], height=0.4,
            color="#3070b0", label="relay")
    for i, f in enumerate(rows):
        ax.text(f["value"], i - 0.2, f"  {f['ratio'] * 100:.0f} % of {f['limit_of']}",
                va="center", fontsize=8)
    ax.set_yticks(list(y))
    ax.set_yticklabels([short(f["name"]) for f in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("events/s (median of runs)")
    ax.set_title("Throughput beside its limit (same run, same rows)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, "bench-throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


FLOOR = 0.1


def latency(figs, out):
    dists = [f for n, f in sorted(figs.items()) if n.endswith("_distribution") and "percentiles" in f]
    if not dists:
        return None
    fig, ax = plt.subplots(figsize=(9, 5))
    clipped = False
    for f in dists:
        pts = sorted((float(q), ms) for q, ms in f["percentiles"].items())
        achieved = figs.get(f["name"][: -len("_distribution")] + "_achieved_rate", {}).get("value")
        label = "{} {:.0f}/s{}, {} writers (p50 {:.1f}, p99 {:.1f} ms)".format(
            f["sink"], f["target_rate"],
            " (achieved {:.0f}/s)".format(achieved) if achieved else "", f["writers"],
            f["percentiles"].get("50", f["value"]), f["percentiles"].get("99", float("nan")))
        clipped = clipped or any(ms < FLOOR for _, ms in pts)
        ax.plot([max(ms, FLOOR) for _, ms in pts], [q for q, _ in pts], marker=".", label=label)
    ax.set_xscale("log")
    # A writer scheduled late after its COMMIT returned can make a latency
    # negative (an overloaded machine): drawn at the floor.
    note = " (values under {} ms drawn at {})".format(FLOOR, FLOOR) if clipped else ""
    ax.set_xlabel("COMMIT returned -> event at the destination, ms, log scale" + note)
    ax.set_ylabel("percentile of events")
    ax.set_yticks([0, 10, 25, 50, 75, 90, 99])
    ax.axhline(50, color="#999999", lw=0.5)
    ax.axhline(99, color="#999999", lw=0.5)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("Latency distribution (all runs pooled)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = os.path.join(out, "bench-latency.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def app_cost(figs, out):
    rows = [f for n, f in sorted(figs.items()) if n.startswith("app_cost_outbox_publish_") and f.get("limit")]
    if not rows:
        return None
    rows.sort(key=lambda f: (f.get("relay_following", False), f.get("clients", 0)))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [f["limit"] for f in rows], width=0.4, color="#cccccc",
           label="plain INSERT of the same jsonb")
    ax.bar([i + 0.2 for i in x], [f["value"] for f in rows], width=0.4, color="#3070b0",
           label="outbox_publish")
    for i, f in enumerate(rows):
        ax.text(i + 0.2, f["value"], f"{f['ratio'] * 100:.0f} %", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(["{} clients{}".format(f["clients"], "\nrelay following" if f["relay_following"] else "")
                        for f in rows], fontsize=8)
    ax.set_ylabel("transactions/s (pgbench, median of runs)")
    ax.set_title("The application's cost: one event per transaction")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, "bench-app-cost.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(figs):
    """Every figure as a Markdown table row, in the order of the file."""
    print("| figure | value | limit | ratio |")
    print("|---|---:|---:|---:|")
    for f in figs.values():
        if f["name"].endswith("_distribution"):
            continue
        unit = f.get("unit", "")
        fmt = "{:,.0f}" if abs(f["value"]) >= 100 else "{:.2f}"
        value = (fmt.format(f["value"]) + " " + unit).strip()
        limit = ratio = ""
        if f.get("limit") is not None:
            limit = "{} ({})".format(fmt.format(f["limit"]), f.get("limit_of", ""))
            ratio = "{:.0f} %".format(100 * f["ratio"])
        print("| {} | {} | {} | {} |".format(f["name"], value, limit, ratio))


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    if sys.argv[1] == "--table" and len(sys.argv) > 2:
        table(load(sys.argv[2]))
        return
    figs = load(sys.argv[1])
    out = sys.argv[2] if len(sys.argv) > 2 else "docs/img"
    os.makedirs(out, exist_ok=True)
    made = [p for p in (throughput(figs, out), latency(figs, out), app_cost(figs, out)) if p]
    if not made:
        sys.exit("bench-plots: no figures to plot in " + sys.argv[1])
    for p in made:
        print(p)


if __name__ == "__main__":
    main()
