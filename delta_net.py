"""DeltaNet: a Transformer whose attention is a fast weight matrix programmed by the delta rule.

Schlag, Irie, Schmidhuber, "Linear Transformers Are Secretly Fast Weight Programmers", ICML 2021,
arXiv 2102.11174 (section 4.2, eq. 17-20; DeltaNet in section 4.3). Chunkwise-parallel training form
from Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", arXiv 2406.06484 (section 3.2, eq. 8-11). The gated delta rule (--gate, --preset gated_deltanet):
Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule", ICLR 2025, arXiv 2412.06464
(section 3: the rule and its chunkwise form).

The slow network (projections W_q, W_k, W_v, w_beta) writes into a fast weight matrix W per head:
    q_t, k_t, v_t = W_q x_t, W_k x_t, W_v x_t        beta_t = sigmoid(w_beta . x_t)
    q_t, k_t <- sumnorm(elu(.) + 1)                  (paper; --qk_map l2 uses L2-normalised silu)
    v̄_t = W_{t-1} k_t                                 (what W currently stores under key k_t)
    W_t = W_{t-1} + beta_t (v_t - v̄_t) k_t^T          (delta rule: replace v̄_t by a beta-mix of v_t)
    y_t = W_t q_t
The gated delta rule (Gated DeltaNet) first decays the memory by alpha_t in (0, 1], one per head and step:
    g_t = -exp(A_log) softplus(w_a . x_t + dt_bias)    alpha_t = exp(g_t)
    W_t = alpha_t W_{t-1} + beta_t (v_t - alpha_t W_{t-1} k_t) k_t^T
The official layer around it (each part a flag): a short causal convolution and SiLU on q, k, v (--short_conv), L2
q and k with q / sqrt(d_head) (--qk_map l2), each head's output RMSNorm-ed and gated by SiLU(W_g x) (--out_gate);
--neg_eigval: beta = 2 sigmoid(.) in (0, 2).
Block: x + Out(Delta(LN(x))), then x + FF(LN(x)); a final LN and the output head.

Glossary: b batch, h head, t time step, T sequence length, C chunk length, n chunk index,
d_k = d_v = d_head = d_model / n_head, W (d_v, d_k) the fast weight of one head (fp32),
S = W^T (d_k, d_v) the same state in the chunk form, beta in (0, 1) the write strength; in the chunk
form A = strict_lower(diag(beta) K K^T) and T = (I + A)^-1 (a C x C matrix, not the length). Gated rule: g the log
decay, alpha = exp(g), A_log and dt_bias (one per head) its slow parameters, G the cumulative log decay within a chunk.

Forms (--impl, delta_rule): loop is the spec and the test oracle; chunk the chunkwise form (DeltaRuleChunk); kernel
the device's fused kernel (cpu_kernels.cpp on the CPU, cuda_kernels.cu on CUDA; built on first use, about a minute;
a failed build prints one warning and runs chunk); chunk_cuda the chunk form with its loops over chunks as CUDA
kernels (not yet run on a GPU, so auto never picks it). Every form takes and returns W, so a stream is processed
segment by segment (--carry_state) and text generated one token at a time in constant memory (--sample N --prompt).

Fidelity. q and k as the paper (sumnorm(elu + 1), one sigmoid beta per head) by default; --qk_map l2 as Yang et al.
2024, with q / sqrt(d_head) as the official Gated DeltaNet code and fla's DeltaNet layers. Slow projections have no
bias, as the official code. Positions (--pos_enc auto): none for recall (the recurrence orders the sequence, as the
official algorithmic code), sinusoidal for --task lm unless --carry_state (the official LM code adds them except in
its full-context runs). --preset paper is the official LM setting: --scale_out and Adam (AdamW with weight decay 0,
betas 0.9/0.999) with cosine decay to 0; the CPU defaults keep AdamW (0.9, 0.98), weight decay 0.1 on matrices,
cosine to lr / 10. Gated DeltaNet against the official layer: DeltaLayer; the chunk form: DeltaRuleChunk.

Commands:
    python delta_net.py                                  # associative recall, about 1.5 CPU minutes
    python delta_net.py --preset tiny --steps 20         # smoke run
    python delta_net.py --repeat_keys                    # keys rewritten with new values: overwriting
    python delta_net.py --preset gated_deltanet          # Gated DeltaNet's layer (--gate for the gated rule alone)
    python delta_net.py --task lm --dataset wikitext-103 --preset paper   # GPU, the paper's LM size
    python delta_net.py --task lm --dataset wikitext-2 --sample 200 --prompt "The meaning of"
    python delta_net.py --bench                          # loop vs chunk vs kernel speed and memory, plain and gated
    torchrun --nproc_per_node 2 delta_net.py             # data-parallel (gloo on CPU, nccl on CUDA)

Runs: --out_dir gets metrics.jsonl and ckpt.pt. The scaffolding at the end, the same in every script, refuses an
--out_dir that holds another run (--resume continues it, --overwrite replaces it), checks a checkpoint before resuming
from it (the script, RESUME_FLAGS, a truncated file) and stops a diverging run before it logs or saves anything of it
(open_out_dir, read_checkpoint, nothing_left, truncate_metrics, check_finite). A resumed run on the CPU ends where an
uninterrupted one would. Under torchrun each process takes its rows of the global --batch_size (recall: drawn alike on
every rank; lm: its rows of the batch_size streams); rank 0 logs, evaluates and checkpoints (with --carry_state the
state of every stream too), so --resume continues with any number of processes.
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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data


# ----------------------------------------------------------------------------------------------
# Configuration: every flag with its default and docstring (--help prints them) and the presets. The flags reach
# the modules only through build_model; check_args checks a command line's values.


@dataclass
class Args:
    # task
    task: str = "recall"
    """recall (associative recall, synthetic) or lm (language modelling through data.py)"""
    n_pairs: int = 24
    """recall: key-value pairs per sequence; every key is queried once afterwards"""
    repeat_keys: bool = False
    """recall: draw keys with replacement; a rewritten key must answer its latest value (tests overwriting)"""
    vocab_size: int = 128
    """recall: keys come from the first half of the ids, values from the second (plus one blank id)"""
    dataset: str = "wikitext-2"
    """lm: wikitext-103 | wikitext-2 | enwik8 | a text file | a folder with train/valid/test files"""
    tokenizer: str = "word"
    """lm: word (perplexity) or char (bits per character)"""
    data_dir: str = data.DATA_DIR
    """where downloads are cached"""
    seq_len: int = 256
    """lm: tokens per training segment"""
    carry_state: bool = False
    """lm: carry the fast weights across consecutive segments (train and eval), detached"""
    sample: int = 0
    """lm: generate this many tokens from the checkpoint in out_dir and exit"""
    prompt: str = "The"
    """lm: text the generation starts from"""
    temperature: float = 1.0
    """lm: sampling temperature"""
    # model
    d_model: int = 128
    """residual stream width"""
    n_layer: int = 2
    """number of DeltaNet blocks"""
    n_head: int = 4
    """heads per layer; d_head = d_model / n_head"""
    d_ff: int = 512
    """feed-forward hidden width"""
    pos_enc: str = "auto"
    """auto (sin for lm unless --carry_state, as the official LM code; none for recall), sin (sinusoidal, added to
    the embedding) or none"""
    scale_out: bool = False
    """multiply the fast-weight output by 1/sqrt(d_head) before the output projection (the official LM layers)"""
    dropout: float = 0.0
    """dropout after the attention output and in the feed-forward block"""
    qk_map: str = "elu_sumnorm"
    """elu_sumnorm (the paper: sumnorm(elu(x)+1)) or l2 (L2-normalised silu, Yang et al. 2024; q also scaled by
    d_head^-1/2 as in the official code)"""
    gate: bool = False
    """the gated delta rule (Gated DeltaNet): W_t = alpha_t W_{t-1} + beta_t (v_t - alpha_t W_{t-1} k_t) k_t^T with
    alpha_t = exp(-exp(A_log) softplus(w_a . x_t + dt_bias)) per head"""
    neg_eigval: bool = False
    """beta = 2 sigmoid(w_beta . x) in (0, 2): the write's eigenvalue 1 - beta |k|^2 may be negative (state tracking)"""
    short_conv: bool = False
    """a causal depthwise convolution over time (kernel 4) and SiLU on q, k and v (its last 3 inputs join the state)"""
    out_gate: bool = False
    """each head's output RMSNorm-ed and multiplied by SiLU(W_g x) before the output projection"""
    impl: str = "auto"
    """auto | loop | chunk | kernel | cuda | chunk_cuda: which implementation of the delta rule. kernel: the fused
    recurrent kernel of the device (cpu_kernels.cpp on the CPU, cuda_kernels.cu on CUDA; cuda: the same on CUDA).
    auto: the kernel (on the CPU --bench measured it faster than chunk at every size tried). chunk_cuda:
    the chunk form with its loops over chunks as CUDA kernels; not yet measured on a GPU, so auto does not pick it"""
    chunk_size: int = 64
    """chunk length C of the chunkwise form (64 measured fastest on 2 CPU cores and D=64)"""
    # training
    batch_size: int = 32
    """sequences (recall) or parallel streams (lm) per step: the global batch (under torchrun each of the N processes
    takes batch_size / N of it)"""
    steps: int = 1000
    """optimizer steps"""
    lr: float = 2e-3
    """peak learning rate (AdamW)"""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices"""
    beta2: float = 0.98
    """AdamW's second-moment decay"""
    warmup: int = 100
    """linear warm-up steps, then cosine decay to lr * lr_min"""
    lr_min: float = 0.1
    """where the cosine ends, as a fraction of lr"""
    grad_clip: float = 1.0
    """gradient norm clip (0 disables)"""
    eval_every: int = 200
    """evaluate and checkpoint every this many steps"""
    log_every: int = 50
    """read the training loss from the device (one sync), log it and show it in the progress bar every this many steps
    and at every evaluation"""
    eval_batches: int = 16
    """recall: batches in each evaluation (lm evaluates the whole split)"""
    seed: int = 0
    """seed of python, numpy and torch"""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"""
    dtype: str = "float32"
    """float32 or bfloat16 (autocast, CUDA only; the fast-weight state stays fp32)"""
    out_dir: str = "out/delta_net"
    """metrics.jsonl and ckpt.pt go here"""
    resume: bool = False
    """continue the run in out_dir from its ckpt.pt (the only way to add to a run there)"""
    overwrite: bool = False
    """start a new run in an out_dir that holds one: delete its ckpt.pt and metrics.jsonl first (without
    this flag or --resume, such a run stops before writing anything)"""
    stop_at: int = 0
    """exit after this step, checkpoint saved (a time-boxed job); --resume continues. 0: run to the end"""
    bench: bool = False
    """run the speed/memory benchmark of the delta-rule implementations and exit"""
    bench_T: str = "256,1024,4096"
    """--bench: comma-separated sequence lengths (B=4, H=4)"""
    bench_d: int = 64
    """--bench: d_k = d_v"""
    bench_impls: str = "loop,chunk,kernel,chunk_cuda"
    """--bench: which implementations (kernel where the device's kernel file builds; cuda and chunk_cuda only on
    CUDA); every one for the plain and the gated rule"""


PRESETS = {
    "tiny": dict(d_model=32, n_layer=1, n_head=2, d_ff=64, n_pairs=4, vocab_size=16, batch_size=8, steps=20,
                 eval_every=10, eval_batches=2, seq_len=32, warmup=5),
    # WikiText-103 "small" of the official code (16 layers, d 128, 8 heads of 16, FF 2048, segments of 256,
    # lr 2.5e-4, 2k warm-up, cosine over 500k steps, clip 0.25); their adaptive input/softmax is not used here
    # the official Gated DeltaNet layer (Yang, Kautz, Hatamizadeh 2024; fla's GatedDeltaNet layer) at this script's CPU
    # size: the gated rule, the short convolution, L2-normalised q and k (q scaled by d_head^-1/2), the gated RMSNorm
    "gated_deltanet": dict(gate=True, short_conv=True, qk_map="l2", out_gate=True),
    "paper": dict(task="lm", dataset="wikitext-103", d_model=128, n_layer=16, n_head=8, d_ff=2048, dropout=0.1,
                  seq_len=256, batch_size=96, steps=500_000, lr=2.5e-4, warmup=2000, grad_clip=0.25, eval_every=5000,
                  weight_decay=0.0, beta2=0.999, lr_min=0.0,  # the official optimizer: Adam, cosine to 0
                  pos_enc="sin", scale_out=True),  # the official LM model: positions, output scaled
}


# ----------------------------------------------------------------------------------------------
# The delta rule: the reference loop (the spec). Shapes: q, k (B, H, T, d_k); v (B, H, T, d_v); beta (B, H, T);
# W (B, H, d_v, d_k).


def state_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def delta_rule_loop(q, k, v, beta, W=None, g=None):
    """The reference recurrence (the spec and the test oracle): one step per token, fp32 state. g (B, H, T): the gated
    rule's log decay, alpha_t = exp(g_t) (None: the plain delta rule)."""
    B, H, T, d_k = k.shape
    dt = state_dtype(q)
    W = q.new_zeros(B, H, v.shape[-1], d_k, dtype=dt) if W is None else W.to(dt)
    ys = []
    with torch.autocast(q.device.type, enabled=False):  # the state and its products stay fp32 under autocast
        gates = g.to(dt).unbind(2) if g is not None else [None] * T
        for q_t, k_t, v_t, b_t, g_t in zip(*(x.to(dt).unbind(2) for x in (q, k, v, beta)), gates):
            if g_t is not None:
                W = g_t.exp()[..., None, None] * W  # alpha_t W_{t-1}
            v_bar = (W @ k_t.unsqueeze(-1)).squeeze(-1)  # (B, H, d_v)
            W = W + (b_t.unsqueeze(-1) * (v_t - v_bar)).unsqueeze(-1) * k_t.unsqueeze(-2)  # + beta (v - v̄) k^T
            ys.append((W @ q_t.unsqueeze(-1)).squeeze(-1))  # y_t = W_t q_t
    return torch.stack(ys, 2).to(q.dtype), W


