"""Continuous-time fast weight programmers: learning rules as neural ODEs/CDEs driven by a control path.

Irie, Faccio, Schmidhuber, "Neural Differential Equations for Learning to Program Neural Nets Through Continuous
Learning Rules", NeurIPS 2022, arXiv 2206.01649 (section 3: Hebb, Oja and delta rules as ODEs; their CDE form
with keys from dX/dt; the readout). Baseline: the neural CDE of Kidger, Morrill, Foster, Lyons, "Neural
Controlled Differential Equations for Irregular Time Series", NeurIPS 2020, arXiv 2005.08926. The ODEs are solved
in this file (no ODE library).

A time series (times t_1 < ... < t_N, values with NaN where missing) becomes a control path X(t) (time is channel 0;
linear or natural cubic interpolation). Per head, a slow net reads the path and a fast weight W (d x d) follows
    h = LN(W_in dX/dt)     (--drive x: LN(W_in X(t)))
    k = softmax(W_k h)     beta = sigmoid(w_b . h)     v = tanh(W_v X(t))
    hebb   dW/dt = beta v k^T
    oja    dW/dt = beta v (k - W^T v)^T        (Oja's rule as the paper writes it; the official code instead
                                               takes softmax(W_k h - W^T v), the softmax after the subtraction)
    delta  dW/dt = beta (v - W k) k^T
W(t_1) is the rule at the first observation with W = 0 (one Hebbian outer product beta v k^T, the same for all
three rules). Readout: q = softmax(W_q LN(W_in u)) with u the drive at the series' last time, y = concat_h W_h q_h,
y <- Out(y), y <- y + FF(LN(y)), logits = Head(y). This is the official delta_cde layout.
--values_from dx is the official code's other layout (hebb_cde / oja_cde): k~, b from LN(W_in X(t)), u = W_v dX/dt;
    hebb   dW/dt = b u softmax(k~)^T                       (the raw logit b and no tanh, as the official code)
    oja    dW/dt = sigmoid(b) v softmax(k~ - W^T v)^T      (v = tanh(u); the official softmax after the subtraction)
    delta  dW/dt = sigmoid(b) (v - W k) k^T                (k = softmax(k~); not in the official code)
W(t_1) the rule with W = 0, and the readout y = concat_h W_h^T q_h with q = softmax(W_q LN(W_in X(t_N))).
--model ncde: dz = f(z) dX, f an MLP ending in tanh, z(t_1) a
linear map of X(t_1), logits = Head(z(t_N)).
Series of different lengths share a batch exactly: series b is solved on its own interval [t_1^b, t_N^b] through
the change of variables t = t_1^b + s (t_N^b - t_1^b), s in [0, 1], dW/ds = (t_N^b - t_1^b) dW/dt.
The slow net's k, v, beta depend on the path alone, never on W (the neural CDE's f(z) depends on z). So with a fixed
step solver (euler, rk4), whose stage times are known before the solve, --impl precomputed evaluates them at every
stage of every series in batched passes (one per --solve_chunk steps, W carried over, so that the tables stay in the
cache); what is left is the rule on W: Hebb's a weighted sum of outer products,
the delta rule's and Oja's (linear in W) one affine map per step, fused in cpu_kernels.cpp with --impl kernel (the
default on the CPU); the other forms (--post_tanh, the official Oja) step through the same solver with the table.
--impl generic evaluates the whole vector field at each stage: the reference, which every other path equals in
float64 (tested), and dopri5's path, whose stage times are not known in advance. The neural CDE's dX/dt is tabulated
the same way; its MLP runs stage by stage. Values are standardised with the training split's statistics, the time
channel divided by the largest time (--raw_time: kept in data units).

Glossary: b batch, h head, d = d_head = d_model / n_head, C channels of X (time included), N observations,
s in [0, 1] the solver's time, span = t_N - t_1 per series, W (d, d) the fast weight of one head, beta in (0, 1)
a learning rate, NFE the number of vector-field evaluations (precomputed: of the slow net, one per stage time).

Commands:
    python ode_fwp.py                                      # delta rule on irregular spirals: ~35 s, +1 min to build
    python ode_fwp.py --dataset synthetic                  # the harder synthetic task (order and sign of events)
    python ode_fwp.py --preset tiny --steps 4              # smoke run
    python ode_fwp.py --rule hebb --interp linear          # other rules, controls, solvers: --solver dopri5
    python ode_fwp.py --model ncde                         # the neural CDE baseline
    python ode_fwp.py --evaluate --solver dopri5           # the trained model under another solver, vs a reference
    python ode_fwp.py --data path/NAME_TRAIN.ts            # any UEA/UCR .ts classification set (_TEST beside it)
    python ode_fwp.py --dataset EigenWorms                 # downloads: a UEA name, speech_commands, sepsis
    python ode_fwp.py --bench                              # step time and NFE per model/solver/path, then vs length
    torchrun --nproc_per_node 2 ode_fwp.py                 # data-parallel (gloo on CPU, nccl on CUDA)

Fidelity. Oja's rule is the paper's; the official one (the softmax after the subtraction) is --values_from dx, the
official oja_cde layout. The default layout (keys from dX/dt, values from X(t)) is the official delta_cde's; with
--rule hebb it keeps sigmoid(b) and tanh on the values, where the official hebb_cde_v2 multiplies the untransformed
values by the raw logit b. The paper does not say which layout produced its Hebb and Oja numbers; the default here
is the first one for all three rules. The official readout takes the query at the batch's last time (times[-1]) for
every series; here each series uses its own last time. The official code backpropagates with the adjoint method;
here through the solver's steps. The default task, the spirals, is torchcde's example (Kidger et al.'s library),
not a task of the CT-FWP paper: a first run that every model learns; the paper's data sets are the presets, which
follow speech_and_physionet/ and eigenworms/ of the official code (PRESETS: the recipes and what still differs).

Runs: --out_dir gets metrics.jsonl, ckpt.pt and best.pt (the best on valid, which the test split and --evaluate use).
The scaffolding at the end, the same in every script, refuses an --out_dir that holds another run (--resume continues
it, --overwrite replaces it), checks a checkpoint before resuming from it (the script, RESUME_FLAGS, a truncated file)
and stops a diverging run before it logs or saves anything of it (open_out_dir, read_checkpoint, nothing_left,
truncate_metrics, check_finite). A resumed run on the CPU ends where an uninterrupted one would. A fixed-step solve of
more than 100,000 steps per series is refused, naming the step size that fits. Under torchrun each process takes its
rows of the global --batch_size, drawn alike on every rank; rank 0 logs, evaluates and checkpoints, so --resume
continues with any number of processes; with --solver dopri5 each rank's adaptive steps follow its own rows, so N
processes do not equal one there. --bench and --evaluate run in one process.
"""

import ast
import contextlib
import dataclasses
import gc
import hashlib
import inspect
import io
import json
import math
import os
import platform
import random
import sys
import time
import wave
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data

DATA_DIR = data.DATA_DIR  # (the Args field `data` hides the module inside the class body)
SPEECH_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


# ----------------------------------------------------------------------------------------------
# Configuration: every flag with its default and docstring (--help prints them), the presets, and the checks
# of a command line's values.


