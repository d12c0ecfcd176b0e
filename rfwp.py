"""Recurrent fast weight programmers: Delta RNN, Delta LSTM, Recurrent Delta Net, Delta MLP, Delta Delta Net.

Irie, Schlag, Csordas, Schmidhuber, "Going Beyond Linear Transformers with Recurrent Fast Weight Programmers",
NeurIPS 2021, arXiv 2106.06295 (section 2: eq. 4-7 DeltaNet, 8-11 Delta MLP, 12-16 Delta Delta Net, 17-20 Delta
RNN, 21-27 Delta LSTM, 28-32 Recurrent Delta Net). One state-carrying interface for every model; code execution,
sequential ListOps, language modelling, and state tracking with length generalisation (parity, modular arithmetic,
permutations: the setting of Irie, Csordas, Schmidhuber 2023, arXiv 2310.16076, and Grazzi et al. 2025, arXiv
2411.12537). The paper's RL experiment (section 4.4) is rfwp_rl.py, which imports its
cores from this file.

"Delta rule" below always means, per head, with v̄ = W k the value W currently stores under the key k:
    W <- W + beta (v - v̄) k^T                                       (delta_step)
    delta        q, k = sumnorm(elu(W_q x) + 1) ...; beta = sigmoid(w_b x); delta rule; y_t = W_t q_t
    linear       q, k = elu(.) + 1, no normalisation; W_t = W_{t-1} + v_t k_t^T; y_t = W_t q_t
    delta_mlp    h_0 = q; h_l = h_{l-1} + W^l_t sumnorm(elu(LN(h_{l-1})) + 1), each W^l a delta-rule fast weight
    delta_delta  fast net 1 (delta rule, from x) outputs q', k', v', beta' that program fast net 2: y_t = W'_t q'_t
    delta_rnn    z_t = W_t q_t; R_t by the delta rule from (softmax) keys, values, beta of x;
                 y_t = z_t + R_t softmax(y_{t-1})
    delta_lstm   z^g = W^g q^g for g in (i, u, o); s = softmax(h_{t-1}); i = sigmoid(z^i + R^i s),
                 o = sigmoid(z^o + R^o s), u = z^u + R^u s; c_t = i u + (1 - i) c_{t-1}; h_t = o c_t
    rdn          s = tanh(y_{t-1}); q = softmax(W_q x + R_q s), k = softmax(W_k x + R_k s), v = W_v x + R_v s,
                 beta = sigmoid(w_b x + r_b . s); delta rule; y_t = W_t q_t
    lstm, transformer: the baselines (nn.LSTM; causal softmax attention)
Block: x + Out(FWP(LN(x))), then x + FF(LN(x)) (post_ln: LN(x + Out(FWP(x))), then LN(x + FF(x)), the official
Transformer baseline's form); a final LN and the output head. The fast weights and recurrent
states start at zero; the output is read after the step's write. Layers whose keys depend only on the current
input (linear, delta, delta_mlp, delta_delta, and the W parts of delta_rnn and delta_lstm) train in the
chunkwise-parallel form; the recurrent parts step through time. With impl "kernel" every part runs as one fused
kernel per pass instead, forward and backward: cpu_kernels.cpp on the CPU (the default there, impl "auto"),
cuda_kernels.cu on a CUDA device. Both are JIT-built on first use (a C++ compiler and ninja; nvcc for CUDA); without
them the PyTorch forms run, after one warning. impl "loop" steps every part in Python (fast_weight_loop,
delta_rnn_loop, delta_lstm_loop, rdn_loop: the spec and the test oracle). "auto" is "kernel" on the CPU, where every
kernel measured faster than its PyTorch form, and "chunk" elsewhere: the CUDA recurrent kernels pass their device
code's tests on CPU threads but have not yet run on a GPU, so they stay opt-in there.

Glossary: b batch, h head, t time step, T sequence length, C chunk length, d = d_head = d_model / n_head,
W, R (d, d) fast weights of one head (fp32), beta in (0, 1) a write strength, s the recurrent input of a step.

Negative eigenvalues (--neg_eigval --qk_map l2, every model with delta-rule writes). A write W <- W (I - beta k k^T) +
beta v k^T scales W along k by 1 - beta |k|^2 and leaves W orthogonal to k as it is. With beta in (0, 1) and |k| <= 1
that factor lies in [0, 1): the state can fade along k but never flip its sign, which counting mod 2 (parity) and
permutations need (Grazzi et al. 2025, arXiv 2411.12537). --neg_eigval makes every write's beta 2 sigmoid(.) in (0, 2);
but the paper's keys, sumnorm(elu + 1) and softmax, have |k|^2 <= 1, at 1 only for a one-hot key and typically near
1/d, so 1 - beta |k|^2 rarely goes below 0. --qk_map l2 makes every key a unit vector (L2-normalised silu; queries
too, times d^-1/2), so the factor is 1 - beta, in (-1, 1) with --neg_eigval: DeltaNet[-1, 1] of Grazzi et al. The
recurrent parts' reads (softmax(y_{t-1}) in delta_rnn, softmax(h_{t-1}) in delta_lstm) stay as the paper's.

As modules (a copy needs this file, data.py, cpu_kernels.cpp and cuda_kernels.cu): RDNLayer(d_model=64, n_head=4),
DeltaLSTMLayer(d_model=64, n_head=4, chunk_size=64), ...: (x, state=None) -> (y, state), x and y (B, T, d_model),
the state's shapes in each layer's docstring; FWPModel(n_in, n_out, model="rdn", ...) stacks them.

Commands:
    python rfwp.py                                        # rdn on code execution, ~2 CPU min with the kernel build
    python rfwp.py --preset tiny --steps 20               # smoke run
    python rfwp.py --model rdn --task listops             # sequential ListOps (depth 4; the paper: 10, 15)
    python rfwp.py --task parity --model delta_rnn        # parity: trained on lengths 3-40, tested up to 256
    python rfwp.py --task modarith --model lstm           # modular arithmetic without brackets (mod 5), same lengths
    python rfwp.py --task permutation --n_perm 5          # the word problem of S5, same lengths
    python rfwp.py --task parity --model delta --neg_eigval --qk_map l2   # DeltaNet[-1, 1] (beta in (0, 2), unit keys)
    python rfwp.py --preset paper --model delta_rnn       # GPU: the paper's code execution setting
    python rfwp.py --task lm --dataset wikitext-2 --model delta_lstm --carry_state
    python rfwp.py --bench                                # training speed and memory of every model
    torchrun --nproc_per_node 2 rfwp.py                   # data-parallel (gloo on CPU, nccl on CUDA)
    python rfwp_rl.py                                     # the RL experiment: CartPole without velocities

Fidelity. Where the paper and the official code differ this file follows the paper: the code generator runs a
conditional statement whenever its condition holds (the official one runs a conditional `v = n` only while v is
unassigned: --official_if); its statement kinds are drawn with the official frequencies (code_program). Delta MLP's
fast layers are d x d each (--fast_net_depth of them, residual; 1 by default, as the official algorithmic code); the
official LM layer uses pairs of fast layers with a 4d hidden width. A final LN sits before the head (the official
algorithmic code has none; its Transformer baseline's nn.TransformerEncoder has one). Blocks are pre-LN, as the
official FWP layers; the official Transformer baseline is post-LN, which is --post_ln (the results use pre-LN for
every model). ListOps trees are drawn as the official generator draws them (listops_tree); --depth counts nested
operators, so --depth 10 is the official --only_depth 11, "depth 10" in the paper.

Runs: --out_dir gets metrics.jsonl, ckpt.pt and best.pt (the best on valid, which the test split is evaluated with). The
scaffolding at the end, the same in every script, refuses an --out_dir that holds another run (--resume continues it,
--overwrite replaces it), checks a checkpoint before resuming from it (the script, RESUME_FLAGS, a truncated file) and
stops a diverging run before it logs or saves anything of it (open_out_dir, read_checkpoint, nothing_left,
truncate_metrics, check_finite). A resumed run on the CPU ends where an uninterrupted one would. Under torchrun each
process takes its rows of the global --batch_size (the synthetic tasks: drawn alike on every rank, the loss over a
varying number of targets scaled as the rank's sum over the global count, times N; lm: its rows of the batch_size
streams); dropout masks are each rank's own; rank 0 logs, evaluates and checkpoints, so --resume continues with any
number of processes.
"""

import ast
import contextlib
import dataclasses
import gc
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data

MODELS = ("lstm", "transformer", "linear", "delta", "delta_mlp", "delta_delta", "delta_rnn", "delta_lstm", "rdn")
IMPLS = ("auto", "loop", "chunk", "kernel")
QK_MAPS = ("paper", "l2")


# ----------------------------------------------------------------------------------------------
# Configuration: every flag with its default and docstring (--help prints them), the presets, and the checks
# of a command line's values (the modules' own checks, check_config below, and what only the command line knows).


