"""Linear Transformers: causal linear attention is a fast weight programmer with the sum rule.

Schlag, Irie, Schmidhuber, "Linear Transformers Are Secretly Fast Weight Programmers", ICML 2021,
arXiv 2102.11174 (section 3, eq. 1-5 and 14-16; DPFP in section 5.3; capacity in section 4 and 6.1).
Linear attention: Katharopoulos, Vyas, Pappas, Fleuret, "Transformers are RNNs", ICML 2020
(arXiv 2006.16236, eq. 4-6). FAVOR+: Choromanski et al., "Rethinking Attention with Performers",
ICLR 2021 (arXiv 2009.14794, section 2.3, Lemma 1).

The slow network (projections W_q, W_k, W_v) writes into a fast weight matrix W per head:
    q_t, k_t, v_t = phi(W_q x_t), phi(W_k x_t), W_v x_t     (phi: --phi elu1 | dpfp | favor | relu)
    W_t = W_{t-1} + v_t k_t^T                                (sum rule: every write adds, nothing is removed)
    z_t = z_{t-1} + k_t                                      (the normaliser, --normalize denom)
    y_t = W_t q_t / (z_t . q_t)                              (Katharopoulos et al.; --normalize sumnorm instead
                                                              divides q and k by their sums; none: y_t = W_t q_t)
Softmax attention y_t = sum_{i<=t} softmax_i(q_t . k_i / sqrt(d)) v_i is the same computation with an
infinite-dimensional phi; W_t then has no finite size and the cost grows as T^2 (--attn softmax, the baseline).
Block: x + Out(Attn(LN(x))), then x + FF(LN(x)); a final LN and the output head.

Glossary: b batch, h head, t time step, T sequence length, C chunk length, n chunk index,
d_head = d_model / n_head, d_phi the feature dimension (d_head; 2 nu d_head for DPFP-nu; n_features for
FAVOR+), W (d_head, d_phi) the fast weight of one head (fp32), z (d_phi) the sum of the keys,
omega (n_features, d_head) FAVOR+'s random projection, nu DPFP's number of rolls.

Forms (--impl, linear_attention): loop (the spec and the test oracle), chunk (sum_rule_chunk: no sequential step at
all), parallel (tril(phi(Q) phi(K)^T) V, quadratic: short T and an oracle), kernel (the device's fused kernel,
cpu_kernels.cpp on the CPU, cuda_kernels.cu on CUDA). The fast forms compute the plain sum rule; the denominator
rides along as one more value row. Every form takes and returns (W, z) (softmax attention its key/value cache), so
a stream is processed segment by segment (--carry_state) and text generated one token at a time (--sample N).

Fidelity. --normalize denom adds eps = 1e-6 to the denominator (as Katharopoulos et al.); the paper's (Schlag et al.)
sum normalisation is --normalize sumnorm. FAVOR+ uses no numerical stabiliser (the Performer code's max
subtraction): inputs are scaled by d^(-1/4) and the state is fp32; one projection per layer, shared by its heads,
redrawn from torch's global RNG (saved in checkpoints, so --resume stays exact). Positions (--pos_enc auto):
sinusoidal for --attn softmax (without them causal softmax attention sees the prefix as a set: tested) and for
--task lm unless --carry_state, as the official LM code; none for the linear forms on recall. --preset paper adds
--scale_out (the official LM layers) and the official LM optimizer: Adam (AdamW with weight decay 0, betas
0.9/0.999), cosine decay to 0; the CPU defaults keep AdamW (0.9, 0.98), weight decay 0.1 on matrices, cosine to
lr / 10.

Commands:
    python linear_transformer.py                             # associative recall, about 1.5 CPU minutes
    python linear_transformer.py --preset tiny --steps 20    # smoke run
    python linear_transformer.py --repeat_keys               # keys rewritten with new values: overwriting
    python linear_transformer.py --phi dpfp --dpfp_nu 2      # a larger feature space (2 nu d_head)
    python linear_transformer.py --attn softmax              # the quadratic baseline, same block
    python linear_transformer.py --task lm --dataset wikitext-103 --preset paper   # GPU, the paper's LM size
    python linear_transformer.py --bench                     # loop/chunk/parallel/kernel vs softmax over T

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
    """number of blocks"""
    n_head: int = 4
    """heads per layer; d_head = d_model / n_head"""
    d_ff: int = 512
    """feed-forward hidden width"""
    pos_enc: str = "auto"
    """auto (sin for --attn softmax, and for lm unless --carry_state, as the official LM code), sin (sinusoidal,
    added to the embedding) or none"""
    scale_out: bool = False
    """multiply the fast-weight output by 1/sqrt(d_head) before the output projection (the official LM layers)"""
    dropout: float = 0.0
    """dropout after the attention output and in the feed-forward block"""
    attn: str = "linear"
    """linear (the sum-rule fast weight programmer) or softmax (causal softmax attention, the baseline)"""
    phi: str = "elu1"
    """feature map of q and k: elu1 (elu(x)+1), dpfp (DPFP-nu), favor (FAVOR+ random features), relu"""
    normalize: str = "denom"
    """denom (y = W q / (z . q)), sumnorm (q, k divided by their sums, no denominator) or none"""
    dpfp_nu: int = 1
    """dpfp: rolls nu; d_phi = 2 nu d_head"""
    n_features: int = 64
    """favor: random features m = d_phi"""
    favor_redraw: int = 1000
    """favor: draw a new random projection every this many training steps (0: never)"""
    impl: str = "auto"
    """auto | loop | chunk | parallel | kernel | cuda: the sum rule's form. kernel: the fused recurrent kernel of the
    device (cpu_kernels.cpp on the CPU, cuda_kernels.cu on CUDA; cuda: the same on CUDA); auto: on CUDA the kernel for
    T < 1024, else chunk; on the CPU the kernel (--bench measured it faster than chunk at every size tried)"""
    chunk_size: int = 64
    """chunk length C of the chunkwise form"""
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
    out_dir: str = "out/linear_transformer"
    """metrics.jsonl and ckpt.pt go here"""
    resume: bool = False
    """continue the run in out_dir from its ckpt.pt (the only way to add to a run there)"""
    overwrite: bool = False
    """start a new run in an out_dir that holds one: delete its ckpt.pt and metrics.jsonl first (without
    this flag or --resume, such a run stops before writing anything)"""
    stop_at: int = 0
    """exit after this step, checkpoint saved (a time-boxed job); --resume continues. 0: run to the end"""
    bench: bool = False
    """run the speed/memory benchmark of the sum-rule implementations and softmax attention, and exit"""
    bench_T: str = "256,1024,4096,16384"
    """--bench: comma-separated sequence lengths (B=4, H=4)"""
    bench_d: int = 64
    """--bench: d_phi = d_head"""
    bench_impls: str = "loop,chunk,parallel,kernel,softmax"
    """--bench: which implementations (kernel where the device's kernel file builds; cuda only on CUDA)"""


PRESETS = {
    "tiny": dict(d_model=32, n_layer=1, n_head=2, d_ff=64, n_pairs=4, vocab_size=16, batch_size=8, steps=20,
                 eval_every=10, eval_batches=2, seq_len=32, warmup=5),
    # WikiText-103 "small" of the official code (16 layers, d 128, 8 heads of 16, FF 2048, segments of 256,
    # lr 2.5e-4, 2k warm-up, cosine over 500k steps, clip 0.25); their adaptive input/softmax is not used here.
    # The paper's linear Transformer there: elu1 with the denominator (its Table 2 "Linear")
    "paper": dict(task="lm", dataset="wikitext-103", d_model=128, n_layer=16, n_head=8, d_ff=2048, dropout=0.1,
                  seq_len=256, batch_size=96, steps=500_000, lr=2.5e-4, warmup=2000, grad_clip=0.25, eval_every=5000,
                  weight_decay=0.0, beta2=0.999, lr_min=0.0,  # the official optimizer: Adam, cosine to 0
                  pos_enc="sin", scale_out=True),  # the official LM model: positions, output scaled
}


# ----------------------------------------------------------------------------------------------
# The sum rule: the reference loop (the spec), and softmax attention (the baseline). Shapes: q, k (B, H, T, d_phi)
# already feature-mapped; v (B, H, T, d_v); W (B, H, d_v, d_phi); z (B, H, d_phi). The state of one layer is (W, z),
# with z None unless normalize is denom.

EPS = 1e-6  # keeps the denominator and the sum normalisation finite when a feature vector is all zeros (relu)


def state_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear_attention_loop(q, k, v, state=None, denom=True):
    """The reference recurrence (the spec and the test oracle): one step per token, fp32 state."""
    B, H, T, d_phi = k.shape
    dt = state_dtype(q)
    W, z = state if state is not None else (None, None)
    W = q.new_zeros(B, H, v.shape[-1], d_phi, dtype=dt) if W is None else W.to(dt)
    z = q.new_zeros(B, H, d_phi, dtype=dt) if z is None else z.to(dt)
    ys = []
    with torch.autocast(q.device.type, enabled=False):  # the state and its products stay fp32 under autocast
        for q_t, k_t, v_t in zip(*(x.to(dt).unbind(2) for x in (q, k, v))):
            W = W + v_t.unsqueeze(-1) * k_t.unsqueeze(-2)  # W_t = W_{t-1} + v_t k_t^T
            y_t = (W @ q_t.unsqueeze(-1)).squeeze(-1)  # W_t q_t
            if denom:
                z = z + k_t  # z_t = z_{t-1} + k_t
                y_t = y_t / ((z * q_t).sum(-1, keepdim=True) + EPS)  # / (z_t . q_t)
            ys.append(y_t)
    return torch.stack(ys, 2).to(q.dtype), (W, z if denom else None)


def softmax_attention(q, k, v, cache=None):
    """Causal softmax attention, the quadratic baseline. Its state is every past key and value (a KV cache)."""
    if cache is not None:
        k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
    T, P = q.shape[2], k.shape[2] - q.shape[2]  # P earlier positions in the cache
    mask = None if P == 0 else torch.ones(T, P + T, dtype=torch.bool, device=q.device).tril(P)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=P == 0)
    return y, (k, v)