# ----------------------------------------------------------------------------------------------
# Layers: plain modules built from keyword arguments, checked on construction.

QK_MAPS = ("elu_sumnorm", "l2")
IMPLS = ("auto", "loop", "chunk", "kernel", "cuda", "chunk_cuda")
POS_ENCS = ("sin", "none")


def check_model_args(flag="", **kw):
    """The checks of the layers' and the model's keyword arguments (each constructor passes those it reads): a
    ValueError naming the argument and the fix. check_args runs them on the flags (flag="--": the same messages)."""
    choices = dict(qk_map=QK_MAPS, impl=IMPLS, pos_enc=POS_ENCS)
    for key, value in kw.items():
        if key in choices and value not in choices[key]:
            raise ValueError(f"{flag}{key} must be one of {', '.join(choices[key])}, got {value!r}")
        if key in ("vocab_size", "d_model", "n_head", "n_layer", "d_ff", "chunk_size"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{flag}{key} must be an integer, got {value!r}")
            if value <= 0:
                raise ValueError(f"{flag}{key} must be positive, got {value}")
        if key in ("gate", "neg_eigval", "short_conv", "out_gate", "scale_out") and not isinstance(value, bool):
            raise ValueError(f"{flag}{key} must be true or false, got {value!r}")
    if "dropout" in kw and not 0 <= kw["dropout"] < 1:
        raise ValueError(f"{flag}dropout must be in [0, 1), got {kw['dropout']}")
    if "d_model" in kw and "n_head" in kw and kw["d_model"] % kw["n_head"]:
        raise ValueError(f"{flag}d_model {kw['d_model']} is not divisible by {flag}n_head {kw['n_head']}; pick n_head "
                         "dividing d_model.")


class DeltaLayer(nn.Module):
    """Multi-head delta-rule fast weight layer: x (B, T, d_model) and a state or None (zeros) -> y (B, T, d_model) and
    the new state. The state is W (B, n_head, d_head, d_head), fp32 (float64 for float64 inputs) also under autocast;
    with short_conv, the pair (W, the convolution's last 3 inputs (B, 3, 3 d_model)).
    qk_map: the feature map of q and k (feature_map; l2 also scales q by d_head^-1/2, as the official Gated DeltaNet
    and fla's layers); impl: the delta rule's form (delta_rule); chunk_size: C of the chunk form; scale_out:
    y / sqrt(d_head) before the output projection (the official LM layers). The parts of the official Gated DeltaNet
    layer (Yang, Kautz, Hatamizadeh 2024; fla's GatedDeltaNet), each off by default:
    gate: the gated rule, alpha_t = exp(g_t) per head with g_t = -exp(A_log) softplus(w_a . x_t + dt_bias);
    neg_eigval: beta = 2 sigmoid(.) in (0, 2), so the write's eigenvalue 1 - beta |k|^2 may be negative (Grazzi et al.
    2024, arXiv 2411.12537); short_conv: a causal depthwise convolution over time (kernel 4, no bias) and SiLU on q, k
    and v; out_gate: each head's output RMSNorm-ed and multiplied by SiLU(W_g x).
    With all four (--preset gated_deltanet) this is the official layer (NVlabs/GatedDeltaNet, fla's GatedDeltaNet):
    w_a bias-free, A ~ U(0, 16), softplus(dt_bias) log-uniform in [0.001, 0.1] (floor 1e-4), neither decayed by the
    script's AdamW (it decays matrices only); the convolutions depthwise, kernel 4, no bias, torch's Conv1d
    initialisation (as fla's ShortConvolution), SiLU after them; the output gate RMSNorm(o) * weight * silu(W_g x) per
    head (eps 1e-5); beta a sigmoid of a bias-free projection (fla's; NVlabs' has a bias), x 2 with neg_eigval (fla's
    allow_neg_eigval). It differs in: values as wide as keys (fla widens them by expand_v 2, NVlabs by 1.5 with keys at
    0.75 d_model), so the state stays d_head x d_head; the block around it (LayerNorm and a ReLU feed-forward here,
    RMSNorm and SwiGLU there) and the linear layers' initialisation (torch's here, a normal of std 0.02 there); without
    short_conv no SiLU is applied to q, k, v (fla applies one)."""

    def __init__(self, d_model=128, n_head=4, qk_map="elu_sumnorm", impl="auto", chunk_size=64, scale_out=False,
                 gate=False, neg_eigval=False, short_conv=False, out_gate=False):
        super().__init__()
        check_model_args(d_model=d_model, n_head=n_head, qk_map=qk_map, impl=impl, chunk_size=chunk_size,
                         scale_out=scale_out, gate=gate, neg_eigval=neg_eigval, short_conv=short_conv,
                         out_gate=out_gate)
        self.d_model, self.n_head, self.d_head = d_model, n_head, d_model // n_head
        self.qk_map, self.impl, self.chunk_size, self.scale_out = qk_map, impl, chunk_size, scale_out
        self.gate, self.neg_eigval, self.short_conv, self.out_gate = gate, neg_eigval, short_conv, out_gate
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)  # W_q, W_k, W_v
        self.w_beta = nn.Linear(d_model, n_head, bias=False)
        if gate:  # the official initialisation: A ~ U(0, 16); softplus(dt_bias) = dt, log-uniform in [1e-3, 0.1]
            self.w_a = nn.Linear(d_model, n_head, bias=False)
            self.A_log = nn.Parameter(torch.empty(n_head).uniform_(0, 16).log())
            dt = torch.exp(torch.rand(n_head) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        if short_conv:
            self.conv = nn.Conv1d(3 * d_model, 3 * d_model, 4, groups=3 * d_model, bias=False)  # one filter a channel
        if out_gate:
            self.w_g = nn.Linear(d_model, d_model, bias=False)
            self.out_norm = nn.RMSNorm(self.d_head, eps=1e-5)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.out_scale = self.d_head ** -0.5 if scale_out else 1.0

    def extra_repr(self):
        return (f"d_model={self.d_model}, n_head={self.n_head}, d_head={self.d_head}, qk_map={self.qk_map!r}, "
                f"impl={self.impl!r}, chunk_size={self.chunk_size}, scale_out={self.scale_out}, gate={self.gate}, "
                f"neg_eigval={self.neg_eigval}, short_conv={self.short_conv}, out_gate={self.out_gate}")

    def feature_map(self, x):
        """phi of q and k (..., d_head): elu_sumnorm sumnorm(elu(x) + 1) (the paper); l2 silu(x) / |silu(x)|
        (Yang et al. 2024; with short_conv the silu is the convolution's, so x / |x| here)."""
        if self.qk_map == "l2":
            return F.normalize(x if self.short_conv else F.silu(x), dim=-1)
        x = F.elu(x) + 1
        return x / x.sum(-1, keepdim=True)  # sumnorm

    def short_convolution(self, x, last=None):
        """x (B, T, C) and the C channels' last 3 inputs before it (B, 3, C) or None (zeros) -> SiLU(the causal
        depthwise convolution of x, kernel 4) (B, T, C) and the last 3 inputs now."""
        last = x.new_zeros(x.shape[0], 3, x.shape[2]) if last is None else last.to(x.dtype)
        x = torch.cat([last, x], 1)  # (B, 3 + T, C)
        y = F.conv1d(x.transpose(1, 2), self.conv.weight, groups=x.shape[2]).transpose(1, 2)  # (B, T, C)
        return F.silu(y), x[:, -3:]

    def forward(self, x, state=None):
        B, T, _ = x.shape
        W, last = state if self.short_conv and state is not None else (state, None)
        qkv = self.qkv(x)  # (B, T, 3 d_model)
        if self.short_conv:
            qkv, last = self.short_convolution(qkv, last)
        q, k, v = qkv.view(B, T, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        q, k = self.feature_map(q), self.feature_map(k)
        if self.qk_map == "l2":
            q = q * self.d_head ** -0.5
        beta = (2 if self.neg_eigval else 1) * torch.sigmoid(self.w_beta(x)).transpose(1, 2)  # (B, H, T)
        g = -self.A_log.exp() * F.softplus(self.w_a(x) + self.dt_bias) if self.gate else None  # (B, T, H): log alpha
        y, W = delta_rule(q, k, v, beta, W, self.impl, self.chunk_size, None if g is None else g.transpose(1, 2))
        y = self.out_scale * y.transpose(1, 2)  # (B, T, H, D)
        if self.out_gate:
            y = self.out_norm(y) * F.silu(self.w_g(x)).view(B, T, self.n_head, self.d_head)
        return self.out(y.reshape(B, T, -1)), (W, last) if self.short_conv else W


class Block(nn.Module):
    """x + Dropout(DeltaLayer(LN(x))), then x + FF(LN(x)) with FF = Linear, ReLU, Dropout, Linear, Dropout:
    x (B, T, d_model) and the layer's state (as DeltaLayer's) or None -> (B, T, d_model), the new state."""

    def __init__(self, d_model=128, n_head=4, d_ff=512, dropout=0.0, qk_map="elu_sumnorm", impl="auto", chunk_size=64,
                 scale_out=False, gate=False, neg_eigval=False, short_conv=False, out_gate=False):
        super().__init__()
        check_model_args(d_model=d_model, n_head=n_head, d_ff=d_ff, dropout=dropout, qk_map=qk_map, impl=impl,
                         chunk_size=chunk_size, scale_out=scale_out, gate=gate, neg_eigval=neg_eigval,
                         short_conv=short_conv, out_gate=out_gate)
        self.d_model, self.d_ff, self.dropout = d_model, d_ff, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = DeltaLayer(d_model, n_head, qk_map, impl, chunk_size, scale_out, gate=gate, neg_eigval=neg_eigval,
                               short_conv=short_conv, out_gate=out_gate)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout),
                                nn.Linear(d_ff, d_model), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def extra_repr(self):
        return f"d_model={self.d_model}, d_ff={self.d_ff}, dropout={self.dropout}"

    def forward(self, x, state=None):
        y, state = self.attn(self.ln1(x), state)
        x = x + self.drop(y)
        return x + self.ff(self.ln2(x)), state


# ----------------------------------------------------------------------------------------------
# Model


def sinusoidal(start, T, d, device=None):
    """Positions start..start+T-1 as (T, d): PE[t, 2i] = sin(t / 10000^(2i/d)), PE[t, 2i+1] = cos(same)
    (Vaswani et al. 2017, section 3.5)."""
    t = torch.arange(start, start + T, device=device, dtype=torch.float32)[:, None]
    angle = t / 10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)  # (T, ceil(d/2))
    return torch.stack([angle.sin(), angle.cos()], -1).flatten(-2)[:, :d]


