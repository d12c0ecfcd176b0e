"""Recurrent fast weight programmers: Delta RNN, Delta LSTM, Recurrent Delta Net, Delta MLP, Delta Delta Net.

Irie, Schlag, Csordas, Schmidhuber, "Going Beyond Linear Transformers with Recurrent Fast Weight Programmers",
NeurIPS 2021, arXiv 2106.06295 (section 2: eq. 4-7 DeltaNet, 8-11 Delta MLP, 12-16 Delta Delta Net, 17-20 Delta
RNN, 21-27 Delta LSTM, 28-32 Recurrent Delta Net). Derived from delta_net.py: same Args style, training loop,
checkpoints and --bench; one state-carrying interface for every model; two algorithmic tasks; and the paper's RL
setting (section 4.4), an IMPALA agent (Espeholt et al. 2018, arXiv 1802.01561) whose core is any of these models.

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
Block: x + Out(FWP(LN(x))), then x + FF(LN(x)) (--post_ln: LN(x + Out(FWP(x))), then LN(x + FF(x)), the official
Transformer baseline's form); a final LN and the output head. The fast weights and recurrent
states start at zero; the output is read after the step's write. Layers whose keys depend only on the current
input (linear, delta, delta_mlp, delta_delta, and the W parts of delta_rnn and delta_lstm) train in the
chunkwise-parallel form; the recurrent parts step through time. With --impl kernel every part runs as one fused
kernel per pass instead, forward and backward: cpu_kernels.cpp on the CPU (the default there, --impl auto),
cuda_kernels.cu on a CUDA device. Both are JIT-built on first use (a C++ compiler and ninja; nvcc for CUDA); without
them the PyTorch forms run, after one warning.

Glossary: b batch, h head, t time step, T sequence length, C chunk length, d = d_head = d_model / n_head,
W, R (d, d) fast weights of one head (fp32), beta in (0, 1) a write strength, s the recurrent input of a step.

Commands:
    python rfwp.py                                        # rdn on code execution, about 2 CPU minutes
    python rfwp.py --preset tiny --steps 20               # smoke run
    python rfwp.py --model rdn --task listops             # sequential ListOps (depth 4; the paper: 10, 15)
    python rfwp.py --preset paper --model delta_rnn       # GPU: the paper's code execution setting
    python rfwp.py --task lm --dataset wikitext-2 --model delta_lstm --carry_state
    python rfwp.py --bench                                # training speed and memory of every model
    python rfwp.py --task rl --model delta                # CartPole without velocities: needs memory, ~2.5 CPU minutes
    python rfwp.py --task rl --env ALE/Breakout-v5 --model rdn --env_steps 50_000_000   # Atari (GPU advised)
    python rfwp.py --task rl --model delta --eval 100     # the greedy policy of out/rfwp/ckpt.pt, 100 episodes

RL (--task rl): per environment step, obs -> encoder (IMPALA CNN or MLP) -> [features, clipped last reward] ->
core (one step, state carried across unrolls, zeroed where an episode ended; by default the official RL code's core
forms, --official_rl_core) -> policy logits, baseline V. Loss per
unroll of T steps: V-trace targets v_s and advantages, -sum log pi(a_s) A_s + 0.5 baseline_cost sum (v_s - V(x_s))^2
- entropy_cost sum H(pi(.|x_s)). Gradients flow through the fast weights within an unroll (--truncate 1 detaches).
"""

import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data

MODELS = ("lstm", "transformer", "linear", "delta", "delta_mlp", "delta_delta", "delta_rnn", "delta_lstm", "rdn")


# ----------------------------------------------------------------------------------------------
# Fast-weight updates. Shapes: q, k (B, H, T, d_k); v (B, H, T, d_v); beta (B, H, T); W (B, H, d_v, d_k).


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


_KERNELS = {}  # device type -> the loaded extension, or False once its build failed
KERNEL_FILES = {"cpu": "cpu_kernels.cpp", "cuda": "cuda_kernels.cu"}
# --impl auto on the CPU is --impl kernel: every kernel of cpu_kernels.cpp measured faster than its PyTorch form on 2
# CPU cores, at the default size (`python rfwp.py --bench`: the rows kernel against chunk), at one step per call
# (`--task rl --bench`) and, for the delta rule, at d_head 16 to 128 and T 256 to 1024 against the chunk form.


def kernels(device_type):
    """The fused kernels of a device (cpu_kernels.cpp on the CPU, cuda_kernels.cu on CUDA: the same functions), built
    and loaded on first use (never at import). The build runs on a copy of the source named by a hash of it and of
    torch's version, so an edit rebuilds, two scripts never clash and a copied script reuses the build. None, after one
    warning, if that fails (no compiler, no ninja, no nvcc): the PyTorch forms run instead. The CPU build is for this
    CPU (-march=native: its vector units; cpu_features names it). None for a device without a kernel file (mps)."""
    if device_type not in KERNEL_FILES:
        return None
    if device_type not in _KERNELS:
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), KERNEL_FILES[device_type])
        try:
            from torch.utils.cpp_extension import load

            with open(src, "rb") as f:
                code = f.read()
            digest = hashlib.sha256(code + torch.__version__.encode() + cpu_features().encode()).hexdigest()[:16]
            name = f"fwp_{device_type}_kernels_{digest}"  # one build for every script
            root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                           "torch_extensions")
            build = os.path.join(root, name)
            os.makedirs(build, exist_ok=True)
            copy = os.path.join(build, os.path.basename(src))
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
    return _KERNELS[device_type] or None


def cpu_features():
    """The CPU's instruction sets, which a -march=native build uses: part of the build's name, so that a build folder
    shared by machines of other CPUs (a home directory on a cluster) is never loaded where it would not run."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.machine() + platform.processor()


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


# ----------------------------------------------------------------------------------------------
# The recurrent parts: the reference loops (the spec), then the fused kernels of cuda_kernels.cu. Inputs
# (B, H, T, d) and beta (B, H, T) come from the layer's input x; states are fp32 (fp64 for fp64 inputs).


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


def rdn_loop(q, k, v, b, R, r_b, W, y):
    """Recurrent Delta Net (eq. 28-32): for each t, with s = tanh(y_{t-1}): q' = softmax(q_t + R_q s),
    k' = softmax(k_t + R_k s), v' = v_t + R_v s, beta = sigmoid(b_t + r_b . s); W_t by the delta rule from k', v',
    beta; y_t = W_t q'. b (B, H, T); R (3, H, d, d) = R_q, R_k, R_v; r_b (H, d); W (B, H, d, d), y (B, H, d)
    -> ys (B, H, T, d), W_T, y_T."""
    ys = []
    for t in range(q.shape[2]):
        s = torch.tanh(y)  # (B, H, d)
        rq, rk, rv = torch.einsum("rhij,bhj->rbhi", R, s)
        beta = torch.sigmoid(b[:, :, t] + (r_b * s).sum(-1))
        W = delta_step(W, F.softmax(k[:, :, t] + rk, -1), v[:, :, t] + rv, beta)
        y = (W @ F.softmax(q[:, :, t] + rq, -1).unsqueeze(-1)).squeeze(-1)
        ys.append(y)
    return torch.stack(ys, 2), W, y


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
    matrices); the slow weights' gradients are sums over b and t of outer products with s_t = tanh(y_{t-1})."""

    @staticmethod
    def forward(ctx, q, k, v, b, R, r_b, W0, y0):
        ys, W, *saved = kernels(q.device.type).rdn_forward(q, k, v, b, R, r_b, W0, y0, any(ctx.needs_input_grad))
        ctx.save_for_backward(R, r_b, *saved, ys, y0, W)
        ctx.q_dtype = q.dtype
        return ys, W, ys[:, :, -1].clone()

    @staticmethod
    def backward(ctx, dys, dW, dy_T):
        R, r_b, q_sv, k_sv, v_sv, beta, v_bar, ys, y0, W = ctx.saved_tensors
        dq, dk, dv, db, dW0, dy0 = kernels(R.device.type).rdn_backward(
            R, r_b, q_sv, k_sv, v_sv, beta, v_bar, ys, y0, W, grad_of_last(dys, dy_T, ys), W.new_empty(0) if dW is None
            else dW)
        s = torch.tanh(torch.cat([y0.unsqueeze(2), ys[:, :, :-1]], 2))  # s_t = tanh(y_{t-1}), (B, H, T, d)
        H, d = s.shape[1], s.shape[3]
        g = torch.einsum("bhti,bhtj->hij", torch.cat([dq, dk, dv, db.unsqueeze(-1)], -1), s)  # (H, 3 d + 1, d)
        dR, dr_b = g[:, : 3 * d].reshape(H, 3, d, d).transpose(0, 1), g[:, 3 * d]
        dt = ctx.q_dtype
        return dq.to(dt), dk.to(dt), dv.to(dt), db.to(dt), dR.to(R.dtype), dr_b.to(r_b.dtype), dW0, dy0


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