@dataclass
class Args:
    # task
    task: str = "code"
    """code (code execution), listops (sequential ListOps), parity, modarith (modular arithmetic without brackets),
    permutation (the word problem of S_n) or lm (through data.py); the RL experiment is rfwp_rl.py"""
    code_length: int = 5
    """code: statements per program (the paper: 100; 5 is learned in a few CPU minutes)"""
    n_vars: int = 3
    """code: variables (3 or 5)"""
    official_if: bool = False
    """code: a conditional `v = n` runs only while v is unassigned, as in the official generator (false: whenever
    its condition holds)"""
    depth: int = 4
    """listops: exact nesting depth of the operator tree (the paper: 10 and 15)"""
    ops: str = "MIN,MAX,FIRST"
    """listops: operators, from MIN, MAX, FIRST, LAST, MED, SM (sum mod 10)"""
    min_len: int = 3
    """parity, modarith, permutation: the shortest training sequence"""
    max_len: int = 40
    """parity, modarith, permutation: the longest training (and validation) sequence; lengths are drawn uniformly
    from min_len to max_len"""
    test_len: int = 256
    """parity, modarith, permutation: the longest test sequence; the test split holds the length buckets min_len to
    max_len, max_len + 1 to the next power of two, and on by doublings up to test_len"""
    modulus: int = 5
    """modarith: the modulus (numbers 0 to modulus - 1)"""
    n_perm: int = 3
    """permutation: n of the symmetric group S_n (3: S3, the smallest non-abelian one; 5: S5, not solvable)"""
    n_train: int = 100_000
    """code, listops, parity, modarith, permutation: training examples (generated in memory, fixed seed; the paper:
    10k, --preset paper)"""
    n_eval: int = 1000
    """code, listops: validation and test examples each; parity, modarith, permutation: examples per length bucket"""
    dataset: str = "wikitext-2"
    """lm: wikitext-103 | wikitext-2 | enwik8 | a text file | a folder with train/valid/test files"""
    tokenizer: str = "word"
    """lm: word (perplexity) or char (bits per character)"""
    data_dir: str = data.DATA_DIR
    """where downloads are cached"""
    seq_len: int = 256
    """lm: tokens per training segment"""
    carry_state: bool = False
    """lm: carry fast weights and recurrent states across consecutive segments, detached"""
    # model
    model: str = "rdn"
    """lstm | transformer | linear | delta | delta_mlp | delta_delta | delta_rnn | delta_lstm | rdn"""
    d_model: int = 64
    """residual stream width (lstm: hidden size)"""
    n_layer: int = 2
    """number of blocks (lstm: layers)"""
    n_head: int = 4
    """heads per layer; d_head = d_model / n_head"""
    d_ff: int = 256
    """feed-forward hidden width"""
    dropout: float = 0.0
    """dropout after the fast-weight output and in the feed-forward block"""
    fast_net_depth: int = 1
    """delta_mlp: layers of the fast network (the official default: 1)"""
    neg_eigval: bool = False
    """every delta-rule write's beta = 2 sigmoid(.) in (0, 2) instead of sigmoid(.) (Grazzi et al. 2025, arXiv
    2411.12537): the write's transition I - beta k k^T then has the eigenvalue 1 - beta |k|^2 along k, negative for
    beta |k|^2 > 1; with the paper's keys |k|^2 <= 1 (usually far below), so pair it with --qk_map l2"""
    qk_map: str = "paper"
    """keys and queries of every delta-rule write: paper (sumnorm(elu + 1), softmax where the paper has it) or l2
    (L2-normalised silu, |k| = 1; queries also times d_head^-1/2)"""
    post_ln: bool = False
    """blocks x = LN(x + FWP(x)), x = LN(x + FF(x)) (nn.TransformerEncoderLayer's form: the official algorithmic
    Transformer baseline's) instead of x + FWP(LN(x)), x + FF(LN(x)) (the official FWP layers')"""
    impl: str = "auto"
    """auto | loop | chunk | kernel (or its old name cuda). loop: every part steps through time in Python (the spec);
    chunk: the input-driven delta/sum-rule parts in the chunkwise form, the recurrent parts loop; kernel: every part
    as a fused kernel (cpu_kernels.cpp on the CPU, float32/64; cuda_kernels.cu on CUDA, d_head <= 128, not yet run on a
    GPU); auto: on the CPU kernel, elsewhere chunk (loop for single steps)"""
    chunk_size: int = 64
    """chunk length C of the chunkwise form"""
    # training
    batch_size: int = 32
    """sequences (or lm streams) per step: the global batch (under torchrun each of the N processes takes batch_size / N
    of it)"""
    steps: int = 4000
    """optimizer steps"""
    lr: float = 3e-3
    """peak learning rate (Adam)"""
    warmup: int = 100
    """linear warm-up steps"""
    cosine: bool = True
    """after warm-up, cosine decay to lr / 10 (false: constant, as in the paper)"""
    grad_clip: float = 1.0
    """gradient norm clip (0 disables; the paper does not clip)"""
    eval_every: int = 250
    """evaluate on valid, keep the best checkpoint, every this many steps"""
    log_every: int = 50
    """read the training loss from the device (one sync), log it and show it in the progress bar every this many steps
    and at every evaluation"""
    seed: int = 0
    """seed of python, numpy, torch and the task generators"""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"""
    out_dir: str = "out/rfwp"
    """metrics.jsonl, ckpt.pt (latest) and best.pt (best on valid) go here"""
    resume: bool = False
    """continue the run in out_dir from its ckpt.pt (the only way to add to a run there)"""
    overwrite: bool = False
    """start a new run in an out_dir that holds one: delete its ckpt.pt, best.pt and metrics.jsonl first (without
    this flag or --resume, such a run stops before writing anything)"""
    stop_at: int = 0
    """exit after this optimizer step, checkpoint saved (a time-boxed job); --resume continues. 0: run to the end"""
    bench: bool = False
    """measure training speed and memory of every model at one size, and exit"""
    bench_T: int = 256
    """--bench: sequence length (batch 32)"""


PRESETS = {
    "tiny": dict(d_model=32, n_layer=1, n_head=2, d_ff=64, code_length=4, depth=2, n_train=64, n_eval=16,
                 batch_size=8, steps=20, eval_every=10, seq_len=32, warmup=5, chunk_size=8),
    # the paper's algorithmic setting (Irie et al. 2021, appendix; official code): no positional encoding,
    # Adam (0.9, 0.995, eps 1e-9) at a constant 3e-4, no clipping, best validation checkpoint evaluated on test
    "paper": dict(code_length=100, n_train=10_000, d_model=256, n_layer=4, n_head=16, d_ff=1024, dropout=0.1, lr=3e-4,
                  batch_size=64, warmup=0, cosine=False, grad_clip=0.0, steps=31_250, eval_every=500, depth=10),
}


# the flags a --resume must share with its checkpoint: the model's shape and inputs
RESUME_FLAGS = ("task", "n_vars", "ops", "modulus", "n_perm", "tokenizer", "model", "d_model", "n_layer", "n_head",
                "d_ff", "fast_net_depth", "post_ln", "neg_eigval", "qk_map")


def check_args(args):
    if args.task == "rl":
        fail("--task rl: the RL experiment (an IMPALA agent with these cores) is rfwp_rl.py beside this file; run "
             "python rfwp_rl.py --help")
    for key, allowed in dict(task=("code", "listops", *STATE_TASKS, "lm"), tokenizer=("word", "char")).items():
        if getattr(args, key) not in allowed:
            fail(f"--{key} must be one of {', '.join(allowed)}, got {getattr(args, key)!r}")
    args.impl = "kernel" if args.impl == "cuda" else args.impl  # the old name of --impl kernel
    sizes = ("d_model", "n_head", "n_layer", "d_ff", "fast_net_depth", "chunk_size", "code_length", "depth", "n_train",
             "n_eval", "min_len", "max_len", "test_len", "modulus", "n_perm", "seq_len", "batch_size", "steps",
             "eval_every", "log_every", "bench_T")
    try:  # the modules' checks: the same messages
        check_config(model=args.model, impl=args.impl, dropout=args.dropout, neg_eigval=args.neg_eigval,
                     qk_map=args.qk_map, **{k: getattr(args, k) for k in sizes})
    except ValueError as e:
        fail(f"--{e}")
    if args.model in ("lstm", "transformer", "linear") and (args.neg_eigval or args.qk_map != "paper"):
        fail(f"--neg_eigval and --qk_map l2 change delta-rule writes; --model {args.model} has none (give delta, "
             "delta_mlp, delta_delta, delta_rnn, delta_lstm or rdn)")
    if args.depth >= LISTOPS_LEVELS:
        fail(f"--depth must be below {LISTOPS_LEVELS} (every node at level {LISTOPS_LEVELS} is a value), "
             f"got {args.depth}")
    if not args.min_len <= args.max_len <= args.test_len:
        fail(f"--min_len <= --max_len <= --test_len must hold (training lengths, then test lengths up to test_len), "
             f"got {args.min_len}, {args.max_len}, {args.test_len}")
    if args.modulus < 2 or not 2 <= args.n_perm <= 5:
        fail(f"--modulus must be at least 2 and --n_perm 2 to 5 (S_n has n! tokens), got {args.modulus}, {args.n_perm}")
    if args.n_vars not in (3, 5):
        fail(f"--n_vars must be 3 or 5 (the paper's settings), got {args.n_vars}")
    bad_ops = set(args.ops.split(",")) - set(LISTOPS)
    if bad_ops:
        fail(f"--ops: unknown operator(s) {', '.join(sorted(bad_ops))}; choose from {', '.join(LISTOPS)}")
    if args.lr <= 0 or min(args.warmup, args.grad_clip, args.stop_at, args.seed) < 0:
        fail("--lr must be positive; --warmup, --grad_clip, --stop_at and --seed non-negative.")
    if args.carry_state and args.model == "transformer":
        fail("--carry_state needs a fast-weight or recurrent model: the transformer's state (a KV cache) grows "
             "with the stream.")
    return args


# ----------------------------------------------------------------------------------------------
# The reference recurrences (the spec, --impl loop). Shapes: q, k (B, H, T, d_k); v (B, H, T, d_v); beta (B, H, T);
# W (B, H, d_v, d_k); the recurrent parts' inputs (B, H, T, d) and beta (B, H, T) come from the layer's input x;
# states are fp32 (fp64 for fp64 inputs).


def state_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def delta_step(W, k, v, beta):
    """One delta-rule write: W + beta (v - W k) k^T; k (B, H, d_k), v (B, H, d_v), beta (B, H)."""
    v_bar = (W @ k.unsqueeze(-1)).squeeze(-1)
    return W + (beta.unsqueeze(-1) * (v - v_bar)).unsqueeze(-1) * k.unsqueeze(-2)


def fast_weight_loop(q, k, v, beta, W=None):
    """The reference recurrence (the spec): y_t = W_t q_t after the write; beta None means the sum rule."""
    B, H, T, d_k = k.shape
    W = q.new_zeros(B, H, v.shape[-1], d_k, dtype=state_dtype(q)) if W is None else W
    ys = []
    for t in range(T):
        if beta is None:
            W = W + v[:, :, t].unsqueeze(-1) * k[:, :, t].unsqueeze(-2)
        else:
            W = delta_step(W, k[:, :, t], v[:, :, t], beta[:, :, t])
        ys.append((W @ q[:, :, t].unsqueeze(-1)).squeeze(-1))
    return torch.stack(ys, 2), W


def delta_rnn_loop(z, k, v, beta, R, y):
    """Delta RNN (eq. 19-20): for each t, R_t = R_{t-1} + beta_t (v_t - R_{t-1} k_t) k_t^T and
    y_t = z_t + R_t softmax(y_{t-1}). R (B, H, d, d), y (B, H, d) -> ys (B, H, T, d), R_T, y_T."""
    ys = []
    for t in range(z.shape[2]):
        R = delta_step(R, k[:, :, t], v[:, :, t], beta[:, :, t])
        y = z[:, :, t] + (R @ F.softmax(y, -1).unsqueeze(-1)).squeeze(-1)
        ys.append(y)
    return torch.stack(ys, 2), R, y


def delta_lstm_loop(z, k, v, beta, R, c, h):
    """Delta LSTM (eq. 21-27): the gates i, u, o are heads [0, H), [H, 2H), [2H, 3H) of z, k, v (B, 3H, T, d), beta
    (B, 3H, T) and R (B, 3H, d, d). For each t, with s = softmax(h_{t-1}): R^g by the delta rule, a^g = z^g_t + R^g_t s;
    c_t = sigmoid(a^i) a^u + (1 - sigmoid(a^i)) c_{t-1}, h_t = sigmoid(a^o) c_t. c, h (B, H, d) -> hs (B, H, T, d),
    R_T, c_T, h_T."""
    hs = []
    for t in range(z.shape[2]):
        s = F.softmax(h, -1).repeat(1, 3, 1).unsqueeze(-1)  # (B, 3H, d, 1)
        R = delta_step(R, k[:, :, t], v[:, :, t], beta[:, :, t])
        a_i, a_u, a_o = (z[:, :, t] + (R @ s).squeeze(-1)).chunk(3, 1)
        i = torch.sigmoid(a_i)
        c = i * a_u + (1 - i) * c
        h = torch.sigmoid(a_o) * c
        hs.append(h)
    return torch.stack(hs, 2), R, c, h


def rdn_loop(q, k, v, b, R, r_b, W, y, beta_scale=1.0, qk_map="paper"):
    """Recurrent Delta Net (eq. 28-32): for each t, with s = tanh(y_{t-1}): q' = softmax(q_t + R_q s), k' = softmax(k_t
    + R_k s), v' = v_t + R_v s, beta = sigmoid(b_t + r_b . s); W_t by the delta rule from k', v', beta; y_t = W_t q'. b
    (B, H, T); R (3, H, d, d) = R_q, R_k, R_v; r_b (H, d); W (B, H, d, d), y (B, H, d) -> ys (B, H, T, d), W_T, y_T.
    beta_scale 2: beta = 2 sigmoid(.) (neg_eigval); qk_map l2: q', k' = l2_feature(.) (q' also times d^-1/2)."""
    key = (lambda u: F.softmax(u, -1)) if qk_map == "paper" else l2_feature
    query = (lambda u: F.softmax(u, -1)) if qk_map == "paper" else (lambda u: l2_feature(u, query=True))
    ys = []
    for t in range(q.shape[2]):
        s = torch.tanh(y)  # (B, H, d)
        rq, rk, rv = torch.einsum("rhij,bhj->rbhi", R, s)
        beta = torch.sigmoid(b[:, :, t] + (r_b * s).sum(-1))
        beta = beta if beta_scale == 1 else beta_scale * beta
        W = delta_step(W, key(k[:, :, t] + rk), v[:, :, t] + rv, beta)
        y = (W @ query(q[:, :, t] + rq).unsqueeze(-1)).squeeze(-1)
        ys.append(y)
    return torch.stack(ys, 2), W, y


# ----------------------------------------------------------------------------------------------
# Layers: (B, T, d_model) and a state (a tuple of tensors, batch first; None = all zeros) -> output, new state. Each
# is built from keywords that name what it reads and checks them (check_config); fast_weight, delta_rnn, delta_lstm
# and rdn (below, with the fast forms) pick the form of each part by impl.


def check_config(**config):
    """The modules' checks, which the command line reuses (check_args): a ValueError naming the argument and the fix.
    model, impl, qk_map: one of MODELS, IMPLS, QK_MAPS; dropout in [0, 1); post_ln, official_rl_core, neg_eigval: True
    or False; every other value a positive integer; n_head divides d_model."""
    for name, value in config.items():
        if name in ("model", "impl", "qk_map"):
            choices = dict(model=MODELS, impl=IMPLS, qk_map=QK_MAPS)[name]
            ok, must = value in choices, f"one of {', '.join(choices)}"
        elif name == "dropout":
            ok, must = 0 <= value < 1, "in [0, 1)"
        elif name in ("post_ln", "official_rl_core", "neg_eigval"):
            ok, must = isinstance(value, bool), "True or False"
        else:
            ok, must = isinstance(value, int) and not isinstance(value, bool) and value > 0, "a positive integer"
        if not ok:
            raise ValueError(f"{name} must be {must}, got {value!r}")
    if "n_head" in config and config["d_model"] % config["n_head"]:
        raise ValueError(f"d_model {config['d_model']} is not divisible by n_head {config['n_head']}; pick an n_head "
                         "that divides d_model (d_head = d_model / n_head)")


def elu1_sumnorm(x, eps=0.0):
    x = F.elu(x) + 1
    return x / (x.sum(-1, keepdim=True) + eps)


def l2_feature(x, query=False):
    """qk_map l2: silu(x) / |silu(x)| over the last dim (Gated DeltaNet's keys and queries, Yang et al. 2024, arXiv
    2412.06464), a query also times d^-1/2 (as fla's layers)."""
    x = F.normalize(F.silu(x), dim=-1)
    return x * x.shape[-1] ** -0.5 if query else x


def heads(x, H):
    """(B, T, H * D) -> (B, H, T, D)"""
    B, T, _ = x.shape
    return x.view(B, T, H, -1).transpose(1, 2)


def merge(y):
    """(B, H, T, D) -> (B, T, H * D)"""
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


def d_head(d_model, n_head):
    check_config(d_model=d_model, n_head=n_head)
    return d_model // n_head


class SlowNet(nn.Module):
    """Common parts: the slow projection to `sizes` per head (no bias), the output projection, and what the layer reads
    among impl, chunk_size, fast_net_depth, official_rl_core, neg_eigval and qk_map (checked, kept as attributes).
    The layers with delta-rule writes take every write's beta from beta() and its keys and queries from key() and
    query(): neg_eigval False and qk_map "paper" are the paper's maps, unchanged."""

    def __init__(self, d_model, n_head, sizes, **config):
        super().__init__()
        check_config(d_model=d_model, n_head=n_head, **config)
        self.d_model, self.n_head, self.H, self.d, self.sizes = d_model, n_head, n_head, d_model // n_head, sizes
        for name, value in config.items():
            setattr(self, name, value)
        self.slow = nn.Linear(d_model, n_head * sum(sizes), bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def extra_repr(self):
        names = ("d_model", "n_head", "impl", "chunk_size", "fast_net_depth", "official_rl_core", "neg_eigval",
                 "qk_map")
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in names if hasattr(self, n))

    def project(self, x):
        """x (B, T, d_model) -> one (B, H, T, size) tensor per entry of sizes; size-1 entries squeezed to (B, H, T)"""
        parts = heads(self.slow(x), self.H).split(self.sizes, -1)
        return [p.squeeze(-1) if s == 1 else p for p, s in zip(parts, self.sizes)]

    def beta(self, b):
        """A delta-rule write's strength: sigmoid(b) in (0, 1), with neg_eigval 2 sigmoid(b) in (0, 2)."""
        return 2 * torch.sigmoid(b) if self.neg_eigval else torch.sigmoid(b)

    def key(self, x, paper=elu1_sumnorm):
        """A delta-rule write's key: the paper's map of it, with qk_map l2 l2_feature (|k| = 1)."""
        return l2_feature(x) if self.qk_map == "l2" else paper(x)

    def query(self, x, paper=elu1_sumnorm):
        """A query of a fast weight written by the delta rule: the paper's map, with qk_map l2 l2_feature / sqrt(d)."""
        return l2_feature(x, query=True) if self.qk_map == "l2" else paper(x)

    def zeros(self, x, *shape, heads=None):
        return x.new_zeros(x.shape[0], heads or self.H, *shape, dtype=state_dtype(x))


class LinearLayer(SlowNet):
    """The linear Transformer of the paper's algorithmic tasks: elu + 1, no normalisation, the sum rule
    (official_rl_core: the official RL layer's (elu + 1) / (sum + 1e-5)). State (W,), W (B, H, d, d)."""

    def __init__(self, d_model=64, n_head=4, impl="auto", chunk_size=64, official_rl_core=False):
        d = d_head(d_model, n_head)
        super().__init__(d_model, n_head, [d] * 3, impl=impl, chunk_size=chunk_size, official_rl_core=official_rl_core)

    def forward(self, x, state=None):
        q, k, v = self.project(x)
        if self.official_rl_core:
            q, k = elu1_sumnorm(q, 1e-5), elu1_sumnorm(k, 1e-5)
        else:
            q, k = F.elu(q) + 1, F.elu(k) + 1
        y, W = fast_weight(q, k, v, None, None if state is None else state[0], self.impl, self.chunk_size)
        return self.out(merge(y)), (W,)


class DeltaLayer(SlowNet):
    """DeltaNet (eq. 4-7): q, k = sumnorm(elu + 1), beta = sigmoid, the delta rule (official_rl_core: the sum
    plus 1e-5 in the normalisation, as the official RL layer; neg_eigval, qk_map: SlowNet's beta, key, query). State
    (W,), W (B, H, d, d)."""

    def __init__(self, d_model=64, n_head=4, impl="auto", chunk_size=64, official_rl_core=False, neg_eigval=False,
                 qk_map="paper"):
        d = d_head(d_model, n_head)
        super().__init__(d_model, n_head, [d, d, d, 1], impl=impl, chunk_size=chunk_size,
                         official_rl_core=official_rl_core, neg_eigval=neg_eigval, qk_map=qk_map)

    def forward(self, x, state=None):
        q, k, v, b = self.project(x)
        eps = 1e-5 if self.official_rl_core else 0.0
        fmap = lambda u: elu1_sumnorm(u, eps)  # noqa: E731
        y, W = fast_weight(self.query(q, fmap), self.key(k, fmap), v, self.beta(b), None if state is None else state[0],
                           self.impl, self.chunk_size)
        return self.out(merge(y)), (W,)


class DeltaMLPLayer(SlowNet):
    """Delta MLP (eq. 8-11): the slow net emits a query and, for each of L = fast_net_depth fast layers, a key, a value
    and beta; h_0 = q, h_l = h_{l-1} + W^l sumnorm(elu(LN_l(h_{l-1})) + 1). Every fast layer is d x d here; the official
    LM code uses pairs of layers with a 4d hidden width. State (W^1, ..., W^L), each (B, H, d, d)."""

    def __init__(self, d_model=64, n_head=4, impl="auto", chunk_size=64, fast_net_depth=1, neg_eigval=False,
                 qk_map="paper"):
        d = d_head(d_model, n_head)
        check_config(fast_net_depth=fast_net_depth)
        super().__init__(d_model, n_head, [d] + [d, d, 1] * fast_net_depth, impl=impl, chunk_size=chunk_size,
                         fast_net_depth=fast_net_depth, neg_eigval=neg_eigval, qk_map=qk_map)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(fast_net_depth))

    def forward(self, x, state=None):
        h, *kvb = self.project(x)
        state = state or (None,) * len(self.norms)
        new_state = []
        for l, (norm, W) in enumerate(zip(self.norms, state)):
            k, v, b = kvb[3 * l : 3 * l + 3]
            y, W = fast_weight(self.query(norm(h)), self.key(k), v, self.beta(b), W, self.impl, self.chunk_size)
            h = h + y
            new_state.append(W)
        return self.out(merge(h)), tuple(new_state)