class DeltaNet(nn.Module):
    """Token ids (B, T) and a state (a list of n_layer layer states: W (B, n_head, d_head, d_head), or with short_conv
    the pair (W, the convolution's last 3 inputs (B, 3, 3 d_model)); or None) -> logits (B, T, vocab_size), the new
    state. Ids of shape (B, T, m) give m ids per position whose embeddings are summed (the recall task). pos_enc: sin
    (sinusoidal positions added to the embedding) or none; the rest as Block."""

    def __init__(self, vocab_size, d_model=128, n_head=4, n_layer=2, d_ff=512, dropout=0.0, pos_enc="none",
                 qk_map="elu_sumnorm", impl="auto", chunk_size=64, scale_out=False, gate=False, neg_eigval=False,
                 short_conv=False, out_gate=False):
        super().__init__()
        check_model_args(vocab_size=vocab_size, d_model=d_model, n_head=n_head, n_layer=n_layer, d_ff=d_ff,
                         dropout=dropout, pos_enc=pos_enc, qk_map=qk_map, impl=impl, chunk_size=chunk_size,
                         scale_out=scale_out, gate=gate, neg_eigval=neg_eigval, short_conv=short_conv,
                         out_gate=out_gate)
        self.vocab_size, self.d_model, self.n_layer, self.pos_enc = vocab_size, d_model, n_layer, pos_enc
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, d_ff, dropout, qk_map, impl, chunk_size, scale_out,
                                          gate=gate, neg_eigval=neg_eigval, short_conv=short_conv, out_gate=out_gate)
                                    for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def extra_repr(self):
        return f"vocab_size={self.vocab_size}, d_model={self.d_model}, n_layer={self.n_layer}, pos_enc={self.pos_enc!r}"

    def forward(self, idx, state=None, pos=0):
        """pos: the position of idx[:, 0] (positions restart at 0 in every call unless the caller counts)."""
        x = self.embed(idx) if idx.dim() == 2 else self.embed(idx).sum(-2)
        if self.pos_enc == "sin":
            x = x + sinusoidal(pos, idx.shape[1], x.shape[-1], x.device).to(x.dtype)
        state = state or [None] * len(self.blocks)
        new_state = []
        for block, W in zip(self.blocks, state):
            x, W = block(x, W)
            new_state.append(W)
        return self.head(self.ln_f(x)), new_state


