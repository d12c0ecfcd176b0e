"""Draw the README's figures from the runs' own logs, committed beside this file in figures/logs/.

    python figures/plot.py              # every figure, PNGs into figures/
    python figures/plot.py --out DIR    # somewhere else

Each figure is one function below reading one folder of logs (a run's metrics.jsonl, or the lines of it that the
figure reads); RESULTS.md gives the command that made each run, the hardware and the date. matplotlib is needed
here only: no model script imports it.
"""

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LOGS = os.path.join(HERE, "logs")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def final_value(path, split, metric):
    """The last logged value of (split, metric) in a metrics.jsonl."""
    rows = [r for r in read_jsonl(path) if r["split"] == split and r["metric"] == metric]
    if not rows:
        sys.exit(f"error: {path} has no {split} {metric}")
    return rows[-1]["value"]


# ----------------------------------------------------------------------------------------------
# The figures: name -> (function, the logs folder it reads)

CAPACITY_RULES = {  # log name prefix -> label
    "sum_elu1": "sum rule, elu + 1 (d_phi 32)",
    "sum_dpfp": "sum rule, DPFP-1 (d_phi 64)",
    "delta_l2": "delta rule, L2 keys (d_phi 32)",
}


def capacity(ax, folder):
    """Recall accuracy against the number of stored pairs, one head of 32: linear_transformer.py (sum rule) and
    delta_net.py (delta rule), seed 0, 3000 steps. Files: <rule>_<n_pairs>.jsonl."""
    for rule, label in CAPACITY_RULES.items():
        points = sorted((int(name[len(rule) + 1 : -6]), final_value(os.path.join(folder, name), "test", "acc"))
                        for name in os.listdir(folder) if name.startswith(rule + "_"))
        if not points:
            sys.exit(f"error: no {rule}_<n_pairs>.jsonl in {folder}")
        ax.plot(*zip(*points), marker="o", label=label)
    ax.axvline(32, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set_xticks([16, 32, 64], ["16", "32", "64"])
    ax.set(xlabel="stored key-value pairs (dotted: d_head 32)", ylabel="test recall accuracy", ylim=(0, 1.02),
           title="Capacity of one head: recall as the stored pairs grow")
    ax.legend()


RL_RUNS = {"lstm": "LSTM core", "delta": "DeltaNet core", "rdn": "Recurrent Delta Net core",
           "memoryless": "LSTM core, state reset every step (no memory)"}


def rl_cartpole(ax, folder, window=100):
    """CartPole without velocities (rfwp_rl.py): mean return of the last `window` episodes against environment
    steps, one line per core, seed 0. Files: <run>.jsonl holding each episode's return (split "episode")."""
    for run, label in RL_RUNS.items():
        episodes = [(r["step"], r["value"]) for r in read_jsonl(os.path.join(folder, run + ".jsonl"))
                    if r["split"] == "episode" and r["metric"] == "return"]
        steps, means = [], []
        for i in range(window, len(episodes) + 1, 10):
            steps.append(episodes[i - 1][0])
            means.append(sum(v for _, v in episodes[i - window : i]) / window)
        ax.plot(steps, means, label=label)
    ax.set(xlabel="environment steps", ylabel=f"mean return, last {window} episodes (500 = solved)",
           title="RL on CartPole without velocities: memory needed", ylim=(0, 510))
    ax.legend()


FIGURES = {"capacity": (capacity, "capacity"), "rl_cartpole": (rl_cartpole, "rl_cartpole")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=HERE, help="folder for the PNGs (default: figures/)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, (draw, folder) in FIGURES.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        draw(ax, os.path.join(LOGS, folder))
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, name + ".png"), dpi=110)
        plt.close(fig)
        print(f"wrote {os.path.join(args.out, name + '.png')}")


if __name__ == "__main__":
    main()