class DeltaDeltaLayer(SlowNet):
    """Delta Delta Net (eq. 12-16): the slow net programs fast net 1 (d x (3d + 1)) with the delta rule; its output
    q', k', v', beta' programs fast net 2 (d x d) with the delta rule; y = W2 q'. State (W1, W2), W1 (B, H, 3d + 1, d),
    W2 (B, H, d, d)."""

    def __init__(self, d_model=64, n_head=4, impl="auto", chunk_size=64, neg_eigval=False, qk_map="paper"):
        d = d_head(d_model, n_head)
        super().__init__(d_model, n_head, [d, d, 3 * d + 1, 1], impl=impl, chunk_size=chunk_size, neg_eigval=neg_eigval,
                         qk_map=qk_map)

    def forward(self, x, state=None):
        q, k, v, b = self.project(x)
        W1, W2 = state or (None, None)
        o, W1 = fast_weight(self.query(q), self.key(k), v, self.beta(b), W1, self.impl, self.chunk_size)
        q2, k2, v2, b2 = o.split([self.d, self.d, self.d, 1], -1)
        y, W2 = fast_weight(self.query(q2), self.key(k2), v2, self.beta(b2.squeeze(-1)), W2, self.impl,
                            self.chunk_size)
        return self.out(merge(y)), (W1, W2)