@dataclass
class Args:
    # task
    dataset: str = "spirals"
    """spirals (torchcde's example task) or synthetic (order and sign of two events), no download; a UEA archive name
    (JapaneseVowels, EigenWorms, ...), speech_commands or sepsis (AUROC)"""
    data: str = ""
    """a UEA/UCR .ts file NAME_TRAIN.ts (NAME_TEST.ts beside it); 15% of TRAIN validates. Overrides --dataset"""
    data_dir: str = DATA_DIR
    """where downloads are cached"""
    n_train: int = 2000
    """spirals, synthetic: training series (validation and test: n_train / 4 each)"""
    syn_length: int = 64
    """spirals, synthetic: the time grid (synthetic 0, 1, ..., syn_length - 1; spirals syn_length points on
    [0, 4 pi]) from which each series keeps a random half"""
    missing: float = 0.1
    """spirals, synthetic: probability that a value is missing (NaN)"""
    intensity: bool = False
    """add one channel per value channel counting its observations so far (the official sepsis "OI" input)"""
    logsig_window: int = 0
    """> 1: the path through every N-th observation (linear), so on each window dX/dt is the window's depth-1
    log-signature (its increment) over its duration: the official EigenWorms input with 4; trailing points dropped"""
    raw_time: bool = False
    """the time channel in data units (the official speech and sepsis input) instead of divided by the largest time"""
    # model
    model: str = "ctfwp"
    """ctfwp (continuous-time fast weight programmer) or ncde (neural CDE baseline)"""
    rule: str = "delta"
    """ctfwp: hebb | oja | delta"""
    drive: str = "dx"
    """ctfwp --values_from x: keys, beta and query from dX/dt (dx, the CDE form) or from X(t) (x)"""
    values_from: str = "x"
    """ctfwp: x (values tanh(W_v X(t)), keys from the drive, readout W q: the official delta_cde / hebb_cde_v2
    layout) or dx (values from dX/dt, keys, beta and query from X(t), readout W^T q: the official hebb_cde /
    oja_cde layout, with its Hebb and Oja forms; --drive is then x)"""
    v_layernorm: bool = False
    """ctfwp: values tanh(W_v2 LN(W_v X)) instead of tanh(W_v X) (the official --cde_use_v_laynorm)"""
    post_tanh: bool = False
    """ctfwp --rule delta: dW/dt = beta tanh(u - W k) k^T with u the value before its tanh (W_v X, or W_v dX/dt with
    --values_from dx): the tanh after the subtraction (the official --delta_ode_post_tahn)"""
    interp: str = "cubic"
    """control path: cubic (natural cubic spline) or linear"""
    d_model: int = 32
    """ctfwp: width (n_head fast weights of d_head x d_head); ncde: size of z"""
    n_head: int = 4
    """ctfwp: heads; d_head = d_model / n_head"""
    d_ff: int = 128
    """ctfwp: feed-forward width of the readout block; ncde: width of the vector field MLP"""
    # solver
    solver: str = "rk4"
    """euler | rk4 (fixed step) | dopri5 (adaptive, Dormand-Prince 5(4))"""
    impl: str = "auto"
    """euler, rk4: precomputed (the slow net at every stage time in batched passes, then only the rule's steps on
    W), kernel (precomputed, the delta and Oja rules' steps fused in cpu_kernels.cpp on the CPU) or generic (the whole
    vector field at each stage: the reference; dopri5 always); auto: kernel on the CPU, precomputed elsewhere"""
    solve_chunk: int = 256
    """precomputed, kernel: solver steps per tabulated chunk (the slow net's tables of one chunk at a time, W carried
    over: tables that stay in the cache, so a step's time grows linearly with length); 0 = the whole solve at once"""
    step_size: float = 0.0
    """euler, rk4: step in data time units; 0 = the smallest gap between two observations in the data (a solve of
    more than 100,000 steps is refused)"""
    rtol: float = 1e-3
    """dopri5: relative tolerance"""
    atol: float = 1e-4
    """dopri5: absolute tolerance"""
    max_steps: int = 10_000
    """dopri5: give up (with a message) after this many steps per solve"""
    # training
    batch_size: int = 64
    """series per step: the global batch (under torchrun each of the N processes takes batch_size / N of it)"""
    steps: int = 600
    """optimizer steps"""
    lr: float = 3e-3
    """peak learning rate (Adam)"""
    warmup: int = 30
    """linear warm-up steps, then cosine decay to lr / 10"""
    grad_clip: float = 1.0
    """gradient norm clip (0 disables)"""
    l2: float = 0.0
    """add l2 x sum over parameter tensors of ||p|| (the norm, not squared: the official penalty, 0.03)"""
    plateau: bool = False
    """no warm-up or cosine: the lr drops x0.1 when the mean training loss has not improved for 2 evaluations
    (the official ReduceLROnPlateau(patience=2) on the training loss)"""
    pos_weight: float = 0.0
    """two classes: binary cross-entropy on the logit difference with this weight on the positives (the official
    sepsis loss: 10); 0: cross-entropy"""
    eval_every: int = 100
    """evaluate on valid, keep the best checkpoint, every this many steps"""
    log_every: int = 50
    """read the training loss from the device (one sync), log it and show it in the progress bar every this many steps
    and at every evaluation"""
    seed: int = 0
    """seed of python, numpy, torch, the synthetic data and the data splits"""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"""
    out_dir: str = "out/ode_fwp"
    """metrics.jsonl, ckpt.pt (latest) and best.pt (best on valid) go here"""
    resume: bool = False
    """continue the run in out_dir from its ckpt.pt (the only way to add to a run there)"""
    overwrite: bool = False
    """start a new run in an out_dir that holds one: delete its ckpt.pt, best.pt and metrics.jsonl first (without
    this flag or --resume, such a run stops before writing anything)"""
    stop_at: int = 0
    """exit after this step, checkpoint saved (a time-boxed job); --resume continues. 0: run to the end"""
    evaluate: bool = False
    """evaluate out_dir/best.pt on test under its trained solver, --solver and a tight dopri5 reference, and exit"""
    bench: bool = False
    """time a training step (forward and backward) of each rule, ncde, solver and path, then against series length,
    and exit"""
    bench_obs: str = "64,256,1024,4096"
    """--bench: the series lengths (observations) of the scaling table"""
    bench_generic_max: int = 1024
    """--bench: time the generic path only up to this many observations (it takes minutes per step beyond)"""


PRESETS = {
    "tiny": dict(n_train=64, syn_length=16, d_model=8, n_head=2, d_ff=16, batch_size=16, steps=4, eval_every=2,
                 warmup=1, bench_obs="8,16", bench_generic_max=8),
    # The official recipes (speech_and_physionet/: delta_cde, rk4 at the observation gap, Adam at base_lr x batch / 32,
    # no clipping, the penalty 0.03 sum ||p||, ReduceLROnPlateau(patience=2) on the training loss every 10 epochs, raw
    # time). Steps: epochs x batches per epoch of the 70% training split (speech 24 of 1024: 500 epochs; sepsis 28:
    # 200 epochs); evaluation every 10 epochs. What differs: the best sepsis checkpoint is chosen on validation AUROC
    # (the official code: accuracy); the official early stop after 100 epochs without a lower training loss and its
    # x100 gradient on the classifier are not reproduced; sepsis' static features are constant channels of the path
    # (the official code computes W(0) from them with a small network); the observational-intensity channels are
    # --intensity (in sepsis_oi).
    "speech": dict(dataset="speech_commands", d_model=80, n_head=4, d_ff=320, batch_size=1024, lr=5e-5 * 1024 / 32,
                   steps=500 * 24, eval_every=10 * 24, warmup=0, grad_clip=0.0, l2=0.03, plateau=True, raw_time=True),
    "sepsis": dict(dataset="sepsis", d_model=160, n_head=32, d_ff=640, v_layernorm=True, batch_size=1024,
                   lr=4e-5 * 1024 / 32, steps=200 * 28, eval_every=10 * 28, warmup=0, grad_clip=0.0, l2=0.03,
                   plateau=True, raw_time=True, pos_weight=10.0),
    "sepsis_oi": dict(dataset="sepsis", d_model=80, n_head=16, d_ff=64, intensity=True, post_tanh=True,
                      batch_size=1024, lr=3e-5 * 1024 / 32, steps=200 * 28, eval_every=10 * 28, warmup=0,
                      grad_clip=0.0, l2=0.03, plateau=True, raw_time=True, pos_weight=10.0),
    # eigenworms/ of the official code: depth-1 log-signature windows of 4 steps, the delta rule with the tanh after
    # the subtraction, hidden 128, 16 heads, FF 64, Adam 1e-4, the whole training set as one batch, 1000 epochs.
    # --dataset EigenWorms alone solves the raw 17,984 steps; the windows leave 4,496 points. What differs: the
    # official model feeds each window's log-signature to its update network as a piecewise-constant input, here it
    # drives the CDE form; its lr schedule (a plateau on the validation loss, patience 15) and early stop are not
    # reproduced.
    "eigenworms": dict(dataset="EigenWorms", logsig_window=4, interp="linear", post_tanh=True, d_model=128,
                       n_head=16, d_ff=64, lr=1e-4, batch_size=1024, steps=1000, eval_every=1, warmup=0,
                       grad_clip=0.0),
}


MODEL_FLAGS = ("rule", "drive", "values_from", "interp", "d_model", "n_head", "d_ff", "post_tanh", "solver",
               "step_size", "impl", "solve_chunk", "rtol", "atol", "max_steps")  # the models' keywords


RESUME_FLAGS = ("dataset", "data", "intensity", "model", "rule", "drive", "values_from", "v_layernorm", "post_tanh",
                "interp", "d_model", "n_head", "d_ff")  # what a --resume must share with its checkpoint: model, inputs


def check_args(args):
    """The models' own checks (check_settings: the same messages, naming the flags), then what only the command line
    knows: the model's name, the task's and the run's values, the flags that go together."""
    try:
        check_settings("--", **{key: getattr(args, key) for key in MODEL_FLAGS})
    except ValueError as e:
        fail(str(e))
    if args.model not in ("ctfwp", "ncde"):
        fail(f"--model must be one of ctfwp, ncde, got {args.model!r}")
    for key in ("n_train", "batch_size", "steps", "eval_every", "log_every", "bench_generic_max"):
        if getattr(args, key) <= 0:
            fail(f"--{key} must be positive, got {getattr(args, key)}")
    if min(args.l2, args.pos_weight) < 0:
        fail(f"--l2 and --pos_weight must be non-negative, got {args.l2} and {args.pos_weight}")
    if args.logsig_window < 0 or args.logsig_window == 1:
        fail(f"--logsig_window must be 0 (off) or at least 2 (observations per window), got {args.logsig_window}")
    if args.seed < 0:
        fail(f"--seed must be non-negative, got {args.seed}")
    if not all(v.strip().isdigit() and int(v) >= 2 for v in args.bench_obs.split(",")):
        fail(f"--bench_obs must be comma-separated observation counts of at least 2, got {args.bench_obs!r}")
    if args.logsig_window > 1 and args.interp != "linear":
        fail("--logsig_window needs --interp linear (the path between window ends is then the log-signature's line)")
    if args.values_from == "dx":
        args.drive = "x"  # what the model reads in this layout (keys, beta and the query from X(t)), in the config
    if args.syn_length < 4:
        fail(f"--syn_length must be at least 4, got {args.syn_length}")
    if not 0 <= args.missing < 1 or args.lr <= 0 or min(args.warmup, args.grad_clip, args.stop_at) < 0:
        fail("--missing must be in [0, 1); --lr positive; --warmup, --grad_clip, --stop_at non-negative.")
    if args.data and not args.data.endswith("_TRAIN.ts"):
        fail(f"--data {args.data!r}: give the NAME_TRAIN.ts file of a UEA/UCR set (NAME_TEST.ts must be beside it).")
    return args


# ----------------------------------------------------------------------------------------------
# ODE solvers over s in [0, 1]: f(s, y) -> dy/ds, y any tensor. Each returns (y(1), NFE); autograd goes through
# the solver's arithmetic (discretise-then-optimise), the adaptive step sizes are not differentiated.


def euler(f, y, n_steps, steps=None):
    """steps: the indices i of the steps to take (default all, range(n_steps)); h = 1 / n_steps either way."""
    h = 1.0 / n_steps
    steps = range(n_steps) if steps is None else steps
    for i in steps:
        y = y + h * f(i * h, y)
    return y, len(steps)


def rk4(f, y, n_steps, steps=None):
    """The classical Runge-Kutta method (global error O(h^4)); steps as for euler."""
    h = 1.0 / n_steps
    steps = range(n_steps) if steps is None else steps
    for i in steps:
        s = i * h
        k1 = f(s, y)
        k2 = f(s + h / 2, y + h / 2 * k1)
        k3 = f(s + h / 2, y + h / 2 * k2)
        k4 = f((i + 1) * h, y + h * k3)  # (i + 1) h, not s + h: the next step's first time to the last bit
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y, 4 * len(steps)


# Dormand-Prince 5(4) (Dormand & Prince 1980): nodes C, stage weights A, 5th-order weights B (= the last row of A,
# so the last stage is the next step's first: FSAL), and B - B* (the embedded 4th-order solution) for the error.
DP_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
DP_A = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
DP_E = (35 / 384 - 5179 / 57600, 0.0, 500 / 1113 - 7571 / 16695, 125 / 192 - 393 / 640,
        -2187 / 6784 + 92097 / 339200, 11 / 84 - 187 / 2100, -1 / 40)