# ----------------------------------------------------------------------------------------------
# Feature maps phi: (..., d_head) -> (..., d_phi) (elu1 and relu are torch's)


def dpfp(x, nu):
    """DPFP-nu (Schlag et al. 2021, section 5.3, eq. 37): r = relu([x, -x]) (2 d), phi_{i 2d + j} = r_j r_{j+i}
    for i = 1..nu (indices mod 2d): d_phi = 2 nu d, sparse, non-negative, and orthogonal for distinct signs."""
    r = F.relu(torch.cat([x, -x], -1))
    return torch.cat([r * r.roll(-i, -1) for i in range(1, nu + 1)], -1)


def favor_projection(m, d, generator=None):
    """m random directions (m, d) for FAVOR+: blocks of d orthogonal rows (Haar, via QR with the sign fix), each
    row rescaled to the norm of a fresh Gaussian vector, so each row is marginally N(0, I_d) (Performer, ORF)."""
    blocks = []
    for _ in range(-(-m // d)):
        Q, R = torch.linalg.qr(torch.randn(d, d, generator=generator))
        blocks.append((Q * torch.sign(torch.diagonal(R))).T)
    return torch.cat(blocks)[:m] * torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)


def favor_features(x, omega):
    """FAVOR+ positive random features (Choromanski et al. 2021, Lemma 1) on x scaled by d^(-1/4):
    phi(x) = exp(omega x - |x|^2 / 2) / sqrt(m), so E[phi(q) . phi(k)] = exp(q . k / sqrt(d)), the softmax kernel."""
    x = x * x.shape[-1] ** -0.25
    omega = omega.to(x.dtype)
    return torch.exp(x @ omega.T - x.pow(2).sum(-1, keepdim=True) / 2) / math.sqrt(omega.shape[0])


# ----------------------------------------------------------------------------------------------
# Layers: plain modules built from keyword arguments, checked on construction.

ATTNS = ("linear", "softmax")
PHIS = ("elu1", "dpfp", "favor", "relu")
NORMALIZES = ("denom", "sumnorm", "none")
IMPLS = ("auto", "loop", "chunk", "parallel", "kernel", "cuda")
POS_ENCS = ("sin", "none")


def check_model_args(flag="", **kw):
    """The checks of the layers' and the model's keyword arguments (each constructor passes those it reads): a
    ValueError naming the argument and the fix. check_args runs them on the flags (flag="--": the same messages)."""
    choices = dict(attn=ATTNS, phi=PHIS, normalize=NORMALIZES, impl=IMPLS, pos_enc=POS_ENCS)
    for key, value in kw.items():
        if key in choices and value not in choices[key]:
            raise ValueError(f"{flag}{key} must be one of {', '.join(choices[key])}, got {value!r}")
        if key in ("vocab_size", "d_model", "n_head", "n_layer", "d_ff", "dpfp_nu", "n_features", "chunk_size"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{flag}{key} must be an integer, got {value!r}")
            if value <= 0:
                raise ValueError(f"{flag}{key} must be positive, got {value}")
    if "dropout" in kw and not 0 <= kw["dropout"] < 1:
        raise ValueError(f"{flag}dropout must be in [0, 1), got {kw['dropout']}")
    if "d_model" in kw and "n_head" in kw and kw["d_model"] % kw["n_head"]:
        raise ValueError(f"{flag}d_model {kw['d_model']} is not divisible by {flag}n_head {kw['n_head']}; pick n_head "
                         "dividing d_model.")


class AttentionLayer(nn.Module):
    """Multi-head linear (or softmax) attention: x (B, T, d_model) and a state or None (empty) -> y (B, T, d_model)
    and the new state. attn linear: the state is (W, z), W (B, n_head, d_head, d_phi) and z (B, n_head, d_phi) (z None
    unless normalize is denom), fp32 (float64 for float64 inputs), also under autocast; attn softmax: (K, V), every
    past key and value, each (B, n_head, T_past, d_head).
    phi: the feature map of q and k (feature_map; dpfp_nu for dpfp, n_features = d_phi for favor, whose random
    projection omega is a buffer); normalize: denom (y = W q / (z . q)), sumnorm or none; impl: the sum rule's form
    (linear_attention); chunk_size: C of the chunk form; scale_out: y / sqrt(d_head) before the output projection
    (the official LM layers; linear attention only)."""

    def __init__(self, d_model=128, n_head=4, attn="linear", phi="elu1", normalize="denom", dpfp_nu=1, n_features=64,
                 impl="auto", chunk_size=64, scale_out=False):
        super().__init__()
        check_model_args(d_model=d_model, n_head=n_head, attn=attn, phi=phi, normalize=normalize, dpfp_nu=dpfp_nu,
                         n_features=n_features, impl=impl, chunk_size=chunk_size)
        self.d_model, self.n_head, self.d_head = d_model, n_head, d_model // n_head
        self.attn, self.phi, self.dpfp_nu, self.normalize = attn, phi, dpfp_nu, normalize
        self.impl, self.chunk_size, self.scale_out = impl, chunk_size, scale_out
        self.d_phi = {"dpfp": 2 * dpfp_nu * self.d_head, "favor": n_features}.get(phi, self.d_head)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)  # W_q, W_k, W_v
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.out_scale = self.d_head ** -0.5 if scale_out else 1.0
        if attn == "linear" and phi == "favor":  # a buffer: moves with .to(), saved in checkpoints, never trained
            self.register_buffer("omega", favor_projection(n_features, self.d_head))

    def extra_repr(self):
        s = f"d_model={self.d_model}, n_head={self.n_head}, d_head={self.d_head}, attn={self.attn!r}"
        if self.attn == "softmax":
            return s
        nu = f", dpfp_nu={self.dpfp_nu}" if self.phi == "dpfp" else ""
        return (s + f", phi={self.phi!r}{nu}, d_phi={self.d_phi}, normalize={self.normalize!r}, impl={self.impl!r}, "
                f"chunk_size={self.chunk_size}, scale_out={self.scale_out}")

    def feature_map(self, x):
        """phi of q and k: (..., d_head) -> (..., d_phi); sumnorm divides by the sum."""
        if self.phi == "elu1":
            x = F.elu(x) + 1
        elif self.phi == "relu":
            x = F.relu(x)
        elif self.phi == "dpfp":
            x = dpfp(x, self.dpfp_nu)
        else:
            x = favor_features(x, self.omega)
        return x / (x.sum(-1, keepdim=True) + EPS) if self.normalize == "sumnorm" else x

    def forward(self, x, state=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        if self.attn == "softmax":
            y, state = softmax_attention(q, k, v, state)
        else:
            q, k = self.feature_map(q), self.feature_map(k)  # (B, H, T, d_phi)
            y, state = linear_attention(q, k, v, state, self.normalize == "denom", self.impl, self.chunk_size)
            y = y * self.out_scale
        return self.out(y.transpose(1, 2).reshape(B, T, -1)), state

    @torch.no_grad()
    def redraw_features(self, generator=None):
        """FAVOR+: a fresh random projection omega (from generator, or torch's global RNG)."""
        self.omega.copy_(favor_projection(*self.omega.shape, generator=generator))


class Block(nn.Module):
    """x + Dropout(AttentionLayer(LN(x))), then x + FF(LN(x)) with FF = Linear, ReLU, Dropout, Linear, Dropout:
    x (B, T, d_model) and the layer's state (as AttentionLayer) or None -> (B, T, d_model), the new state."""

    def __init__(self, d_model=128, n_head=4, d_ff=512, dropout=0.0, attn="linear", phi="elu1", normalize="denom",
                 dpfp_nu=1, n_features=64, impl="auto", chunk_size=64, scale_out=False):
        super().__init__()
        check_model_args(d_model=d_model, n_head=n_head, d_ff=d_ff, dropout=dropout, attn=attn, phi=phi,
                         normalize=normalize, dpfp_nu=dpfp_nu, n_features=n_features, impl=impl, chunk_size=chunk_size)
        self.d_model, self.d_ff, self.dropout = d_model, d_ff, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = AttentionLayer(d_model, n_head, attn, phi, normalize, dpfp_nu, n_features, impl, chunk_size,
                                   scale_out)
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


class LinearTransformer(nn.Module):
    """Token ids (B, T) and a state (a list of n_layer layer states, as AttentionLayer, or None) -> logits
    (B, T, vocab_size), the new state. Ids of shape (B, T, m) give m ids per position whose embeddings are summed (the
    recall task). pos_enc: sin (sinusoidal positions added to the embedding) or none; the rest as Block."""

    def __init__(self, vocab_size, d_model=128, n_head=4, n_layer=2, d_ff=512, dropout=0.0, pos_enc="none",
                 attn="linear", phi="elu1", normalize="denom", dpfp_nu=1, n_features=64, impl="auto", chunk_size=64,
                 scale_out=False):
        super().__init__()
        check_model_args(vocab_size=vocab_size, d_model=d_model, n_head=n_head, n_layer=n_layer, d_ff=d_ff,
                         dropout=dropout, pos_enc=pos_enc, attn=attn, phi=phi, normalize=normalize, dpfp_nu=dpfp_nu,
                         n_features=n_features, impl=impl, chunk_size=chunk_size)
        self.vocab_size, self.d_model, self.n_layer, self.pos_enc = vocab_size, d_model, n_layer, pos_enc
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_head, d_ff, dropout, attn, phi, normalize, dpfp_nu, n_features,
                                          impl, chunk_size, scale_out) for _ in range(n_layer))
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
        for block, s in zip(self.blocks, state):
            x, s = block(x, s)
            new_state.append(s)
        return self.head(self.ln_f(x)), new_state

    def redraw_features(self, generator=None):
        """FAVOR+: a fresh random projection in every layer (from generator, or torch's global RNG, which training
        uses and checkpoints save)."""
        for block in self.blocks:
            if hasattr(block.attn, "omega"):
                block.attn.redraw_features(generator)