class DeltaRNNLayer(SlowNet):
    """Delta RNN (eq. 17-20): z_t = W_t q_t (DeltaNet); R_t by the delta rule from softmax keys, values and beta
    of x; y_t = z_t + R_t softmax(y_{t-1}). State (W, R, y_prev): W, R (B, H, d, d), y_prev (B, H, d).
    official_rl_core: q and k of the DeltaNet part through a softmax instead (the official RL layer). neg_eigval and
    qk_map: both writes' beta and keys, and W's queries; R's read softmax(y_{t-1}) stays (an input of the recurrence,
    computed inside its kernels)."""

    def __init__(self, d_model=64, n_head=4, impl="auto", chunk_size=64, official_rl_core=False, neg_eigval=False,
                 qk_map="paper"):
        d = d_head(d_model, n_head)
        super().__init__(d_model, n_head, [d, d, d, 1, d, d, 1], impl=impl, chunk_size=chunk_size,
                         official_rl_core=official_rl_core, neg_eigval=neg_eigval, qk_map=qk_map)

    def forward(self, x, state=None):
        q, k, v, b, k_r, v_r, b_r = self.project(x)
        W, R, y = state or (None, self.zeros(x, self.d, self.d), self.zeros(x, self.d))
        fmap = (lambda u: F.softmax(u, -1)) if self.official_rl_core else elu1_sumnorm
        z, W = fast_weight(self.query(q, fmap), self.key(k, fmap), v, self.beta(b), W, self.impl, self.chunk_size)
        ys, R, y = delta_rnn(z, self.key(k_r, lambda u: F.softmax(u, -1)), v_r, self.beta(b_r), R, y, self.impl)
        return self.out(merge(ys)), (W, R, y)


class DeltaLSTMLayer(SlowNet):
    """Delta LSTM (eq. 21-27, the official "v4"): per gate g in (i, u, o) a DeltaNet part z^g = W^g q^g and a recurrent
    fast weight R^g (delta rule, softmax keys from x) read with s = softmax(h_{t-1}); i, o = sigmoid(z + R s), u = z^u +
    R^u s (no squashing); c_t = i u + (1 - i) c_{t-1}; h_t = o c_t. The three gates run as 3H heads side by side. State
    (W, R, c, h): W, R (B, 3H, d, d) in gate order i, u, o; c, h (B, H, d). neg_eigval and qk_map: every write's
    beta and keys, and W's queries; R's read softmax(h_{t-1}) stays (an input of the recurrence)."""

    def __init__(self, d_model=64, n_head=4, impl="auto", chunk_size=64, neg_eigval=False, qk_map="paper"):
        d = d_head(d_model, n_head)
        super().__init__(d_model, n_head, [d, d, d, 1, d, d, 1] * 3, impl=impl, chunk_size=chunk_size,
                         neg_eigval=neg_eigval, qk_map=qk_map)

    def forward(self, x, state=None):
        p = self.project(x)
        q, k, v, b, k_r, v_r, b_r = (torch.cat(p[j::7], 1) for j in range(7))  # (B, 3H, T, .): gates as heads
        W, R, c, h = state or (None, self.zeros(x, self.d, self.d, heads=3 * self.H), self.zeros(x, self.d),
                               self.zeros(x, self.d))
        z, W = fast_weight(self.query(q), self.key(k), v, self.beta(b), W, self.impl, self.chunk_size)
        hs, R, c, h = delta_lstm(z, self.key(k_r, lambda u: F.softmax(u, -1)), v_r, self.beta(b_r), R, c, h, self.impl)
        return self.out(merge(hs)), (W, R, c, h)


class RDNLayer(SlowNet):
    """Recurrent Delta Net (eq. 28-32): keys, queries, values and beta also see s = tanh(y_{t-1}) through slow
    recurrent weights R_q, R_k, R_v (d x d per head) and r_b; y_t = W_t q_t (un-squashed). State (W, y_prev):
    W (B, H, d, d), y_prev (B, H, d). Every step depends on the last, so there is no chunkwise form. neg_eigval: beta =
    2 sigmoid(.); qk_map l2: q', k' = l2_feature(.) instead of softmax (rdn_loop; its kernels take both options)."""

    def __init__(self, d_model=64, n_head=4, impl="auto", neg_eigval=False, qk_map="paper"):
        d = d_head(d_model, n_head)
        super().__init__(d_model, n_head, [d, d, d, 1], impl=impl, neg_eigval=neg_eigval, qk_map=qk_map)
        self.R = nn.Parameter(torch.randn(3, n_head, d, d) / math.sqrt(d))  # R_q, R_k, R_v: entries of std 1/sqrt(d)
        self.r_b = nn.Parameter(torch.randn(n_head, d) / math.sqrt(d))

    def forward(self, x, state=None):
        q, k, v, b = self.project(x)
        W, y = state or (self.zeros(x, self.d, self.d), self.zeros(x, self.d))
        ys, W, y = rdn(q, k, v, b, self.R.to(y.dtype), self.r_b.to(y.dtype), W, y, self.impl,
                       2.0 if self.neg_eigval else 1.0, self.qk_map)
        return self.out(merge(ys)), (W, y)


class SoftmaxLayer(SlowNet):
    """Causal softmax attention (the Transformer baseline). Its state is every past key and value, with a 0/1 flag
    per position that a reset sets to 0 (those positions are then masked out): (k, v, seen), k and v (B, H, P, d),
    seen (B, P) for the P positions seen so far."""

    def __init__(self, d_model=64, n_head=4):
        super().__init__(d_model, n_head, [d_head(d_model, n_head)] * 3)

    def forward(self, x, state=None):
        q, k, v = self.project(x)
        seen = x.new_ones(x.shape[0], x.shape[1])  # (B, T)
        if state is not None:
            k, v, seen = torch.cat([state[0], k], 2), torch.cat([state[1], v], 2), torch.cat([state[2], seen], 1)
        T, P = q.shape[2], k.shape[2] - q.shape[2]  # P cached positions
        mask = None
        if P:
            mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P) & (seen > 0)[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=P == 0)
        return self.out(merge(y)), (k, v, seen)


LAYERS = dict(transformer=SoftmaxLayer, linear=LinearLayer, delta=DeltaLayer, delta_mlp=DeltaMLPLayer,
              delta_delta=DeltaDeltaLayer, delta_rnn=DeltaRNNLayer, delta_lstm=DeltaLSTMLayer, rdn=RDNLayer)


def make_layer(model, **config):
    """The layer of a model name, given those keywords of config that its class reads (rdn: no chunk_size, ...)."""
    if model not in LAYERS:
        raise ValueError(f"model must be one of {', '.join(LAYERS)} (the lstm is LSTMModel), got {model!r}")
    params = inspect.signature(LAYERS[model]).parameters
    return LAYERS[model](**{k: v for k, v in config.items() if k in params})


# ----------------------------------------------------------------------------------------------
# The models: blocks of a layer and a feed-forward net; the LSTM baseline; build_model maps the flags to them.