def rdn(q, k, v, b, R, r_b, W, y, impl):
    if use_kernel(impl, q, "rdn"):
        return RDNKernel.apply(*contiguous(q, k, v, b), *states(q, R, r_b, W, y))
    return rdn_loop(q, k, v, b, R, r_b, W, y)


def elu1_sumnorm(x, eps=0.0):
    x = F.elu(x) + 1
    return x / (x.sum(-1, keepdim=True) + eps)


def heads(x, H):
    """(B, T, H * D) -> (B, H, T, D)"""
    B, T, _ = x.shape
    return x.view(B, T, H, -1).transpose(1, 2)


def merge(y):
    """(B, H, T, D) -> (B, T, H * D)"""
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


# ----------------------------------------------------------------------------------------------
# Layers: (B, T, d_model) and a state (a tuple of tensors, batch first; None = all zeros) -> output, new state


class SlowNet(nn.Module):
    """Common parts: the slow projection to `sizes` per head (no bias) and the output projection."""

    def __init__(self, args, sizes):
        super().__init__()
        self.H, self.d, self.sizes = args.n_head, args.d_model // args.n_head, sizes
        self.impl, self.chunk_size, self.official = args.impl, args.chunk_size, args.official_rl_core
        self.slow = nn.Linear(args.d_model, args.n_head * sum(sizes), bias=False)
        self.out = nn.Linear(args.d_model, args.d_model, bias=False)

    def project(self, x):
        """x (B, T, d_model) -> one (B, H, T, size) tensor per entry of sizes; size-1 entries squeezed to (B, H, T)"""
        parts = heads(self.slow(x), self.H).split(self.sizes, -1)
        return [p.squeeze(-1) if s == 1 else p for p, s in zip(parts, self.sizes)]

    def zeros(self, x, *shape, heads=None):
        return x.new_zeros(x.shape[0], heads or self.H, *shape, dtype=state_dtype(x))


