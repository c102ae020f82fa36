#!/usr/bin/python3
"""Plots from mig's JSON rows, the same way every time (Debian's python3-matplotlib).

  plot.py rounds STATS.json OUT.png [--title T]
      One migration, round by round: pages sent (bars), the dirty rate, and the downtime
      expected if it stopped there. STATS is a round_table's holder: mig-send --stats-json,
      mig-sim --json, or a stats file of mig-recv's peer.
  plot.py validation ROWS.json OUT.png
      bench-sim --json: every real repeat as a point and mig-sim's prediction as a cross,
      for total time and bytes sent, one column per workload, link and policy.
  plot.py predictions ROWS.json OUT.png
      bench-predict --json: total time and downtime against guest size, one column per
      link, one line per policy; a hollow marker where the policy gives up (the source keeps
      the guest).
  plot.py tls LINES.json OUT.png
      bench-tls --json (one object per line): GB/s for plaintext and TLS, on 1 and 2
      channels, every repeat, with TLS's ratio to the best plaintext repeat of the same run.
  plot.py migrate LINES.json OUT.png
      bench-migrate --json (one object per line): total time against the raw link's time for
      the same bytes, and downtime (the engine's and the guest's own), per dirty rate.
  plot.py dirtylimit ROWS.json OUT.png
      bench/dirty-limit.py --json: per dirty rate and policy, every run's total time, and the
      computing vCPU's pace during pre-copy as a share of its pace before.
  plot.py compare ROWS.jsonl OUT.png
      bench/compare-qemu.py's rows.jsonl: total time, the downtime the guest saw and bytes sent
      against the dirty rate, one line (through the medians) per configuration and guest;
      flat-out rows have no rate and are left out.

Every point is drawn, so the spread of repeats shows, not only a median.
"""
import argparse
import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def round_table(stats):
    for holder in (stats, stats.get("stats", {}), stats.get("mig", {}).get("stats", {})):
        if isinstance(holder, dict) and "round_table" in holder:
            return holder["round_table"]
    sys.exit("plot.py: no round_table in the stats given")