# ----------------------------------------------------------------------------------------------
# The fast forms of the delta rule: chunkwise (any device), the fused recurrent kernel (CUDA), and delta_rule, which
# picks one (impl).


class DeltaRuleChunk(torch.autograd.Function):
    """Chunkwise delta rule (Yang et al. 2024, eq. 8-11), gated or not, with a hand-written backward.

    Inputs are split into chunks: q, k (B, H, N, C, d_k), v (B, H, N, C, d_v), beta (B, H, N, C);
    S0 (B, H, d_k, d_v) is the state W^T; G (B, H, N, C) the gated rule's cumulative log decay within each chunk,
    G_i = g_1 + ... + g_i (None: no gate). Within a chunk, the C delta-rule writes are equivalent to one write
    S <- exp(G_C) S + (diag(exp(G_C - G)) K)^T U' with pseudo-values U' = T (diag(beta) V - diag(beta exp(G)) K S),
    where T = (I + A)^-1, A = strict_lower(diag(beta) K K^T o Gamma), Gamma_ij = exp(G_i - G_j) (the UT transform;
    gated as in Yang, Kautz, Hatamizadeh 2024, section 3; without a gate every exp is 1). Every factor is exp of a sum of
    g <= 0 over a span of steps, so none exceeds 1 and none divides. Everything that does not depend on S runs for all
    chunks at once; only two small matmuls per chunk are sequential. The outputs: O = diag(exp(G)) Q S +
    tril(Q K^T o Gamma) U'. The backward reruns nothing: it walks the chunk states S_n saved by the forward in reverse.
    kernel=True runs each of the two loops over chunks as one CUDA kernel (chunk_state_pass in cuda_kernels.cu,
    which keeps the state on chip), the rest as here. The state, A and T are fp32. Gated, the form stays exact as
    alpha -> 0 (tested down to alpha = 1e-35 at single steps); it needs finite g (the loop and the kernels also take
    g = -inf).
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, S0, G=None, kernel=False):
        C = k.shape[-2]
        kb, vb = k * beta[..., None], v * beta[..., None]  # diag(beta) K, diag(beta) V
        QK, KK = (q @ k.transpose(-1, -2)).tril(), (kb @ k.transpose(-1, -2)).tril(-1)  # (B, H, N, C, C)
        if G is None:
            kw, kd, qg, P, A, Gam, lam = kb, k, q, QK, KK, None, None
        else:
            Gam = (G[..., :, None] - G[..., None, :]).tril().exp().tril()  # exp(G_i - G_j) for i >= j, else 0
            gamma, lam = G.exp(), G[..., -1].exp()  # exp(G_i): decay since the chunk's start; over the whole chunk
            kw = kb * gamma[..., None]  # diag(beta exp(G)) K
            kd = k * (G[..., -1:] - G).exp()[..., None]  # the keys decayed to the chunk's end
            qg, P, A = q * gamma[..., None], QK * Gam, KK * Gam
        eye = torch.eye(C, dtype=k.dtype, device=k.device)
        T = torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False, unitriangular=True)
        w, u = T @ kw, T @ vb  # (B, H, N, C, d_k), (B, H, N, C, d_v)
        if kernel:
            S_n, up, S_last = kernels("cuda").chunk_state_pass(u, w, kd, k.new_empty(0), S0,
                                                               k.new_empty(0) if lam is None else lam, -1.0, 1.0, False)
        else:
            S, ups = [S0], []
            for n, (w_n, u_n, k_n) in enumerate(zip(w.unbind(2), u.unbind(2), kd.unbind(2))):  # the sequential part
                ups.append(u_n - w_n @ S[-1])  # U' = U - W S
                decayed = S[-1] if lam is None else lam[:, :, n, None, None] * S[-1]
                S.append(decayed + k_n.transpose(-1, -2) @ ups[-1])  # S <- exp(G_C) S + K^T U'
            S_n, up, S_last = torch.stack(S[:-1], 2), torch.stack(ups, 2), S[-1]  # chunk-start states, pseudo-values
        o = qg @ S_n + P @ up  # O = diag(exp(G)) Q S + tril(Q K^T o Gamma) U'
        ctx.save_for_backward(q, k, v, beta, T, w, up, S_n, QK, KK, kb, vb, G, Gam)
        ctx.kernel = kernel
        return o, S_last

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, beta, T, w, up, S_n, QK, KK, kb, vb, G, Gam = ctx.saved_tensors
        do = do.contiguous()
        if G is None:
            kw, kd, qg, P, lam, delta, gamma = kb, k, q, QK, None, None, None
        else:
            gamma, lam, delta = G.exp(), G[..., -1].exp(), (G[..., -1:] - G).exp()
            kw, kd, qg, P = kb * gamma[..., None], k * delta[..., None], q * gamma[..., None], QK * Gam
        Gd = P.transpose(-1, -2) @ do  # the part of dU' that comes from the outputs
        E = qg.transpose(-1, -2) @ do  # the part of dS_n that comes from the outputs
        if ctx.kernel:
            dS_next, dup, dS = kernels("cuda").chunk_state_pass(Gd, kd, w, E, dS, k.new_empty(0) if lam is None else
                                                                lam, 1.0, -1.0, True)
        else:
            dS_next, dups = [], []
            for n in reversed(range(k.shape[2])):
                dS_next.append(dS)  # gradient w.r.t. S_{n+1}
                dups.append(Gd[:, :, n] + kd[:, :, n] @ dS)
                dS = (dS if lam is None else lam[:, :, n, None, None] * dS) + E[:, :, n] - \
                    w[:, :, n].transpose(-1, -2) @ dups[-1]
            dS_next, dup = torch.stack(dS_next[::-1], 2), torch.stack(dups[::-1], 2)
        dP = (do @ up.transpose(-1, -2)).tril()
        dPG = dP if G is None else dP * Gam  # through P = tril(Q K^T o Gamma)
        dqg = do @ S_n.transpose(-1, -2)
        dkd = up @ dS_next.transpose(-1, -2)
        dq = (dqg if G is None else gamma[..., None] * dqg) + dPG @ k
        dk = dPG.transpose(-1, -2) @ q + (dkd if G is None else delta[..., None] * dkd)
        dw = -dup @ S_n.transpose(-1, -2)
        Tt = T.transpose(-1, -2)
        dvb, dkw = Tt @ dup, Tt @ dw
        dA = -(Tt @ (dup @ vb.transpose(-1, -2) + dw @ kw.transpose(-1, -2)) @ Tt).tril(-1)  # d(I+A)^-1
        dAG = dA if G is None else dA * Gam
        dkb = (dkw if G is None else gamma[..., None] * dkw) + dAG @ k
        dk = dk + dAG.transpose(-1, -2) @ kb + beta[..., None] * dkb
        dbeta = (dkb * k).sum(-1) + (dvb * v).sum(-1)
        dG = None
        if G is not None:  # G enters through Gamma_ij = exp(G_i - G_j), exp(G_i), exp(G_C - G_j) and exp(G_C)
            dGam = (dP * QK + dA * KK) * Gam
            dG = dGam.sum(-1) - dGam.sum(-2) + gamma * ((q * dqg).sum(-1) + (kb * dkw).sum(-1))
            dd = delta * (k * dkd).sum(-1)
            dG = dG - dd
            dG[..., -1] += dd.sum(-1) + lam * (S_n * dS_next).sum((-1, -2))
        return dq, dk, beta[..., None] * dvb, dbeta, dS, dG, None


def delta_rule_chunk(q, k, v, beta, W=None, chunk_size=64, kernel=False, g=None):
    """Chunkwise form of delta_rule_loop: same arguments, same results; any T (the last chunk is padded). kernel: the
    loops over chunks as CUDA kernels (CUDA tensors)."""
    B, H, T, d_k = k.shape
    d_v, dt = v.shape[-1], state_dtype(q)
    C = min(chunk_size, T)
    N = -(-T // C)

    def chunks(x):  # (B, H, T, ...) -> (B, H, N, C, ...), zero-padded; zero k and beta write nothing, zero g keeps S
        x = F.pad(x.to(dt), (0, 0, 0, N * C - T) if x.dim() == 4 else (0, N * C - T))
        return x.reshape(B, H, N, C, *x.shape[3:])

    S0 = q.new_zeros(B, H, d_k, d_v, dtype=dt) if W is None else W.to(dt).transpose(-1, -2)
    with torch.autocast(q.device.type, enabled=False):  # S, A, T and all products in fp32 under autocast
        G = None if g is None else chunks(g).cumsum(-1)  # the log decay since each chunk's start
        o, S = DeltaRuleChunk.apply(chunks(q), chunks(k), chunks(v), chunks(beta), S0, G, kernel)
    return o.reshape(B, H, N * C, d_v)[:, :, :T].to(q.dtype), S.transpose(-1, -2)


class DeltaRuleKernel(torch.autograd.Function):
    """The recurrent delta rule as one fused kernel per pass: cpu_kernels.cpp on the CPU (float32/64), cuda_kernels.cu
    on CUDA (state fp32, inputs fp32/bf16/fp16/fp64); the two files have the same functions. The plain rule (g None):
    the forward saves v̄_t and the backward undoes each write. The gated rule: the forward saves the state at the start
    of every few steps, and the backward recomputes those steps from it (undoing a write would divide by alpha_t)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, W0, g=None):
        ext, W0_ = kernels(q.device.type), q.new_empty(0) if W0 is None else W0
        if g is None:
            y, W, saved = ext.forward(q, k, v, beta, W0_, True)  # saved: v̄ (B, H, T, d_v)
        else:
            y, W, saved = ext.gated_delta_forward(q, k, v, beta, g, W0_)  # saved: the states (B, H, segments, d_v, d_k)
        ctx.save_for_backward(q, k, v, beta, g, saved, W)
        ctx.has_W0 = W0 is not None
        return y, W

    @staticmethod
    def backward(ctx, dy, dW):
        q, k, v, beta, g, saved, W = ctx.saved_tensors
        ext = kernels(q.device.type)
        dy = v.new_zeros(v.shape) if dy is None else dy
        dW = W.new_empty(0) if dW is None else dW
        if g is None:
            (dq, dk, dv, dbeta, dW0), dg = ext.backward(q, k, v, beta, saved, W, dy, dW, True), None
        else:
            dq, dk, dv, dbeta, dg, dW0 = ext.gated_delta_backward(q, k, v, beta, g, saved, dy, dW)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), dW0 if ctx.has_W0 else None,
                None if g is None else dg.to(g.dtype))