class Block(nn.Module):
    """x + Out(FWP(LN(x))), then x + FF(LN(x)) (post_ln: LN(x + Out(FWP(x))), then LN(x + FF(x))); FWP the layer of
    `model` built with the keywords it reads. (B, T, d_model), the layer's state -> (B, T, d_model), its new state."""

    def __init__(self, model="delta", d_model=64, n_head=4, d_ff=256, dropout=0.0, post_ln=False, impl="auto",
                 chunk_size=64, fast_net_depth=1, official_rl_core=False, neg_eigval=False, qk_map="paper"):
        super().__init__()
        check_config(d_model=d_model, n_head=n_head, d_ff=d_ff, dropout=dropout, post_ln=post_ln, neg_eigval=neg_eigval,
                     qk_map=qk_map)
        if model in ("linear", "transformer") and (neg_eigval or qk_map != "paper"):
            raise ValueError(f"neg_eigval and qk_map 'l2' change delta-rule writes; model {model!r} has none")
        self.post_ln = post_ln
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.fwp = make_layer(model, d_model=d_model, n_head=n_head, impl=impl, chunk_size=chunk_size,
                              fast_net_depth=fast_net_depth, official_rl_core=official_rl_core, neg_eigval=neg_eigval,
                              qk_map=qk_map)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model),
                                nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, state=None):
        if self.post_ln:
            y, state = self.fwp(x, state)
            x = self.ln1(x + self.drop(y))
            return self.ln2(x + self.ff(x)), state
        y, state = self.fwp(self.ln1(x), state)
        x = x + self.drop(y)
        return x + self.ff(self.ln2(x)), state


def reset_state(state, reset):
    """Zero the state of the sequences where reset (B,) is True (their episode or document ended)."""
    if state is None or reset is None:
        return state
    def mask(s):
        return s * (~reset).to(s.dtype).view(-1, *[1] * (s.dim() - 1))

    return [None if layer is None else tuple(None if s is None else mask(s) for s in layer) for layer in state]


class FWPModel(nn.Module):
    """Token ids (B, T) (or, with an embed module, what it maps to (B, T, n_in = d_model)), a state (one tuple per
    block, its layer's state, or None) and an optional reset mask (B,) applied before the first step -> logits
    (B, T, n_out), new state. n_layer Blocks of `model`; no positional encoding (as in the paper's algorithmic tasks); a
    final LN before the head (official_rl_core: none, as the official algorithmic and RL code)."""

    def __init__(self, n_in, n_out, model="delta", d_model=64, n_head=4, n_layer=2, d_ff=256, dropout=0.0,
                 post_ln=False, impl="auto", chunk_size=64, fast_net_depth=1, official_rl_core=False, neg_eigval=False,
                 qk_map="paper", embed=None):
        super().__init__()
        check_config(n_in=n_in, n_out=n_out, d_model=d_model, n_layer=n_layer, official_rl_core=official_rl_core)
        if embed is not None and n_in != d_model:
            raise ValueError(f"n_in {n_in} must equal d_model {d_model} when an embed module is given (n_in is the "
                             "width of its output, which the blocks read)")
        self.embed = nn.Embedding(n_in, d_model) if embed is None else embed
        block = dict(model=model, d_model=d_model, n_head=n_head, d_ff=d_ff, dropout=dropout, post_ln=post_ln,
                     impl=impl, chunk_size=chunk_size, fast_net_depth=fast_net_depth, official_rl_core=official_rl_core,
                     neg_eigval=neg_eigval, qk_map=qk_map)
        self.blocks = nn.ModuleList(Block(**block) for _ in range(n_layer))
        self.ln_f = nn.Identity() if official_rl_core else nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_out)

    def forward(self, idx, state=None, reset=None):
        state = reset_state(state, reset) or [None] * len(self.blocks)
        x, new_state = self.embed(idx), []
        for block, s in zip(self.blocks, state):
            x, s = block(x, s)
            new_state.append(s)
        return self.head(self.ln_f(x)), new_state


class LSTMModel(nn.Module):
    """The LSTM baseline: embedding -> nn.LSTM (n_layer layers of d_model) -> linear; with an embed module given, n_in
    is the width of its output. State [(h, c)], each (B, n_layer, d_model)."""

    def __init__(self, n_in, n_out, d_model=64, n_layer=2, dropout=0.0, embed=None):
        super().__init__()
        check_config(n_in=n_in, n_out=n_out, d_model=d_model, n_layer=n_layer, dropout=dropout)
        self.embed = nn.Embedding(n_in, d_model) if embed is None else embed
        self.lstm = nn.LSTM(d_model if embed is None else n_in, d_model, n_layer, batch_first=True, dropout=dropout)
        self.head = nn.Linear(d_model, n_out)

    def forward(self, idx, state=None, reset=None):
        state = reset_state(state, reset)
        hc = None if state is None else tuple(s.transpose(0, 1).contiguous() for s in state[0])
        y, (h, c) = self.lstm(self.embed(idx), hc)
        return self.head(y), [(h.transpose(0, 1), c.transpose(0, 1))]


def build_model(args, n_in, n_out, embed=None):
    """The command line's model: the flags mapped to the constructors (the only place that reads Args for a module)."""
    if args.model == "lstm":
        return LSTMModel(n_in, n_out, d_model=args.d_model, n_layer=args.n_layer, dropout=args.dropout, embed=embed)
    return FWPModel(n_in, n_out, model=args.model, d_model=args.d_model, n_head=args.n_head, n_layer=args.n_layer,
                    d_ff=args.d_ff, dropout=args.dropout, post_ln=args.post_ln, impl=args.impl,
                    chunk_size=args.chunk_size, fast_net_depth=args.fast_net_depth, neg_eigval=args.neg_eigval,
                    qk_map=args.qk_map, embed=embed)


# ----------------------------------------------------------------------------------------------
# The fast forms: the chunkwise delta and sum rules; the fused kernels (cpu_kernels.cpp and cuda_kernels.cu, the
# same functions) as autograd Functions; fast_weight, delta_rnn, delta_lstm and rdn pick a form by impl.


def fast_weight_chunk(q, k, v, beta, W=None, chunk_size=64):
    """Chunkwise-parallel form of fast_weight_loop (same results, any T; autograd does the backward).
    Per chunk of C steps with S = W^T: the C delta-rule writes equal one write S <- S + K^T U' with pseudo-values
    U' = T (diag(beta) V - diag(beta) K S), T = (I + strict_lower(diag(beta) K K^T))^-1 (Yang et al. 2024,
    arXiv 2406.06484, eq. 8-11; for the sum rule U' = V). Outputs: O = Q S + tril(Q K^T) U'."""
    B, H, T, d_k = k.shape
    d_v, dt = v.shape[-1], state_dtype(q)
    C = min(chunk_size, T)
    N = -(-T // C)

    def chunks(x):  # (B, H, T, ...) -> (B, H, N, C, ...), zero-padded; zero keys write nothing
        x = F.pad(x, (0, 0, 0, N * C - T) if x.dim() == 4 else (0, N * C - T))
        return x.reshape(B, H, N, C, *x.shape[3:])

    q, k, v = chunks(q), chunks(k), chunks(v)
    S = q.new_zeros(B, H, d_k, d_v, dtype=dt) if W is None else W.transpose(-1, -2)
    if beta is not None:
        beta = chunks(beta)[..., None]
        eye = torch.eye(C, dtype=k.dtype, device=k.device)
        A = ((k * beta) @ k.transpose(-1, -2)).tril(-1)
        T_inv = torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)
        w, u = T_inv @ (k * beta), T_inv @ (v * beta)  # (B, H, N, C, d_k), (B, H, N, C, d_v)
    P = (q @ k.transpose(-1, -2)).tril()  # causal intra-chunk scores, diagonal included
    ys = []
    for n in range(N):  # the only sequential part: two small matmuls per chunk
        up = v[:, :, n] if beta is None else u[:, :, n] - w[:, :, n] @ S
        ys.append(q[:, :, n] @ S + P[:, :, n] @ up)
        S = S + k[:, :, n].transpose(-1, -2) @ up
    return torch.stack(ys, 2).reshape(B, H, N * C, d_v)[:, :, :T], S.transpose(-1, -2)


# --impl auto on the CPU is --impl kernel: every kernel of cpu_kernels.cpp measured faster than its PyTorch form on 2
# CPU cores, at the default size (`python rfwp.py --bench`: the rows kernel against chunk), at one step per call
# (`python rfwp_rl.py --bench`) and, for the delta rule, at d_head 16 to 128 and T 256 to 1024 against the chunk form.


def use_kernel(impl, x, part):
    """Whether the part (fast_weight or a recurrent model) with inputs x (B, H, T, d) runs as a fused kernel: --impl
    kernel (and auto) on the CPU, float32 or float64; --impl kernel on a CUDA device, d <= 128 and, for a recurrent
    model, where its backward's shared memory fits the GPU. T >= 1."""
    if x.device.type == "cpu":
        wanted = impl in ("kernel", "auto") and x.dtype in (torch.float32, torch.float64)
    else:
        wanted = impl == "kernel" and x.is_cuda and x.shape[3] <= 128
    if not (wanted and x.shape[2] > 0 and kernels(x.device.type)):
        return False
    if x.is_cuda and part != "fast_weight":
        nbytes = kernels("cuda").recurrent_backward_smem(part, x.shape[3], 8 if x.dtype == torch.float64 else 4)
        return nbytes <= getattr(torch.cuda.get_device_properties(x.device), "shared_memory_per_block_optin",
                                 48 * 1024)
    return True


class FastWeightKernel(torch.autograd.Function):
    """fast_weight_loop as one fused kernel per pass (beta None: the sum rule); the backward undoes each write."""

    @staticmethod
    def forward(ctx, q, k, v, beta, W0):
        ctx.delta, ctx.has_W0 = beta is not None, W0 is not None
        beta = q.new_empty(0) if beta is None else beta
        y, W, v_bar = kernels(q.device.type).forward(q, k, v, beta, q.new_empty(0) if W0 is None else W0, ctx.delta)
        ctx.save_for_backward(q, k, v, beta, v_bar, W)
        return y, W

    @staticmethod
    def backward(ctx, dy, dW):
        q, k, v, beta, v_bar, W = ctx.saved_tensors
        dy = torch.zeros_like(v) if dy is None else dy
        dq, dk, dv, dbeta, dW0 = kernels(q.device.type).backward(q, k, v, beta, v_bar, W, dy, W.new_empty(0) if dW is
                                                                 None else dW, ctx.delta)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype) if ctx.delta else None,
                dW0 if ctx.has_W0 else None)


def fast_weight(q, k, v, beta, W, impl, chunk_size):
    """The input-driven delta rule (beta None: sum rule) by impl; see Args.impl."""
    if use_kernel(impl, q, "fast_weight"):
        q, k, v = (x.contiguous() for x in (q, k, v))
        return FastWeightKernel.apply(q, k, v, None if beta is None else beta.contiguous(), W)
    if impl == "loop" or (impl == "auto" and q.shape[2] == 1):
        return fast_weight_loop(q, k, v, beta, W)
    return fast_weight_chunk(q, k, v, beta, W, chunk_size)