class LinearLayer(SlowNet):
    """The linear Transformer of the paper's algorithmic tasks: elu + 1, no normalisation, the sum rule
    (--official_rl_core: the official RL layer's (elu + 1) / (sum + 1e-5))."""

    def __init__(self, args):
        super().__init__(args, [args.d_model // args.n_head] * 3)

    def forward(self, x, state=None):
        q, k, v = self.project(x)
        if self.official:
            q, k = elu1_sumnorm(q, 1e-5), elu1_sumnorm(k, 1e-5)
        else:
            q, k = F.elu(q) + 1, F.elu(k) + 1
        y, W = fast_weight(q, k, v, None, None if state is None else state[0], self.impl,
                           self.chunk_size)
        return self.out(merge(y)), (W,)


class DeltaLayer(SlowNet):
    """DeltaNet (eq. 4-7): q, k = sumnorm(elu + 1), beta = sigmoid, the delta rule (--official_rl_core: the sum
    plus 1e-5 in the normalisation, as the official RL layer)."""

    def __init__(self, args):
        d = args.d_model // args.n_head
        super().__init__(args, [d, d, d, 1])

    def forward(self, x, state=None):
        q, k, v, b = self.project(x)
        eps = 1e-5 if self.official else 0.0
        y, W = fast_weight(elu1_sumnorm(q, eps), elu1_sumnorm(k, eps), v, torch.sigmoid(b),
                           None if state is None else state[0], self.impl, self.chunk_size)
        return self.out(merge(y)), (W,)


class DeltaMLPLayer(SlowNet):
    """Delta MLP (eq. 8-11): the slow net emits a query and, for each of L fast layers, a key, a value and beta;
    h_0 = q, h_l = h_{l-1} + W^l sumnorm(elu(LN_l(h_{l-1})) + 1). Every fast layer is d x d here; the official LM
    code uses pairs of layers with a 4d hidden width."""

    def __init__(self, args):
        d, L = args.d_model // args.n_head, args.fast_net_depth
        super().__init__(args, [d] + [d, d, 1] * L)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(L))

    def forward(self, x, state=None):
        h, *kvb = self.project(x)
        state = state or (None,) * len(self.norms)
        new_state = []
        for l, (norm, W) in enumerate(zip(self.norms, state)):
            k, v, b = kvb[3 * l : 3 * l + 3]
            y, W = fast_weight(elu1_sumnorm(norm(h)), elu1_sumnorm(k), v, torch.sigmoid(b), W, self.impl,
                               self.chunk_size)
            h = h + y
            new_state.append(W)
        return self.out(merge(h)), tuple(new_state)


class DeltaDeltaLayer(SlowNet):
    """Delta Delta Net (eq. 12-16): the slow net programs fast net 1 (d x (3d + 1)) with the delta rule; its output
    q', k', v', beta' programs fast net 2 (d x d) with the delta rule; y = W2 q'."""

    def __init__(self, args):
        d = args.d_model // args.n_head
        super().__init__(args, [d, d, 3 * d + 1, 1])

    def forward(self, x, state=None):
        q, k, v, b = self.project(x)
        W1, W2 = state or (None, None)
        o, W1 = fast_weight(elu1_sumnorm(q), elu1_sumnorm(k), v, torch.sigmoid(b), W1, self.impl, self.chunk_size)
        q2, k2, v2, b2 = o.split([self.d, self.d, self.d, 1], -1)
        y, W2 = fast_weight(elu1_sumnorm(q2), elu1_sumnorm(k2), v2, torch.sigmoid(b2.squeeze(-1)), W2, self.impl,
                            self.chunk_size)
        return self.out(merge(y)), (W1, W2)


class DeltaRNNLayer(SlowNet):
    """Delta RNN (eq. 17-20): z_t = W_t q_t (DeltaNet); R_t by the delta rule from softmax keys, values and beta
    of x; y_t = z_t + R_t softmax(y_{t-1}). State (W, R, y_prev). --official_rl_core: q and k of the DeltaNet part
    through a softmax instead (the official RL layer)."""

    def __init__(self, args):
        d = args.d_model // args.n_head
        super().__init__(args, [d, d, d, 1, d, d, 1])

    def forward(self, x, state=None):
        q, k, v, b, k_r, v_r, b_r = self.project(x)
        W, R, y = state or (None, self.zeros(x, self.d, self.d), self.zeros(x, self.d))
        fmap = (lambda u: F.softmax(u, -1)) if self.official else elu1_sumnorm
        z, W = fast_weight(fmap(q), fmap(k), v, torch.sigmoid(b), W, self.impl, self.chunk_size)
        ys, R, y = delta_rnn(z, F.softmax(k_r, -1), v_r, torch.sigmoid(b_r), R, y, self.impl)
        return self.out(merge(ys)), (W, R, y)


class DeltaLSTMLayer(SlowNet):
    """Delta LSTM (eq. 21-27, the official "v4"): per gate g in (i, u, o) a DeltaNet part z^g = W^g q^g and a
    recurrent fast weight R^g (delta rule, softmax keys from x) read with s = softmax(h_{t-1});
    i, o = sigmoid(z + R s), u = z^u + R^u s (no squashing); c_t = i u + (1 - i) c_{t-1}; h_t = o c_t.
    The three gates run as 3H heads side by side. State (W, R, c, h), W and R (B, 3H, d, d) in gate order i, u, o."""

    def __init__(self, args):
        d = args.d_model // args.n_head
        super().__init__(args, [d, d, d, 1, d, d, 1] * 3)

    def forward(self, x, state=None):
        p = self.project(x)
        q, k, v, b, k_r, v_r, b_r = (torch.cat(p[j::7], 1) for j in range(7))  # (B, 3H, T, .): gates as heads
        W, R, c, h = state or (None, self.zeros(x, self.d, self.d, heads=3 * self.H), self.zeros(x, self.d),
                               self.zeros(x, self.d))
        z, W = fast_weight(elu1_sumnorm(q), elu1_sumnorm(k), v, torch.sigmoid(b), W, self.impl, self.chunk_size)
        hs, R, c, h = delta_lstm(z, F.softmax(k_r, -1), v_r, torch.sigmoid(b_r), R, c, h, self.impl)
        return self.out(merge(hs)), (W, R, c, h)


class RDNLayer(SlowNet):
    """Recurrent Delta Net (eq. 28-32): keys, queries, values and beta also see s = tanh(y_{t-1}) through slow
    recurrent weights R_q, R_k, R_v (d x d per head) and r_b; y_t = W_t q_t (un-squashed). State (W, y_prev)."""

    def __init__(self, args):
        d = args.d_model // args.n_head
        super().__init__(args, [d, d, d, 1])
        self.R = nn.Parameter(torch.randn(3, args.n_head, d, d) / math.sqrt(d))  # R_q, R_k, R_v ~ N(0, 1/sqrt(d))
        self.r_b = nn.Parameter(torch.randn(args.n_head, d) / math.sqrt(d))

    def forward(self, x, state=None):
        q, k, v, b = self.project(x)
        W, y = state or (self.zeros(x, self.d, self.d), self.zeros(x, self.d))
        ys, W, y = rdn(q, k, v, b, self.R.to(y.dtype), self.r_b.to(y.dtype), W, y, self.impl)
        return self.out(merge(ys)), (W, y)


class SoftmaxLayer(SlowNet):
    """Causal softmax attention (the Transformer baseline). Its state is every past key and value, with a 0/1 flag
    per position that a reset sets to 0 (those positions are then masked out)."""

    def __init__(self, args):
        super().__init__(args, [args.d_model // args.n_head] * 3)

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


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.post_ln = args.post_ln
        self.ln1, self.ln2 = nn.LayerNorm(args.d_model), nn.LayerNorm(args.d_model)
        self.fwp = LAYERS[args.model](args)
        self.ff = nn.Sequential(nn.Linear(args.d_model, args.d_ff), nn.ReLU(), nn.Dropout(args.dropout),
                                nn.Linear(args.d_ff, args.d_model), nn.Dropout(args.dropout))
        self.drop = nn.Dropout(args.dropout)

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
    """Token ids (B, T), a state (one tuple per layer, or None) and an optional reset mask (B,) applied before the
    first step -> logits (B, T, n_out), new state. No positional encoding (as in the paper's algorithmic tasks); a
    final LN before the head (the official algorithmic and RL code have none: --official_rl_core), as in
    delta_net.py."""

    def __init__(self, args, n_in, n_out, embed=None):
        super().__init__()
        self.embed = nn.Embedding(n_in, args.d_model) if embed is None else embed
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.ln_f = nn.Identity() if args.official_rl_core else nn.LayerNorm(args.d_model)
        self.head = nn.Linear(args.d_model, n_out)

    def forward(self, idx, state=None, reset=None):
        state = reset_state(state, reset) or [None] * len(self.blocks)
        x, new_state = self.embed(idx), []
        for block, s in zip(self.blocks, state):
            x, s = block(x, s)
            new_state.append(s)
        return self.head(self.ln_f(x)), new_state


class LSTMModel(nn.Module):
    """The LSTM baseline: embedding -> nn.LSTM (n_layer layers) -> linear. State [(h, c)], each (B, n_layer, D).
    With an embed module given, n_in is the width of its output."""

    def __init__(self, args, n_in, n_out, embed=None):
        super().__init__()
        self.embed = nn.Embedding(n_in, args.d_model) if embed is None else embed
        self.lstm = nn.LSTM(args.d_model if embed is None else n_in, args.d_model, args.n_layer, batch_first=True,
                            dropout=args.dropout)
        self.head = nn.Linear(args.d_model, n_out)

    def forward(self, idx, state=None, reset=None):
        state = reset_state(state, reset)
        hc = None if state is None else tuple(s.transpose(0, 1).contiguous() for s in state[0])
        y, (h, c) = self.lstm(self.embed(idx), hc)
        return self.head(y), [(h.transpose(0, 1), c.transpose(0, 1))]


def build_model(args, n_in, n_out, embed=None):
    """embed: the input module (default an embedding of n_in token ids; the RL agent passes nn.Identity() and the
    width of its inputs as n_in)."""
    return (LSTMModel if args.model == "lstm" else FWPModel)(args, n_in, n_out, embed)


# ----------------------------------------------------------------------------------------------
# Tasks: code execution and sequential ListOps (synthetic, generated in memory with fixed seeds)

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
    runs only while v is still unassigned). Statement kinds are drawn as CODE_WEIGHTS says. Only assigned variables
    are read; the first statement assigns, the last prints. The target of every token is None except at the `;` of
    an executed print: the value printed.
        a = 3 ; b = 7 ; if a < 5 : a ++ ; print a ; if b > 8 : print b ; print b ;
        targets: None everywhere except the `;` after `print a` (4) and the last `;` (7)
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


def make_examples(args, split):
    """The fixed examples of a split: (list of input id lists, list of target lists with -100 = no loss), the
    input vocabulary and the number of output classes. Each split has its own seed."""
    rng = random.Random(f"{args.task}-{split}-{args.seed}")
    n = args.n_train if split == "train" else args.n_eval
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
# Configuration: every flag with its default and docstring (--help prints them), the presets, and the checks
# of a command line's values.


@dataclass
class Args:
    # task
    task: str = "code"
    """code (code execution), listops (sequential ListOps), lm (through data.py) or rl (an IMPALA agent, below)"""
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
    n_train: int = 100_000
    """code, listops: training examples (generated in memory, fixed seed; the paper: 10k, --preset paper)"""
    n_eval: int = 1000
    """code, listops: validation and test examples each"""
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
    # reinforcement learning (--task rl)
    env: str = "CartPole-NoVel"
    """rl: CartPole-NoVel (CartPole-v1 seeing only cart position and pole angle: it needs memory), a gymnasium id
    with vector observations and discrete actions, or ALE/<Game>-v5 (Atari through ale_py's vector environment)"""
    env_steps: int = 300_000
    """rl: environment steps in all, summed over the environments (Atari: agent steps of 4 frames each)"""
    unroll: int = 50
    """rl: steps of each environment per update, the V-trace trajectory length (CartPole-NoVel default 20)"""
    entropy_cost: float = 0.01
    """rl: weight of the entropy bonus"""
    baseline_cost: float = 0.5
    """rl: weight of the value (baseline) loss"""
    discount: float = 0.99
    """rl: discount factor gamma"""
    reward_scale: float = 1.0
    """rl: rewards are multiplied by this in the loss, before the clip to [-1, 1] (CartPole-NoVel default 0.1: its
    reward of 1 per step would need values of ~100, which RMSProp's small steps reach slowly)"""
    truncate: int = 0
    """rl: detach the core state every this many steps of an unroll (1: the official code's per-step detach of the
    fast weights; 0: backpropagate through the whole unroll)"""
    memoryless: bool = False
    """rl: zero the core state before every step (an agent without memory: the ablation for the CPU task)"""
    eval: int = 0
    """rl: run the greedy policy of out_dir/ckpt.pt for this many episodes, print mean and std, and exit"""
    eval_per_life: bool = False
    """rl --eval on Atari: score one life as an episode (the official test(), which keeps the episodic-life wrapper);
    default: the whole game, the usual Atari score"""
    # model
    model: str = "rdn"
    """lstm | transformer | linear | delta | delta_mlp | delta_delta | delta_rnn | delta_lstm | rdn"""
    d_model: int = 64
    """residual stream width (lstm: hidden size; rl default 128, lstm 256, CartPole-NoVel 64)"""
    n_layer: int = 2
    """number of blocks (lstm: layers; rl lstm default 1, CartPole-NoVel 2)"""
    n_head: int = 4
    """heads per layer; d_head = d_model / n_head"""
    d_ff: int = 256
    """feed-forward hidden width (rl default 512, CartPole-NoVel 256)"""
    dropout: float = 0.0
    """dropout after the fast-weight output and in the feed-forward block"""
    fast_net_depth: int = 1
    """delta_mlp: layers of the fast network (the official default: 1)"""
    official_rl_core: bool = False
    """the official RL cores' forms (torchbeast/ of the official code; on by default for --task rl): linear and delta
    q, k = (elu + 1) / (sum + 1e-5), delta_rnn q, k = softmax, no final LN before the heads, lstm = nn.LSTM on the
    core inputs themselves (no linear map to d_model first)"""
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
    """sequences (or lm streams) per step; rl: environments stepped together (default 32; CartPole-NoVel 8)"""
    steps: int = 4000
    """optimizer steps (rl: env_steps / (batch_size x unroll))"""
    lr: float = 3e-3
    """peak learning rate (Adam; rl: RMSProp decayed linearly to 0, default 6e-4; CartPole-NoVel 3e-3)"""
    warmup: int = 100
    """linear warm-up steps"""
    cosine: bool = True
    """after warm-up, cosine decay to lr / 10 (false: constant, as in the paper)"""
    grad_clip: float = 1.0
    """gradient norm clip (0 disables; the paper does not clip; rl default 40)"""
    eval_every: int = 250
    """evaluate on valid, keep the best checkpoint, every this many steps (rl: print and checkpoint every this many
    updates, default 25; CartPole-NoVel 50)"""
    seed: int = 0
    """seed of python, numpy, torch and the task generators"""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"""
    out_dir: str = "out/rfwp"
    """metrics.jsonl, ckpt.pt (latest) and best.pt (best on valid) go here"""
    resume: bool = False
    """continue from out_dir/ckpt.pt"""
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


# --task rl: the settings flags and preset leave unset. For Atari and any gymnasium id the official code's: IMPALA's
# optimizer (RMSProp 6e-4, clip 40), batch 32, the official cores (2 layers of d 128, 4 heads of 32, FF 512; the
# LSTM: one layer of 256). The CPU memory task learns in a few minutes with smaller cores, more, smaller updates and
# a larger step.
IMPALA = dict(lr=6e-4, grad_clip=40.0, batch_size=32, eval_every=25, d_model=128, d_ff=512, official_rl_core=True)
RL_DEFAULTS = {"lstm": dict(IMPALA, d_model=256, n_layer=1)}
ENV_DEFAULTS = {"CartPole-NoVel": dict(IMPALA, d_model=64, d_ff=256, lr=3e-3, batch_size=8, unroll=20, reward_scale=0.1,
                                      eval_every=50)}


def check_args(args):
    choices = dict(task=("code", "listops", "lm", "rl"), tokenizer=("word", "char"), model=MODELS,
                   impl=("auto", "loop", "chunk", "kernel", "cuda"))
    for key, allowed in choices.items():
        if getattr(args, key) not in allowed:
            fail(f"--{key} must be one of {', '.join(allowed)}, got {getattr(args, key)!r}")
    args.impl = "kernel" if args.impl == "cuda" else args.impl  # the old name of --impl kernel
    for key in ("code_length", "depth", "n_train", "n_eval", "seq_len", "d_model", "n_layer", "n_head", "d_ff",
                "fast_net_depth", "chunk_size", "batch_size", "steps", "eval_every", "bench_T", "env_steps", "unroll"):
        if getattr(args, key) <= 0:
            fail(f"--{key} must be positive, got {getattr(args, key)}")
    if args.depth >= LISTOPS_LEVELS:
        fail(f"--depth must be below {LISTOPS_LEVELS} (every node at level {LISTOPS_LEVELS} is a value), "
             f"got {args.depth}")
    if args.n_vars not in (3, 5):
        fail(f"--n_vars must be 3 or 5 (the paper's settings), got {args.n_vars}")
    bad_ops = set(args.ops.split(",")) - set(LISTOPS)
    if bad_ops:
        fail(f"--ops: unknown operator(s) {', '.join(sorted(bad_ops))}; choose from {', '.join(LISTOPS)}")
    if args.d_model % args.n_head:
        fail(f"--d_model {args.d_model} is not divisible by --n_head {args.n_head}; pick n_head dividing d_model.")
    if not 0 <= args.dropout < 1 or args.lr <= 0 or min(args.warmup, args.grad_clip, args.stop_at) < 0:
        fail("--dropout must be in [0, 1); --lr positive; --warmup, --grad_clip and --stop_at non-negative.")
    if (min(args.truncate, args.eval, args.entropy_cost, args.baseline_cost, args.seed) < 0
            or not 0 <= args.discount <= 1 or args.reward_scale <= 0):
        fail("--truncate, --eval, --entropy_cost, --baseline_cost and --seed must be non-negative; --discount in "
             "[0, 1]; --reward_scale positive.")
    if args.task == "rl" and args.model == "transformer":
        fail("--task rl needs a fast-weight or recurrent core: the transformer's state (a KV cache) grows with every "
             "environment step. Use --model lstm, delta, delta_rnn, rdn, ...")
    if args.carry_state and args.model == "transformer":
        fail("--carry_state needs a fast-weight or recurrent model: the transformer's state (a KV cache) grows "
             "with the stream.")
    return args


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
    """code, listops: the three fixed splits. lm: the corpus as parallel streams."""
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
    accuracy; lm: loss and perplexity (or bits per character) over the whole split, state carried if asked."""
    model.eval()
    loss_sum, n_tok, n_right, n_print, print_right, n_seq, seq_right = 0.0, 0, 0, 0, 0, 0, 0
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
    model.train()
    loss = loss_sum / n_tok
    if args.task == "code":
        return {"loss": loss, "print_acc": print_right / n_print, "seq_acc": seq_right / n_seq}
    if args.task == "listops":
        return {"loss": loss, "acc": n_right / n_tok}
    return {"loss": loss, "ppl" if args.tokenizer == "word" else "bpc":
            math.exp(min(loss, 50)) if args.tokenizer == "word" else loss / math.log(2)}


HEADLINE = {"code": "seq_acc", "listops": "acc"}  # lm: ppl or bpc, lower is better


def headline(args):
    return HEADLINE.get(args.task, "ppl" if args.tokenizer == "word" else "bpc")


def train_batch(args, task, step, gen, state):
    """This step's inputs and targets (code, listops: a random batch of the training set, padded; lm: the next
    segment of every stream) and the state they start from (a new pass over the corpus starts from zero)."""
    if args.task == "lm":
        i = step % data.n_segments(task["train"], args.seq_len)
        return *data.segment(task["train"], i, args.seq_len), None if i == 0 else state
    xs, ys = task["train"]
    idx = torch.randint(len(xs), (args.batch_size,), generator=gen).tolist()
    return *pad_batch([xs[i] for i in idx], [ys[i] for i in idx], task["pad"]), state


def optimizer_step(model, opt, loss, args, step, ckpt_path, bar):
    """A non-finite loss stops the run (the last checkpoint stays); else one clipped optimizer step."""
    if not torch.isfinite(loss):
        bar.close()
        print(f"error: the loss became {loss.item()} at step {step}; the last good checkpoint stays at {ckpt_path}. "
              "Lower --lr or raise --warmup.", file=sys.stderr)
        sys.exit(1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()


def final_test(model, args, task, device, best, t0):
    """The final line: the test split with the best-on-valid checkpoint."""
    name = headline(args)
    model.load_state_dict(torch.load(os.path.join(args.out_dir, "best.pt"), map_location=device,
                                     weights_only=False)["model"])
    result = evaluate(model, args, task, "test", device)
    log_metrics(args.out_dir, args.steps, "test", result, t0)
    print(f"final: test {name} {result[name]:.4f} (" + " ".join(f"{k} {v:.4f}" for k, v in result.items()) +
          f") with the best valid checkpoint (step {best[0]}, valid {name} {best[1]:.4f}), {time.time() - t0:.0f}s")


def adam(params, **kw):
    """torch's Adam as one fused kernel per step where torch has one for the device (CPU from torch 2.4; a tenth of
    a small model's step), else its loop over the tensors: the same update."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, **kw)


def train(args):
    device = pick_device(args.device, args.impl)
    seed_everything(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # which training examples each step sees
    try:
        task = load_task(args)
    except data.DataError as e:
        fail(str(e))
    model = build_model(args, task["n_in"], task["n_out"]).to(device)
    opt = adam(model.parameters(), lr=args.lr, betas=(0.9, 0.995), eps=1e-9)  # the paper's Adam
    step, state, best, ckpt_path = 0, None, None, os.path.join(args.out_dir, "ckpt.pt")
    if args.resume:
        ckpt = resume_from(ckpt_path, model, opt, device)
        step, state, best = ckpt["step"], ckpt["train_state"], ckpt["best"]
        gen.set_state(ckpt["rng"]["data"])
    os.makedirs(args.out_dir, exist_ok=True)
    if args.resume:
        truncate_metrics(args.out_dir, step)
    print(f"config: {json.dumps(dataclasses.asdict(args))}")
    print(f"device {device}, model {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"starting at step {step}")
    if step >= args.steps:
        print(f"the checkpoint in {args.out_dir} is already at step {step} of --steps {args.steps}; nothing to do")
        return
    t0, name, bar = time.time(), headline(args), tqdm(total=args.steps, initial=step, dynamic_ncols=True)
    while step < args.steps:
        x, y, state = train_batch(args, task, step, gen, state)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        logits, new_state = model(x.to(device), state if args.carry_state else None)
        loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), ignore_index=-100)
        optimizer_step(model, opt, loss, args, step, ckpt_path, bar)
        state, step = detach_state(new_state) if args.carry_state else None, step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log_metrics(args.out_dir, step, "train", {"loss": loss.item()}, t0)
        if step % args.eval_every == 0 or step == args.steps or step == args.stop_at:
            result = evaluate(model, args, task, "valid", device)
            log_metrics(args.out_dir, step, "valid", result, t0)
            tqdm.write(f"step {step} valid: " + " ".join(f"{k} {v:.4f}" for k, v in result.items()))
            improved = best is None or (result[name] < best[1] if args.task == "lm" else result[name] > best[1])
            best = (step, result[name]) if improved else best
            for path in ["best.pt", "ckpt.pt"] if improved else ["ckpt.pt"]:
                save_checkpoint(os.path.join(args.out_dir, path), {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "args": dataclasses.asdict(args), "vocab": task["vocab"], "train_state": detach_state(state),
                    "best": best, "rng": dict(rng_state(), data=gen.get_state())})
            if step == args.stop_at:
                break
    bar.close()
    if step == args.steps:
        final_test(model, args, task, device, best, t0)


# ----------------------------------------------------------------------------------------------
# Reinforcement learning (--task rl): an IMPALA agent (Espeholt et al. 2018, arXiv 1802.01561) with an rfwp core,
# as in the paper's Atari experiments (section 4.4). Synchronous: one process steps a batch of environments with the
# current policy, keeping the graph, and learns from each unroll with V-trace.

MEMORY_TASKS = {"CartPole-NoVel": ("CartPole-v1", [0, 2])}  # name -> (gymnasium id, the observation dims kept)


class GymEnvs:
    """A batch of gymnasium environments in this process (vector observations, discrete actions), reset where an
    episode ends (the observation returned with the end is the next episode's first). step -> obs, reward, done
    (terminated or truncated), life_end (= done here)."""

    def __init__(self, name, n, seed):
        import gymnasium as gym

        gym_id, self.keep = MEMORY_TASKS.get(name, (name, None))
        try:
            self.envs = gym.vector.SyncVectorEnv([lambda: gym.make(gym_id)] * n,
                                                 autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        except gym.error.Error as e:
            fail(f"--env {name}: gymnasium cannot make it ({e}). Use CartPole-NoVel, a gymnasium id with vector "
                 "observations and discrete actions, or ALE/<Game>-v5.")
        space, act = self.envs.single_observation_space, self.envs.single_action_space
        if not isinstance(act, gym.spaces.Discrete) or len(space.shape) != 1:
            self.envs.close()
            fail(f"--env {name}: the agent needs vector observations and discrete actions; it has {space} and {act}.")
        self.obs_shape = (len(self.keep) if self.keep else space.shape[0],)
        self.n_actions, self.seed = int(act.n), seed

    def view(self, obs):
        return (obs if self.keep is None else obs[:, self.keep]).astype(np.float32)

    def reset(self):
        return self.view(self.envs.reset(seed=self.seed)[0])

    def step(self, actions):
        obs, reward, terminated, truncated, _ = self.envs.step(actions)
        done = terminated | truncated
        return self.view(obs), reward.astype(np.float32), done, done

    def close(self):
        self.envs.close()


def ale_game(name):
    """ALE/MsPacman-v5 -> ms_pacman, the ROM name ale_py's vector environment takes."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name.removeprefix("ALE/").rsplit("-v", 1)[0]).lower()


class AtariEnvs:
    """ale_py's native vector environment with the usual preprocessing (no OpenCV): 84x84 grey, a stack of 4,
    frame skip 4 with a max over the last two frames, up to 30 no-op starts, FIRE at reset, no sticky actions
    (as the paper's NoFrameskip-v4). Raw rewards (the loss clips them). life_end marks a lost life or game over:
    there the bootstrap stops, as torchbeast's episodic-life wrapper does, while the core state and the reported
    score run over the whole game.
    FIRE after a lost life: the official wrappers press FIRE in the reset that follows every lost life (their
    FireResetEnv sits on top of the episodic-life wrapper); in games such as Breakout nothing moves until FIRE is
    pressed. Here the step after a lost life executes FIRE whatever the agent chose. The agent's sampled action is
    then ignored by the environment, so the transition does not depend on it and the data stay on-policy for
    V-trace (that step's policy-gradient term has zero mean). Games without a FIRE action are unaffected."""

    def __init__(self, name, n, seed):
        from ale_py import roms
        from ale_py.vector_env import AtariVectorEnv

        game = ale_game(name)
        if game not in roms.get_all_rom_ids():
            fail(f"--env {name}: ale_py has no ROM {game!r}; use a name like ALE/Breakout-v5 or ALE/MsPacman-v5.")
        self.envs = AtariVectorEnv(game, n, autoreset_mode="SameStep", reward_clipping=False)
        self.obs_shape = self.envs.single_observation_space.shape  # (4, 84, 84) uint8
        self.n_actions, self.seed, self.lives = int(self.envs.single_action_space.n), seed, None
        action_set = [action.name for action in self.envs.ale.get_action_set()]  # NOOP, FIRE, RIGHT, ...
        self.fire = action_set.index("FIRE") if "FIRE" in action_set else None
        self.fire_next = np.zeros(n, dtype=bool)

    def reset(self):
        obs, info = self.envs.reset(seed=self.seed)
        self.lives, self.fire_next[:] = info["lives"], False
        return obs

    def step(self, actions):
        if self.fire is not None:
            actions = np.where(self.fire_next, self.fire, actions)
        obs, reward, terminated, truncated, info = self.envs.step(actions)
        done = terminated | truncated
        life_end = done | (info["lives"] < self.lives)
        self.lives, self.fire_next = info["lives"], life_end & ~done  # a new game gets FIRE from the reset itself
        return obs, reward.astype(np.float32), done, life_end

    def close(self):
        self.envs.close()


def make_envs(args, n, seed):
    return (AtariEnvs if args.env.startswith("ALE/") else GymEnvs)(args.env, n, seed)


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class ImpalaCNN(nn.Module):
    """IMPALA's deep residual encoder (Espeholt et al. 2018, fig. 3): per stage (16, 32, 32 channels) conv 3x3,
    max-pool 3x3 stride 2, two residual blocks; then ReLU, FC 3872 -> 256, ReLU. Frames (N, 4, 84, 84) uint8."""

    def __init__(self, in_channels, n_out=256):
        super().__init__()
        stages = []
        for c in (16, 32, 32):
            stages += [nn.Conv2d(in_channels, c, 3, padding=1), nn.MaxPool2d(3, 2, padding=1), Residual(c),
                       Residual(c)]
            in_channels = c
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(32 * 11 * 11, n_out)

    def forward(self, x):
        return F.relu(self.fc(F.relu(self.stages(x.float() / 255)).flatten(1)))


class Agent(nn.Module):
    """Encoder (Atari: ImpalaCNN; vectors: standardised by running statistics, then a two-layer MLP) -> concat the
    clipped last reward -> linear to d_model -> the core (any rfwp.py model but the transformer; one step per call)
    -> policy logits and baseline (one linear head). The core's reset mask zeroes the state of the environments
    whose episode just ended. With --official_rl_core an lstm core reads the concatenation itself (the official
    LSTM agent has no linear map before its LSTM; its fast-weight agents have one, as here)."""

    def __init__(self, args, obs_shape, n_actions):
        super().__init__()
        self.image, self.memoryless = len(obs_shape) == 3, args.memoryless
        if self.image:
            self.encoder, n_feat = ImpalaCNN(obs_shape[0]), 256
        else:
            self.encoder = nn.Sequential(nn.Linear(obs_shape[0], args.d_model), nn.ReLU(),
                                         nn.Linear(args.d_model, args.d_model), nn.ReLU())
            n_feat = args.d_model
            self.register_buffer("obs_count", torch.zeros(()))
            self.register_buffer("obs_mean", torch.zeros(obs_shape))
            self.register_buffer("obs_var", torch.ones(obs_shape))
        raw = args.official_rl_core and args.model == "lstm"
        self.core_in = nn.Identity() if raw else nn.Linear(n_feat + 1, args.d_model)
        self.core = build_model(dataclasses.replace(args, impl="loop" if args.impl == "chunk" else args.impl),
                                n_feat + 1 if raw else args.d_model, n_actions + 1,
                                embed=nn.Identity())  # one step per call: no chunks

    @torch.no_grad()
    def observe(self, obs):
        """Merge a batch (N, n_obs) into the running mean and variance of vector observations (Chan et al. 1979)."""
        if self.image:
            return
        n, mean, var = obs.shape[0], obs.mean(0), obs.var(0, unbiased=False)
        total, delta = self.obs_count + n, mean - self.obs_mean
        self.obs_var.copy_((self.obs_var * self.obs_count + var * n + delta**2 * self.obs_count * n / total) / total)
        self.obs_mean.add_(delta * n / total)
        self.obs_count.copy_(total)

    def forward(self, obs, last_reward, state=None, reset=None):
        """obs (B, *obs_shape), last_reward (B,), reset (B,) bool -> logits (B, A), value (B,), new state"""
        if self.memoryless:  # --memoryless: every step starts from the zero state
            reset = torch.ones(obs.shape[0], dtype=torch.bool, device=obs.device)
        if not self.image:
            obs = ((obs - self.obs_mean) / (self.obs_var + 1e-8).sqrt()).clamp(-10, 10)
        x = torch.cat([self.encoder(obs), last_reward.clamp(-1, 1).unsqueeze(-1)], -1)
        out, state = self.core(self.core_in(x).unsqueeze(1), state, reset)  # (B, 1, A + 1)
        return out[:, 0, :-1], out[:, 0, -1], state


def vtrace(log_rhos, discounts, rewards, values, bootstrap_value, rho_bar=1.0, c_bar=1.0):
    """V-trace targets (Espeholt et al. 2018, eq. 1 and section 4.2), all (T, B) but bootstrap_value (B,):
    v_s = V(x_s) + sum_{t>=s} (prod_{i=s}^{t-1} gamma_i c_i) delta_t
    delta_t = rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t)),
    rho_t = min(rho_bar, pi/mu), c_i = min(c_bar, pi/mu), computed backwards as v_s - V(x_s) = delta_s + gamma_s c_s
    (v_{s+1} - V(x_{s+1})). Returns v_s and the policy-gradient advantages rho_s (r_s + gamma_s v_{s+1} - V(x_s))."""
    with torch.no_grad():
        rhos = log_rhos.exp()
        rho, c = rhos.clamp(max=rho_bar), rhos.clamp(max=c_bar)
        values_next = torch.cat([values[1:], bootstrap_value[None]])
        deltas = rho * (rewards + discounts * values_next - values)
        acc, vs_minus_v = torch.zeros_like(bootstrap_value), []
        for t in reversed(range(len(deltas))):
            acc = deltas[t] + discounts[t] * c[t] * acc
            vs_minus_v.append(acc)
        vs = torch.stack(vs_minus_v[::-1]) + values
        vs_next = torch.cat([vs[1:], bootstrap_value[None]])
        return vs, rho * (rewards + discounts * vs_next - values)


class Carry(NamedTuple):
    """What one unroll hands to the next: the agent's next inputs and its core state."""
    obs: np.ndarray  # (B, ...) the latest observations
    last_reward: torch.Tensor  # (B,) the reward that came with them
    reset: torch.Tensor  # (B,) bool: the episode ended there, so the core state starts from zero
    state: object  # the core state (None: zero)


class Unroll(NamedTuple):
    traj: dict  # (T, B) tensors: logits, values, actions, rewards, discounts; bootstrap (B,)
    finished: list  # returns of the episodes that ended in this unroll
    env_time: float  # seconds spent in the environments
    carry: Carry


class Update(NamedTuple):
    loss: torch.Tensor
    parts: dict  # pg_loss, baseline_loss, entropy
    finished: list
    env_time: float
    carry: Carry


def rl_unroll(agent, envs, carry, args, device):
    """Step every environment args.unroll times with the current policy (graph kept), then compute the bootstrap
    value. Returns an Unroll: the trajectory, the returns of the episodes that ended, the emulator seconds, the new
    Carry."""
    obs, last_reward, reset, state = carry
    logits, values, actions, rewards, discounts, finished, env_time, seen = [], [], [], [], [], [], 0.0, [obs]
    for t in range(args.unroll):
        if args.truncate and t % args.truncate == 0:
            state = detach_state(state)
        logit, value, state = agent(torch.as_tensor(obs, device=device), last_reward, state, reset)
        action = torch.multinomial(F.softmax(logit.detach().float(), -1), 1).squeeze(-1)
        t_env = time.perf_counter()
        obs, reward, done, life_end = envs.step(action.cpu().numpy())
        env_time += time.perf_counter() - t_env
        seen.append(obs)
        envs.returns += reward
        finished += envs.returns[done].tolist()
        envs.returns[done] = 0
        # the next step's input: the new observation, this reward, and a reset where the episode ended
        last_reward = torch.as_tensor(reward, device=device)
        reset = torch.as_tensor(done, device=device)
        logits.append(logit), values.append(value), actions.append(action)
        rewards.append(args.reward_scale * last_reward)
        discounts.append(args.discount * (1 - torch.as_tensor(life_end, device=device, dtype=torch.float32)))
    with torch.no_grad():  # V(x_T): the state is not advanced (the next unroll starts from x_T again)
        _, bootstrap, _ = agent(torch.as_tensor(obs, device=device), last_reward, state, reset)
    if not agent.image:  # the observation statistics change between unrolls, never within one
        agent.observe(torch.as_tensor(np.concatenate(seen[:-1]), device=device))
    traj = dict(logits=torch.stack(logits), values=torch.stack(values), actions=torch.stack(actions),
                rewards=torch.stack(rewards), discounts=torch.stack(discounts), bootstrap=bootstrap)
    return Unroll(traj, finished, env_time, Carry(obs, last_reward, reset, detach_state(state)))


def rl_loss(traj, args):
    """IMPALA's loss, summed over time and batch (torchbeast): policy gradient with V-trace advantages, 0.5 x
    baseline_cost x (v_s - V)^2, minus entropy_cost x entropy. Rewards (scaled by reward_scale) clipped to [-1, 1]."""
    log_probs = F.log_softmax(traj["logits"].float(), -1)  # (T, B, A)
    log_pi = log_probs.gather(-1, traj["actions"].unsqueeze(-1)).squeeze(-1)
    behaviour = log_pi.detach()  # synchronous: the behaviour policy is the current one, pi/mu = 1
    values = traj["values"].float()
    vs, advantages = vtrace(log_pi.detach() - behaviour, traj["discounts"], traj["rewards"].clamp(-1, 1),
                            values.detach(), traj["bootstrap"].float())
    pg = -(log_pi * advantages).sum()
    baseline = 0.5 * (vs - values).square().sum()
    entropy = -(log_probs.exp() * log_probs).sum()
    total = pg + args.baseline_cost * baseline - args.entropy_cost * entropy
    return total, {"pg_loss": pg.item(), "baseline_loss": baseline.item(), "entropy": entropy.item() / vs.numel()}


def rl_update(agent, opt, envs, carry, args, device):
    """One unroll and, if its loss is finite, one clipped RMSProp step. Returns an Update: the loss, its parts, the
    returns of the episodes that ended, the emulator seconds and the new Carry."""
    unroll = rl_unroll(agent, envs, carry, args, device)
    loss, parts = rl_loss(unroll.traj, args)
    if torch.isfinite(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(agent.parameters(), args.grad_clip)
        opt.step()
    return Update(loss, parts, unroll.finished, unroll.env_time, unroll.carry)


def rl_start(envs, device, n):
    """Reset the environments: the first Carry (zero reward, a reset everywhere, no core state)."""
    envs.returns = np.zeros(n, dtype=np.float64)
    return Carry(envs.reset(), torch.zeros(n, device=device), torch.ones(n, dtype=torch.bool, device=device), None)


def rl_log_update(args, env_steps, update, returns, bar, t0):
    """metrics.jsonl: every finished episode's return and the update's losses; the bar: the last 100 returns."""
    for r in update.finished:
        log_metrics(args.out_dir, env_steps, "episode", {"return": r}, t0)
    log_metrics(args.out_dir, env_steps, "train", dict(loss=update.loss.item(), **update.parts), t0)
    if returns:
        bar.set_postfix(ret=f"{np.mean(returns[-100:]):.1f}", ent=f"{update.parts['entropy']:.2f}")


def rl_log_window(args, step, per_update, returns, dt, n_updates, env_time, t0):
    """One line per --eval_every updates: the mean of the last 100 returns, speed and the environments' share."""
    recent, n = returns[-100:], per_update * n_updates
    mean = np.mean(recent) if recent else float("nan")
    tqdm.write(f"update {step} ({step * per_update} steps): return {mean:.1f} (last {len(recent)} episodes), "
               f"{len(returns)} episodes, {n / dt:.0f} steps/s, {100 * env_time / dt:.0f}% of the time in the "
               "environments")
    log_metrics(args.out_dir, step * per_update, "train", {"steps_per_s": n / dt, "env_time_frac": env_time / dt}, t0)


def rl_train(args):
    device = pick_device(args.device, args.impl)
    seed_everything(args.seed)
    envs = make_envs(args, args.batch_size, args.seed)
    agent = Agent(args, envs.obs_shape, envs.n_actions).to(device)
    opt = torch.optim.RMSprop(agent.parameters(), lr=args.lr, alpha=0.99, eps=0.01)
    per_update = args.batch_size * args.unroll
    n_updates = max(1, args.env_steps // per_update)
    step, returns = 0, []
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume:
        ckpt = resume_from(ckpt_path, agent, opt, device)
        step, returns = ckpt["step"], ckpt["returns"]
        envs.seed = args.seed + step  # fresh episodes: the environments' own state is not saved
    os.makedirs(args.out_dir, exist_ok=True)
    if args.resume:
        truncate_metrics(args.out_dir, step * per_update)  # the RL logs count environment steps
    print(f"config: {json.dumps(dataclasses.asdict(args))}")
    print(f"device {device}, env {args.env} (observation {envs.obs_shape}, {envs.n_actions} actions), "
          f"core {args.model}, {sum(p.numel() for p in agent.parameters()) / 1e6:.2f}M parameters, {n_updates} "
          f"updates of {args.batch_size} x {args.unroll} steps, starting at update {step}")
    if step >= n_updates:
        print(f"the checkpoint in {args.out_dir} is already at update {step} of {n_updates}; nothing to do")
        return
    carry = rl_start(envs, device, args.batch_size)
    t0, env_time, t_window, step_window = time.time(), 0.0, time.time(), step
    bar = tqdm(total=n_updates * per_update, initial=step * per_update, unit="step", dynamic_ncols=True)
    while step < n_updates:
        for group in opt.param_groups:
            group["lr"] = args.lr * (1 - step / n_updates)  # linear decay to 0
        update = rl_update(agent, opt, envs, carry, args, device)
        if not torch.isfinite(update.loss):
            bar.close()
            print(f"error: the loss became {update.loss.item()} at update {step}; the last good checkpoint stays at "
                  f"{ckpt_path}. Lower --lr.", file=sys.stderr)
            sys.exit(1)
        carry, step, env_time = update.carry, step + 1, env_time + update.env_time
        returns += update.finished
        bar.update(per_update)
        rl_log_update(args, step * per_update, update, returns, bar, t0)
        if step % args.eval_every == 0 or step == n_updates or step == args.stop_at:
            rl_log_window(args, step, per_update, returns, time.time() - t_window, step - step_window, env_time, t0)
            t_window, step_window, env_time = time.time(), step, 0.0
            save_checkpoint(ckpt_path, {
                "model": agent.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "args": dataclasses.asdict(args), "returns": returns, "rng": rng_state()})
            if step == args.stop_at:
                break
    bar.close()
    envs.close()
    if step == n_updates:
        print(f"final: mean return of the last {len(returns[-100:])} episodes {np.mean(returns[-100:]):.1f} after "
              f"{step * per_update} environment steps, {time.time() - t0:.0f}s")


@torch.no_grad()
def rl_evaluate(args):
    """The greedy (argmax) policy of out_dir/ckpt.pt, one episode in each of args.eval environments."""
    device = pick_device(args.device)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        fail(f"--eval: no checkpoint at {ckpt_path}; train first (same --out_dir)")
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
    saved = Args(**ckpt["args"])
    if saved.task != "rl":
        fail(f"--eval: {ckpt_path} is a --task {saved.task} checkpoint, not an agent")
    envs = make_envs(saved, args.eval, args.seed + 10**6)  # seeds apart from training's
    agent = Agent(saved, envs.obs_shape, envs.n_actions).to(device)
    agent.load_state_dict(ckpt["model"])
    agent.eval()
    obs, last_reward, reset, state = rl_start(envs, device, args.eval)
    scores = np.full(args.eval, np.nan)
    t0 = time.time()
    while np.isnan(scores).any():
        logit, _, state = agent(torch.as_tensor(obs, device=device), last_reward, state, reset)
        obs, reward, done, life_end = envs.step(logit.argmax(-1).cpu().numpy())
        envs.returns += reward
        end = life_end if args.eval_per_life else done
        first = end & np.isnan(scores)
        scores[first] = envs.returns[first]
        envs.returns[end] = 0
        last_reward, reset = torch.as_tensor(reward, device=device), torch.as_tensor(done, device=device)
    envs.close()
    log_metrics(args.out_dir, ckpt["step"], "eval", {"return_mean": scores.mean(), "return_std": scores.std()}, t0)
    print(f"eval: greedy policy of {ckpt_path} (update {ckpt['step']}), {args.eval} episodes of {saved.env}: return "
          f"{scores.mean():.1f} +- {scores.std():.1f} (min {scores.min():.1f}, max {scores.max():.1f}), "
          f"{time.time() - t0:.0f}s")
    return scores


def rl_bench(args):
    """Environment steps per second: the emulator alone (random actions), then a full update (acting, V-trace,
    backward, RMSProp) for each core, with the share of the update spent in the environments. Each fast-weight core
    with --impl loop (one Python step per environment step) and, where the device's kernels build, --impl kernel."""
    device = pick_device(args.device)
    envs = make_envs(args, args.batch_size, args.seed)
    n = args.batch_size * args.unroll
    impls = ["loop", "kernel"] if kernels(device.type) else ["loop"]
    print(f"device {device}, threads {torch.get_num_threads()}, env {args.env}, {args.batch_size} environments x "
          f"unroll {args.unroll} = {n} steps per update, d_model {args.d_model}, n_layer {args.n_layer}, "
          f"n_head {args.n_head}")
    envs.reset()
    t = time.perf_counter()
    for _ in range(args.unroll):
        envs.step(np.random.randint(envs.n_actions, size=args.batch_size))
    print(f"{'emulator only':14} {n / (time.perf_counter() - t):9.0f} steps/s")
    print(f"{'core':14} {'impl':6} {'params':>8} {'steps/s':>9} {'in envs':>8}")
    for name in MODELS:
        if name == "transformer":
            continue
        for impl in ["auto"] if name == "lstm" else impls:
            torch.manual_seed(0)
            agent = Agent(dataclasses.replace(args, model=name, impl=impl), envs.obs_shape, envs.n_actions).to(device)
            opt = torch.optim.RMSprop(agent.parameters(), lr=args.lr, alpha=0.99, eps=0.01)
            carry, times, env_times = rl_start(envs, device, args.batch_size), [], []
            for _ in range(3):  # the first is a warm-up
                t = time.perf_counter()
                update = rl_update(agent, opt, envs, carry, args, device)
                carry = update.carry
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                env_times.append(update.env_time)
            t_med, env_med = float(np.median(times[1:])), float(np.median(env_times[1:]))
            n_params = sum(p.numel() for p in agent.parameters())
            print(f"{name:14} {impl:6} {n_params / 1e6:7.2f}M {n / t_med:9.0f} {100 * env_med / t_med:7.0f}%",
                  flush=True)
    envs.close()


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


def relative_error(args, b):
    return ((args.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------
# Scaffolding, the same in every script: command line (from the Args fields and their docstrings), errors,
# device, checkpoint writes, seeds and --resume, metrics (here parse_args also fills the RL defaults and
# pick_device checks --impl kernel).


def fail(msg):
    """A user error: one message, non-zero exit, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def print_help():
    """Every Args field with its type, default and docstring (read from this file's source)."""
    import ast
    import inspect

    body = ast.parse(inspect.getsource(Args)).body[0].body
    print(f"usage: python {os.path.basename(sys.argv[0])} [--preset {'|'.join(PRESETS)}] [--key value ...]")
    for node, doc in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr):
            name = node.target.id
            print(f"  --{name} ({ast.unparse(node.annotation)}, {getattr(Args, name)!r}): {doc.value.value}")
    sys.exit(0)


def parse_args(argv):
    """--key value (or --key=value; a bare --flag sets a bool), --preset NAME applied first."""
    if "--help" in argv or "-h" in argv:
        print_help()
    fields = {f.name: f for f in dataclasses.fields(Args)}
    kv, i = {}, 0
    while i < len(argv):
        key, _, val = argv[i].removeprefix("--").partition("=")
        if not argv[i].startswith("--") or (key not in fields and key != "preset"):
            fail(f"unknown argument {argv[i]!r}; --help lists the flags")
        is_bool = key in fields and fields[key].type is bool
        if not val and not (is_bool and (i + 1 == len(argv) or argv[i + 1].startswith("--"))):
            if i + 1 == len(argv):
                fail(f"--{key} needs a value")
            val, i = argv[i + 1], i + 1
        kv[key] = val or "true"
        i += 1
    preset = kv.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    args = Args(**PRESETS.get(preset, {}))
    if kv.get("task", args.task) == "rl":
        model_defaults = RL_DEFAULTS.get(kv.get("model", args.model), IMPALA)
        for key, val in ENV_DEFAULTS.get(kv.get("env", args.env), model_defaults).items():
            if key not in kv and key not in PRESETS.get(preset, {}):
                setattr(args, key, val)
    for key, val in kv.items():
        typ = fields[key].type
        try:
            if typ is bool:
                if val.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                val = val.lower() in ("true", "1")
            setattr(args, key, typ(val))
        except ValueError:
            fail(f"--{key} expects {typ.__name__}, got {val!r}")
    return check_args(args)


def pick_device(name, impl="auto"):
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            fail(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            fail(f"--device {name}: this machine has no CUDA GPU; use --device cpu (or auto)")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if impl == "kernel" and device.type not in ("cpu", "cuda"):
        print(f"warning: --impl kernel runs on the CPU and CUDA, not {device}; using --impl chunk", file=sys.stderr)
    return device


def save_checkpoint(path, obj):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a killed run leaves the previous checkpoint intact


def log_metrics(out_dir, step, split, metrics, t0):
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        for name, value in metrics.items():
            f.write(json.dumps(dict(step=step, split=split, metric=name, value=value, time=time.time() - t0)) + "\n")


def truncate_metrics(out_dir, step):
    """--resume: drop the metrics.jsonl lines past the checkpoint's step (the killed run logged them; the resumed run
    logs those steps again), and a line the kill cut short; written atomically, as the checkpoints."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def resume_from(path, model, opt, device):
    """--resume: load model and optimizer in place, restore the global RNGs; return the checkpoint dict."""
    if not os.path.exists(path):
        fail(f"--resume: no checkpoint at {path}")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    random.setstate(ckpt["rng"]["python"])
    np.random.set_state(ckpt["rng"]["numpy"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    return ckpt


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.task == "rl":
        return rl_bench(args) if args.bench else rl_evaluate(args) if args.eval else rl_train(args)
    if args.bench:
        return bench(args)
    train(args)


if __name__ == "__main__":
    main()