# --impl auto on the CPU is the kernel: `python delta_net.py --bench` on 2 CPU cores measured it faster than the chunk
# form at every size tried (d_head 16 to 128, T 64 to 1024 per call, the plain and the gated rule; RESULTS.md).


def use_kernel(impl, q):
    """Whether delta_rule runs the fused recurrent kernel: on a CUDA device for impl auto, cuda and kernel (d_k <= 128),
    on the CPU for impl auto and kernel; where the kernel file builds."""
    if q.is_cuda:
        wanted = impl in ("auto", "cuda", "kernel") and q.shape[-1] <= 128
    else:
        wanted = q.device.type == "cpu" and impl in ("auto", "kernel")
    return wanted and q.shape[2] > 0 and kernels(q.device.type) is not None


def delta_rule(q, k, v, beta, W=None, impl="auto", chunk_size=64, g=None):
    """Dispatch to an implementation; all take and return the fast weight W (B, H, d_v, d_k). g (B, H, T): the gated
    rule's log decay (alpha_t = exp(g_t), g_t <= 0; the chunk form needs it finite, the loop and the kernels also take
    -inf), None for the plain rule. kernel: the fused recurrent kernel of the inputs' device (cpu_kernels.cpp on the
    CPU, cuda_kernels.cu on CUDA for d_k <= 128; elsewhere the chunk form); cuda: the same on a CUDA device; auto: the
    kernel where it applies (use_kernel), else the chunk form; chunk_cuda: the chunk form with its loops over chunks as
    kernels (CUDA tensors; elsewhere the chunk form). An unknown impl is a ValueError."""
    check_model_args(impl=impl)
    if impl == "loop":
        return delta_rule_loop(q, k, v, beta, W, g)
    if impl == "chunk_cuda" and q.is_cuda and kernels("cuda") is not None:
        return delta_rule_chunk(q, k, v, beta, W, chunk_size, kernel=True, g=g)
    if impl != "chunk_cuda" and use_kernel(impl, q):
        dt = state_dtype(q) if not q.is_cuda else \
            torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)  # autocast may mix bf16 and fp32
        q_, k_, v_, beta_ = (x.to(dt).contiguous() for x in (q, k, v, beta))
        y, W = DeltaRuleKernel.apply(q_, k_, v_, beta_, None if W is None else W.contiguous(),
                                     None if g is None else g.to(dt).contiguous())
        return y.to(q.dtype), W
    return delta_rule_chunk(q, k, v, beta, W, chunk_size, g=g)