def grad_of_last(dys, dy_T, ys):
    """The gradient of every output ys with the final state's (the last output) added at the last step."""
    dys = torch.zeros_like(ys) if dys is None else dys.clone()
    if dy_T is not None:
        dys[:, :, -1] += dy_T
    return dys


class DeltaRNNKernel(torch.autograd.Function):
    """delta_rnn_loop as one kernel per pass; the backward undoes the writes of R instead of storing R_t."""

    @staticmethod
    def forward(ctx, z, k, v, beta, R0, y0):
        ys, R, v_bar = kernels(z.device.type).delta_rnn_forward(z, k, v, beta, R0, y0, any(ctx.needs_input_grad))
        ctx.save_for_backward(k, v, beta, v_bar, ys, y0, R)
        return ys, R, ys[:, :, -1].clone()

    @staticmethod
    def backward(ctx, dys, dR, dy_T):
        k, v, beta, v_bar, ys, y0, R = ctx.saved_tensors
        dz, dk, dv, dbeta, dR0, dy0 = kernels(k.device.type).delta_rnn_backward(
            k, v, beta, v_bar, ys, y0, R, grad_of_last(dys, dy_T, ys), R.new_empty(0) if dR is None else dR)
        return dz.to(k.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), dR0, dy0


class DeltaLSTMKernel(torch.autograd.Function):
    """delta_lstm_loop as one kernel per pass; the backward undoes the writes of R^g instead of storing them."""

    @staticmethod
    def forward(ctx, z, k, v, beta, R0, c0, h0):
        save = any(ctx.needs_input_grad)
        hs, cs, R, v_bar = kernels(z.device.type).delta_lstm_forward(z, k, v, beta, R0, c0, h0, save)
        ctx.save_for_backward(z, k, v, beta, v_bar, hs, cs, h0, c0, R)
        return hs, R, cs[:, :, -1].clone(), hs[:, :, -1].clone()

    @staticmethod
    def backward(ctx, dhs, dR, dc_T, dh_T):
        z, k, v, beta, v_bar, hs, cs, h0, c0, R = ctx.saved_tensors
        dz, dk, dv, dbeta, dR0, dc0, dh0 = kernels(z.device.type).delta_lstm_backward(
            z, k, v, beta, v_bar, hs, cs, h0, c0, R, grad_of_last(dhs, dh_T, hs), c0.new_empty(0) if dc_T is None
            else dc_T, R.new_empty(0) if dR is None else dR)
        return dz.to(z.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), dR0, dc0, dh0


class RDNKernel(torch.autograd.Function):
    """rdn_loop as one kernel per pass. The forward keeps q', k', v', beta and v̄ of every step (vectors, no
    matrices; with qk_map l2, q and k before the map, which the backward recomputes); the slow weights' gradients are
    sums over b and t of outer products with s_t = tanh(y_{t-1})."""

    @staticmethod
    def forward(ctx, q, k, v, b, R, r_b, W0, y0, beta_scale=1.0, qk_map="paper"):
        ctx.options = (float(beta_scale), qk_map == "l2")
        ys, W, *saved = kernels(q.device.type).rdn_forward(q, k, v, b, R, r_b, W0, y0, any(ctx.needs_input_grad),
                                                           *ctx.options)
        ctx.save_for_backward(R, r_b, *saved, ys, y0, W)
        ctx.q_dtype = q.dtype
        return ys, W, ys[:, :, -1].clone()

    @staticmethod
    def backward(ctx, dys, dW, dy_T):
        R, r_b, q_sv, k_sv, v_sv, beta, v_bar, ys, y0, W = ctx.saved_tensors
        dq, dk, dv, db, dW0, dy0 = kernels(R.device.type).rdn_backward(
            R, r_b, q_sv, k_sv, v_sv, beta, v_bar, ys, y0, W, grad_of_last(dys, dy_T, ys), W.new_empty(0) if dW is None
            else dW, *ctx.options)
        s = torch.tanh(torch.cat([y0.unsqueeze(2), ys[:, :, :-1]], 2))  # s_t = tanh(y_{t-1}), (B, H, T, d)
        H, d = s.shape[1], s.shape[3]
        g = torch.einsum("bhti,bhtj->hij", torch.cat([dq, dk, dv, db.unsqueeze(-1)], -1), s)  # (H, 3 d + 1, d)
        dR, dr_b = g[:, : 3 * d].reshape(H, 3, d, d).transpose(0, 1), g[:, 3 * d]
        dt = ctx.q_dtype
        return dq.to(dt), dk.to(dt), dv.to(dt), db.to(dt), dR.to(R.dtype), dr_b.to(r_b.dtype), dW0, dy0, None, None


def contiguous(*xs):
    return [x.contiguous() for x in xs]


def states(x, *xs):
    """the states (and slow weights) as the kernels hold them: fp32 (fp64 for fp64 x), contiguous"""
    return [s.to(state_dtype(x)).contiguous() for s in xs]


def delta_rnn(z, k, v, beta, R, y, impl):
    if use_kernel(impl, z, "delta_rnn"):
        return DeltaRNNKernel.apply(*contiguous(z, k, v, beta), *states(z, R, y))
    return delta_rnn_loop(z, k, v, beta, R, y)


def delta_lstm(z, k, v, beta, R, c, h, impl):
    if use_kernel(impl, z, "delta_lstm"):
        return DeltaLSTMKernel.apply(*contiguous(z, k, v, beta), *states(z, R, c, h))
    return delta_lstm_loop(z, k, v, beta, R, c, h)


def rdn(q, k, v, b, R, r_b, W, y, impl, beta_scale=1.0, qk_map="paper"):
    if use_kernel(impl, q, "rdn"):
        return RDNKernel.apply(*contiguous(q, k, v, b), *states(q, R, r_b, W, y), beta_scale, qk_map)
    return rdn_loop(q, k, v, b, R, r_b, W, y, beta_scale, qk_map)


# ----------------------------------------------------------------------------------------------
# Tasks: code execution, sequential ListOps and state tracking (synthetic, generated in memory with fixed seeds)

CODE_VARS = "abcde"
CODE_MIN, CODE_MAX = -8, 16  # values stay in this range: ++ at the top becomes --, -- at the bottom becomes ++
CODE_WORDS = ["=", "++", "--", "print", "if", "<", ">", ":", ";"] + [str(n) for n in range(10)]
# as the official generator: assign, ++/-- (a coin picks which), print and if uniformly; inside an if, one of the
# first three uniformly
CODE_KINDS, CODE_WEIGHTS = ["assign", "inc", "dec", "print", "if"], [2, 1, 1, 2, 2]


def code_program(rng, n_statements, n_vars, official_if=False):
    """One program of code execution (Fan et al. 2020, as in Irie et al. 2021 section 4.1) and its targets.
    Statements: `v = n ;`, `v ++ ;`, `v -- ;`, `print v ;`, or `if v < c :` / `if v > c :` followed by one of
    those, which runs only if the condition holds (official_if: as the official generator, a conditional `v = n`
    runs only while v is still unassigned). Statement kinds are drawn as CODE_WEIGHTS says, the official generator's
    frequencies: assign, ++/--, print and if 1/4 each; inside an if, one of the first three, 1/3 each. Values stay
    in [CODE_MIN, CODE_MAX] = [-8, 16]. Only assigned variables are read; the first statement assigns, the last
    prints. The target of every token is None except at the `;` of an executed print: the value printed.
        a = 3 ; b = 7 ; if a < 5 : a ++ ; print a ; if b > 8 : print b ; print b ;
        targets: None everywhere except the `;` after `print a` (4) and the last `;` (7)
    Metrics: print accuracy (at executed prints) and sequence accuracy (every position of a program right: the
    headline).
    """
    names, env, tokens, targets = CODE_VARS[:n_vars], {}, [], []

    def simple(kind, run, conditional=False):
        if kind == "assign":
            var, n = rng.choice(names), rng.randrange(10)
            if run and not (official_if and conditional and var in env):
                env[var] = n
            return [var, "=", str(n), ";"], None
        var = rng.choice(sorted(env))
        if kind == "print":
            return ["print", var, ";"], env[var] if run else None
        up = kind == "inc" if CODE_MIN < env[var] < CODE_MAX else env[var] == CODE_MIN
        if run:
            env[var] += 1 if up else -1
        return [var, "++" if up else "--", ";"], None

    for i in range(n_statements):
        kind = "assign" if i == 0 else "print" if i == n_statements - 1 else rng.choices(CODE_KINDS, CODE_WEIGHTS)[0]
        if kind == "if":
            var, op, c = rng.choice(sorted(env)), rng.choice("<>"), rng.randrange(10)
            run = env[var] < c if op == "<" else env[var] > c
            tokens += ["if", var, op, str(c), ":"]
            targets += [None] * 5
            kind = rng.choices(CODE_KINDS[:4], CODE_WEIGHTS[:4])[0]
        else:
            run = True
        toks, target = simple(kind, run, conditional=tokens[-1:] == [":"])
        tokens += toks
        targets += [None] * (len(toks) - 1) + [target]
    return tokens, targets


LISTOPS = ("MIN", "MAX", "FIRST", "LAST", "MED", "SM")


def listops_eval(tree):
    """The value of a ListOps tree: an int, or (op, [children])."""
    if isinstance(tree, int):
        return tree
    op, values = tree[0], [listops_eval(c) for c in tree[1]]
    return dict(MIN=min, MAX=max, FIRST=lambda x: x[0], LAST=lambda x: x[-1], SM=lambda x: sum(x) % 10,
                MED=lambda x: int(statistics.median(x)))[op](values)


LISTOPS_LEVELS = 20  # the official generator's cap: every node at level 20 (the root is level 1) is a value