# ----------------------------------------------------------------------------------------------
# The fast forms of the sum rule: chunkwise, parallel (the attention form), the fused recurrent kernel (CUDA), and
# linear_attention, which picks one (impl).


def sum_rule_chunk(q, k, v, W=None, chunk_size=64):
    """Chunkwise form of the plain sum rule (y_t = W_t q_t): within a chunk of C steps the outputs are a causal
    (C x C) masked matmul, across chunks the state is a prefix sum of the chunks' writes K_n^T V_n:
        W_n = W_0 + sum_{m<n} V_m^T K_m        Y_n = Q_n W_n^T + tril(Q_n K_n^T) V_n
    No step depends on another through a nonlinearity, so all chunks run at once (autograd does the backward)."""
    B, H, T, d_phi = k.shape
    d_v, dt = v.shape[-1], state_dtype(q)
    C = min(chunk_size, T)
    N = -(-T // C)

    def chunks(x):  # (B, H, T, D) -> (B, H, N, C, D), zero-padded; a zero key writes nothing
        return F.pad(x.to(dt), (0, 0, 0, N * C - T)).reshape(B, H, N, C, x.shape[-1])

    W0 = q.new_zeros(B, H, d_v, d_phi, dtype=dt) if W is None else W.to(dt)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = chunks(q), chunks(k), chunks(v)
        writes = v.transpose(-1, -2) @ k  # (B, H, N, d_v, d_phi): sum over the chunk of v_t k_t^T
        W_n = torch.cat([W0.unsqueeze(2), writes], 2).cumsum(2)  # (B, H, N + 1, d_v, d_phi): W at chunk starts
        y = q @ W_n[:, :, :-1].transpose(-1, -2) + (q @ k.transpose(-1, -2)).tril() @ v  # inter + intra chunk
    return y.reshape(B, H, N * C, d_v)[:, :, :T], W_n[:, :, -1]


def sum_rule_parallel(q, k, v, W=None):
    """The attention form: Y = tril(Q K^T) V (+ Q W_0^T). Quadratic in T; the short-T test oracle."""
    dt = state_dtype(q)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        y = (q @ k.transpose(-1, -2)).tril() @ v  # (B, H, T, T) scores, causal mask
        W_T = v.transpose(-1, -2) @ k  # the fast weight the T writes add up to
        if W is not None:
            y, W_T = y + q @ W.to(dt).transpose(-1, -2), W_T + W.to(dt)
    return y, W_T


class SumRuleKernel(torch.autograd.Function):
    """The recurrent sum rule as one fused kernel per pass (delta=False): cpu_kernels.cpp on the CPU (float32/64),
    cuda_kernels.cu on CUDA (state fp32); the two files have the same functions. The backward undoes each write."""

    @staticmethod
    def forward(ctx, q, k, v, W0):
        ext = kernels(q.device.type)
        y, W, _ = ext.forward(q, k, v, q.new_empty(0), q.new_empty(0) if W0 is None else W0, False)
        ctx.save_for_backward(q, k, v, W)
        ctx.has_W0 = W0 is not None
        return y, W

    @staticmethod
    def backward(ctx, dy, dW):
        q, k, v, W = ctx.saved_tensors
        dy = v.new_zeros(v.shape) if dy is None else dy.contiguous()
        dW = W.new_empty(0) if dW is None else dW.contiguous()
        dq, dk, dv, _, dW0 = kernels(q.device.type).backward(q, k, v, q.new_empty(0), q.new_empty(0), W, dy, dW, False)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dW0 if ctx.has_W0 else None


# --impl auto on the CPU is the kernel: `python linear_transformer.py --bench` on 2 CPU cores measured it faster than
# the chunk form at every size tried (d_phi 16 to 128, T 64 to 4096 per call; RESULTS.md).


def use_kernel(impl, q):
    """Whether linear_attention runs the fused recurrent kernel: on a CUDA device for impl cuda and kernel, and for
    auto where T < 1024 (d_phi <= 128; measured fastest there on an H200, RESULTS.md); on the CPU for impl auto and
    kernel; where the kernel file builds."""
    T, d_phi = q.shape[2], q.shape[3]
    if q.is_cuda:
        wanted = (impl in ("cuda", "kernel") or (impl == "auto" and T < 1024)) and d_phi <= 128
    else:
        wanted = q.device.type == "cpu" and impl in ("auto", "kernel")
    return wanted and T > 0 and kernels(q.device.type) is not None


def linear_attention(q, k, v, state=None, denom=True, impl="auto", chunk_size=64):
    """Dispatch to an implementation; all take and return the state (W, z). kernel: the fused kernel of the inputs'
    device; auto: the kernel where use_kernel says, else chunk. loop is the recurrence; the
    fast forms compute the plain sum rule, and the denominator rides along as one more value row: z_t . q_t =
    sum_{i<=t} (k_i . q_t) * 1, so the sum rule on v_t extended by a constant 1 stores z as W's last row.
    An unknown impl is a ValueError."""
    check_model_args(impl=impl)
    if impl == "loop":
        return linear_attention_loop(q, k, v, state, denom)
    W, z = state if state is not None else (None, None)
    if denom:
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # (B, H, T, d_v + 1)
        if W is not None:
            z = W.new_zeros(W.shape[:2] + W.shape[-1:]) if z is None else z
            W = torch.cat([W, z.unsqueeze(-2)], -2)  # (B, H, d_v + 1, d_phi)
    if impl != "parallel" and use_kernel(impl, q):
        dt = state_dtype(q) if not q.is_cuda else \
            torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)  # autocast may mix bf16 and fp32
        q_, k_, v_ = (x.to(dt).contiguous() for x in (q, k, v))
        y, W = SumRuleKernel.apply(q_, k_, v_, None if W is None else W.contiguous())
    elif impl == "parallel":
        y, W = sum_rule_parallel(q, k, v, W)
    else:
        y, W = sum_rule_chunk(q, k, v, W, chunk_size)
    y, z = y.to(state_dtype(q)), None
    if denom:
        y, W, z = y[..., :-1] / (y[..., -1:] + EPS), W[..., :-1, :], W[..., -1, :]  # W q / (z . q), then split
    return y.to(q.dtype), (W, z)


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
# The command line and the model: build_model maps the flags to LinearTransformer's keywords (each flag has its
# keyword's name); check_args checks a command line's values, the model's through the constructors' own checks.