# ----------------------------------------------------------------------------------------------
# Tasks


def recall_batch(batch_size, n_pairs, vocab_size, gen, repeat_keys=False):
    """Associative recall (Schlag et al. 2021, section 4.1): n_pairs key-value pairs are written, then n_pairs
    queries follow in a random order and the model must output the value of each queried key. Each position
    holds two ids whose embeddings are summed: (key, value) while writing, (key, blank) while querying. Keys come
    from [0, V/2), values from [V/2, V); blank = V. Targets are -100 (no loss) while writing.
    Default: keys are distinct and every key is queried once. n_pairs=3, V=16:
        x: (3,12) (5,9) (1,14) | (5,16) (1,16) (3,16)
        y:   .      .     .    |    9     14     12
    repeat_keys: keys are drawn with replacement (the paper's setting 2), so a key may be written again with a
    new value, and the target is the value of its latest write: the memory must overwrite, not only add. The
    queries are the written keys in a random order (a repeated key is asked as often as it was written):
        x: (3,12) (5,9) (3,14) | (3,16) (5,16) (3,16)
        y:   .      .     .    |   14     9     14
    """
    half = vocab_size // 2
    if repeat_keys:
        keys = torch.randint(0, half, (batch_size, n_pairs), generator=gen)
    else:
        keys = torch.rand(batch_size, half, generator=gen).argsort(-1)[:, :n_pairs]
    values = torch.randint(half, vocab_size, (batch_size, n_pairs), generator=gen)
    order = torch.rand(batch_size, n_pairs, generator=gen).argsort(-1)
    asked = keys.gather(1, order)  # (B, n_pairs)
    # index of the latest write of each asked key: the largest position j with keys[j] == asked key
    written = (keys[:, None, :] == asked[:, :, None]) * torch.arange(1, n_pairs + 1)  # (B, n_pairs, n_pairs)
    answer = values.gather(1, written.argmax(-1))
    queries = torch.stack([asked, torch.full_like(keys, vocab_size)], -1)
    x = torch.cat([torch.stack([keys, values], -1), queries], 1)  # (B, 2 n_pairs, 2)
    y = torch.cat([torch.full_like(values, -100), answer], 1)  # (B, 2 n_pairs)
    return x, y


# ----------------------------------------------------------------------------------------------
# The command line and the model: build_model maps the flags to DeltaNet's keywords (each flag has its keyword's
# name); check_args checks a command line's values, the model's through the constructors' own checks.

MODEL_FLAGS = ("d_model", "n_head", "n_layer", "d_ff", "dropout", "pos_enc", "qk_map", "impl", "chunk_size",
               "scale_out", "gate", "neg_eigval", "short_conv", "out_gate")


# the flags a --resume must share with its checkpoint: the model's shape and inputs
RESUME_FLAGS = ("task", "vocab_size", "tokenizer", "d_model", "n_head", "n_layer", "d_ff", "pos_enc", "qk_map",
                "scale_out", "gate", "neg_eigval", "short_conv", "out_gate")


def build_model(args, vocab_size):
    return DeltaNet(vocab_size, **{name: getattr(args, name) for name in MODEL_FLAGS})


def check_args(args):
    """What only the command line knows (the task and training flags, --pos_enc auto, flag combinations); the model's
    flags through check_model_args. An error exits with its one-line message (status 2)."""
    choices = dict(task=("recall", "lm"), tokenizer=("word", "char"), pos_enc=("auto", *POS_ENCS),
                   dtype=("float32", "bfloat16"))
    for key, allowed in choices.items():
        if getattr(args, key) not in allowed:
            fail(f"--{key} must be one of {', '.join(allowed)}, got {getattr(args, key)!r}")
    if args.pos_enc == "auto":
        args.pos_enc = "sin" if (args.task == "lm" and not args.carry_state) else "none"
    try:
        check_model_args("--", **{name: getattr(args, name) for name in MODEL_FLAGS})
    except ValueError as e:
        fail(str(e))
    for key in ("batch_size", "steps", "eval_every", "log_every", "eval_batches", "seq_len", "n_pairs", "vocab_size",
                "bench_d"):
        if getattr(args, key) <= 0:
            fail(f"--{key} must be positive, got {getattr(args, key)}")
    for key in ("seed", "sample", "weight_decay"):
        if getattr(args, key) < 0:
            fail(f"--{key} must be non-negative, got {getattr(args, key)}")
    if args.temperature <= 0:
        fail(f"--temperature must be positive (lower is greedier), got {args.temperature}")
    if args.task == "recall" and args.vocab_size < 2:
        fail(f"--vocab_size must be at least 2 (keys from the first half of the ids, values from the second), got "
             f"{args.vocab_size}")
    if args.task == "recall" and not args.repeat_keys and 2 * args.n_pairs > args.vocab_size:
        fail(f"--n_pairs {args.n_pairs} needs --vocab_size of at least {2 * args.n_pairs} (distinct keys in one half).")
    if args.lr <= 0 or args.warmup < 0 or args.grad_clip < 0 or args.stop_at < 0:
        fail("--lr must be positive; --warmup, --grad_clip and --stop_at non-negative.")
    if not 0 <= args.beta2 < 1 or not 0 <= args.lr_min <= 1:
        fail(f"--beta2 must be in [0, 1) and --lr_min in [0, 1], got {args.beta2} and {args.lr_min}.")
    return args


