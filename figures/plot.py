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


CODE_MODELS = {"lstm": "LSTM", "linear": "linear Transformer (sum rule)", "delta": "DeltaNet",
               "delta_rnn": "Delta RNN", "delta_lstm": "Delta LSTM", "rdn": "Recurrent Delta Net"}


def code_time(ax, folder):
    """Code execution (rfwp.py, 10 statements): valid sequence accuracy against wall-clock seconds, each model at its
    best learning rate for about the same CPU time, seeds 0 and 1 (one line each, the same colour). Files:
    <model>_<seed>.jsonl, a run's metrics.jsonl without its training lines."""
    for i, (model, label) in enumerate(CODE_MODELS.items()):
        for seed in (0, 1):
            rows = [(r["time"], r["value"]) for r in read_jsonl(os.path.join(folder, f"{model}_{seed}.jsonl"))
                    if r["split"] == "valid" and r["metric"] == "seq_acc"]
            ax.plot(*zip(*rows), color=f"C{i}", lw=1.2, label=None if seed else label)
    ax.set(xlabel="wall-clock seconds (one thread per run)", ylabel="valid sequence accuracy",
           title="Code execution at equal CPU time")
    ax.legend()


def read_table(path, header):
    """The rows (lists of fields) of the whitespace-separated table that follows the line starting with `header` in a
    saved --bench output, up to the first blank line or the end."""
    with open(path) as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith(header)), None)
    if start is None:
        sys.exit(f"error: {path} has no table headed {header!r}")
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


ODE_PATHS = {("ctfwp-delta", "kernel"): "CT-FWP delta rule, CPU kernel",
             ("ctfwp-delta", "precomputed"): "CT-FWP delta rule, precomputed (PyTorch)",
             ("ctfwp-delta", "generic"): "CT-FWP delta rule, generic solve",
             ("ctfwp-hebb", "precomputed"): "CT-FWP Hebb rule, precomputed",
             ("ncde", "precomputed"): "neural CDE, precomputed",
             ("ncde", "generic"): "neural CDE, generic solve"}


def ode_scaling(ax, folder):
    """ode_fwp.py --bench: a training step's time against the series' length (observations), log-log, rk4 at the
    observation gap, batch 64. File: bench.txt, the saved output (its table after the line starting with "obs")."""
    rows = read_table(os.path.join(folder, "bench.txt"), "obs")
    for (model, impl), label in ODE_PATHS.items():
        points = [(int(r[0]), float(r[4]) / 1000) for r in rows if r[2] == model and r[3] == impl]
        ax.plot(*zip(*points), marker="o", ls="--" if model == "ncde" else "-", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="observations per series", ylabel="training step, seconds",
           title="Continuous-time FWP and neural CDE: step time against length")
    ax.legend(fontsize=8)


def rfwp_bench(ax, folder):
    """rfwp.py --bench: each model's training step time over the LSTM's in the same run, the recurrent and fast-weight
    parts stepping in Python (--impl chunk) against the fused CPU kernels (--impl kernel). File: bench.txt, the saved
    output (its table after the line starting with "model")."""
    rows = read_table(os.path.join(folder, "bench.txt"), "model")
    ratio = {(r[0], r[1]): float(r[4].rstrip("x")) for r in rows}
    models = [m for m, impl in ratio if impl == "chunk"]
    for j, impl in enumerate(("chunk", "kernel")):
        label = "Python loop / chunkwise (--impl chunk)" if impl == "chunk" else "fused CPU kernels (--impl kernel)"
        ax.barh([i + 0.4 * j for i in range(len(models))], [ratio[m, impl] for m in models], height=0.4, label=label)
    ax.set_yticks([i + 0.2 for i in range(len(models))], models)
    ax.invert_yaxis()
    ax.axvline(1, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlim(0.8, 400)  # room for the legend
    ax.set(xlabel="training step time / the LSTM's (dotted: 1)",
           title="rfwp.py --bench: cost of a step against the LSTM")
    ax.legend(fontsize=8, loc="lower right")


STATE_MODELS = {"lstm": "LSTM", "transformer": "Transformer", "delta": "DeltaNet",
                "delta_neg": "DeltaNet[-1, 1] (l2 keys)", "delta_rnn": "Delta RNN", "delta_lstm": "Delta LSTM",
                "rdn": "Recurrent Delta Net"}
STATE_BUCKETS = ["acc_3_40", "acc_41_64", "acc_65_128", "acc_129_256"]


def state_tracking(ax, folder):
    """Parity (rfwp.py --task parity): test sequence accuracy per length bucket, the mean of seeds 0-2, one line per
    model; trained on lengths 3-40. Files: <model>_<seed>.jsonl, the test lines of each run's metrics.jsonl."""
    for model, label in STATE_MODELS.items():
        runs = [{r["metric"]: r["value"] for r in read_jsonl(os.path.join(folder, f"{model}_{seed}.jsonl"))}
                for seed in range(3)]
        ax.plot(range(len(STATE_BUCKETS)), [sum(r[b] for r in runs) / len(runs) for b in STATE_BUCKETS], marker="o",
                ls="--" if model in ("lstm", "transformer") else "-", label=label)
    ax.set_xticks(range(len(STATE_BUCKETS)), ["3-40 (train)", "41-64", "65-128", "129-256"])
    ax.set(xlabel="sequence length", ylabel="test sequence accuracy (mean of 3 seeds)", ylim=(-0.02, 1.02),
           title="Parity: length generalisation")
    ax.legend(fontsize=8)


FIGURES = {"capacity": (capacity, "capacity"), "rl_cartpole": (rl_cartpole, "rl_cartpole"),
           "code_time": (code_time, "code_time"), "ode_scaling": (ode_scaling, "ode_scaling"),
           "rfwp_bench": (rfwp_bench, "rfwp_bench"), "state_tracking": (state_tracking, "state_tracking")}


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