def listops_tree(rng, depth, ops):
    """A ListOps tree of exactly `depth` nested operators, drawn as the official generator draws them (Nangia &
    Bowman 2018; sequential ListOps of Irie et al. 2021 section 4.2, whose `--only_depth 11` is depth 10 here): the
    root is an operator with 2-5 arguments, every other node a value (0-9) with probability 0.75, else an operator,
    and a value at level LISTOPS_LEVELS; a tree of another depth is drawn again (depth 10: 1.5% of the trees are
    kept; median length about 92 tokens)."""

    def grow(level):
        if level > 1 and (level >= LISTOPS_LEVELS or rng.random() < 0.75):
            return rng.randrange(10)
        return rng.choice(ops), [grow(level + 1) for _ in range(rng.randint(2, 5))]

    def tree_depth(t):
        return 0 if isinstance(t, int) else 1 + max(tree_depth(c) for c in t[1])

    while True:
        tree = grow(1)
        if tree_depth(tree) == depth:
            return tree


def listops_tokens(tree):
    """Prefix order with closing brackets only: [MAX 2 9 [MIN 4 7 ] 0 ] -> '[MAX' '2' '9' '[MIN' '4' '7' ']' '0' ']'"""
    if isinstance(tree, int):
        return [str(tree)]
    return ["[" + tree[0]] + [tok for c in tree[1] for tok in listops_tokens(c)] + ["]"]


# State tracking with length generalisation (Irie, Csordas, Schmidhuber 2023, arXiv 2310.16076; Grazzi et al. 2025,
# arXiv 2411.12537, Table 3; Delétang et al. 2023, arXiv 2207.02098): train on lengths min_len to max_len (3 to 40),
# test on longer ones (up to 256); the metric is sequence accuracy (every target of a sequence right) by length bucket.
STATE_TASKS = ("parity", "modarith", "permutation")


def parity_example(rng, length):
    """A bit string and, at every position, the parity of its prefix (dense supervision, as the formal-language
    setting of Bhattamishra et al. 2020 and Irie et al. 2023). Token ids = targets = bits:
        tokens  1 0 1 1 0
        targets 1 1 0 1 1
    """
    bits = [rng.randrange(2) for _ in range(length)]
    return bits, list(itertools.accumulate(bits, lambda a, b: a ^ b))


MODARITH_OPS = "+-*"  # ids modulus, modulus + 1, modulus + 2; the official blank `_` (modulus + 3) is the pad id here


def modarith_example(rng, length, modulus):
    """Modular arithmetic without brackets as the official generator of Delétang et al. 2023 draws and evaluates it
    (google-deepmind/neural_networks_chomsky_hierarchy, tasks/regular/modular_arithmetic.py): an even length is made
    odd by subtracting 1; numbers uniform in 0..modulus-1 at the even positions, operators uniform among + - * at the
    odd ones; the value with * before + and -, each a - b read as a + (-b), taken mod modulus; one label, read at the
    last token. Token ids as the official ones: the numbers, then + - * at modulus, modulus + 1, modulus + 2.
        tokens  3 - 4 * 2 + 1          ids 3 6 4 7 2 5 1 (modulus 5)
        targets None everywhere but the last token: (3 - 4 * 2 + 1) mod 5 = 1
    """
    length -= 1 - length % 2
    ids = [rng.randrange(modulus) if i % 2 == 0 else modulus + rng.randrange(3) for i in range(length)]
    total, term = 0, ids[0]  # the sum of the finished terms; the product of the current one, its sign included
    for op, n in zip(ids[1::2], ids[2::2]):
        if MODARITH_OPS[op - modulus] == "*":
            term *= n
        else:
            total, term = total + term, n if MODARITH_OPS[op - modulus] == "+" else -n
    return ids, [None] * (length - 1) + [(total + term) % modulus]


def permutation_example(rng, length, n_perm):
    """The word problem of S_n (Merrill et al. 2024; Grazzi et al. 2025: S3 and S5): each token is a permutation g of
    (0, ..., n - 1), its id its index in itertools.permutations(range(n)); the target at every position is the index
    of the prefix product p_t = p_{t-1} o g_t, i.e. p_t(i) = p_{t-1}(g_t(i)) with p_0 the identity: as tuples,
    p_t = tuple(p_{t-1}[g_t[i]] for i), the arrangement p_{t-1} shuffled by g_t. For S3 (ids: 012 021 102 120 201 210):
        tokens  102 021 102            ids 2 1 2
        targets 102 120 210            ids 2 3 5
    """
    perms = list(itertools.permutations(range(n_perm)))
    ids, targets, p = [], [], perms[0]
    for _ in range(length):
        g = rng.randrange(len(perms))
        p = tuple(p[i] for i in perms[g])
        ids.append(g)
        targets.append(perms.index(p))
    return ids, targets


def length_buckets(args):
    """The length ranges of a state-tracking task: (min_len, max_len), the training lengths (valid and the first test
    bucket), then max_len + 1 to the next power of two, and on by doublings up to test_len (test): 3-40, 41-64,
    65-128, 129-256 by default."""
    buckets, lo = [(args.min_len, args.max_len)], args.max_len + 1
    while lo <= args.test_len:
        hi = min(args.test_len, 1 << (lo - 1).bit_length())
        buckets.append((lo, hi))
        lo = hi + 1
    return buckets


def state_task_examples(args, split, rng):
    """A split of parity, modarith or permutation: train n_train and valid n_eval sequences of lengths drawn
    uniformly from min_len to max_len; test n_eval in each of length_buckets. -> inputs, targets (None: no loss),
    the vocabulary, the number of classes."""
    if args.task == "parity":
        vocab, n_out, example = ["0", "1"], 2, parity_example
    elif args.task == "modarith":
        vocab, n_out = [str(n) for n in range(args.modulus)] + list(MODARITH_OPS), args.modulus
        example = lambda rng, length: modarith_example(rng, length, args.modulus)  # noqa: E731
    else:
        vocab = ["".join(map(str, p)) for p in itertools.permutations(range(args.n_perm))]
        n_out, example = len(vocab), lambda rng, length: permutation_example(rng, length, args.n_perm)  # noqa: E731
    buckets = length_buckets(args) if split == "test" else length_buckets(args)[:1]
    xs, ys = [], []
    for lo, hi in buckets:
        for _ in range(args.n_train if split == "train" else args.n_eval):
            x, y = example(rng, rng.randint(lo, hi))
            xs.append(x)
            ys.append(y)
    return xs, ys, vocab, n_out


def make_examples(args, split):
    """The fixed examples of a split: (list of input id lists, list of target lists with -100 = no loss), the
    input vocabulary and the number of output classes. Each split has its own seed."""
    rng = random.Random(f"{args.task}-{split}-{args.seed}")
    n = args.n_train if split == "train" else args.n_eval
    if args.task in STATE_TASKS:
        xs, ys, vocab, n_out = state_task_examples(args, split, rng)
        return xs, [[-100 if t is None else t for t in y] for y in ys], vocab, n_out
    if args.task == "code":
        vocab = list(CODE_VARS[: args.n_vars]) + CODE_WORDS
        blank = CODE_MAX - CODE_MIN + 1  # classes: values CODE_MIN..CODE_MAX, then blank
        xs, ys = [], []
        for _ in range(n):
            tokens, targets = code_program(rng, args.code_length, args.n_vars, args.official_if)
            xs.append([vocab.index(t) for t in tokens])
            ys.append([blank if t is None else t - CODE_MIN for t in targets])
        return xs, ys, vocab, blank + 1
    ops = args.ops.split(",")
    vocab = ["[" + op for op in ops] + ["]"] + [str(n) for n in range(10)]
    xs, ys = [], []
    for _ in range(n):
        tree = listops_tree(rng, args.depth, ops)
        xs.append([vocab.index(t) for t in listops_tokens(tree)])
        ys.append([-100] * (len(xs[-1]) - 1) + [listops_eval(tree)])  # the label is read at the last token
    return xs, ys, vocab, 10


def pad_batch(xs, ys, pad_id):
    """Right-pad to the longest sequence: pads read pad_id and carry no loss (causal models never see them)."""
    T = max(map(len, xs))
    x = torch.tensor([s + [pad_id] * (T - len(s)) for s in xs])
    y = torch.tensor([s + [-100] * (T - len(s)) for s in ys])
    return x, y


# ----------------------------------------------------------------------------------------------
# Training


def detach_state(state):
    return None if state is None else [tuple(s.detach() for s in layer) for layer in state]


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if not args.cosine:
        return args.lr
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def load_task(args):
    """code, listops, parity, modarith, permutation: the three fixed splits. lm: the corpus as parallel streams."""
    if args.task == "lm":
        train, valid, test, vocab = data.load_text(args.dataset, args.tokenizer, args.data_dir)
        return {"n_in": len(vocab), "n_out": len(vocab), "vocab": vocab, "train": data.batchify(train, args.batch_size),
                "valid": data.batchify(valid, args.batch_size), "test": data.batchify(test, args.batch_size)}
    task = {}
    for split in ("train", "valid", "test"):
        xs, ys, vocab, n_out = make_examples(args, split)
        task[split] = (xs, ys)
    return dict(task, n_in=len(vocab) + 1, n_out=n_out, vocab=vocab, pad=len(vocab))  # + the pad id


def batches(task, args, split):
    """The evaluation batches of a split, in order."""
    if args.task == "lm":
        streams = task[split]
        return (data.segment(streams, i, args.seq_len) for i in range(data.n_segments(streams, args.seq_len)))
    xs, ys = task[split]
    return (pad_batch(xs[i : i + args.batch_size], ys[i : i + args.batch_size], task["pad"])
            for i in range(0, len(xs), args.batch_size))