# ----------------------------------------------------------------------------------------------
# Training


def detach_state(state):
    """Each layer's state detached (W, or the pair (W, the convolution's last inputs))."""
    return None if state is None else [tuple(x.detach() for x in W) if isinstance(W, tuple) else W.detach()
                                       for W in state]


def build_optimizer(model, args):
    """AdamW, weight decay on matrices only (weight_decay 0: Adam)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0}]
    return torch.optim.AdamW(groups,
                             lr=args.lr, betas=(0.9, args.beta2))


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.lr_min + (1 - args.lr_min) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(model, args, task, split, device, autocast):
    """recall: query accuracy and loss on fixed batches; lm: loss over the whole split, state carried if asked."""
    model.eval()
    total_loss, total_correct, total_n = 0.0, 0, 0
    if args.task == "recall":
        gen = torch.Generator().manual_seed({"valid": 10_000, "test": 20_000}[split] + args.seed)
        batches = (recall_batch(args.batch_size, args.n_pairs, args.vocab_size, gen, args.repeat_keys)
                   for _ in range(args.eval_batches))
    else:
        streams = task[split]
        batches = (data.segment(streams, i, args.seq_len) for i in range(data.n_segments(streams, args.seq_len)))
    state = None
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast:
            logits, state = model(x, state if args.carry_state else None)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        mask = y != -100
        total_loss += loss.item()
        total_correct += (logits.argmax(-1)[mask] == y[mask]).sum().item()
        total_n += mask.sum().item()
    model.train()
    loss = total_loss / total_n
    if args.task == "recall":
        return {"loss": loss, "acc": total_correct / total_n}
    if args.tokenizer == "word":
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}
    return {"loss": loss, "bpc": loss / math.log(2)}


def load_task(args):
    """recall: nothing to load. lm: the corpus laid out as batch_size parallel streams (a rank trains on its rows)."""
    if args.task == "recall":
        return {"vocab_size": args.vocab_size + 1}  # + the blank id
    train, valid, test, vocab = data.load_text(args.dataset, args.tokenizer, args.data_dir)
    return {"vocab_size": len(vocab), "vocab": vocab, "train": data.batchify(train, args.batch_size),
            "valid": data.batchify(valid, args.batch_size), "test": data.batchify(test, args.batch_size)}


def sample(args, device):
    """Generate args.sample tokens from out_dir/ckpt.pt, one token at a time, carrying the fast weights."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    if args.task != "lm":
        fail("--sample needs --task lm (and a checkpoint trained on text)")
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}; train first (python delta_net.py --task lm ...)")
    ckpt = read_checkpoint(path, "--sample", device)
    train_args, vocab = Args(**ckpt["args"]), ckpt["vocab"]
    if train_args.task != "lm":
        fail(f"the checkpoint at {path} was trained on --task {train_args.task}, not lm; it cannot generate text")
    train_args.impl = args.impl
    model = build_model(train_args, len(vocab)).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    index = {s: i for i, s in enumerate(vocab)}
    tokens = list(args.prompt) if train_args.tokenizer == "char" else args.prompt.split()
    ids = [index.get(s, index["<unk>"]) for s in tokens] or [index["<unk>"]]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        logits, state = model(torch.tensor([ids], device=device))  # the prompt in one parallel pass
        for _ in range(args.sample):  # then constant memory per token: only the fast weights are kept
            probs = F.softmax(logits[0, -1].float() / args.temperature, -1)
            ids.append(torch.multinomial(probs, 1, generator=gen).item())
            logits, state = model(torch.tensor([[ids[-1]]], device=device), state, pos=len(ids) - 1)
    sep = "" if train_args.tokenizer == "char" else " "
    print(sep.join(vocab[i] for i in ids).replace(" <eos> ", "\n"))


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


def setup_processes(args):
    """start_processes, then this script's device warnings -> rank, world, device, and the bf16 autocast context (a
    no-op unless --dtype bfloat16 on CUDA)."""
    rank, world, device = start_processes(args)
    if args.impl in ("cuda", "chunk_cuda") and device.type != "cuda":
        print(f"warning: --impl {args.impl} needs a CUDA device, not {device}; using --impl chunk", file=sys.stderr)
    use_bf16 = args.dtype == "bfloat16" and device.type == "cuda"
    if args.dtype == "bfloat16" and not use_bf16:
        print(f"warning: --dtype bfloat16 (autocast) is CUDA only; training in float32 on {device}", file=sys.stderr)
    return rank, world, device, torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)


def train_batch(args, task, step, gen, state):
    """This step's global batch, the same on every rank (recall: fresh pairs; lm: the next segment of every stream),
    and the state it starts from (a new pass over the corpus starts from empty fast weights)."""
    if args.task == "recall":
        return *recall_batch(args.batch_size, args.n_pairs, args.vocab_size, gen, args.repeat_keys), state
    i = step % data.n_segments(task["train"], args.seq_len)
    return *data.segment(task["train"], i, args.seq_len), None if i == 0 else state


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


def evaluate_and_log(model, args, task, step, device, autocast, master, world, t0):
    """valid (and test at the last step): rank 0 evaluates; every rank checks the losses (check_finite: a divergence
    stops all ranks alike, before anything is logged or saved); rank 0 logs and prints. Called by every rank."""
    results = {}
    for split in (["valid", "test"] if step == args.steps else ["valid"]) if master else []:
        results[split] = evaluate(model, args, task, split, device, autocast)
    results = gather_ranks(results if master else None, world)[0]  # rank 0's losses, checked by every rank alike
    for split in results:
        check_finite(step, args.out_dir, "Lower --lr or raise --warmup.", {f"the {split} loss": results[split]["loss"]},
                     [model])
        if master:
            log_metrics(args.out_dir, step, split, results[split], t0)
            tqdm.write(f"step {step} {split}: " + " ".join(f"{k} {v:.4f}" for k, v in results[split].items()))
    return results


def map_tensors(fn, x):
    """fn applied to every tensor of a state (tensors nested in lists and tuples; None stays None)."""
    if isinstance(x, (list, tuple)):
        return type(x)(map_tensors(fn, s) for s in x)
    return None if x is None else fn(x)