MODEL_FLAGS = ("d_model", "n_head", "n_layer", "d_ff", "dropout", "pos_enc", "attn", "phi", "normalize", "dpfp_nu",
               "n_features", "impl", "chunk_size", "scale_out")


RESUME_FLAGS = ("task", "vocab_size", "tokenizer", "d_model", "n_head", "n_layer", "d_ff", "pos_enc", "attn", "phi",
                "normalize", "dpfp_nu", "n_features", "scale_out")  # what a --resume must share with its checkpoint


def build_model(args, vocab_size):
    return LinearTransformer(vocab_size, **{name: getattr(args, name) for name in MODEL_FLAGS})


def check_args(args):
    """What only the command line knows (the task and training flags, --pos_enc auto, flag combinations); the model's
    flags through check_model_args. An error exits with its one-line message (status 2)."""
    choices = dict(task=("recall", "lm"), tokenizer=("word", "char"), pos_enc=("auto", *POS_ENCS),
                   dtype=("float32", "bfloat16"))
    for key, allowed in choices.items():
        if getattr(args, key) not in allowed:
            fail(f"--{key} must be one of {', '.join(allowed)}, got {getattr(args, key)!r}")
    if args.pos_enc == "auto":
        args.pos_enc = "sin" if (args.attn == "softmax" or args.task == "lm" and not args.carry_state) else "none"
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
    if args.lr <= 0 or min(args.warmup, args.grad_clip, args.stop_at, args.favor_redraw) < 0:
        fail("--lr must be positive; --warmup, --grad_clip, --stop_at and --favor_redraw non-negative.")
    if not 0 <= args.beta2 < 1 or not 0 <= args.lr_min <= 1:
        fail(f"--beta2 must be in [0, 1) and --lr_min in [0, 1], got {args.beta2} and {args.lr_min}.")
    if args.attn == "softmax" and args.carry_state:
        fail("--carry_state needs --attn linear: softmax attention's state (all past keys and values) grows with "
             "the stream instead of staying one d_head x d_phi matrix.")
    return args