def plot_rounds(stats, out, title):
    rounds = round_table(stats)
    if not rounds:
        sys.exit("plot.py: the round table is empty")
    x = [r["round"] for r in rounds]
    fig, pages_axis = plt.subplots(figsize=(8, 4.5))
    pages_axis.bar(x, [r["pages"] for r in rounds], color="#9ecae1", label="pages sent")
    pages_axis.set_xlabel("pre-copy round")
    pages_axis.set_ylabel("pages sent (4 KiB)")
    rate_axis = pages_axis.twinx()
    rate_axis.plot(x, [r["dirty_rate_MBps"] for r in rounds], "o-", color="#e6550d", label="dirty rate (MB/s)")
    rate_axis.plot(x, [r["bandwidth_MBps"] for r in rounds], "s--", color="#636363", label="link (MB/s)")
    rate_axis.set_ylabel("MB/s")
    downtime_axis = pages_axis.twinx()
    downtime_axis.spines["right"].set_position(("axes", 1.12))
    downtime_axis.semilogy(x, [max(r["expected_downtime_ms"], 1e-3) for r in rounds], "^:", color="#31a354",
                           label="expected downtime (ms)")
    downtime_axis.set_ylabel("expected downtime, ms (log)")
    handles = sum((axis.get_legend_handles_labels()[0] for axis in (pages_axis, rate_axis, downtime_axis)), [])
    labels = sum((axis.get_legend_handles_labels()[1] for axis in (pages_axis, rate_axis, downtime_axis)), [])
    pages_axis.legend(handles, labels, loc="upper right", fontsize=8)
    policy = stats.get("policy") or stats.get("stats", {}).get("policy", "")
    pages_axis.set_title(title or f"{len(rounds)} pre-copy rounds" + (f", policy {policy}" if policy else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_validation(data, out):
    rows = data["rows"]
    labels = [f"{r['workload'].split(',')[0]}\n{r['link']}, {r['policy']}" for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, len(rows) * 0.9), 8), sharex=True)
    for axis, real_key, sim_key, scale, unit in ((axes[0], "real_total_ms", "sim_total_ms", 1, "total time, ms"),
                                                  (axes[1], "real_bytes", "sim_bytes", 1e-6, "sent, MB")):
        for i, row in enumerate(rows):
            real = [v * scale for v in row[real_key]]
            axis.plot([i] * len(real), real, "o", color="#3182bd", alpha=0.7, label="real (each repeat)" if i == 0 else None)
            axis.vlines(i, min(real), max(real), color="#3182bd")
            axis.plot(i, row[sim_key] * scale, "x", color="#e6550d", markersize=10, mew=2,
                      label="mig-sim" if i == 0 else None)
        axis.set_ylabel(unit)
        axis.legend(fontsize=8)
    axes[1].set_xticks(range(len(rows)), labels, fontsize=7, rotation=40, ha="right")
    guest = data.get("guest", "")
    axes[0].set_title(f"mig-sim against real migrations of the same traces {guest}".strip())
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_predictions(data, out, title):
    rows = data["rows"]
    links = list(dict.fromkeys(r["link"] for r in rows))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(2, len(links), figsize=(3.6 * len(links), 7), sharex=True, squeeze=False)
    for column, link in enumerate(links):
        for policy in policies:
            mine = sorted((r for r in rows if r["link"] == link and r["policy"] == policy), key=lambda r: r["guest_gib"])
            # A policy that gives up has no downtime: the guest never stops.
            for axis, key, scale, shown in ((axes[0][column], "total_ms", 1e-3, mine),
                                            (axes[1][column], "downtime_ms", 1, [r for r in mine if not r["aborted"]])):
                line, = axis.plot([r["guest_gib"] for r in shown], [max(r[key] * scale, 1e-3) for r in shown], "-",
                                  label=policy)
                for r in shown:
                    axis.plot(r["guest_gib"], max(r[key] * scale, 1e-3), "o", color=line.get_color(),
                              markerfacecolor="none" if r["aborted"] else line.get_color())
        axes[0][column].set_title(link)
        for axis in (axes[0][column], axes[1][column]):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xticks([r["guest_gib"] for r in rows if r["link"] == link], minor=False)
            axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes[1][column].set_xlabel("guest, GiB")
    axes[0][0].set_ylabel("total time, s (log)")
    axes[1][0].set_ylabel("downtime, ms (log)")
    axes[0][0].legend(fontsize=8, title="hollow: gives up", title_fontsize=7)
    workload = rows[0]["workload"] if rows else ""
    fig.suptitle(title or f"mig-sim predictions: {workload}, scaled to each guest size, "
                          f"{data.get('latency_ms', '')} ms one way", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_tls(rows, out, title):
    groups = list(dict.fromkeys((r["channels"], r["security"]) for r in rows))
    fig, axis = plt.subplots(figsize=(max(6, len(groups) * 1.5), 4.5))
    for i, (channels, security) in enumerate(groups):
        mine = [r for r in rows if r["channels"] == channels and r["security"] == security]
        rates = [r["GBps"] for r in mine]
        color = "#e6550d" if security == "tls" else "#3182bd"
        axis.plot([i] * len(rates), rates, "o", color=color, alpha=0.7)
        axis.vlines(i, min(rates), max(rates), color=color)
        if security == "tls":
            ratios = [r["ratio_to_best_plaintext"] for r in mine]
            axis.annotate(f"{min(ratios):.2f}-{max(ratios):.2f}\nof plaintext", (i, max(rates)), fontsize=7,
                          textcoords="offset points", xytext=(6, 0))
    axis.set_xticks(range(len(groups)), [f"{security}\n{channels} channel{'s' if channels > 1 else ''}"
                                         for channels, security in groups])
    axis.set_ylabel("GB/s (each repeat)")
    axis.set_ylim(bottom=0)
    axis.set_title(title or "mig's Stream: TLS 1.3 against plaintext (bench-tls)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_migrate(rows, out, title):
    percents = sorted(set(r["link_percent"] for r in rows))
    fig, (time_axis, downtime_axis) = plt.subplots(1, 2, figsize=(10, 4.5))
    for p in percents:
        mine = [r for r in rows if r["link_percent"] == p]
        # Side by side around each dirty rate, so that the two series' repeats do not hide each other.
        for axis, values, color, label, shift in (
                (time_axis, [r["total_ms"] for r in mine], "#3182bd", "mig, total", -1),
                (time_axis, [r["raw_same_bytes_ms"] for r in mine], "#636363", "raw link, same bytes", 1),
                (downtime_axis, [r["downtime_ms"] for r in mine], "#3182bd", "engine's downtime", -1),
                (downtime_axis, [r["guest_downtime_ms"] for r in mine if r.get("guest_downtime_ms") is not None],
                 "#e6550d", "guest's longest heartbeat gap", 1)):
            if not values:
                continue
            x = p + shift
            axis.plot([x] * len(values), values, "o", color=color, alpha=0.7, label=label if p == percents[0] else None)
            axis.vlines(x, min(values), max(values), color=color)
    for axis, unit in ((time_axis, "total time, ms"), (downtime_axis, "downtime, ms")):
        axis.set_xlabel("guest dirty rate, % of the raw link (0: idle)")
        axis.set_ylabel(unit + " (each repeat)")
        axis.legend(fontsize=8)
    cmdline = rows[0].get("guest_cmdline", "") if rows else ""
    fig.suptitle(title or f"bench-migrate: {cmdline}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_dirtylimit(rows, out, title):
    groups = list(dict.fromkeys((r["dirty_MBps"], r["policy"]) for r in rows))
    colors = {"qemu": "#3182bd", "dirty-limit": "#e6550d"}
    fig, (time_axis, pace_axis) = plt.subplots(1, 2, figsize=(max(8, len(groups) * 1.6), 4.5))
    for i, (dirty, policy) in enumerate(groups):
        mine = [r for r in rows if r["dirty_MBps"] == dirty and r["policy"] == policy]
        for axis, values in ((time_axis, [r["total_ms"] / 1000 for r in mine]),
                             (pace_axis, [r["compute_speed_pct"] for r in mine])):
            color = colors.get(policy, "#636363")
            axis.plot([i] * len(values), values, "o", color=color, alpha=0.7)
            axis.vlines(i, min(values), max(values), color=color)
    labels = [f"{policy}\n{dirty} MB/s" for dirty, policy in groups]
    for axis, unit in ((time_axis, "total time, s (each run)"), (pace_axis, "computing vCPU's pace during pre-copy, % of before")):
        axis.set_xticks(range(len(groups)), labels, fontsize=8)
        axis.set_ylabel(unit)
        axis.set_ylim(bottom=0)
    link = rows[0]["link"] if rows else ""
    guest = "the workload guest on KVM" if rows and rows[0].get("guest") == "kvm" else "synthetic guest"
    fig.suptitle(title or f"dirty-limit against auto-converge (qemu): 2-vCPU {guest}, vCPU 0 dirtying, {link}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_compare(rows, out, title):
    series = {}
    for r in rows:
        if r.get("dirty_MBps") is not None:
            series.setdefault(f'{r["config"]}, {r["mem"]} {r["fill"]} {r["workload"]}', []).append(r)
    if not series:
        sys.exit("plot.py: no rows with a dirty rate to plot")
    metrics = (("total_ms", "total time, ms"), ("guest_downtime_ms", "downtime the guest saw, ms"),
               ("bytes_sent", "bytes sent"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(15, 4.5))
    for n, (name, mine) in enumerate(sorted(series.items())):
        color = plt.cm.tab10(n % 10)
        for axis, (metric, _) in zip(axes, metrics):
            points = [(r["dirty_MBps"], r[metric]) for r in mine if r.get(metric) is not None]
            if not points:
                continue
            axis.plot([x for x, _ in points], [y for _, y in points], "o", color=color, alpha=0.6)
            rates = sorted({x for x, _ in points})
            medians = [statistics.median(y for x, y in points if x == rate) for rate in rates]
            axis.plot(rates, medians, "-", color=color, label=name)
    for axis, (_, label) in zip(axes, metrics):
        axis.set_xlabel("guest dirty rate asked, MB/s")
        axis.set_ylabel(label + " (each repeat)")
        axis.set_ylim(bottom=0)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "mig and QEMU migrating the same guest (compare-qemu.py); lines through the medians")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def read_lines(path):
    """JSON lines (bench-tls, bench-migrate): one object per line."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["rounds", "validation", "predictions", "tls", "migrate", "dirtylimit", "compare"])
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    try:
        if args.kind in ("tls", "migrate", "compare"):
            data = read_lines(args.input)
        else:
            with open(args.input) as f:
                data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"plot.py: cannot read {args.input}: {e}")
    if args.kind == "tls":
        plot_tls(data, args.output, args.title)
    elif args.kind == "migrate":
        plot_migrate(data, args.output, args.title)
    elif args.kind == "rounds":
        plot_rounds(data, args.output, args.title)
    elif args.kind == "predictions":
        plot_predictions(data, args.output, args.title)
    elif args.kind == "dirtylimit":
        plot_dirtylimit(data, args.output, args.title)
    elif args.kind == "compare":
        plot_compare(data, args.output, args.title)
    else:
        plot_validation(data, args.output)


if __name__ == "__main__":
    main()