def train(args):
    rank, world, device, autocast = setup_processes(args)
    master = rank == 0
    seed_everything(args.seed + rank)  # each rank its own dropout masks; the initial weights are rank 0's (DDP)
    gen = torch.Generator().manual_seed(args.seed)  # the training data: every rank draws the same global batch
    try:
        task = load_task(args)
    except data.DataError as e:
        fail(str(e))
    model = build_model(args, task["vocab_size"]).to(device)
    opt = build_optimizer(model, args)
    step, state, ckpt_path = 0, None, os.path.join(args.out_dir, "ckpt.pt")
    if args.resume:
        ckpt = resume_from(ckpt_path, model, opt, device, args)
        step, state = ckpt["step"], map_tensors(lambda s: rank_slice(s, rank, world), ckpt["train_state"])
        gen.set_state(ckpt["rng"]["data"])
        if rank:  # the checkpoint holds rank 0's global RNGs: the other ranks draw dropout masks of their own
            seed_everything(args.seed + world * step + rank)
        # every rank reads the same checkpoint, so all return here alike (rank 0 says why); then a clean teardown
        with contextlib.nullcontext() if master else contextlib.redirect_stdout(io.StringIO()):
            done = nothing_left(args.out_dir, step, args.steps, args.stop_at, ckpt.get("final", True))
        if done:
            finish_processes(model, world, master)
            return
    ddp = model  # what the training steps call: the model, wrapped in DDP when there are several processes
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        if args.resume:  # at the last step: its evaluation is left, its lines from before a kill go
            truncate_metrics(args.out_dir, step, ["valid", "test"] if step == args.steps else [])
        print(f"config: {json.dumps(dataclasses.asdict(args))}")
        print(f"device {device}, {world} process(es), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"parameters, starting at step {step}")
    t0, bar, results, pending = time.time(), progress_bar(args.steps, step, master), None, []
    while step < args.steps:
        x, y, state = train_batch(args, task, step, gen, state)
        x, y = rank_slice(x, rank, world), rank_slice(y, rank, world)  # this rank's rows (lm: its streams)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with autocast:
            logits, new_state = ddp(x.to(device), state if args.carry_state else None)
        # every sequence has as many targets (recall: n_pairs, lm: the segment's length), so the mean over this rank's
        # rows, averaged over the ranks by DDP, is the global batch's mean and its gradient
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=-100)
        pending.append({"loss": optimizer_step(ddp, opt, loss, args, world)})
        state, step = detach_state(new_state) if args.carry_state else None, step + 1
        bar.update(1)
        evaluate_now = step % args.eval_every == 0 or step == args.steps or step == args.stop_at
        if step % args.log_every == 0 or evaluate_now:
            pending = log_train(args, step, pending, bar, master, t0)
        if evaluate_now:
            # the carried state of every stream (each rank holds its rows), so that any number of processes resumes
            train_state = map_tensors(lambda s: torch.cat(gather_ranks(s.cpu(), world)), state)
            results = evaluate_and_log(model, args, task, step, device, autocast, master, world, t0)
            if master:
                save_checkpoint(ckpt_path, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "args": dataclasses.asdict(args), "vocab": task.get("vocab"), "train_state": train_state,
                    "rng": dict(rng_state(), data=gen.get_state()), "final": step == args.steps})
            if step == args.stop_at:
                break
    bar.close()
    if step == args.steps and results is None:  # resumed at the last step of a longer run: its final evaluation
        results = evaluate_and_log(model, args, task, step, device, autocast, master, world, t0)
        if master:
            mark_final(ckpt_path)
    if master and step == args.steps:
        name = {"recall": "acc", "lm": "ppl" if args.tokenizer == "word" else "bpc"}[args.task]
        print(f"final: test {name} {results['test'][name]:.4f}, valid {name} {results['valid'][name]:.4f} after {step}"
              f" steps, {time.time() - t0:.0f}s")
    del ddp  # DDP holds the process group: release it here, not at interpreter exit (gloo aborts there)
    finish_processes(model, world, master)


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
    """Forward and forward+backward of each delta-rule implementation at B=4, H=4, d=bench_d, T in bench_T."""
    device = pick_device(args.device)
    B, H, D, C = 4, 4, args.bench_d, args.chunk_size
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    try:
        lengths = [int(t) for t in args.bench_T.split(",")]
    except ValueError:
        fail(f"--bench_T expects comma-separated integers, got {args.bench_T!r}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timeit(fn, reps):
        fn()
        times = []
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    # the reference rate: batched matmuls of the chunk form's own shape, (B H T/C, C, D) @ (.., D, C) at T=1024
    X, Y = torch.randn(B * H * 1024 // C, C, D, device=device), torch.randn(B * H * 1024 // C, D, C, device=device)
    bmm_rate = 2 * X.shape[0] * C * C * D / timeit(lambda: torch.bmm(X, Y), 20) / 1e9
    print(f"device {device}, threads {torch.get_num_threads()}, inputs {args.dtype}, d {D}; batched matmul"
          f" ({X.shape[0]}x{C}x{D} @ {D}x{C}, fp32): {bmm_rate:.1f} GFLOP/s")
    print("useful FLOPs: loop and kernel 6 d^2 per token (read, write, query); chunk per chunk of C: C^2 d (A, strict"
          " lower) + C^3/3 (T) + 2 C^2 d (T applied) + 2 C^2 d (QK^T, PU', causal halves) + 6 C d^2 (state);"
          " backward = 2x forward; the gated rule's rows are counted the same\nmem MiB: on CUDA the peak allocated; on"
          " CPU the tensors autograd saves for the backward")
    print(f"{'rule':6} {'impl':10} {'T':>6} {'fwd ms':>9} {'fwd+bwd ms':>11} {'tok/s (f+b)':>12} {'mem MiB':>9}"
          f" {'GFLOP/s':>8} {'% bmm':>6}")
    wanted = args.bench_impls.split(",")
    impls = [i for i in wanted if i in ("loop", "chunk")]
    if kernels(device.type) is not None:  # the fused kernel of this device (cuda: the same on a CUDA device)
        impls += [i for i in wanted if i == "kernel" or (device.type == "cuda" and i in ("cuda", "chunk_cuda"))]
    fb = {}  # (rule, impl, T) -> forward+backward seconds
    for T in lengths:
        g = torch.Generator().manual_seed(0)
        q, k = (F.normalize(torch.randn(B, H, T, D, generator=g), dim=-1).to(device, dtype) for _ in range(2))
        v, beta = torch.randn(B, H, T, D, generator=g).to(device, dtype), torch.rand(B, H, T, generator=g).to(device, dtype)
        log_alpha = (0.5 + 0.5 * torch.rand(B, H, T, generator=g)).log().to(device, dtype)  # alpha in (0.5, 1)
        for rule in ("delta", "gated"):
            for impl in impls:
                leaves = [t.clone().requires_grad_() for t in (q, k, v, beta)]
                gate = log_alpha.clone().requires_grad_() if rule == "gated" else None

                def fwd():
                    with torch.no_grad():
                        delta_rule(*leaves, impl=impl, chunk_size=C, g=gate)

                def fwd_bwd():
                    y, W = delta_rule(*leaves, impl=impl, chunk_size=C, g=gate)
                    torch.autograd.backward((y, W), (torch.ones_like(y), torch.ones_like(W)))

                reps = 3 if impl == "loop" else 10
                t_f, t_fb = timeit(fwd, reps), timeit(fwd_bwd, reps)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    fwd_bwd()
                    mem = torch.cuda.max_memory_allocated() / 2**20
                else:
                    mem = saved_mib(fwd_bwd)
                c = min(C, T)
                flops_fwd = B * H * T * 6 * D * D if impl in ("loop", "kernel", "cuda") else \
                    B * H * -(-T // c) * (c * c * D + c**3 / 3 + 4 * c * c * D + 6 * c * D * D)
                rate = 3 * flops_fwd / t_fb / 1e9
                fb[rule, impl, T] = t_fb
                print(f"{rule:6} {impl:10} {T:6d} {t_f * 1e3:9.1f} {t_fb * 1e3:11.1f} {B * T / t_fb:12.0f} {mem:9.1f}"
                      f" {rate:8.1f} {100 * rate / bmm_rate:5.0f}%", flush=True)
    for rule in ("delta", "gated"):
        pairs = [(T, fb[rule, "chunk", T] / fb[rule, "kernel", T]) for T in lengths
                 if (rule, "kernel", T) in fb and (rule, "chunk", T) in fb]
        if pairs:
            print(f"{rule}: kernel speed-up over chunk (fwd+bwd): " + ", ".join(f"T {T}: {r:.2f}x" for T, r in pairs))


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
    if args.sample:
        return sample(args, pick_device(args.device))
    open_out_dir(args)
    train(args)


if __name__ == "__main__":
    main()