def dopri5(f, y, rtol, atol, max_steps):
    """Adaptive Dormand-Prince 5(4): a step is accepted when the RMS of err / (atol + rtol max(|y|, |y_new|)) <= 1
    for every series of the batch (dim 0; the batch shares the steps); the next step is h * clip(0.9 ratio^(-1/5),
    0.2, 10). Initial step as in Hairer, Norsett, Wanner (II.4)."""

    def rms(x):  # the largest per-series RMS: one series' error is not averaged away by the others
        x = x.detach()
        return x.reshape(len(x) if x.dim() > 1 else 1, -1).pow(2).mean(1).sqrt().max().item()

    k1 = f(0.0, y)
    scale = atol + rtol * y.detach().abs()
    d0, d1 = rms(y / scale), rms(k1 / scale)
    h0 = 1e-6 if min(d0, d1) < 1e-5 else 0.01 * d0 / d1
    d2 = rms((f(h0, y + h0 * k1) - k1) / scale) / h0
    h = min(100 * h0, max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** 0.2, 1.0)
    s, nfe, n_steps = 0.0, 2, 0
    while s < 1.0:
        n_steps += 1
        if n_steps > max_steps:
            raise RuntimeError(f"dopri5 needed more than max_steps {max_steps} steps (at s = {s:.4g}, step {h:.3g});"
                               " raise rtol/atol or max_steps, or use solver rk4")
        h = min(h, 1.0 - s)
        ks = [k1]
        for c, row in zip(DP_C, DP_A):
            ks.append(f(s + c * h, y + h * sum(w * k for w, k in zip(row, ks) if w)))
        nfe += 6
        y_new = y + h * sum(w * k for w, k in zip(DP_A[-1], ks) if w)  # the 6th stage's input: the 5th-order y
        err = h * sum(e * k for e, k in zip(DP_E, ks) if e)
        ratio = rms(err / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
        if ratio <= 1.0:
            s = 1.0 if 1.0 - s - h < 1e-12 else s + h
            y, k1 = y_new, ks[-1]
        h *= min(10.0, max(0.2, 0.9 * ratio ** -0.2)) if ratio > 0 else 10.0
    return y, nfe


def odeint(f, y0, solver, n_steps, rtol=1e-3, atol=1e-4, max_steps=10_000):
    """y(1) and the NFE by euler or rk4 (n_steps steps) or dopri5 (rtol, atol, at most max_steps steps)."""
    if solver == "dopri5":
        return dopri5(f, y0, rtol, atol, max_steps)
    return (euler if solver == "euler" else rk4)(f, y0, n_steps)


# ----------------------------------------------------------------------------------------------
# Control path: X(t) = a + b tau + c tau^2 + d tau^3 on each interval [t_i, t_i+1), tau = t - t_i.
# Shapes: t (B, N) increasing (padding continues past the series' end), x (B, N, C) with NaN = missing,
# lengths (B,) observations per series (>= 2).


def fill_missing(t, x, lengths):
    """Per channel, a missing value is linearly interpolated in time between the nearest observed values (held
    constant before the first and after the last observation; 0, the normalised mean, if a channel is empty)."""
    B, N, C = x.shape
    observed = ~torch.isnan(x) & (torch.arange(N, device=x.device) < lengths[:, None])[..., None]
    idx = torch.arange(N, device=x.device).view(1, N, 1).expand(B, N, C)
    prev = torch.where(observed, idx, -1).cummax(1).values
    nxt = torch.where(observed, idx, N).flip(1).cummin(1).values.flip(1)
    x0, tt = torch.nan_to_num(x), t[..., None].expand(B, N, C)
    x_prev, t_prev = x0.gather(1, prev.clamp(min=0)), tt.gather(1, prev.clamp(min=0))
    x_next, t_next = x0.gather(1, nxt.clamp(max=N - 1)), tt.gather(1, nxt.clamp(max=N - 1))
    w = ((tt - t_prev) / (t_next - t_prev).clamp(min=1e-12)).clamp(0, 1)
    both = torch.where(prev == nxt, x_prev, x_prev + w * (x_next - x_prev))
    return torch.where(prev >= 0, torch.where(nxt < N, both, x_prev), torch.where(nxt < N, x_next, 0.0))


def spline_second_derivatives(t, y, lengths):
    """Second derivatives M at the knots of the natural cubic spline (M = 0 at both ends of each series): the
    tridiagonal system h_i-1 M_i-1 + 2 (h_i-1 + h_i) M_i + h_i M_i+1 = 6 (slope_i - slope_i-1), by the Thomas
    algorithm; rows at and past a series' last knot are M_i = 0."""
    B, N, C = y.shape
    h = (t[:, 1:] - t[:, :-1])[..., None]  # (B, N-1, 1)
    slope = (y[:, 1:] - y[:, :-1]) / h
    interior = ((torch.arange(N, device=t.device) >= 1) & (torch.arange(N, device=t.device) < lengths[:, None] - 1))
    lower, upper, diag, rhs = [torch.zeros_like(y) for _ in range(4)]
    lower[:, 1:-1], upper[:, 1:-1] = h[:, :-1], h[:, 1:]
    diag[:, 1:-1], rhs[:, 1:-1] = 2 * (h[:, :-1] + h[:, 1:]), 6 * (slope[:, 1:] - slope[:, :-1])
    interior = interior[..., None]
    lower, upper, rhs = lower * interior, upper * interior, rhs * interior
    diag = torch.where(interior, diag, 1.0)
    c_, d_ = [upper[:, 0] / diag[:, 0]], [rhs[:, 0] / diag[:, 0]]
    for i in range(1, N):
        m = diag[:, i] - lower[:, i] * c_[-1]
        c_.append(upper[:, i] / m)
        d_.append((rhs[:, i] - lower[:, i] * d_[-1]) / m)
    M = [d_[-1]]
    for i in range(N - 2, -1, -1):
        M.append(d_[i] - c_[i] * M[-1])
    return torch.stack(M[::-1], 1)


class ControlPath:
    """X(t) and dX/dt per series from (t, x, lengths); interp 'linear' or 'cubic'. Data only: no gradient."""

    def __init__(self, t, x, lengths, interp):
        y = fill_missing(t, x, lengths)
        h = (t[:, 1:] - t[:, :-1])[..., None]
        a, b = y[:, :-1], (y[:, 1:] - y[:, :-1]) / h
        c = d = torch.zeros_like(a)
        if interp == "cubic":
            M = spline_second_derivatives(t, y, lengths)
            b = b - h * (2 * M[:, :-1] + M[:, 1:]) / 6
            c, d = M[:, :-1] / 2, (M[:, 1:] - M[:, :-1]) / (6 * h)
        self.knots, self.lengths = t, lengths
        self.coeffs = torch.stack([a, b, c, d], -1)  # (B, N-1, C, 4)
        self.t0 = t[:, 0]
        self.t1 = t.gather(1, (lengths - 1)[:, None]).squeeze(1)

    def __call__(self, t):
        """X(t) and dX/dt at one time per series, t (B,) -> (B, C) twice, or at S times, t (B, S) -> (B, S, C) twice."""
        if t.dim() == 1:
            X, dX = self(t[:, None])
            return X[:, 0], dX[:, 0]
        i = torch.searchsorted(self.knots, t.contiguous(), right=True) - 1  # (B, S)
        i = torch.minimum(i.clamp(min=0), (self.lengths - 2)[:, None])  # the last interval is closed on the right
        a, b, c, d = self.coeffs.gather(1, i[..., None, None].expand(-1, -1, *self.coeffs.shape[2:])).unbind(-1)
        tau = (t - self.knots.gather(1, i))[..., None]
        return a + tau * (b + tau * (c + tau * d)), b + tau * (2 * c + 3 * d * tau)


# ----------------------------------------------------------------------------------------------
# Models. The ODE state of ctfwp: W (B, H, d, d); of ncde: z (B, D).


def hebb(W, k, v, beta):
    return beta[..., None, None] * v[..., :, None] * k[..., None, :]


def oja(W, k, v, beta):
    return beta[..., None, None] * v[..., :, None] * (k - (W.transpose(-1, -2) @ v[..., None])[..., 0])[..., None, :]


def delta(W, k, v, beta):
    return beta[..., None, None] * (v - (W @ k[..., None])[..., 0])[..., :, None] * k[..., None, :]


RULES = {"hebb": hebb, "oja": oja, "delta": delta}


class Softmax(torch.autograd.Function):
    """x.softmax(-1), forward and backward written out: the same values and the same saved tensor (the output), but
    about twice as fast as torch's CPU kernels over rows as short as a head (d 8), the largest op of a step once the
    slow net runs on a table of every stage time."""

    @staticmethod
    def forward(ctx, x):
        e = (x - x.amax(-1, keepdim=True)).exp_()
        y = e.div_(e.sum(-1, keepdim=True))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return y * (dy - (dy * y).sum(-1, keepdim=True))


softmax = Softmax.apply


def delta_post_tanh(W, k, u, beta):
    """--post_tanh (the official --delta_ode_post_tahn): dW/dt = beta tanh(u - W k) k^T, u the value before any tanh."""
    return beta[..., None, None] * torch.tanh(u - (W @ k[..., None])[..., 0])[..., :, None] * k[..., None, :]


def oja_softmax_after(W, k_raw, v, beta):
    """The official oja_cde form: dW/dt = beta v softmax(k_raw - W^T v)^T (the softmax after the subtraction)."""
    return beta[..., None, None] * v[..., :, None] * (k_raw - (W.transpose(-1, -2) @ v[..., None])[..., 0]
                                                      ).softmax(-1)[..., None, :]


# --values_from dx (the official FastWeightCDE): k, v, beta are computed per rule from k_raw = W_k LN(W_in X(t)), its
# beta logit b and u = W_v dX/dt; each entry: (rule, k, v, beta).
DX_RULES = {
    "hebb": lambda k_raw, b, u: (hebb, softmax(k_raw), u, b),  # the raw logit b times u, no tanh (official)
    "oja": lambda k_raw, b, u: (oja_softmax_after, k_raw, torch.tanh(u), torch.sigmoid(b)),
    "delta": lambda k_raw, b, u: (delta, softmax(k_raw), torch.tanh(u), torch.sigmoid(b)),  # not in the official
}


class CTFWP(nn.Module):
    """The continuous-time fast weight programmer (the equations at the top of this file): per head a fast weight W
    (d_head x d_head) follows the learning rule over each series' control path; the readout of W at the series' last
    time gives its logits.
    n_channels: channels of x (time included as one, so that dX/dt holds the clock); n_classes; d_model: width, n_head
    fast weights of d_head = d_model / n_head; d_ff: the readout block's feed-forward width; rule: hebb | oja | delta;
    values_from: x (values tanh(W_v X(t)), readout W q: the official delta_cde layout) or dx (the official hebb_cde /
    oja_cde layout: keys, beta and query from X(t)); drive: the x layout only, keys, beta and query from dX/dt (dx)
    or X(t) (x); v_layernorm: values tanh(W_v2 LN(W_v X)); post_tanh: the delta rule with the tanh after the
    subtraction; interp: the control path, cubic | linear.
    The solver (forward may replace each for one call): solver euler | rk4 | dopri5; step_size: euler, rk4, in data
    time units (0: the batch's smallest gap between observations), unless forward is given n_steps; impl: precomputed
    (the slow net at every stage time in batched passes), kernel (precomputed, and the delta and Oja rules' steps in
    cpu_kernels.cpp on the CPU), generic (the whole vector field at each stage: the reference; dopri5's) or auto
    (kernel on the CPU, else precomputed); solve_chunk: precomputed, kernel: steps per tabulated chunk (0: all);
    rtol, atol, max_steps: dopri5's tolerances and its limit of steps per solve."""

    def __init__(self, n_channels, n_classes, d_model=32, n_head=4, d_ff=128, rule="delta", values_from="x",
                 drive="dx", v_layernorm=False, post_tanh=False, interp="cubic", solver="rk4", step_size=0.0,
                 impl="auto", solve_chunk=256, rtol=1e-3, atol=1e-4, max_steps=10_000):
        super().__init__()
        check_settings(n_channels=n_channels, n_classes=n_classes, d_model=d_model, n_head=n_head, d_ff=d_ff,
                       rule=rule, values_from=values_from, drive=drive, post_tanh=post_tanh, interp=interp,
                       solver=solver, step_size=step_size, impl=impl, solve_chunk=solve_chunk, rtol=rtol, atol=atol,
                       max_steps=max_steps)
        self.n_channels, self.n_classes, self.d_model, self.d_ff = n_channels, n_classes, d_model, d_ff
        self.rule, self.values_from, self.post_tanh, self.interp = rule, values_from, post_tanh, interp
        self.drive = "x" if values_from == "dx" else drive  # the dx layout reads keys, beta and query from X(t)
        self.solver, self.step_size, self.impl, self.solve_chunk = solver, step_size, impl, solve_chunk
        self.rtol, self.atol, self.max_steps = rtol, atol, max_steps
        self.H, self.d = n_head, d_model // n_head
        D = d_model
        self.W_in, self.ln_in = nn.Linear(n_channels, D), nn.LayerNorm(D)
        self.W_kb = nn.Linear(D, self.H * (self.d + 1))  # keys and beta of every head
        self.W_v = nn.Linear(n_channels, D)
        if v_layernorm:  # the official --cde_use_v_laynorm: values from W_v2 LN(W_v X)
            self.ln_v, self.W_v2 = nn.LayerNorm(D), nn.Linear(D, D)
        self.W_q, self.out = nn.Linear(D, D), nn.Linear(D, D)
        self.ln_ff = nn.LayerNorm(D)
        self.ff = nn.Sequential(nn.Linear(D, d_ff), nn.ReLU(), nn.Linear(d_ff, D))
        self.head = nn.Linear(D, n_classes)

    def extra_repr(self):
        return (f"n_channels={self.n_channels}, n_classes={self.n_classes}, d_model={self.d_model}, n_head={self.H} "
                f"(d_head {self.d}), d_ff={self.d_ff}, rule={self.rule}, values_from={self.values_from}, "
                f"drive={self.drive}, post_tanh={self.post_tanh}, interp={self.interp}, solver={self.solver}, "
                f"step_size={self.step_size}, impl={self.impl}, solve_chunk={self.solve_chunk}, rtol={self.rtol}, "
                f"atol={self.atol}, max_steps={self.max_steps}")

    def h(self, X, dX):
        return self.ln_in(self.W_in(dX if self.drive == "dx" else X))  # (B, D)

    def rule_kvb(self, path, t):
        """The rule and its (k, v, beta) at time t (B,): (B, H, d), (B, H, d), (B, H); at t (B, S): (B, S, H, ...)."""
        X, dX = path(t)
        kb = self.W_kb(self.h(X, dX)).unflatten(-1, (self.H, self.d + 1))
        k_raw, b = kb[..., :-1], kb[..., -1]  # (B, H, d), (B, H)
        u = self.W_v(dX if self.values_from == "dx" else X)
        if hasattr(self, "ln_v"):
            u = self.W_v2(self.ln_v(u))
        u = u.unflatten(-1, (self.H, self.d))
        if self.post_tanh:
            return delta_post_tanh, softmax(k_raw), u, torch.sigmoid(b)
        if self.values_from == "dx":
            return DX_RULES[self.rule](k_raw, b, u)
        return RULES[self.rule], softmax(k_raw), torch.tanh(u), torch.sigmoid(b)

    def vector_field(self, path):
        span = (path.t1 - path.t0)[:, None, None, None]

        def f(s, W):
            rule, *kvb = self.rule_kvb(path, path.t0 + s * span[:, 0, 0, 0])
            return span * rule(W, *kvb)

        return f

    def forward(self, t, x, lengths, n_steps=None, *, solver=None, step_size=None, impl=None, solve_chunk=None,
                rtol=None, atol=None, max_steps=None):
        """t (B, N) increasing times (a shorter series' padding continues past its end), x (B, N, n_channels) with
        NaN where missing, lengths (B,) observations per series (>= 2) -> logits (B, n_classes) and the NFE (int).
        n_steps: euler/rk4 steps per series, each over its own [t_1, t_N] (default: from step_size); the solver
        arguments given replace the constructor's for this call. W: (B, H, d, d) from t_1 to t_N."""
        path = ControlPath(t.to(self.head.weight.dtype), x.to(self.head.weight.dtype), lengths, self.interp)
        solve = solve_settings(self, path, n_steps, dict(solver=solver, step_size=step_size, impl=impl,
                                                   solve_chunk=solve_chunk, rtol=rtol, atol=atol, max_steps=max_steps))
        if precomputed(solve):
            W, nfe = self.solve_precomputed(path, solve)
        else:
            rule, k, v, beta = self.rule_kvb(path, path.t0)
            W0 = rule(v.new_zeros(*v.shape, k.shape[-1]), k, v, beta)  # the rule at the first observation with W = 0
            W, nfe = odeint(self.vector_field(path), W0, solve.solver, solve.n_steps, solve.rtol, solve.atol,
                               solve.max_steps)
        q = self.W_q(self.h(*path(path.t1))).view(-1, self.H, self.d).softmax(-1)
        Wq = W.transpose(-1, -2) @ q[..., None] if self.values_from == "dx" else W @ q[..., None]  # official forms
        y = self.out(Wq.flatten(1))  # (B, D)
        y = y + self.ff(self.ln_ff(y))
        return self.head(y), nfe

    def solve_precomputed(self, path, solve):
        """The same solve with k, v, beta (functions of the path alone) computed at every stage time in one batched
        pass per chunk of solve_chunk steps (B, S, H, d), W carried from chunk to chunk; then Hebb's rule is a
        weighted sum, the delta rule and Oja's (the paper's form, linear in W) a product of one affine map per step,
        and the other forms (post_tanh, the official Oja) step through the solver with the table."""
        n_steps = solve.n_steps
        s = stage_nodes(solve.solver, n_steps).to(path.t0)  # (S,)
        stride, span, chunk = NODE_STRIDE[solve.solver], path.t1 - path.t0, solve.solve_chunk or n_steps
        W = None
        for first in range(0, n_steps, chunk):
            steps = range(first, min(first + chunk, n_steps))
            rule, k, v, beta = self.rule_kvb(path, path.t0[:, None] + s[first * stride : steps.stop * stride + 1]
                                             * span[:, None])  # (B, S_chunk, H, d), ..., (B, S_chunk, H)
            if W is None:  # W = 0 at t_1, then the rule's first evaluation
                W = rule(v.new_zeros(*v[:, 0].shape, k.shape[-1]), k[:, 0], v[:, 0], beta[:, 0])
            W = self.tabulated_steps(W, rule, (k, v, beta), span, solve, steps)
        return W, len(s)  # NFE: the slow net's evaluations (for dopri5 and impl generic: the vector field's)

    def tabulated_steps(self, W, rule, kvb, span, solve, steps):
        """The solver's steps `steps` (of solve.n_steps) from W, with k, v, beta tabulated at those steps' nodes."""
        k, v, beta = kvb
        c, h = span[:, None, None] * beta, 1.0 / solve.n_steps  # c (B, S, H): the rule's rate in solver time
        if rule is hebb:  # dW/ds = c v k^T does not depend on W
            w = solver_weights(solve.solver, len(steps), h).to(c)[:, None]
            return W + torch.einsum("bsh,bshi,bshj->bhij", w * c, v, k)
        fused = use_kernel(solve.impl, c)
        if rule is delta:  # dW/ds = c (v - W k) k^T
            return linear_rule_solve(W, v, k, c, solve.solver, h, fused)
        if rule is oja:  # dW^T/ds = c (k - W^T v) v^T
            return linear_rule_solve(W.transpose(-1, -2), k, v, c, solve.solver, h, fused).transpose(-1, -2)
        stride = NODE_STRIDE[solve.solver]
        at = tabulated(kvb, stride * solve.n_steps + 1, first=stride * steps.start)
        span4 = span[:, None, None, None]
        step = euler if solve.solver == "euler" else rk4
        return step(lambda s_, W: span4 * rule(W, *at(s_)), W, solve.n_steps, steps)[0]


class NCDE(nn.Module):
    """Kidger et al. 2020: dz/dt = f(z) dX/dt, f: D -> (D, C) an MLP whose last activation is tanh, z(t_1) a linear
    map of X(t_1), logits = Head(z(t_N)). n_channels (C), n_classes; d_model: the size D of z; d_ff: the MLP's width;
    interp and the solver's settings as CTFWP's (impl: generic, or dX/dt tabulated at every stage time in one pass:
    auto, precomputed, kernel; f(z) needs z, so the stages still run one by one)."""

    def __init__(self, n_channels, n_classes, d_model=32, d_ff=128, interp="cubic", solver="rk4", step_size=0.0,
                 impl="auto", rtol=1e-3, atol=1e-4, max_steps=10_000):
        super().__init__()
        check_settings(n_channels=n_channels, n_classes=n_classes, d_model=d_model, d_ff=d_ff, interp=interp,
                       solver=solver, step_size=step_size, impl=impl, rtol=rtol, atol=atol, max_steps=max_steps)
        self.n_channels, self.n_classes, self.d_model, self.d_ff = n_channels, n_classes, d_model, d_ff
        self.interp, self.solver, self.step_size, self.impl = interp, solver, step_size, impl
        self.rtol, self.atol, self.max_steps = rtol, atol, max_steps
        D, C = d_model, n_channels
        self.init = nn.Linear(C, D)
        self.f = nn.Sequential(nn.Linear(D, d_ff), nn.ReLU(), nn.Linear(d_ff, d_ff), nn.ReLU(),
                               nn.Linear(d_ff, D * C), nn.Tanh(), nn.Unflatten(-1, (D, C)))
        self.head = nn.Linear(D, n_classes)

    def extra_repr(self):
        return (f"n_channels={self.n_channels}, n_classes={self.n_classes}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"interp={self.interp}, solver={self.solver}, step_size={self.step_size}, impl={self.impl}, "
                f"rtol={self.rtol}, atol={self.atol}, max_steps={self.max_steps}")

    def forward(self, t, x, lengths, n_steps=None, *, solver=None, step_size=None, impl=None, rtol=None, atol=None,
                max_steps=None):
        """As CTFWP.forward: t (B, N), x (B, N, n_channels), lengths (B,) -> logits (B, n_classes), NFE; z (B, D)."""
        path = ControlPath(t.to(self.head.weight.dtype), x.to(self.head.weight.dtype), lengths, self.interp)
        solve = solve_settings(self, path, n_steps, dict(solver=solver, step_size=step_size, impl=impl, rtol=rtol,
                                                   atol=atol, max_steps=max_steps))
        span = (path.t1 - path.t0)[:, None]
        dX = lambda s: path(path.t0 + s * span[:, 0])[1]  # noqa: E731
        if precomputed(solve):  # the path's derivative at every stage time in one pass; f(z) needs z, stage by stage
            nodes = stage_nodes(solve.solver, solve.n_steps).to(span)
            at = tabulated(path(path.t0[:, None] + nodes * span)[1:], len(nodes))
            dX = lambda s: at(s)[0]  # noqa: E731

        def f(s, z):
            return span * (self.f(z) @ dX(s)[..., None])[..., 0]

        z, nfe = odeint(f, self.init(path(path.t0)[0]), solve.solver, solve.n_steps, solve.rtol, solve.atol,
                        solve.max_steps)
        return self.head(z), nfe


# The settings of the models and what each may be: check_settings is called by the constructors (and by forward for
# the solver arguments given there) and by check_args, so that a module and the command line refuse the same values.
CHOICES = dict(rule=("hebb", "oja", "delta"), drive=("dx", "x"), values_from=("x", "dx"), interp=("cubic", "linear"),
               solver=("euler", "rk4", "dopri5"), impl=("auto", "kernel", "precomputed", "generic"))
POSITIVE = ("n_channels", "n_classes", "d_model", "n_head", "d_ff", "rtol", "atol", "max_steps")
NON_NEGATIVE = ("step_size", "solve_chunk")


def check_settings(flag="", **settings):
    """A ValueError naming the first bad value among the settings given, and the fix; flag is "--" where the command
    line asks, so that its message names the flag."""
    for key, value in settings.items():
        if key in CHOICES and value not in CHOICES[key]:
            raise ValueError(f"{flag}{key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        if key in POSITIVE and not value > 0:
            raise ValueError(f"{flag}{key} must be positive, got {value}")
        if key in NON_NEGATIVE and not value >= 0:
            raise ValueError(f"{flag}{key} must be non-negative, got {value}")
    s = settings
    if s.get("impl") in ("kernel", "precomputed") and s.get("solver") == "dopri5":
        raise ValueError(f"{flag}impl {s['impl']} needs a fixed-step solver (euler, rk4): dopri5's stage times are "
                         "not known ahead")
    if s.get("post_tanh") and s.get("rule") != "delta":
        raise ValueError(f"{flag}post_tanh changes the delta rule; it does nothing with {flag}rule {s.get('rule')}")
    if "d_model" in s and "n_head" in s and s["d_model"] % s["n_head"]:
        raise ValueError(f"{flag}d_model {s['d_model']} is not divisible by {flag}n_head {s['n_head']}; pick n_head "
                         "dividing d_model.")


class Solve(NamedTuple):
    """How one forward pass solves: the solver, its steps per series (euler, rk4) and its other settings."""

    solver: str
    n_steps: int
    impl: str
    solve_chunk: int
    rtol: float
    atol: float
    max_steps: int


def solve_settings(model, path, n_steps, given):
    """The Solve of a forward pass: each solver setting given to forward, or else the model's; n_steps given, or else
    the batch's longest span over step_size (0: over the batch's smallest gap between two observations)."""
    s = {key: getattr(model, key) if value is None else value for key, value in given.items()}
    check_settings(**s)
    if n_steps is None:
        inside = torch.arange(1, path.knots.shape[1], device=path.knots.device) < path.lengths[:, None]  # (B, N-1)
        gap = path.knots.diff(dim=1)[inside].min().item()  # the smallest gap between two observations of a series
        n_steps = fixed_step_count((path.t1 - path.t0).max().item(), s["step_size"] or gap)
    elif n_steps <= 0:
        raise ValueError(f"n_steps must be positive, got {n_steps}")
    return Solve(s["solver"], n_steps, s["impl"], s.get("solve_chunk", 0), s["rtol"], s["atol"], s["max_steps"])


def fixed_step_count(max_span, step):
    """euler/rk4 steps per solve: the longest span over the step size; every series takes as many steps, each series
    over its own interval (so a series' prediction depends on the longest span, not on the series beside it)."""
    return max(1, math.ceil(max_span / step - 1e-9))


def precomputed(solve):
    """impl: euler and rk4 take the precomputed path (the generic one is the reference); dopri5 the generic."""
    return solve.impl != "generic" and solve.solver != "dopri5"


def build_model(args, n_channels, n_classes):
    """The command line's model: each flag the constructor's keyword of the same name."""
    solver = dict(interp=args.interp, solver=args.solver, step_size=args.step_size, impl=args.impl, rtol=args.rtol,
                  atol=args.atol, max_steps=args.max_steps)
    if args.model == "ncde":
        return NCDE(n_channels, n_classes, d_model=args.d_model, d_ff=args.d_ff, **solver)
    return CTFWP(n_channels, n_classes, d_model=args.d_model, n_head=args.n_head, d_ff=args.d_ff, rule=args.rule,
                 values_from=args.values_from, drive=args.drive, v_layernorm=args.v_layernorm,
                 post_tanh=args.post_tanh, solve_chunk=args.solve_chunk, **solver)


# ----------------------------------------------------------------------------------------------
# Fast forms of the same solves (--impl precomputed, kernel): the slow net's inputs at every stage time of a fixed-step
# solver in batched passes, the delta and Oja rules' steps as affine maps, and those steps fused in cpu_kernels.cpp.


# The fixed-step solvers as stages (node of the step, a, b): the stage's input is y + a h k', k' the previous stage,
# at the step's node (euler: i h; rk4: i h, i h + h/2, (i + 1) h), and y <- y + h sum b k. Node j of step i is node
# i stride + j of the solve (stride 1 for euler, 2 for rk4: a step's last node is the next one's first).
RK_STAGES = {"euler": [(0, 0.0, 1.0)], "rk4": [(0, 0.0, 1 / 6), (1, 0.5, 1 / 3), (1, 0.5, 1 / 3), (2, 1.0, 1 / 6)]}
NODE_STRIDE = {solver: max(1, max(j for j, _, _ in stages)) for solver, stages in RK_STAGES.items()}

# These stage times are known before the solve, so a vector field whose inputs do not depend on the state can be
# tabulated in batched passes. The nodes are written as the solvers write them (each is the same float).


def stage_nodes(solver, n_steps):
    """The s of every stage of euler (n + 1 nodes: i h) or rk4 (2n + 1 nodes: i h, then i h + h/2), float64 (S,)."""
    h, i = 1.0 / n_steps, torch.arange(n_steps + 1, dtype=torch.float64)
    if solver == "euler":
        return i * h
    return torch.stack([i * h, i * h + h / 2], 1).flatten()[:-1]


def tabulated(table, n_nodes, first=0):
    """f(s, y) for the solvers from a table of stage inputs (each (B, S, ...)) whose row 0 is node `first` of a
    solve of n_nodes nodes (node j at s = j / (n_nodes - 1))."""
    return lambda s: [x[:, round(s * (n_nodes - 1)) - first] for x in table]


def solver_weights(solver, n_steps, h):
    """Weights w_j such that n_steps steps of size h on dy/ds = g(s) (no dependence on y) give y + sum_j w_j g(s_j),
    s_j the steps' nodes: each stage's h b at its node (euler: h at i h; rk4: Simpson's rule, h/6, 4h/6, h/6)."""
    stride = NODE_STRIDE[solver]
    w = torch.zeros(stride * n_steps + 1, dtype=torch.float64)
    for j, _, b in RK_STAGES[solver]:
        w[j : j + stride * n_steps : stride] += h * b
    return w


def linear_rule_solve(Y0, a, p, c, solver, h, fused=False):
    """Steps of size h of euler or rk4 on dY/ds = c (a - Y p) p^T (delta: Y = W, a = v, p = k; Oja's rule on Y = W^T:
    a = k, p = v), with a, p tabulated at the steps' nodes (B, S, H, d), c (B, S, H), Y (B, H, d, d); n steps take
    S = n stride + 1 nodes. Each step is linear in Y: a stage at node j is k = u p_j^T with u = Y P^T gamma + A delta
    (P (J, d) the step's p_j as rows, A (d, J) its a_j as columns, gamma, delta in R^J); after the stage
    k' = u' p_j'^T, k = c_j (a_j - (Y + a h k') p_j) p_j^T gives gamma = -c_j (e_j + a h (p_j' . p_j) gamma') and
    delta = c_j (e_j - a h (p_j' . p_j) delta'). So the step is
    Y <- Y M + N with M = I + P^T Gamma P and N = A Delta P (Gamma, Delta: h b gamma, h b delta summed into column j),
    built for all steps at once from the tabulated values; then n products run on Y."""
    B, S, H, d = p.shape
    stride = NODE_STRIDE[solver]
    n_steps = (S - 1) // stride
    if fused:  # the same steps in cpu_kernels.cpp (each row of Y is its own ODE; a head's rows step together)
        return LinearRuleKernel.apply(Y0, a, p, c, n_steps, h, solver == "rk4")
    stages = RK_STAGES[solver]
    J = 1 + max(j for j, _, _ in stages)  # nodes per step
    at = lambda x, j: x[:, j : j + stride * n_steps : stride]  # noqa: E731  (B, n, ...): node j of every step
    e = torch.eye(J, dtype=c.dtype, device=c.device)
    Gam, Del, prev = [0.0] * J, [0.0] * J, None  # columns of Gamma and Delta, each (B, n, H, J)
    for j, alpha, b in stages:
        cj = at(c, j)[..., None]
        if prev is None:
            gamma, delta = -cj * e[j], cj * e[j]
        else:
            j_, gamma_, delta_ = prev
            g = alpha * h * (at(p, j_) * at(p, j)).sum(-1, keepdim=True)  # (B, n, H, 1)
            gamma, delta = -cj * (e[j] + g * gamma_), cj * (e[j] - g * delta_)
        Gam[j], Del[j], prev = Gam[j] + h * b * gamma, Del[j] + h * b * delta, (j, gamma, delta)
    P = torch.stack([at(p, j) for j in range(J)], -2)  # (B, n, H, J, d)
    A = torch.stack([at(a, j) for j in range(J)], -1)  # (B, n, H, d, J)
    M = torch.eye(d, dtype=p.dtype, device=p.device) + P.transpose(-1, -2) @ torch.stack(Gam, -1) @ P
    N = A @ torch.stack(Del, -1) @ P  # (B, n, H, d, d)
    steps = lambda x: x.transpose(0, 1).flatten(1, 2).unbind(0)  # noqa: E731  (B, n, H, ...) -> n x (B H, ...)
    Y = Y0.flatten(0, 1)  # (B H, d, d)
    # unbind, not indexing: one backward node for all steps (a backward per index would write a whole zero tensor)
    for M_i, N_i in zip(steps(M), steps(N)):
        Y = torch.baddbmm(N_i, Y, M_i)
    return Y.view(B, H, d, d)


class LinearRuleKernel(torch.autograd.Function):
    """linear_rule_solve's steps as one fused kernel per pass (cpu_kernels.cpp): Y0 (B, H, rows, cols), a (B, S, H,
    rows), p (B, S, H, cols), c (B, S, H). The forward keeps Y at the start of every step for the backward."""

    @staticmethod
    def forward(ctx, Y0, a, p, c, n_steps, h, rk4):
        Y, Ys = kernels("cpu").ct_linear_rule_forward(Y0, a, p, c, n_steps, h, rk4)
        ctx.save_for_backward(Ys, a, p, c)
        ctx.n_steps, ctx.h, ctx.rk4 = n_steps, h, rk4
        return Y

    @staticmethod
    def backward(ctx, dY):
        dY0, da, dp, dc = kernels("cpu").ct_linear_rule_backward(dY.contiguous(), *ctx.saved_tensors, ctx.n_steps,
                                                                 ctx.h, ctx.rk4)
        return dY0, da, dp, dc, None, None, None


def use_kernel(impl, x):
    """--impl kernel and auto take cpu_kernels.cpp for the delta and Oja rules on the CPU (float32, float64)."""
    return (impl in ("kernel", "auto") and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and kernels("cpu") is not None)


# ----------------------------------------------------------------------------------------------
# Data. A split is a dict of padded tensors: t (n, N) float64, x (n, N, C) float32 with NaN = missing and channel 0 =
# time, lengths (n,), y (n,); padded times continue past each series' end (t_last + 1, + 2, ...).


def synthetic_series(n, length, missing, rng):
    """Order-and-sign task, 4 classes. Two channels on the grid 0..length-1; a series keeps each grid time with
    probability 1/2 (always the first) and ends at a random time in the last quarter (variable lengths); values
    go missing with probability `missing`. Early on (t < length/3) channel 0 has a Gaussian bump of sign s and width
    length/32, channel 1 a positive bump, at random times at least length/16 apart; later, two distractor bumps
    of random sign per channel and noise (std 0.1). Label = 2 [s > 0] + [channel 0's bump comes first]. Solving it
    needs the time channel (which event came first), and memory over the distractors until the series ends.
    One example, length 64: times 0 2 3 5 ..., x[:, 1] = 0.02 -0.9 -0.4 ... (a negative bump at t = 2),
    label 1 when channel 1's bump is at, say, t = 15."""
    grid = np.arange(length, dtype=np.float64)
    width = length / 32
    t_ev = np.empty((n, 2))
    for i in range(n):  # two event times at least length/16 apart
        while True:
            t_ev[i] = rng.uniform(0, length / 3, 2)
            if abs(t_ev[i, 0] - t_ev[i, 1]) >= length / 16:
                break
    sign = rng.choice([-1.0, 1.0], n)
    bump = lambda at: np.exp(-0.5 * ((grid[None, :, None] - at[:, None, :]) / width) ** 2)  # noqa: E731
    x = bump(t_ev) * np.stack([sign, np.ones(n)], 1)[:, None]
    for _ in range(2):  # distractors in the later two thirds
        t_d = rng.uniform(length / 2.5, length, (n, 2))
        x += rng.choice([-1.0, 1.0], (n, 1, 2)) * bump(t_d)
    x += 0.1 * rng.standard_normal(x.shape)
    x[rng.random(x.shape) < missing] = np.nan
    y = 2 * (sign > 0) + (t_ev[:, 0] < t_ev[:, 1])
    ends = rng.integers(3 * length // 4, length, n)
    series = []
    for i in range(n):
        keep = rng.random(length) < 0.5
        keep[0] = keep[ends[i]] = True
        keep[ends[i] + 1:] = False
        series.append((grid[keep], x[i, keep]))
    return series, y.astype(np.int64)


def spirals(n, length, missing, rng):
    """Irregularly sampled spirals, 2 classes: the example task of the neural CDE library torchcde (Kidger et al.,
    example/time_series_classification.py): x = cos(phi + t) / (1 + t / 2), y = sin(phi + t) / (1 + t / 2) on
    t in [0, 4 pi] (length grid points), phi uniform in [0, 2 pi), noise std 0.01, x mirrored for class 1 (the spiral
    turns clockwise); as the synthetic task, each series keeps a random half of the grid (always the first and last
    point) and values go missing with probability `missing`. One example, length 8: t 0 1.80 5.39 12.57, x = cos(phi),
    ..., label 0 (counter-clockwise)."""
    grid = np.linspace(0, 4 * np.pi, length)
    phi = rng.uniform(0, 2 * np.pi, (n, 1))
    y = rng.integers(0, 2, n)
    xy = np.stack([np.cos(phi + grid), np.sin(phi + grid)], -1) / (1 + 0.5 * grid)[None, :, None]
    xy[y == 1, :, 0] *= -1
    xy += 0.01 * rng.standard_normal(xy.shape)
    xy[rng.random(xy.shape) < missing] = np.nan
    series = []
    for i in range(n):
        keep = rng.random(length) < 0.5
        keep[0] = keep[-1] = True
        series.append((grid[keep], xy[i, keep]))
    return series, y.astype(np.int64)


def parse_ts(path):
    """A UEA/UCR .ts file -> (list of (values (L, C) float64 with NaN), list of label strings, channel count).
    Header lines start with '@', comments with '#'; a case is 'dim1:dim2:...:label', values ','-separated, '?'
    missing; lengths may differ between cases and dimensions (shorter dimensions are NaN-padded). A case with a
    dimension of '?' only is dropped (with a count); a file of such cases is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise data.DataError(f"cannot read {path}: {e}") from e
    header, cases, labels, in_data = {}, [], [], False
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}, line {n}"
        if not in_data:
            if not line.startswith("@"):
                raise data.DataError(f"{where}: expected a header line ('@...') before @data, got {line[:40]!r}")
            key, _, val = line[1:].partition(" ")
            header[key.lower()] = val.strip()
            if key.lower() == "timestamps" and val.strip().lower() == "true":
                raise data.DataError(f"{where}: @timeStamps true (time-stamped values) is not supported")
            in_data = key.lower() == "data"
            continue
        *dims, label = line.split(":")
        if not dims or not label.strip():
            raise data.DataError(f"{where}: a case needs at least one dimension and a class label after the last ':'")
        declared = header.get("classlabel", "").split()[1:]
        if declared and label.strip() not in declared:
            raise data.DataError(f"{where}: class label {label.strip()!r} is not declared in @classLabel")
        try:
            values = [[math.nan if v.strip() == "?" else float(v) for v in dim.split(",")] for dim in dims]
        except ValueError as e:
            raise data.DataError(f"{where}: a value is not a number or '?' ({e})") from e
        if cases and len(values) != cases[0].shape[1]:
            raise data.DataError(f"{where}: {len(values)} dimensions, but earlier cases have {cases[0].shape[1]}")
        arr = np.full((max(map(len, values)), len(values)), np.nan)
        for c, vals in enumerate(values):
            arr[: len(vals), c] = vals
        cases.append(arr)
        labels.append(label.strip())
    if not in_data or not cases:
        raise data.DataError(f"{path}: no @data section or no cases in it")
    empty = [np.isnan(arr).all(0).any() for arr in cases]  # a dimension with no observed value: nothing to interpolate
    if all(empty):
        raise data.DataError(f"{path}: every case has a dimension with no observed value ('?' throughout)")
    if any(empty):
        print(f"warning: {path}: dropped {sum(empty)} of {len(cases)} cases, each with a dimension that has no "
              "observed value ('?' throughout)", file=sys.stderr)
    return [a for a, e in zip(cases, empty) if not e], [s for s, e in zip(labels, empty) if not e], cases[0].shape[1]


def read_wav(path):
    """A 16-bit mono .wav as float32 samples in [-1, 1) (the stdlib wave module)."""
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise data.DataError(f"{path}: expected 16-bit mono PCM")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768


def mfcc(wav, sr=16000, n_mfcc=20, n_fft=200, n_mels=64):
    """(B, samples) -> (B, frames, n_mfcc): hann-windowed centred STFT (hop n_fft / 2, reflect padding), power,
    HTK mel filterbank (0 .. sr/2), log(mel + 1e-6), orthonormal DCT-II; torchaudio's MFCC with log_mels=True."""
    spec = torch.stft(wav, n_fft, n_fft // 2, window=torch.hann_window(n_fft, dtype=wav.dtype), center=True,
                      pad_mode="reflect", return_complex=True).abs().pow(2)  # (B, freq, frames)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    f_pts = 700 * (10 ** (np.linspace(mel(0), mel(sr / 2), n_mels + 2) / 2595) - 1)
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)[:, None]
    fb = np.maximum(0, np.minimum((freqs - f_pts[:-2]) / (f_pts[1:-1] - f_pts[:-2]),
                                  (f_pts[2:] - freqs) / (f_pts[2:] - f_pts[1:-1])))  # (freq, n_mels)
    logmel = torch.log(spec.transpose(1, 2) @ torch.tensor(fb, dtype=wav.dtype) + 1e-6)  # (B, frames, n_mels)
    n, k = np.arange(n_mels)[:, None], np.arange(n_mfcc)[None]
    dct = np.cos(np.pi / n_mels * (n + 0.5) * k) * np.where(k == 0, np.sqrt(1 / n_mels), np.sqrt(2 / n_mels))
    return logmel @ torch.tensor(dct, dtype=wav.dtype)


def load_speech(folder):
    """The 10 words, clips of exactly 16000 samples, as MFCC series (161 frames x 20) at times 0..160."""
    cache = os.path.join(folder, "mfcc_10words.pt")
    if not os.path.exists(cache):
        feats, labels = [], []
        for c, word in enumerate(SPEECH_WORDS):
            names = sorted(f for f in os.listdir(os.path.join(folder, word)) if f.endswith(".wav"))
            wavs = [read_wav(os.path.join(folder, word, f)) for f in tqdm(names, desc=word)]
            wavs = [w for w in wavs if len(w) == 16000]
            for i in range(0, len(wavs), 1024):
                feats.append(mfcc(torch.tensor(np.stack(wavs[i : i + 1024]))))
            labels += [c] * len(wavs)
        if not labels:
            raise data.DataError(f"{folder} holds no 16000-sample .wav clips of the 10 words")
        torch.save({"x": torch.cat(feats), "y": torch.tensor(labels)}, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    d = torch.load(cache)
    times = np.arange(d["x"].shape[1], dtype=np.float64)
    return [(times, x) for x in d["x"].double().numpy()], d["y"].numpy(), list(SPEECH_WORDS)


SEPSIS_STATIC = ("Age", "Gender", "Unit1", "Unit2", "HospAdmTime")


def load_sepsis(folder, max_hours=72):
    """PhysioNet 2019: label = the patient ever has SepsisLabel 1; the time-varying columns over the first
    max_hours ICU hours (time = ICULOS), NaN where unmeasured; the static columns as constant channels."""
    series, labels = [], []
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.endswith(".psv"))
    if not files:
        raise data.DataError(f"{folder} holds no .psv files")
    for path in tqdm(files, desc="sepsis", disable=len(files) < 1000):
        with open(path) as f:
            head = f.readline().strip().split("|")
            rows = np.array([[float(v) for v in line.strip().split("|")] for line in f if line.strip()], ndmin=2)
        if rows.size == 0 or not {"ICULOS", "SepsisLabel", *SEPSIS_STATIC} <= set(head):
            raise data.DataError(f"{path}: expected a PhysioNet 2019 .psv with ICULOS, SepsisLabel and static columns")
        col = {name: i for i, name in enumerate(head)}
        dynamic = [i for i, name in enumerate(head) if name not in ("ICULOS", "SepsisLabel", *SEPSIS_STATIC)]
        keep = rows[:, col["ICULOS"]] <= max_hours
        if keep.sum() < 2:
            continue  # a stay of one hour has no path
        r = rows[keep]
        static = np.nan_to_num(rows[0, [col[s] for s in SEPSIS_STATIC]])
        series.append((r[:, col["ICULOS"]], np.concatenate([r[:, dynamic], np.broadcast_to(static, (len(r), 5))], 1)))
        labels.append(int(rows[:, col["SepsisLabel"]].max() > 0))
    return series, np.array(labels), ["no sepsis", "sepsis"]


def observation_counts(x):
    """Intensity channels (N, C) for values x (N, C): how many times each channel has been observed up to and
    including each time (Kidger et al. 2020's observational intensity, as the official sepsis code)."""
    return np.cumsum(~np.isnan(x), 0).astype(np.float32)


def logsig_windows(t, x, w):
    """Depth-1 log-signature windows of w steps (Morrill et al. 2021, the log-ODE method): the observations 0, w, 2w,
    ... (as the official EigenWorms windows [i, i + w], trailing points dropped); a linear path through them has,
    on each window, the derivative (x[i + w] - x[i]) / (t[i + w] - t[i]), the window's log-signature over its
    duration."""
    return t[::w], x[::w]


def pad_split(series, labels, mean, std, t_max, intensity=False):
    """Padded tensors of one split; values normalised, time (/ t_max) prepended as channel 0; with intensity, C
    observation-count channels after the C values (not normalised, as the official code)."""
    n, N = len(series), max(len(t) for t, _ in series)
    C = series[0][1].shape[1]
    t = np.zeros((n, N))
    x = np.full((n, N, 1 + C * (2 if intensity else 1)), np.nan, dtype=np.float32)
    for i, (ti, xi) in enumerate(series):
        L = len(ti)
        t[i, :L], t[i, L:] = ti, ti[-1] + np.arange(1, N - L + 1)
        x[i, :L, 0], x[i, :L, 1:C + 1] = ti / t_max, (xi - mean) / std
        if intensity:
            x[i, :L, C + 1:] = observation_counts(xi)
    return {"t": torch.tensor(t), "x": torch.tensor(x), "lengths": torch.tensor([len(s[0]) for s in series]),
            "y": torch.tensor(labels, dtype=torch.long)}


def load_task(args):
    """train/valid/test splits, class names, channels, the solver's fixed step count. Splits: synthetic generated;
    --data TRAIN (85/15 into train/valid) and TEST; downloads: all cases pooled and split 70/15/15 (seeded)."""
    rng = np.random.default_rng(args.seed)
    if args.data:
        tr, tr_labels, C = parse_ts(args.data)
        te, te_labels, C_te = parse_ts(args.data.removesuffix("_TRAIN.ts") + "_TEST.ts")
        if C_te != C:
            raise data.DataError(f"{args.data} has {C} dimensions but its _TEST file {C_te}")
        names = sorted(set(tr_labels))
        if set(te_labels) - set(names):
            raise data.DataError(f"the _TEST file has labels not in _TRAIN: {sorted(set(te_labels) - set(names))}")
        tr, te = [[(np.arange(len(v), dtype=np.float64), v) for v in cases] for cases in (tr, te)]  # times 0, 1, ...
        perm = rng.permutation(len(tr))
        n_valid = max(1, round(0.15 * len(tr)))
        ys = np.array([names.index(s) for s in tr_labels])
        pools = [([tr[i] for i in idx], ys[idx]) for idx in (perm[n_valid:], perm[:n_valid])]
        pools.append((te, np.array([names.index(s) for s in te_labels])))
    elif args.dataset in ("spirals", "synthetic"):
        sizes = (args.n_train, args.n_train // 4, args.n_train // 4)
        make = spirals if args.dataset == "spirals" else synthetic_series
        pools = [make(n, args.syn_length, args.missing, rng) for n in sizes]
        names = ["counter-clockwise", "clockwise"] if args.dataset == "spirals" else ["-first1", "-first0", "+first1",
                                                                                      "+first0"]
    else:
        if args.dataset == "speech_commands":
            series, ys, names = load_speech(data.fetch_speech_commands(SPEECH_WORDS, args.data_dir))
        elif args.dataset == "sepsis":
            series, ys, names = load_sepsis(data.fetch_sepsis(args.data_dir))
        else:
            tr_path, te_path = data.fetch_uea(args.dataset, args.data_dir)
            (tr, tr_labels, _), (te, te_labels, _) = parse_ts(tr_path), parse_ts(te_path)
            names = sorted(set(tr_labels) | set(te_labels))
            series = [(np.arange(len(v), dtype=np.float64), v) for v in tr + te]
            ys = np.array([names.index(s) for s in tr_labels + te_labels])
        perm = rng.permutation(len(series))
        cut = [round(0.7 * len(series)), round(0.85 * len(series))]
        pools = [([series[i] for i in idx], ys[idx]) for idx in np.split(perm, cut)]
    if args.logsig_window > 1:
        pools = [([logsig_windows(t, x, args.logsig_window) for t, x in series], ys) for series, ys in pools]
    for split, (series, ys) in zip(("train", "valid", "test"), pools):
        if not len(series) or any(len(t) < 2 for t, _ in series):
            raise data.DataError(f"the {split} split is empty or has a series with fewer than 2 observations")
    values = np.concatenate([x for _, x in pools[0][0]])
    mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
    mean, std = np.nan_to_num(mean), np.where(np.nan_to_num(std) > 0, np.nan_to_num(std), 1.0)
    t_max = 1.0 if args.raw_time else max(max(t[-1] for t, _ in s) for s, _ in pools) or 1.0
    task = {split: pad_split(s, ys, mean, std, t_max, args.intensity)
            for split, (s, ys) in zip(("train", "valid", "test"), pools)}
    min_gap = min(np.diff(t).min() for s, _ in pools for t, _ in s)
    max_span = max(t[-1] - t[0] for s, _ in pools for t, _ in s)
    n_channels = 1 + values.shape[1] * (2 if args.intensity else 1)
    return dict(task, names=names, n_channels=n_channels, min_gap=min_gap, max_span=max_span)


MAX_FIXED_STEPS = 100_000  # euler/rk4 steps per solve a run may take: more is a step size in the wrong units


def fixed_steps(args, task):
    """euler/rk4 steps per solve: the longest series' span over the step size (the same for every batch, so a
    series' prediction does not depend on the batch it is in; shorter series take proportionally shorter steps). More
    than MAX_FIXED_STEPS is refused, naming the smallest step size that fits."""
    n = fixed_step_count(task["max_span"], args.step_size or task["min_gap"])
    if n > MAX_FIXED_STEPS and args.solver != "dopri5":
        step = f"--step_size {args.step_size:g}" if args.step_size else f"the smallest gap, {task['min_gap']:g},"
        fits = task["max_span"] / MAX_FIXED_STEPS
        fail(f"{step} makes {n:,} {args.solver} steps per solve over the longest series ({task['max_span']:g} time "
             f"units); at most {MAX_FIXED_STEPS:,} are run: give --step_size {fits:.3g} or more")
    return n


def get_batch(split, idx, device):
    """The series idx of a split, trimmed to their longest: t, x, lengths, y."""
    n = int(split["lengths"][idx].max())
    t, x = split["t"][idx, :n].to(device), split["x"][idx, :n].to(device)
    return t, x, split["lengths"][idx].to(device), split["y"][idx].to(device)


# ----------------------------------------------------------------------------------------------
# Training


def auroc(score, y):
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counted half."""
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    for v in np.unique(score):  # average ranks of ties
        ranks[score == v] = ranks[score == v].mean()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return (ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@torch.no_grad()
def predict(model, args, task, split, device):
    """Logits of a whole split (in batches) under the solver of args, and the mean NFE per batch."""
    solver = {key: getattr(args, key) for key in ("solver", "impl", "rtol", "atol", "max_steps")}
    model.eval()
    out, nfes = [], []
    for i in range(0, len(task[split]["y"]), args.batch_size):
        rows = torch.arange(i, min(i + args.batch_size, len(task[split]["y"])))
        t, x, lengths, _ = get_batch(task[split], rows, device)
        logits, nfe = model(t, x, lengths, fixed_steps(args, task), **solver)
        out.append(logits.float().cpu())
        nfes.append(nfe)
    model.train()
    return torch.cat(out), float(np.mean(nfes))


def evaluate(model, args, task, split, device):
    logits, nfe = predict(model, args, task, split, device)
    y = task[split]["y"]
    result = {"loss": task_loss(logits, y, args).item(), "acc": (logits.argmax(-1) == y).float().mean().item()}
    if logits.shape[1] == 2:
        result["auroc"] = auroc(logits.softmax(-1)[:, 1].numpy(), y.numpy())
    return dict(result, nfe=nfe)


def task_loss(logits, y, args):
    """Cross-entropy; with --pos_weight (two classes) the official sepsis loss, binary cross-entropy on the logit
    difference with the positives weighted."""
    if args.pos_weight > 0:
        weight = torch.tensor(args.pos_weight, dtype=logits.dtype, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits[:, 1] - logits[:, 0], y.to(logits.dtype), pos_weight=weight)
    return F.cross_entropy(logits, y)


def l2_penalty(model, args):
    """The official penalty: l2 x the sum over parameter tensors of their (unsquared) L2 norms."""
    return args.l2 * sum(p.norm() for p in model.parameters()) if args.l2 > 0 else 0.0


def headline(args):
    return "auroc" if args.dataset == "sepsis" and not args.data else "acc"


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def setup(args, device=None, rank=0):
    device = device or pick_device(args.device)
    seed_everything(args.seed + rank)
    try:
        task = load_task(args)
    except data.DataError as e:
        fail(str(e))
    fixed_steps(args, task)  # a solve of too many steps is refused before anything runs
    return device, task, build_model(args, task["n_channels"], len(task["names"])).to(device)


def forward_loss(model, args, task, batch, bar):
    """The loss of one training batch (task loss + the L2 penalty) and the solver's function evaluations. A solve that
    exceeds --max_steps is a user error; what is on disk stays."""
    t, x, lengths, y = batch
    try:
        logits, nfe = model(t, x, lengths, fixed_steps(args, task))
    except RuntimeError as e:
        if "max_steps" not in str(e):
            raise
        bar.close()
        fail(f"{e}; the run stops: {on_disk(args.out_dir)}")
    return task_loss(logits, y, args) + l2_penalty(model, args), nfe


def optimizer_step(model, opt, loss, args, world):
    """One clipped optimizer step. Returns the global batch's loss, the mean of the ranks' (so that every rank stops
    alike on a divergence), as a device tensor: log_train reads and checks it."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    return mean_over_ranks(loss, world)


def log_train(args, step, pending, bar, master, t0):
    """The training metrics of the steps since the last call (one dict per step, its "loss" a device tensor, read here
    in one sync rather than every step): a non-finite loss stops the run (check_finite, before anything of it is
    saved); rank 0 logs every step's line; the bar shows the last loss. Returns an empty list for the next steps."""
    losses = torch.stack([m["loss"] for m in pending]).tolist() if pending else []
    first = step - len(pending) + 1
    for i, loss in enumerate(losses):
        check_finite(first + i, args.out_dir, "Lower --lr or raise --warmup.", {"the loss": loss}, bar=bar)
    for i, (m, loss) in enumerate(zip(pending, losses) if master else []):
        log_metrics(args.out_dir, first + i, "train", dict(m, loss=loss), t0)
    if losses:
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    return []


def final_test(model, args, task, device, best, t0):
    """The final line: the test split with the best-on-valid checkpoint."""
    name = headline(args)
    model.load_state_dict(torch.load(os.path.join(args.out_dir, "best.pt"), map_location=device,
                                     weights_only=False)["model"])
    result = evaluate(model, args, task, "test", device)
    log_metrics(args.out_dir, args.steps, "test", result, t0)
    print(f"final: test {name} {result[name]:.4f} (" + " ".join(f"{k} {v:.4f}" for k, v in result.items()) +
          f") with the best valid checkpoint (step {best[0]}, valid {name} {best[1]:.4f}), {time.time() - t0:.0f}s")


def announce(args, device, world, task, model, step):
    print(f"config: {json.dumps(dataclasses.asdict(args))}")
    print(f"device {device}, {world} process(es), model {args.model}" +
          (f" ({args.rule} rule)" if args.model == "ctfwp" else "") +
          f", {sum(p.numel() for p in model.parameters()) / 1e3:.1f}k parameters, {len(task['train']['y'])} training "
          f"series, {task['n_channels']} channels, {len(task['names'])} classes, " +
          (f"{fixed_steps(args, task)} {args.solver} steps per solve" if args.solver != "dopri5" else "dopri5") +
          f", starting at step {step}")


def start_processes(args):
    """One process per rank under torchrun (RANK, WORLD_SIZE set; gloo on CPU, nccl on CUDA) -> rank, world, device.
    --batch_size is the global batch: each rank takes its rows (rank_slice); rank 0 logs, evaluates and saves."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        fail(f"--batch_size {args.batch_size} is the global batch; it must divide evenly among the {world} processes")
    device = pick_device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def finish_processes(model, world, master):
    """DDP's invariant, checked (every rank ends with the same weights), then a clean teardown."""
    if world > 1:
        flat = torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()
        same = all(torch.equal(g, flat) for g in gather_ranks(flat, world))
        if master:
            print(f"ddp: parameters identical on all {world} ranks: {same}")
        torch.distributed.barrier()  # no rank tears down while another still talks to it
        gc.collect()  # the DDP wrapper's reducer, with its reference to the group, goes now
        torch.distributed.destroy_process_group()


def rank_slice(x, rank, world):
    """This rank's rows of a global batch: rows rank * n ... (rank + 1) * n - 1 of dim 0, n = len(x) / world."""
    n = len(x) // world
    return x[rank * n : (rank + 1) * n]


def mean_over_ranks(x, world):
    """The mean of a tensor over the ranks, on every rank (a detached copy)."""
    x = x.detach().clone()
    if world > 1:
        torch.distributed.all_reduce(x)
    return x / world


def gather_ranks(x, world):
    """x (any picklable value; tensors on the CPU) from every rank, in rank order, on every rank."""
    out = [x] * world
    if world > 1:
        torch.distributed.all_gather_object(out, x)
    return out


def train(args):
    rank, world, device = start_processes(args)
    master = rank == 0
    device, task, model = setup(args, device, rank)  # the initial weights are rank 0's (DDP broadcasts them)
    gen = torch.Generator().manual_seed(args.seed)  # which training series each step sees: the same on every rank
    if args.pos_weight > 0 and len(task["names"]) != 2:
        fail(f"--pos_weight needs two classes; this task has {len(task['names'])}")
    n_train = len(task["train"]["y"])
    n_batch = min(args.batch_size, n_train)  # the global batch: the whole training set's size if that is smaller
    if n_batch % world:
        fail(f"the global batch is the training set's {n_batch} series (fewer than --batch_size); it must divide "
             f"evenly among the {world} processes")
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=2)
    step, best, window, ckpt_path = 0, None, [], os.path.join(args.out_dir, "ckpt.pt")  # window: losses since an eval
    if args.resume:
        ckpt = resume_from(ckpt_path, model, opt, device, args)
        if "plateau" in ckpt:  # checkpoints from before --plateau existed have none
            plateau.load_state_dict(ckpt["plateau"])
        step, best = ckpt["step"], ckpt["best"]
        gen.set_state(ckpt["rng"]["data"])
        # every rank reads the same checkpoint, so all return here alike (rank 0 says why); then a clean teardown
        with contextlib.nullcontext() if master else contextlib.redirect_stdout(io.StringIO()):
            done = nothing_left(args.out_dir, step, args.steps, args.stop_at, ckpt.get("final", False))
        if done:
            finish_processes(model, world, master)
            return
    ddp = model  # what the training steps call: the model, wrapped in DDP when there are several processes
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        if args.resume:  # at the last step: the final test is left, its lines from before a kill go
            truncate_metrics(args.out_dir, step, ["test"] if step == args.steps else [])
        announce(args, device, world, task, model, step)
    t0, name = time.time(), headline(args)
    bar, pending = progress_bar(args.steps, step, master), []
    while step < args.steps:
        idx = torch.randint(n_train, (n_batch,), generator=gen)
        # the global batch, trimmed to its longest series as one process trims it, then this rank's rows; the loss is
        # a mean over series, so DDP's average of the ranks' means over equal slices is the global batch's mean
        batch = [rank_slice(a, rank, world).to(device) for a in get_batch(task["train"], idx, "cpu")]
        if not args.plateau:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
        loss, nfe = forward_loss(ddp, args, task, batch, bar)
        # nfe: rank 0's solve (the same on every rank but with dopri5, whose steps depend on the batch)
        pending.append(dict(loss=optimizer_step(ddp, opt, loss, args, world), nfe=nfe, lr=opt.param_groups[0]["lr"]))
        window.append(pending[-1]["loss"])
        step += 1
        bar.update(1)
        evaluate_now = step % args.eval_every == 0 or step == args.steps or step == args.stop_at
        if step % args.log_every == 0 or evaluate_now:
            pending = log_train(args, step, pending, bar, master, t0)
        if evaluate_now:
            if args.plateau:  # x0.1 after 2 evaluations without a lower training loss
                plateau.step(torch.stack(window).double().mean().item())
            window = []
            result = evaluate(model, args, task, "valid", device) if master else None  # rank 0 evaluates
            result = gather_ranks(result, world)[0]  # and every rank checks its loss: a divergence stops all alike
            check_finite(step, args.out_dir, "Lower --lr or raise --warmup.", {"the valid loss": result["loss"]},
                         [model], bar)
            if master:
                log_metrics(args.out_dir, step, "valid", result, t0)
                tqdm.write(f"step {step} valid: " + " ".join(f"{k} {v:.4f}" for k, v in result.items()))
                improved = best is None or result[name] > best[1]
                best = (step, result[name]) if improved else best
                for path in ["best.pt", "ckpt.pt"] if improved else ["ckpt.pt"]:
                    save_checkpoint(os.path.join(args.out_dir, path), {
                        "model": model.state_dict(), "optimizer": opt.state_dict(), "plateau": plateau.state_dict(),
                        "step": step, "args": dataclasses.asdict(args), "names": task["names"], "best": best,
                        "rng": dict(rng_state(), data=gen.get_state())})
            if step == args.stop_at:
                break
    bar.close()
    del ddp  # DDP holds the process group: release it here, not at interpreter exit (gloo aborts there)
    finish_processes(model, world, master)
    if master and step == args.steps:
        final_test(model, args, task, device, best, t0)
        mark_final(ckpt_path)


def evaluate_checkpoint(args):
    """Test predictions of out_dir/best.pt under the solver it was trained with, under --solver (with --rtol, --atol,
    --step_size), and under a tight reference (dopri5, rtol 1e-7, atol 1e-9): accuracy, NFE, time, and each one's
    distance from the reference (share of equal predicted classes, largest logit difference)."""
    path = os.path.join(args.out_dir, "best.pt")
    if not os.path.exists(path):
        fail(f"--evaluate: no checkpoint at {path}; train first (same --out_dir)")
    saved = read_checkpoint(path, "--evaluate")
    trained = Args(**saved["args"])
    model_keys = ("model", "rule", "drive", "values_from", "interp", "d_model", "n_head", "d_ff", "dataset", "data",
                  "n_train", "syn_length", "missing", "seed")
    args = dataclasses.replace(args, **{k: getattr(trained, k) for k in model_keys})
    reference = dataclasses.replace(args, solver="dopri5", impl="generic", rtol=1e-7, atol=1e-9)
    device, task, model = setup(trained)
    model.load_state_dict(saved["model"])
    y, rows = task["test"]["y"], []
    for name, cfg in (("trained", trained), ("asked", args), ("reference", reference)):
        t = time.time()
        logits, nfe = predict(model, cfg, task, "test", device)
        rows.append((name, cfg, logits, nfe, time.time() - t))
    ref = rows[-1][2]
    for name, cfg, logits, nfe, sec in rows:
        solver = cfg.solver + (f" step {cfg.step_size or task['min_gap']:g}" if cfg.solver != "dopri5" else
                              f" rtol {cfg.rtol:g} atol {cfg.atol:g}")
        same = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
        print(f"{name:9} {solver:29} test acc {(logits.argmax(-1) == y).float().mean().item():.4f}  NFE per batch "
              f"{nfe:5.0f}  {sec:5.1f}s  vs reference: same class {same:.4f}, max |logit diff| "
              f"{(logits - ref).abs().max().item():.2e}")


# ----------------------------------------------------------------------------------------------
# Benchmark


def saved_mib(fn):
    """MiB of tensors autograd keeps for the backward pass of fn (the activation memory), each storage once."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values()) / 2**20


def fast_paths(args, device):
    """The --impl values that differ for this model: kernel where the rule's steps run in cpu_kernels.cpp (the delta
    rule and the paper's Oja rule, on the CPU), and precomputed."""
    linear = args.model == "ctfwp" and not args.post_tanh and (args.rule == "delta" or args.values_from == "x" and
                                                               args.rule == "oja")
    return (["kernel"] if linear and device.type == "cpu" and kernels("cpu") else []) + ["precomputed"]


def step_timer(args, task, batch, device):
    """One model's training step (forward + backward) on a batch, ready to be timed: a function returning its wall
    time in ms, after a warm-up step in which the NFE and the MiB saved for the backward pass are counted; and the
    parameter count."""
    t, x, lengths, y = batch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build_model(args, task["n_channels"], len(task["names"])).to(device)
    out = {}

    def step():
        logits, out["nfe"] = model(t, x, lengths, fixed_steps(args, task))
        F.cross_entropy(logits, y).backward()

    def timed():
        sync()
        t_start = time.perf_counter()
        step()
        sync()
        return (time.perf_counter() - t_start) * 1e3

    mib = saved_mib(step)
    return timed, out["nfe"], mib, sum(p.numel() for p in model.parameters())


def bench(args):
    """(1) The task's batch: a training step of each model/rule and solver, by each path (kernel where the rule's
    steps have one, precomputed, generic; dopri5: generic only), median of 3. (2) Scale: synthetic series of about N
    observations for N in --bench_obs (--syn_length 2N: each series keeps half of the grid), rk4 at the observation gap
    (about 2N steps), batch --batch_size: the CT-FWP rules against the neural CDE at the same width, each by its paths
    (the generic one, for the delta rule and the neural CDE, up to --bench_generic_max observations), with the
    activation memory; every row timed once per round, 3 rounds, the median (so that a slow spell of a shared machine
    falls on every row alike, not on one length); ms/step: the step's ms per solver step (flat where the cost is
    linear in length); x generic: the generic path's ms over this row's, same model and length."""
    device = pick_device(args.device)
    try:
        task = load_task(args)
    except data.DataError as e:
        fail(str(e))
    n = min(args.batch_size, len(task["train"]["y"]))
    batch = get_batch(task["train"], torch.arange(n), device)
    print(f"device {device}, threads {torch.get_num_threads()}, batch {n}, {fixed_steps(args, task)} fixed steps per "
          f"solve, d_model {args.d_model}, n_head {args.n_head}, interp {args.interp}, dopri5 rtol {args.rtol} atol "
          f"{args.atol}")
    print(f"{'model':12} {'solver':7} {'impl':12} {'params':>8} {'step ms':>9} {'NFE':>6}")
    models = (("ctfwp", "hebb"), ("ctfwp", "oja"), ("ctfwp", "delta"), ("ncde", args.rule))
    label = lambda model_name, rule: model_name if model_name == "ncde" else f"ctfwp-{rule}"  # noqa: E731
    for model_name, rule in models:
        fast = fast_paths(dataclasses.replace(args, model=model_name, rule=rule), device)
        for solver, impl in [(s, i) for s in ("euler", "rk4") for i in (*fast, "generic")] + [("dopri5", "generic")]:
            b = dataclasses.replace(args, model=model_name, rule=rule, solver=solver, impl=impl)
            timed, nfe, _, n_params = step_timer(b, task, batch, device)
            ms = np.median([timed() for _ in range(3)])
            print(f"{label(model_name, rule):12} {solver:7} {impl:12} {n_params / 1e3:7.1f}k {ms:9.1f} {nfe:6d}",
                  flush=True)
    print(f"\nscale: rk4 at the observation gap, batch {args.batch_size}, d_model {args.d_model} (ncde: z of "
          f"{args.d_model}, MLP {args.d_ff}); each row's warm-up, then 3 rounds over the rows", flush=True)
    rows = []  # (obs, steps, label, impl, timed, MiB saved)
    for n_obs in (int(v) for v in args.bench_obs.split(",")):
        s = dataclasses.replace(args, dataset="synthetic", data="", syn_length=2 * n_obs, n_train=4 * args.batch_size,
                                solver="rk4", step_size=0.0, logsig_window=0)
        task = load_task(s)
        batch = get_batch(task["train"], torch.arange(args.batch_size), device)
        obs = float(batch[2].float().mean())
        for model_name, rule in models:
            for impl in ("generic", *fast_paths(dataclasses.replace(s, model=model_name, rule=rule), device)):
                if impl == "generic" and (n_obs > args.bench_generic_max or model_name == "ctfwp" and rule != "delta"):
                    continue
                b = dataclasses.replace(s, model=model_name, rule=rule, impl=impl)
                timed, _, mib, _ = step_timer(b, task, batch, device)
                rows.append((obs, fixed_steps(b, task), label(model_name, rule), impl, timed, mib))
    times = [[] for _ in rows]
    for _ in range(3):
        for row, ms in zip(rows, times):
            ms.append(row[4]())
    print(f"{'obs':>6} {'steps':>6} {'model':12} {'impl':12} {'step ms':>10} {'ms/step':>8} {'x generic':>9} "
          f"{'MiB saved':>10}")
    generic = {}  # (obs, label) -> the generic path's ms
    for (obs, n, name, impl, _, mib), ms in zip(rows, times):
        ms = float(np.median(ms))
        if impl == "generic":
            generic[obs, name] = ms
        ratio = f"{generic[obs, name] / ms:8.1f}x" if (obs, name) in generic else f"{'-':>9}"
        print(f"{obs:6.0f} {n:6d} {name:12} {impl:12} {ms:10.1f} {ms / n:8.3f} {ratio} {mib:10.1f}")


# ----------------------------------------------------------------------------------------------
# Scaffolding, the same in every script: the command line (from the Args fields and their docstrings), errors, the
# device, torchrun's processes, the output folder, checkpoints, divergence, seeds, metrics, the kernels' loader.


def fail(msg):
    """A user error: one message, exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    """--key value (or --key=value; a bare --flag sets a bool), --preset NAME applied first; --help lists every Args
    field with its type, default and docstring. Then check_args, a seed numpy takes, an --out_dir, a --device here."""
    fields = {f.name: f for f in dataclasses.fields(Args)}
    if "--help" in argv or "-h" in argv:
        body = ast.parse(inspect.getsource(Args)).body[0].body
        print(f"usage: python {os.path.basename(sys.argv[0])} [--preset {'|'.join(PRESETS)}] [--key value ...]")
        for node, doc in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr):
                name = node.target.id
                print(f"  --{name} ({ast.unparse(node.annotation)}, {getattr(Args, name)!r}): {doc.value.value}")
        sys.exit(0)
    kv, i = {}, 0
    while i < len(argv):
        key, eq, val = argv[i].removeprefix("--").partition("=")
        if not argv[i].startswith("--") or (key not in fields and key != "preset"):
            fail(f"unknown argument {argv[i]!r}; --help lists the flags")
        if not eq and key in fields and fields[key].type is bool and (i + 1 == len(argv) or argv[i + 1][:2] == "--"):
            val = "true"  # a bare --flag
        elif not eq:
            if i + 1 == len(argv):
                fail(f"--{key} needs a value")
            val, i = argv[i + 1], i + 1
        kv[key], i = val, i + 1
    preset = kv.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    args = Args(**PRESETS.get(preset, {}))
    for key, val in kv.items():
        typ = fields[key].type
        try:
            if typ is bool and val.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            value = val.lower() in ("true", "1") if typ is bool else typ(val)
            if typ is float and not np.isfinite(value):
                raise ValueError
        except ValueError:
            fail(f"--{key} expects {'a finite float' if typ is float else typ.__name__}, got {val!r}")
        setattr(args, key, value)
    args = check_args(args)
    if not 0 <= args.seed < 2**32:
        fail(f"--seed must be in [0, 2**32 - 1] (numpy's seeds), got {args.seed}")
    if not args.out_dir:
        fail("--out_dir must name a folder (. for the current one), got ''")
    pick_device(args.device)
    return args


def pick_device(name):
    """auto: cuda > mps > cpu; else the device named, if this machine has it (a one-line error if not)."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    name = ("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu") if name == "auto" else name
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        fail(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= n_gpu:
        fail(f"--device {name}: this machine has " + (f"{n_gpu} CUDA GPU(s), cuda:0 to cuda:{n_gpu - 1}" if n_gpu else
                                                      "no CUDA GPU; use --device cpu (or auto)"))
    if device.type == "mps" and not mps:
        fail(f"--device {name}: this torch has no MPS (Apple GPU) backend here; use --device cpu (or auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        fail(f"--device {name}: the scripts run on cpu, cuda or mps")
    return device


RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl")  # what a run writes to its out_dir


def open_out_dir(args):
    """--out_dir, checked before anything is written: a folder this process can write to, never another run's (one
    holding RUN_FILES) unless --resume continues that run or --overwrite deletes its RUN_FILES first."""
    out = args.out_dir
    if args.resume and args.overwrite:
        fail("--resume continues the run in --out_dir, --overwrite replaces it: give one of them")
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out_dir {out} is a file, not a folder; give a folder")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test_{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"--out_dir {out} cannot be written to ({e.strerror or e}); give a folder you can write to")
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if found and not args.resume and not args.overwrite:
        fail(f"--out_dir {out} holds a run ({', '.join(found)}): continue it with --resume, give another --out_dir, "
             "or replace it with --overwrite")
    for f in found if args.overwrite else []:
        with contextlib.suppress(FileNotFoundError):  # another process of this run removed it first
            os.remove(os.path.join(out, f))


def save_checkpoint(path, obj):
    """obj and the script's name (read_checkpoint checks it), written atomically: a kill leaves the last one intact."""
    torch.save(dict(obj, script=os.path.basename(__file__)), path + ".tmp")
    os.replace(path + ".tmp", path)


def mark_final(path):
    """Record in the checkpoint at path that the run's final evaluation is written: a --resume has nothing left."""
    save_checkpoint(path, dict(torch.load(path, map_location="cpu", weights_only=False), final=True))


def read_checkpoint(path, flag, device="cpu", args=None):
    """The checkpoint at path, or a one-line error: none there, a truncated or corrupt file, another script's, or (with
    args) a run whose RESUME_FLAGS differ from args'."""
    if not os.path.exists(path):
        fail(f"{flag}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        saved = ckpt["args"]
    except Exception as e:  # a truncated or corrupt file: zip, pickle, EOF and key errors alike
        fail(f"{flag}: {path} is not a readable checkpoint ({type(e).__name__}: a truncated or corrupt file); restore "
             "it, or start anew with --overwrite")
    script = os.path.basename(__file__)
    if ckpt.get("script", script) != script:
        fail(f"{flag}: {path} is a checkpoint of {ckpt['script']}, not of {script}; run that script, or give another "
             "--out_dir")
    differ = [key for key in RESUME_FLAGS if args is not None and key in saved and saved[key] != getattr(args, key)]
    if differ:
        fail(f"{flag}: {path} holds a run of " + ", ".join(f"--{key} {saved[key]}" for key in differ) + " (this run: "
             + ", ".join(f"--{key} {getattr(args, key)}" for key in differ) + "); give the same flags, or another "
             "--out_dir")
    return ckpt


def resume_from(path, model, opt, device, args):
    """--resume: read_checkpoint, the model and optimizer loaded in place, the global RNGs restored; returns the
    checkpoint (its RNG states on the CPU, where torch keeps generators')."""
    ckpt = read_checkpoint(path, "--resume", device, args)
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"--resume: the weights in {path} do not fit this model ({str(e).strip().splitlines()[0]}); give the "
             "flags it was trained with, or another --out_dir")
    rng = ckpt["rng"] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in ckpt["rng"].items()}
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    return ckpt


def nothing_left(out_dir, step, steps, stop_at, final):
    """--resume of a checkpoint at step of a run of steps: True, after saying why, if nothing is left to do (finished,
    its final evaluation written; or at or past --steps or --stop_at)."""
    if step == steps and final:
        print(f"the run in {out_dir} is finished (step {step} of {steps}, its final results written); nothing to do")
    elif step > steps:
        print(f"the checkpoint in {out_dir} is at step {step}, past the run's {steps} steps; nothing to do")
    elif stop_at and stop_at <= step < steps:
        print(f"the checkpoint in {out_dir} is at step {step}, at or past --stop_at {stop_at}; nothing to do (a later "
              "--stop_at, or none, continues)")
    return step == steps and final or step > steps or bool(stop_at and stop_at <= step < steps)


def check_finite(step, out_dir, fix, values, modules=(), bar=None):
    """A divergence stops the run before anything of it is logged or saved (exit 1): a non-finite value in values (name
    -> a number or tensor) or weight of modules. The message says what stays on disk."""
    values = {name: torch.as_tensor(v) for name, v in values.items()}
    bad = [f"{name} became {v.item() if v.numel() == 1 else 'non-finite'}" for name, v in values.items()
           if not v.isfinite().all()]
    bad += [f"the weights of {type(m).__name__} became non-finite" for m in modules
            if not all(t.isfinite().all() for t in m.state_dict().values() if t.is_floating_point())]
    if bad:
        if bar is not None:
            bar.close()
        tqdm.write(f"error: {' and '.join(bad)} at step {step}; the run stops, saving nothing of it: "
                   f"{on_disk(out_dir)}. {fix}", file=sys.stderr)
        sys.exit(1)


def on_disk(out_dir):
    """What a stopped run leaves in out_dir: its last checkpoint and that checkpoint's step, or none."""
    path = os.path.join(out_dir, "ckpt.pt")
    try:
        step = torch.load(path, map_location="cpu", weights_only=False)["step"]
    except FileNotFoundError:
        return f"it has no checkpoint ({path} was never written)"
    except Exception:  # unreadable: left as it was
        return f"{path} stays as it was"
    return f"the last good checkpoint, {path} (step {step}), stays"


def log_metrics(out_dir, step, split, metrics, t0):
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        for name, value in metrics.items():
            f.write(json.dumps(dict(step=step, split=split, metric=name, value=value, time=time.time() - t0)) + "\n")


def truncate_metrics(out_dir, step, final=()):
    """--resume: drop the metrics.jsonl lines past the checkpoint's step (the resumed run logs those steps again), a
    line cut short by the kill, and those at step of the splits in `final` (the final evaluation, written again)."""
    path, keep = os.path.join(out_dir, "metrics.jsonl"), []
    if not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                m = json.loads(line)
                if m["step"] < step or m["step"] == step and m["split"] not in final:
                    keep.append(line)
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def progress_bar(total, initial=0, master=True, **kw):
    """tqdm over the training steps on rank 0, redrawn at most twice a second on a terminal and every 10 s when
    stderr is a file (a log stays small); set its postfix with refresh=False: it shows at the next redraw."""
    return tqdm(total=total, initial=initial, disable=not master, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10, **kw)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


_KERNELS = {}  # device type -> the loaded extension, or False once its build failed
KERNEL_FILES = {"cpu": "cpu_kernels.cpp", "cuda": "cuda_kernels.cu"}


def kernels(device_type):
    """The fused kernels of a device (KERNEL_FILES: the same functions on both), built and loaded on first use, never at
    import. The build runs on a copy of the source in a folder named by a hash of it, of torch's version and of this
    CPU's instruction sets (the CPU build is -march=native), so an edit rebuilds, scripts share one build and a build
    folder shared by other CPUs is never loaded here. None for a device without a kernel file (mps), and, after one
    warning, if the build fails (no compiler, no ninja, no nvcc): the PyTorch forms run instead."""
    if device_type in KERNEL_FILES and device_type not in _KERNELS:
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), KERNEL_FILES[device_type])
        try:
            from torch.utils.cpp_extension import load

            with open(src, "rb") as f:
                code = f.read()
            try:
                with open("/proc/cpuinfo") as f:
                    cpu = next((line for line in f if line.startswith(("flags", "Features"))), "")
            except OSError:
                cpu = platform.machine() + platform.processor()
            name = f"fwp_{device_type}_kernels_" + hashlib.sha256(code + torch.__version__.encode() + cpu.encode()
                                                                  ).hexdigest()[:16]
            build = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser(
                "~/.cache/torch_extensions"), name)
            copy = os.path.join(build, os.path.basename(src))
            os.makedirs(build, exist_ok=True)
            if not os.path.exists(copy):
                with open(copy + ".tmp", "wb") as f:
                    f.write(code)
                os.replace(copy + ".tmp", copy)
            flags = ["-O3", "-march=native", "-fopenmp" if torch.backends.openmp.is_available() else "-fopenmp-simd"]
            _KERNELS[device_type] = load(name, [copy], build_directory=build, extra_cflags=flags,
                                         extra_cuda_cflags=["-O3"], verbose=False)
        except Exception as e:  # no compiler, no ninja, a compile error: the PyTorch forms still work
            print(f"warning: {os.path.basename(src)} unavailable ({type(e).__name__}: {str(e)[-2000:]}); using the "
                  "PyTorch forms", file=sys.stderr)
            _KERNELS[device_type] = False
    return _KERNELS.get(device_type) or None


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.bench:
        return bench(args)
    if args.evaluate:
        return evaluate_checkpoint(args)
    open_out_dir(args)
    train(args)


if __name__ == "__main__":
    main()