# ----------------------------------------------------------------------------------------------
# Training


def detach_state(state):
    """Per layer (W, z) (z None without the denominator) or a softmax layer's (K, V) cache, cut from the graph."""
    return None if state is None else [tuple(None if s is None else s.detach() for s in layer) for layer in state]


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
    """Generate args.sample tokens from out_dir/ckpt.pt, one token at a time, carrying the fast weights (or, for
    softmax attention, a cache of every past key and value)."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    if args.task != "lm":
        fail("--sample needs --task lm (and a checkpoint trained on text)")
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}; train first (python linear_transformer.py --task lm ...)")
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
    if args.impl == "cuda" and device.type != "cuda":
        print(f"warning: --impl cuda needs a CUDA device, not {device}; using --impl chunk", file=sys.stderr)
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
        redraw = args.attn == "linear" and args.phi == "favor" and args.favor_redraw
        if redraw and step > 0 and step % args.favor_redraw == 0:
            model.redraw_features()  # every rank computes with rank 0's: DDP broadcasts the buffers in each forward
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
    """Forward and forward+backward of each sum-rule implementation and of softmax attention at B=4, H=4,
    d = bench_d, T in bench_T: linear against quadratic cost, and the T from which the chunk form wins."""
    device = pick_device(args.device)
    B, H, D, C = 4, 4, args.bench_d, args.chunk_size
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    try:
        lengths = [int(t) for t in args.bench_T.split(",")]
    except ValueError:
        fail(f"--bench_T expects comma-separated integers, got {args.bench_T!r}")
    impls = [i for i in args.bench_impls.split(",") if i in ("loop", "chunk", "parallel", "softmax")]
    fused = [i for i in args.bench_impls.split(",") if i == "kernel" or (i == "cuda" and device.type == "cuda")]
    if fused and kernels(device.type) is not None:  # the device's fused kernel (cuda: the same on a CUDA device)
        for i in fused:
            impls.insert(impls.index("softmax") if "softmax" in impls else len(impls), i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mem_limit = 0.25 * (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else
                        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def timeit(fn, reps):
        times = []
        for _ in range(reps + 1):  # the first call warms up and is not counted; calls over 2 s are timed once
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
            if len(times) == 2 and times[1] > 2:
                break
        return float(np.median(times[1:]))

    print(f"device {device}, threads {torch.get_num_threads()}, inputs {args.dtype}, B {B}, H {H}, d_phi = d_v = {D},"
          f" chunk {C}; linear forms: the plain sum rule y_t = W_t q_t; softmax: F.scaled_dot_product_attention, causal")
    print("mem MiB: on CUDA the peak allocated; on CPU the tensors autograd saves for the backward")
    print(f"{'impl':8} {'T':>6} {'fwd ms':>9} {'fwd+bwd ms':>11} {'tok/s (f+b)':>12} {'mem MiB':>9}")
    fb = {}  # (impl, T) -> forward+backward seconds
    for T in lengths:
        g = torch.Generator().manual_seed(0)
        q, k = (F.elu(torch.randn(B, H, T, D, generator=g)).add(1).to(device, dtype) for _ in range(2))
        v = torch.randn(B, H, T, D, generator=g).to(device, dtype)
        for impl in impls:
            if impl == "parallel" and 3 * B * H * T * T * 4 > mem_limit:  # the (T, T) scores, kept for backward
                print(f"{impl:8} {T:6d}   skipped: its T x T scores need {3 * B * H * T * T * 4 / 2**30:.0f} GiB")
                continue
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]

            def run():
                if impl == "softmax":
                    return softmax_attention(*leaves)
                return linear_attention(*leaves, denom=False, impl=impl, chunk_size=C)

            def fwd():
                with torch.no_grad():
                    run()

            def fwd_bwd():
                y, _ = run()
                y.backward(torch.ones_like(y))

            reps = 3 if impl == "loop" else 10
            t_f, t_fb = timeit(fwd, reps), timeit(fwd_bwd, reps)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                fwd_bwd()
                mem = torch.cuda.max_memory_allocated() / 2**20
            else:
                mem = saved_mib(fwd_bwd)
            fb[impl, T] = t_fb
            print(f"{impl:8} {T:6d} {t_f * 1e3:9.1f} {t_fb * 1e3:11.1f} {B * T / t_fb:12.0f} {mem:9.1f}", flush=True)
    pairs = [(T, fb["chunk", T] / fb["kernel", T]) for T in lengths if ("kernel", T) in fb and ("chunk", T) in fb]
    if pairs:
        print("kernel speed-up over chunk (fwd+bwd): " + ", ".join(f"T {T}: {r:.2f}x" for T, r in pairs))
    for fast in ("chunk", "kernel", "cuda"):
        pairs = [(T, fb[fast, T] < fb["softmax", T]) for T in lengths if (fast, T) in fb and ("softmax", T) in fb]
        if pairs:
            wins = [T for T, win in pairs if win]
            print(f"{fast} vs softmax (fwd+bwd): " + (f"{fast} faster from T = {wins[0]}" if wins else
                                                      f"softmax faster at every T measured (up to {pairs[-1][0]})")
                  + "; " + ", ".join(f"T {T}: {fb['softmax', T] / fb[fast, T]:.2f}x" for T, _ in pairs))


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

