#!/usr/bin/env python3
"""Plots bench-results/replication.json (written by mcvmm-bench-replication) as a PNG:
guest slowdown ratios per epoch length, the pause-time distribution, and failover times."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "bench-results/replication.json"
dst = sys.argv[2] if len(sys.argv) > 2 else "bench-results/replication.png"
data = json.load(open(src))
base = data["unprotected"]
runs = data["protected"]

fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))

measures = [
    ("cpu_iters_per_s", "CPU-bound"),
    ("mem_pages_per_s", "memory dirtying"),
    ("disk_write_mbps", "disk write"),
]
ax = axes[0]
width = 0.8 / max(len(runs), 1)
for i, run in enumerate(runs):
    ratios = [run[k] / base[k] if base[k] else 0 for k, _ in measures]
    ax.bar([x + i * width for x in range(len(measures))], ratios, width, label=run["name"])
ax.axhline(1.0, color="gray", linewidth=0.8)
ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(measures))])
ax.set_xticklabels([label for _, label in measures])
ax.set_ylabel("protected / unprotected")
ax.set_title("Guest throughput under protection")
ax.legend(fontsize=8)

ax = axes[1]
for run in runs + [data["no_compression"]]:
    hist = run["replication"]["pause_us"]["histogram_ms"]
    # JSON objects come back in name order: put the buckets in the order of their bounds.
    labels = sorted(hist, key=lambda k: float("inf") if k.startswith(">") else float(k[2:]))
    total = max(sum(hist.values()), 1)
    ax.plot(labels, [hist[k] / total for k in labels], marker="o", label=run["name"])
ax.set_xlabel("pause (ms bucket)")
ax.set_ylabel("share of epochs")
ax.set_title("Epoch pause distribution")
ax.legend(fontsize=8)

ax = axes[2]
# Fenced and unfenced, each mode's rounds by kind, side by side.
for mode in data["failover"]:
    name = "fenced" if mode["fenced"] else "unfenced"
    for kill, marker in (("Process", "o"), ("Host", "s")):
        rounds = [r for r in mode["rounds"] if r["kill"] == kill]
        if rounds:
            ax.plot(range(1, len(rounds) + 1), [r["failover_ms"] for r in rounds],
                    marker=marker, label=f"{name}, {'process kill' if kill == 'Process' else 'host power-off'}")
ax.set_xlabel("round")
ax.set_ylabel("ms to a new connection's first answer")
ax.set_title("Failover")
ax.legend(fontsize=8)

fig.suptitle("mcvmm replication, lab test hosts (nested KVM under TCG): ratios measured side by side")
fig.tight_layout()
fig.savefig(dst, dpi=90)
print(f"plot: {dst}")