@torch.no_grad()
def evaluate(model, args, task, split, device):
    """code: print accuracy (at executed prints) and sequence accuracy (every position right); listops:
    accuracy; parity, modarith, permutation: sequence accuracy (every target right) in each length bucket present,
    acc_LO_HI; lm: loss and perplexity (or bits per character) over the whole split, state carried if asked."""
    model.eval()
    loss_sum, n_tok, n_right, n_print, print_right, n_seq, seq_right = 0.0, 0, 0, 0, 0, 0, 0
    buckets = length_buckets(args) if args.task in STATE_TASKS else []
    bucket_n, bucket_right = [0] * len(buckets), [0] * len(buckets)
    state = None
    for x, y in batches(task, args, split):
        x, y = x.to(device), y.to(device)
        logits, state = model(x, state if args.carry_state else None)
        mask = y != -100
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        right = (logits.argmax(-1) == y) & mask
        n_tok, n_right = n_tok + mask.sum().item(), n_right + right.sum().item()
        if args.task == "code":
            printed = mask & (y != task["n_out"] - 1)
            n_print, print_right = n_print + printed.sum().item(), print_right + (right & printed).sum().item()
            n_seq, seq_right = n_seq + len(y), seq_right + (right == mask).all(-1).sum().item()
        if buckets:
            for length, ok in zip((x != task["pad"]).sum(-1).tolist(), (right == mask).all(-1).tolist()):
                i = next((i for i, (_, hi) in enumerate(buckets) if length <= hi), len(buckets) - 1)
                bucket_n[i], bucket_right[i] = bucket_n[i] + 1, bucket_right[i] + ok
    model.train()
    loss = loss_sum / n_tok
    if args.task == "code":
        return {"loss": loss, "print_acc": print_right / n_print, "seq_acc": seq_right / n_seq}
    if args.task == "listops":
        return {"loss": loss, "acc": n_right / n_tok}
    if buckets:
        return {"loss": loss, **{f"acc_{lo}_{hi}": r / n for (lo, hi), n, r in zip(buckets, bucket_n, bucket_right)
                                 if n}}
    return {"loss": loss, "ppl" if args.tokenizer == "word" else "bpc":
            math.exp(min(loss, 50)) if args.tokenizer == "word" else loss / math.log(2)}


HEADLINE = {"code": "seq_acc", "listops": "acc"}  # lm: ppl or bpc, lower is better


def headline(args, split="valid"):
    """The metric that picks the best checkpoint (valid) and leads the final line (test); parity, modarith,
    permutation: sequence accuracy on the training lengths (valid), at the longest lengths (test)."""
    if args.task in STATE_TASKS:
        lo, hi = length_buckets(args)[-1 if split == "test" else 0]
        return f"acc_{lo}_{hi}"
    return HEADLINE.get(args.task, "ppl" if args.tokenizer == "word" else "bpc")


def train_batch(args, task, step, gen, state):
    """This step's global batch, the same on every rank (the synthetic tasks: a random batch of the training set,
    padded; lm: the next segment of every stream), and the state it starts from (a new pass over the corpus starts from
    zero)."""
    if args.task == "lm":
        i = step % data.n_segments(task["train"], args.seq_len)
        return *data.segment(task["train"], i, args.seq_len), None if i == 0 else state
    xs, ys = task["train"]
    idx = torch.randint(len(xs), (args.batch_size,), generator=gen).tolist()
    return *pad_batch([xs[i] for i in idx], [ys[i] for i in idx], task["pad"]), state


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
    name, test_name = headline(args), headline(args, "test")
    model.load_state_dict(torch.load(os.path.join(args.out_dir, "best.pt"), map_location=device,
                                     weights_only=False)["model"])
    result = evaluate(model, args, task, "test", device)
    log_metrics(args.out_dir, args.steps, "test", result, t0)
    print(f"final: test {test_name} {result[test_name]:.4f} (" + " ".join(f"{k} {v:.4f}" for k, v in result.items()) +
          f") with the best valid checkpoint (step {best[0]}, valid {name} {best[1]:.4f}), {time.time() - t0:.0f}s")


def adam(params, **kw):
    """torch's Adam as one fused kernel per step where torch has one for the device (CPU from torch 2.4; a tenth of
    a small model's step), else its loop over the tensors: the same update."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, **kw)


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


def map_tensors(fn, x):
    """fn applied to every tensor of a state (tensors nested in lists and tuples; None stays None)."""
    if isinstance(x, (list, tuple)):
        return type(x)(map_tensors(fn, s) for s in x)
    return None if x is None else fn(x)


def train(args):
    rank, world, device = start_processes(args)
    if args.impl == "kernel" and device.type not in KERNEL_FILES:
        print(f"warning: --impl kernel runs on the CPU and CUDA, not {device}; using --impl chunk", file=sys.stderr)
    master = rank == 0
    seed_everything(args.seed + rank)  # each rank its own dropout masks; the initial weights are rank 0's (DDP)
    gen = torch.Generator().manual_seed(args.seed)  # which training examples each step sees: the same on every rank
    try:
        task = load_task(args)
    except data.DataError as e:
        fail(str(e))
    model = build_model(args, task["n_in"], task["n_out"]).to(device)
    opt = adam(model.parameters(), lr=args.lr, betas=(0.9, 0.995), eps=1e-9)  # the paper's Adam
    step, state, best, ckpt_path = 0, None, None, os.path.join(args.out_dir, "ckpt.pt")
    if args.resume:
        ckpt = resume_from(ckpt_path, model, opt, device, args)
        step, best = ckpt["step"], ckpt["best"]
        state = map_tensors(lambda s: rank_slice(s, rank, world), ckpt["train_state"])
        gen.set_state(ckpt["rng"]["data"])
        if rank:  # the checkpoint holds rank 0's global RNGs: the other ranks draw dropout masks of their own
            seed_everything(args.seed + world * step + rank)
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
        print(f"config: {json.dumps(dataclasses.asdict(args))}")
        print(f"device {device}, {world} process(es), model {args.model}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, starting at step {step}")
    t0, name = time.time(), headline(args)
    bar, pending = progress_bar(args.steps, step, master), []
    while step < args.steps:
        x, y, state = train_batch(args, task, step, gen, state)
        n_targets = (y != -100).sum().item()  # in the global batch
        x, y = rank_slice(x, rank, world), rank_slice(y, rank, world)  # this rank's rows (lm: its streams)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        logits, new_state = ddp(x.to(device), state if args.carry_state else None)
        # the global batch's mean over its targets (their number per sequence varies: code's padding): this rank's
        # sum over n_targets, times world, as DDP averages the ranks' gradients
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), ignore_index=-100, reduction="sum")
        loss = loss * world / n_targets
        pending.append({"loss": optimizer_step(ddp, opt, loss, args, world)})
        state, step = detach_state(new_state) if args.carry_state else None, step + 1
        bar.update(1)
        evaluate_now = step % args.eval_every == 0 or step == args.steps or step == args.stop_at
        if step % args.log_every == 0 or evaluate_now:
            pending = log_train(args, step, pending, bar, master, t0)
        if evaluate_now:
            # the carried state of every stream (each rank holds its rows), so that any number of processes resumes
            train_state = map_tensors(lambda s: torch.cat(gather_ranks(s.cpu(), world)), state)
            result = evaluate(model, args, task, "valid", device) if master else None  # rank 0 evaluates
            result = gather_ranks(result, world)[0]  # and every rank checks its loss: a divergence stops all alike
            check_finite(step, args.out_dir, "Lower --lr or raise --warmup.", {"the valid loss": result["loss"]},
                         [model], bar)
            if master:
                log_metrics(args.out_dir, step, "valid", result, t0)
                tqdm.write(f"step {step} valid: " + " ".join(f"{k} {v:.4f}" for k, v in result.items()))
                improved = best is None or (result[name] < best[1] if args.task == "lm" else result[name] > best[1])
                best = (step, result[name]) if improved else best
                for path in ["best.pt", "ckpt.pt"] if improved else ["ckpt.pt"]:
                    save_checkpoint(os.path.join(args.out_dir, path), {
                        "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "args": dataclasses.asdict(args), "vocab": task["vocab"], "train_state": train_state,
                        "best": best, "rng": dict(rng_state(), data=gen.get_state())})
            if step == args.stop_at:
                break
    bar.close()
    del ddp  # DDP holds the process group: release it here, not at interpreter exit (gloo aborts there)
    finish_processes(model, world, master)
    if master and step == args.steps:
        final_test(model, args, task, device, best, t0)
        mark_final(ckpt_path)


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


def bench(args):
    """Training steps (forward, backward) of every model at the configured size, batch 32, T = bench_T. Each
    fast-weight model with --impl chunk (the recurrent parts step in Python) and, where the device's kernels build,
    --impl kernel (fused kernels); each of those rows checked against --impl loop (the spec) in the same run: rel err
    = max |difference| / max |value| over the logits and every parameter's gradient of one step. ms: the median of 5
    timed steps after a warm-up; vs lstm: that over the lstm row's."""
    device = pick_device(args.device)
    B, T = 32, args.bench_T
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    impls = ["chunk", "kernel"] if kernels(device.type) else ["chunk"]
    print(f"device {device}, threads {torch.get_num_threads()}, batch {B}, T {T}, d_model {args.d_model}, "
          f"n_layer {args.n_layer}, n_head {args.n_head}; mem MiB: on CUDA the peak allocated, on CPU the tensors "
          "autograd saves for the backward")
    print(f"{'model':12} {'impl':6} {'params':>8} {'fwd+bwd ms':>11} {'vs lstm':>8} {'tok/s':>9} {'mem MiB':>9} "
          f"{'rel err':>9}")
    x = torch.randint(0, 20, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    t_lstm = None
    for name in MODELS:
        baseline = name in ("lstm", "transformer")
        for impl in ["auto"] if baseline else impls:
            torch.manual_seed(0)
            model = build_model(dataclasses.replace(args, model=name, impl=impl), 20, 20).to(device)

            def step():
                logits, _ = model(x)
                logits.float().square().mean().backward()
                return logits

            times = []
            for _ in range(6):  # the first is a warm-up
                sync()
                t = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - t)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                step()
                mem = torch.cuda.max_memory_allocated() / 2**20
            else:
                mem = saved_mib(step)
            err = "" if baseline else f"{loop_error(model, step):9.1e}"
            t_med = float(np.median(times[1:]))
            t_lstm = t_lstm or t_med
            n_params = sum(p.numel() for p in model.parameters())
            print(f"{name:12} {impl:6} {n_params / 1e6:7.2f}M {t_med * 1e3:11.1f} {t_med / t_lstm:7.1f}x "
                  f"{B * T / t_med:9.0f} {mem:9.1f} {err:>9}", flush=True)


def loop_error(model, step):
    """The logits and parameter gradients of one step of model, against the same model with --impl loop."""
    results = []
    for impl in (None, "loop"):
        if impl:
            for m in model.modules():
                if hasattr(m, "impl"):
                    m.impl = impl
        model.zero_grad()
        results.append([step().detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    return max(relative_error(a, b) for a, b in zip(*results))


def relative_error(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


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
    open_out_dir(args)
    train(args)


if __name__ == "__main__":
    main()
