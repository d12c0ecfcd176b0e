"""Goal-conditioned generators of deep policies (GoGePo): a hypernetwork maps a desired return to policy weights.

Faccio, Herrmann, Ramesh, Kirsch, Schmidhuber, "Goal-Conditioned Generators of Deep Policies", AAAI 2023,
arXiv 2207.01570 (section 3: the generator, the evaluator with probing states, the training loop). A fast weight
programmer at the level of whole networks: the slow net (generator G) writes all weights theta of the fast net
(the policy) from one input, the command c.
    policy      pi_theta(o) = a_max tanh(W3 tanh(W2 tanh(W1 o' + b1) + b2) + b3), o' = (o - mean) / std (running)
    generator   theta = G(c / (R_max - R_min)): every layer cut into tiles; tile (i, j) of a layer of type
                t in {first, hidden, last} is MLP^w_t([e_ij, c]) (weights) and MLP^b_t([e_ij, c]) (biases, averaged
                over the input-side tiles j), e_ij a learned embedding; each layer scaled by 2 / sqrt(fan_in)
    evaluator   V(theta) = MLP([pi_theta(p_1), ..., pi_theta(p_M)]), p_m learned probing states
    loop        c = (best return so far) + drive; theta = G(c) + sigma eps; run one episode per theta, store
                (theta, return R); V: MSE to R on recency-weighted buffer samples; G: minimise (V(G(R)) - R)^2
                through the frozen V, R drawn from the buffer's returns
Speed (same algorithm; the official code's profile and this file's times are in RESULTS.md): one generator call per
batch of `--n_parallel` policies (the noise makes them differ), their episodes stepped side by side with one batched
policy forward per time step, and the evaluation episodes batched the same way; each distinct command of a
generator batch generated once (generator_loss: the same loss and gradient); the updates follow the batch, one per
episode (4 evaluator and 19 generator Adam steps), as in the paper.

Glossary: theta (n_params,) a flat policy vector [W1, b1, W2, b2, W3, b3] (W (out, in), row-major), P policies
in a batch, c a command (a return), R an episode's return, M probing states, tile the block size of a layer.

Commands:
    python policy_generator.py                                  # MountainCarContinuous-v0 until solved (return 90)
    python policy_generator.py --preset tiny                    # smoke run
    python policy_generator.py --env InvertedPendulum-v5        # MuJoCo (gymnasium[mujoco]); also Swimmer-v5, Hopper-v5
    python policy_generator.py --sweep_only                     # the command sweep of the checkpoint in out_dir
    python policy_generator.py --bench                          # generator, update and rollout times

Fidelity. The official code's settings (Args, ENVS), with these differences: a batch of --n_parallel episodes shares one
command (the official code raises it after each episode) and is evaluated after the batch (so an evaluation lands at the
first batch end past each multiple of --eval_every steps, not exactly at it); observations are normalised by an exact
running mean and std (the official one starts from var = mean^2); evaluation episodes get fresh seeds from the run's
generator. Gymnasium 1.x -v5 MuJoCo tasks replace the paper's -v2/-v3; Pendulum-v1 is not in the paper.

Runs: --out_dir gets metrics.jsonl and ckpt.pt (at every evaluation). The scaffolding at the end, the same in every
script, refuses an --out_dir that holds another run (--resume continues it, --overwrite replaces it), checks a
checkpoint before resuming from it (the script, RESUME_FLAGS, a truncated file) and stops a diverging run (a non-finite
evaluator or generator loss, or generated policy) before it logs or saves anything of it (open_out_dir, read_checkpoint,
nothing_left, truncate_metrics, check_finite). It runs in one process (no torchrun): it learns by many small updates
from a replay buffer after each batch of episodes, not by a gradient over a data batch that processes could split; its
speed comes from batching the episodes.
"""

import ast
import contextlib
import dataclasses
import inspect
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# return range (R_min, R_max) that normalises commands, and the "solved" evaluation return (None: none set).
# The official code's ranges; Pendulum-v1 is not in the paper: its range is this repo's choice.
ENVS = {
    "MountainCarContinuous-v0": dict(r_min=-100, r_max=100, solved=90),
    "Pendulum-v1": dict(r_min=-1600, r_max=0, solved=None),
    "InvertedPendulum-v5": dict(r_min=0, r_max=1000, solved=950),
    "Swimmer-v5": dict(r_min=-100, r_max=365, solved=None),
    "Hopper-v5": dict(r_min=-100, r_max=3000, solved=None, alive_bonus=1.0),  # training return drops it
}


# ----------------------------------------------------------------------------------------------
# Configuration: every flag with its default and docstring (--help prints them), the presets, and the checks
# of a command line's values.


@dataclass
class Args:
    # environment
    env: str = "MountainCarContinuous-v0"
    """MountainCarContinuous-v0 | Pendulum-v1 | InvertedPendulum-v5 | Swimmer-v5 | Hopper-v5"""
    total_steps: int = 100_000
    """training environment steps (the paper: 100k for MountainCar and InvertedPendulum, 3M for Swimmer, Hopper)"""
    stop_solved: bool = True
    """stop training at the first evaluation that reaches the environment's solved return"""
    n_parallel: int = 4
    """generated policies rolled out side by side per iteration (each one episode; then one update per episode)"""
    # policy and generator
    hidden: int = 256
    """policy hidden width (two tanh layers)"""
    tile: int = 16
    """generator tile: hidden layers are generated in tile x tile blocks"""
    embed_dim: int = 8
    """learned embedding size per tile"""
    gen_hidden: int = 256
    """width of the generator's tile MLPs (two ReLU layers)"""
    noise: float = 0.1
    """std of the Gaussian parameter noise for exploration"""
    drive: float = 20.0
    """command = best return so far + drive"""
    # evaluator
    n_probes: int = 200
    """learned probing states"""
    eval_hidden: int = 256
    """width of the evaluator MLP (two ReLU layers)"""
    # updates
    buffer_size: int = 10_000
    """replay buffer of (theta, return); sampling weight of the i-th newest entry (1 / i) ** recency"""
    recency: float = 1.1
    """exponent of the recency weighting"""
    batch_size: int = 16
    """buffer samples per update step"""
    evaluator_steps: int = 4
    """evaluator Adam steps per update"""
    generator_steps: int = 19
    """generator Adam steps per update"""
    lr_evaluator: float = 5e-3
    """Adam learning rate of the evaluator"""
    lr_generator: float = 2e-6
    """Adam learning rate of the generator"""
    # evaluation and bookkeeping
    eval_every: int = 1000
    """evaluate G(best return) every this many training steps"""
    n_eval: int = 10
    """episodes per evaluation (and of the final one)"""
    sweep_points: int = 21
    """command sweep: commands evenly spaced over the return range"""
    sweep_episodes: int = 5
    """command sweep: episodes per command"""
    sweep_only: bool = False
    """run the command sweep of out_dir/ckpt.pt and exit"""
    seed: int = 0
    """seed of python, numpy, torch and the environments"""
    device: str = "cpu"
    """cpu (default: small batched ops), cuda, cuda:1, mps or auto (cuda > mps > cpu)"""
    out_dir: str = "out/policy_generator"
    """metrics.jsonl and ckpt.pt (written at every evaluation) go here"""
    resume: bool = False
    """continue the run in out_dir from its ckpt.pt (the only way to add to a run there)"""
    overwrite: bool = False
    """start a new run in an out_dir that holds one: delete its ckpt.pt and metrics.jsonl first (without
    this flag or --resume, such a run stops before writing anything)"""
    stop_at: int = 0
    """exit after the evaluation at or after this many steps, checkpoint saved; --resume continues. 0: no stop"""
    bench: bool = False
    """time the generator, one update and a batched rollout step, and exit"""


PRESETS = {
    "tiny": dict(hidden=32, gen_hidden=32, eval_hidden=32, n_probes=8, total_steps=600, eval_every=300, n_eval=2,
                 sweep_points=3, sweep_episodes=1, buffer_size=50, generator_steps=3, evaluator_steps=2,
                 stop_solved=False),
}


# The flags a --resume must share with its checkpoint (they shape the nets), and the advice when a run diverges.
RESUME_FLAGS = ("env", "hidden", "tile", "embed_dim", "gen_hidden", "n_probes", "eval_hidden")
DIVERGED = "Lower --lr_evaluator or --lr_generator."


def check_args(args):
    """The models' own checks (check_sizes: the same messages, naming the flags), then what only the command line
    knows: the environment, the run's sizes and rates (parse_args checks the device)."""
    try:
        sizes = ("hidden", "tile", "embed_dim", "gen_hidden", "n_probes", "eval_hidden")  # the models' keywords
        check_sizes("--", **{key: getattr(args, key) for key in sizes})
    except ValueError as e:
        fail(str(e))
    if args.env not in ENVS:
        fail(f"--env must be one of {', '.join(ENVS)}, got {args.env!r}")
    for key in ("total_steps", "n_parallel", "buffer_size", "batch_size", "eval_every", "n_eval", "sweep_points",
                "sweep_episodes"):
        if getattr(args, key) <= 0:
            fail(f"--{key} must be positive, got {getattr(args, key)}")
    if min(args.noise, args.evaluator_steps, args.generator_steps, args.drive, args.recency, args.stop_at,
           args.seed) < 0 or min(args.lr_evaluator, args.lr_generator) <= 0:
        fail("--noise, --evaluator_steps, --generator_steps, --drive, --recency, --stop_at and --seed must be "
             "non-negative; the learning rates positive.")
    return args


# ----------------------------------------------------------------------------------------------
# The policy (a flat parameter vector theta, a batched forward for P policies at once), the generator, the evaluator.


def layer_shapes(obs_dim, act_dim, hidden):
    """[(out, in)] of the three layers."""
    return [(hidden, obs_dim), (hidden, hidden), (act_dim, hidden)]


def unpack(theta, shapes):
    """theta (P, n_params) -> [(W (P, out, in), b (P, out))] in the order W1, b1, W2, b2, W3, b3."""
    layers, i = [], 0
    for out, inp in shapes:
        W = theta[:, i : i + out * inp].view(-1, out, inp)
        i += out * inp
        layers.append((W, theta[:, i : i + out]))
        i += out
    return layers


def policy_forward(theta, obs, shapes, act_limit):
    """Actions of P policies: theta (P, n_params), obs (P, N, obs_dim) -> (P, N, act_dim). tanh everywhere, the
    output scaled to the action bound."""
    x = obs
    for W, b in unpack(theta, shapes):
        x = torch.tanh(torch.baddbmm(b[:, None], x, W.transpose(1, 2)))
    return x * act_limit


def mlp(sizes):
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def check_sizes(flag="", **sizes):
    """A ValueError naming the first size that is not positive, or a width the tile does not divide, and the fix; flag
    is "--" where the command line asks, so that its message names the flag. The constructors and check_args call it."""
    for key, value in sizes.items():
        if not value > 0:
            raise ValueError(f"{flag}{key} must be positive, got {value}")
    if "hidden" in sizes and "tile" in sizes and sizes["hidden"] % sizes["tile"]:
        raise ValueError(f"{flag}hidden {sizes['hidden']} is not divisible by {flag}tile {sizes['tile']}; pick a tile "
                         "that divides the width.")


class Generator(nn.Module):
    """theta = G(c) for the policy obs_dim -> hidden -> hidden -> act_dim (layer_shapes). Layer l (out x in) is cut
    into tiles of (out_chunk x in_chunk): the first layer's tiles span all inputs, the last layer's all outputs, hidden
    layers use tile x tile (so tile divides hidden). One pair of tile MLPs (two ReLU layers of gen_hidden) per layer
    type, each tile with a learned embedding of embed_dim."""

    def __init__(self, obs_dim, act_dim, hidden=256, tile=16, embed_dim=8, gen_hidden=256):
        super().__init__()
        check_sizes(obs_dim=obs_dim, act_dim=act_dim, hidden=hidden, tile=tile, embed_dim=embed_dim,
                    gen_hidden=gen_hidden)
        self.shapes = shapes = layer_shapes(obs_dim, act_dim, hidden)
        self.n_params = sum(out * inp + out for out, inp in shapes)
        self.tile, self.embed_dim, self.gen_hidden = tile, embed_dim, gen_hidden
        self.scale = [2 / fan_in**0.5 for _, fan_in in shapes]  # each layer scaled by 2 / sqrt(fan_in)
        n = len(shapes)
        self.kind = ["first"] + ["hidden"] * (n - 2) + ["last"]
        self.chunk = [(tile if i < n - 1 else out, tile if i > 0 else inp) for i, (out, inp) in enumerate(shapes)]
        self.tiles = [(inp // ic, out // oc) for (out, inp), (oc, ic) in zip(shapes, self.chunk)]  # (in, out) tiles
        self.embeddings = nn.ParameterList([nn.Parameter(torch.randn(ti, to, embed_dim)) for ti, to in self.tiles])
        self.w_nets, self.b_nets = nn.ModuleDict(), nn.ModuleDict()
        for kind, (oc, ic) in zip(self.kind, self.chunk):
            if kind not in self.w_nets:
                self.w_nets[kind] = mlp([embed_dim + 1, gen_hidden, gen_hidden, oc * ic])
                self.b_nets[kind] = mlp([embed_dim + 1, gen_hidden, gen_hidden, oc])

    def extra_repr(self):
        return (f"policy {' -> '.join(str(i) for _, i in self.shapes)} -> {self.shapes[-1][0]} ({self.n_params} "
                f"parameters), tile={self.tile}, embed_dim={self.embed_dim}, gen_hidden={self.gen_hidden}")

    def forward(self, c):
        """c (B,) normalised commands -> theta (B, n_params)."""
        B, out = len(c), []
        for e, kind, (oc, ic), (ti, to), s in zip(self.embeddings, self.kind, self.chunk, self.tiles, self.scale):
            z = torch.cat([e.expand(B, -1, -1, -1), c.view(B, 1, 1, 1).expand(B, ti, to, 1)], -1)  # (B, ti, to, E+1)
            w = self.w_nets[kind](z).view(B, ti, to, oc, ic).permute(0, 2, 3, 1, 4).reshape(B, to * oc, ti * ic)
            b = self.b_nets[kind](z).mean(1).reshape(B, to * oc)  # biases averaged over the input-side tiles
            out += [s * w.flatten(1), s * b]
        return torch.cat(out, 1)


class Evaluator(nn.Module):
    """V(theta): the actions of the policy theta (obs_dim -> hidden -> hidden -> act_dim, actions scaled to act_limit:
    a number or one per action) on n_probes learned probing states (its fingerprint) -> an MLP with two ReLU layers of
    eval_hidden -> the predicted return."""

    def __init__(self, obs_dim, act_dim, hidden=256, act_limit=1.0, n_probes=200, eval_hidden=256):
        super().__init__()
        check_sizes(obs_dim=obs_dim, act_dim=act_dim, hidden=hidden, n_probes=n_probes, eval_hidden=eval_hidden)
        act_limit = torch.as_tensor(act_limit, dtype=torch.float32)
        if act_limit.numel() not in (1, act_dim) or not (act_limit > 0).all():
            raise ValueError(f"act_limit must be positive, one number or one per action ({act_dim}), got "
                             f"{act_limit.tolist()}")
        act_limit = act_limit.reshape(-1).expand(act_dim).clone()
        self.shapes = layer_shapes(obs_dim, act_dim, hidden)
        self.register_buffer("act_limit", act_limit, persistent=False)
        self.probes = nn.Parameter(torch.rand(n_probes, obs_dim))  # uniform [0, 1), as the official code
        self.net = mlp([n_probes * act_dim, eval_hidden, eval_hidden, 1])

    def extra_repr(self):
        return (f"policy {' -> '.join(str(i) for _, i in self.shapes)} -> {self.shapes[-1][0]}, "
                f"act_limit={self.act_limit.tolist()}, n_probes={len(self.probes)}")

    def fingerprint(self, theta):
        """theta (B, n_params) -> the actions on the probes, flattened (B, n_probes * act_dim)."""
        return policy_forward(theta, self.probes.expand(len(theta), -1, -1), self.shapes, self.act_limit).flatten(1)

    def forward(self, theta):
        """theta (B, n_params) -> predicted returns (B,)."""
        return self.net(self.fingerprint(theta)).squeeze(-1)


def generator_loss(generator, evaluator, c, rets):
    """The generator's loss mean_i (V(G(c_i)) - R_i)^2 through the evaluator, c the normalised commands of the returns
    R (B,). Recency-weighted sampling with replacement repeats commands: each distinct one is generated once and its
    prediction counted as often as it was drawn (the whole batch's loss and gradient, at a fraction of the cost)."""
    unique, inverse = torch.unique(c, return_inverse=True)
    return F.mse_loss(evaluator(generator(unique))[inverse], rets)


def build_model(args, obs_dim, act_dim, act_limit):
    """The command line's generator and evaluator: each flag the constructor's keyword of the same name."""
    generator = Generator(obs_dim, act_dim, hidden=args.hidden, tile=args.tile, embed_dim=args.embed_dim,
                          gen_hidden=args.gen_hidden)
    evaluator = Evaluator(obs_dim, act_dim, hidden=args.hidden, act_limit=act_limit, n_probes=args.n_probes,
                          eval_hidden=args.eval_hidden)
    return generator, evaluator


# ----------------------------------------------------------------------------------------------
# Replay buffer, observation normaliser, batched rollouts


class Buffer:
    """The newest `size` (theta, return) pairs; a sample draws with replacement, the i-th newest entry with
    probability proportional to (1 / i) ** recency."""

    def __init__(self, size, recency):
        self.size, self.recency, self.thetas, self.returns = size, recency, [], []

    def add(self, theta, ret):
        self.thetas.append(theta)
        self.returns.append(ret)
        if len(self.thetas) > self.size:
            self.thetas.pop(0)
            self.returns.pop(0)

    def weights(self):
        w = (1.0 / np.arange(len(self.thetas), 0, -1)) ** self.recency  # oldest first: 1/n, ..., 1/1
        return w / w.sum()

    def sample(self, k, gen):
        k = min(k, len(self.thetas))  # as the official code: a young buffer gives smaller batches
        idx = torch.multinomial(torch.tensor(self.weights()), k, replacement=True, generator=gen).tolist()
        thetas = torch.stack([self.thetas[i] for i in idx])
        return thetas, torch.tensor([self.returns[i] for i in idx], dtype=thetas.dtype, device=thetas.device)


class RunningNorm:
    """Running mean and std of the observations seen in training episodes (Chan et al.'s parallel update)."""

    def __init__(self, dim):
        self.n, self.mean, self.m2 = 0, np.zeros(dim), np.zeros(dim)

    def push(self, x):  # x (N, dim)
        n, mean = len(x), x.mean(0)
        delta, total = mean - self.mean, self.n + len(x)
        self.m2 += ((x - mean) ** 2).sum(0) + delta**2 * self.n * n / total
        self.mean, self.n = self.mean + delta * n / total, total

    def __call__(self, x):
        if self.n < 2:
            return x
        return (x - self.mean) / (np.sqrt(self.m2 / (self.n - 1)) + 1e-8)


def make_envs(name, n):
    import gymnasium as gym

    return [gym.make(name, disable_env_checker=True) for _ in range(n)]


@torch.no_grad()
def rollout(envs, thetas, shapes, act_limit, norm, seeds, push=False, alive_bonus=0.0):
    """One episode per policy, side by side: thetas (P, n_params), env p runs policy p from reset(seed=seeds[p]).
    Returns the training returns (alive bonus removed), the environment returns, and the steps taken."""
    P = len(thetas)
    obs = np.stack([env.reset(seed=int(s))[0] for env, s in zip(envs[:P], seeds)])
    active, ret, env_ret, steps = np.ones(P, bool), np.zeros(P), np.zeros(P), 0
    while active.any():
        idx = np.flatnonzero(active)
        if push:
            norm.push(obs[idx])
        x = torch.as_tensor(norm(obs[idx]), dtype=torch.float32, device=thetas.device)[:, None]
        actions = policy_forward(thetas[idx], x, shapes, act_limit)[:, 0].cpu().numpy()
        for j, p in enumerate(idx):
            obs[p], r, terminated, truncated, _ = envs[p].step(actions[j])
            env_ret[p] += r
            ret[p] += r - alive_bonus
            if terminated or truncated:
                active[p] = False
        steps += len(idx)
    return ret, env_ret, steps


# ----------------------------------------------------------------------------------------------
# Training


class GoGePo:
    """Everything a run holds: the nets, their optimisers, the buffer, the normaliser, the counters, the RNGs."""

    def __init__(self, args):
        import gymnasium as gym

        env = gym.make(args.env, disable_env_checker=True)
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        self.args, self.info = args, ENVS[args.env]
        self.r_range = self.info["r_max"] - self.info["r_min"]
        self.device = pick_device(args.device)
        torch.manual_seed(args.seed)  # the same initial weights on every device
        generator, evaluator = build_model(args, obs_dim, act_dim, env.action_space.high)
        self.generator, self.evaluator = generator.to(self.device), evaluator.to(self.device)
        self.shapes, self.n_params, self.act_limit = generator.shapes, generator.n_params, evaluator.act_limit
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=args.lr_generator)
        self.opt_v = torch.optim.Adam(self.evaluator.parameters(), lr=args.lr_evaluator)
        self.buffer, self.norm = Buffer(args.buffer_size, args.recency), RunningNorm(obs_dim)
        self.gen = torch.Generator().manual_seed(args.seed)  # buffer sampling and parameter noise
        self.rng = np.random.default_rng(args.seed)  # environment seeds
        self.steps, self.episodes, self.best, self.solved_at, self.last_eval = 0, 0, -np.inf, None, 0

    def command(self, ret):
        return torch.as_tensor(ret, dtype=torch.float32, device=self.device).view(-1) / self.r_range

    def update(self):
        """The paper's update after an episode: evaluator steps (MSE to returns), then generator steps through
        the frozen evaluator with commands drawn from the buffer's returns. -> the last loss of each (NaN: no steps);
        a non-finite loss stops the run (check_finite)"""
        loss_v = loss_g = torch.tensor(float("nan"))
        for _ in range(self.args.evaluator_steps):
            thetas, rets = self.buffer.sample(self.args.batch_size, self.gen)
            loss_v = F.mse_loss(self.evaluator(thetas), rets)
            check_finite(self.steps, self.args.out_dir, DIVERGED, {"the evaluator's loss": loss_v})
            self.opt_v.zero_grad(set_to_none=True)
            loss_v.backward()
            self.opt_v.step()
        self.evaluator.requires_grad_(False)
        for _ in range(self.args.generator_steps):
            _, rets = self.buffer.sample(self.args.batch_size, self.gen)
            loss_g = generator_loss(self.generator, self.evaluator, rets / self.r_range, rets)
            check_finite(self.steps, self.args.out_dir, DIVERGED, {"the generator's loss": loss_g})
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            self.opt_g.step()
        self.evaluator.requires_grad_(True)
        return loss_v.item(), loss_g.item()

    @torch.no_grad()
    def evaluate(self, envs, ret, n):
        """Returns of the noise-free policy G(ret) over n episodes (run side by side)."""
        theta = self.generator(self.command(ret)).expand(n, -1)
        check_finite(self.steps, self.args.out_dir, DIVERGED, {"the generated policy": theta})
        seeds = self.rng.integers(2**31, size=n)
        return rollout(envs, theta, self.shapes, self.act_limit, self.norm, seeds)[1]

    def state(self):
        return {"generator": self.generator.state_dict(), "evaluator": self.evaluator.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_v": self.opt_v.state_dict(),
                "args": dataclasses.asdict(self.args), "step": self.steps,
                "buffer": (self.buffer.thetas, self.buffer.returns), "norm": vars(self.norm),
                "counters": (self.steps, self.episodes, self.best, self.solved_at, self.last_eval),
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state(), "gen": self.gen.get_state(),
                        "np": self.rng.bit_generator.state}}


def make_run(args):
    import gymnasium

    try:
        return GoGePo(args)
    except (gymnasium.error.Error, ImportError) as e:  # DependencyNotInstalled: a missing MuJoCo
        fail(f"cannot make {args.env}: {e}. The MuJoCo tasks need pip install 'gymnasium[mujoco]'.")


def command_sweep(run, envs, args, t0):
    """Commanded vs achieved return over the return range (the paper's claim: any return seen in training)."""
    info = run.info
    print(f"command sweep ({args.sweep_episodes} episodes per command):")
    print(f"{'command':>9} {'achieved':>9} {'std':>7} {'V(G(c))':>9}")
    rows = []
    for c in np.linspace(info["r_min"], info["r_max"], args.sweep_points):
        achieved = run.evaluate(envs, c, args.sweep_episodes)
        with torch.no_grad():
            predicted = run.evaluator(run.generator(run.command(c))).item()
        rows.append((c, achieved.mean(), achieved.std(), predicted))
        print(f"{c:9.1f} {achieved.mean():9.1f} {achieved.std():7.1f} {predicted:9.1f}", flush=True)
    log_metrics(args.out_dir, run.steps, "sweep", {"rows": [list(map(float, r)) for r in rows]}, t0)
    return rows


def train_round(run, envs, args, t0):
    """n_parallel noisy policies from the generator at the command best + drive, one episode each; each result goes
    into the buffer, followed by one update of the evaluator and the generator. -> environment steps taken, and the
    progress bar's numbers"""
    with torch.no_grad():  # one generator call for the batch; the noise makes the policies differ
        c = 1.0 if run.episodes == 0 else run.best + args.drive
        theta = run.generator(run.command(c))
        thetas = theta + args.noise * torch.randn(args.n_parallel, run.n_params, generator=run.gen).to(run.device)
    check_finite(run.steps, args.out_dir, DIVERGED, {"the generated policy": theta})
    seeds = run.rng.integers(2**31, size=args.n_parallel)
    rets, env_rets, steps = rollout(envs, thetas, run.shapes, run.act_limit, run.norm, seeds, push=True,
                                    alive_bonus=run.info.get("alive_bonus", 0.0))
    run.steps += steps
    for theta_p, r in zip(thetas, rets):
        run.buffer.add(theta_p, float(r))
        run.best = max(run.best, float(r))
        run.episodes += 1
        loss_v, loss_g = run.update()
    log_metrics(args.out_dir, run.steps, "train", {"return": float(env_rets.mean()), "best": run.best,
                                                 "command": float(c), "loss_v": loss_v, "loss_g": loss_g}, t0)
    return steps, dict(best=f"{run.best:.1f}", ret=f"{env_rets.mean():.1f}", loss_v=f"{loss_v:.2f}")


def evaluate_and_log(run, envs, args, t0):
    """The generator's policy for the command best, n_eval episodes. -> whether the task is solved for the first
    time now"""
    run.last_eval = run.steps
    result = run.evaluate(envs, run.best, args.n_eval)
    log_metrics(args.out_dir, run.steps, "eval", {"return": float(result.mean()), "std": float(result.std())}, t0)
    tqdm.write(f"step {run.steps} (episode {run.episodes}, {time.time() - t0:.0f}s): eval return "
               f"{result.mean():.1f} +- {result.std():.1f} for command {run.best:.1f}")
    solved = run.info["solved"]
    if solved is not None and result.mean() >= solved and run.solved_at is None:
        run.solved_at = (run.steps, time.time() - t0)
        log_metrics(args.out_dir, run.steps, "eval", {"solved_steps": run.steps}, t0)
        return True
    return False


def train(args):
    random.seed(args.seed)
    np.random.seed(args.seed)
    try:
        import gymnasium  # noqa: F401
    except ImportError:
        fail("policy_generator.py needs gymnasium (and gymnasium[mujoco] for the MuJoCo tasks): "
             "pip install -r requirements.txt")
    run = make_run(args)
    path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume or args.sweep_only:
        ckpt = resume_from(path, run, "--resume" if args.resume else "--sweep_only")
    done = run.steps >= args.total_steps or args.stop_solved and run.solved_at is not None  # the final evaluation next
    if args.resume and nothing_left(args.out_dir, run.steps, run.steps if done else args.total_steps, args.stop_at,
                                    ckpt.get("final", False)):
        return
    os.makedirs(args.out_dir, exist_ok=True)
    if args.resume:  # training done: the final evaluation and sweep are left, their lines from before a kill go
        truncate_metrics(args.out_dir, run.steps, ["final", "sweep"] if done else [])
    envs = make_envs(args.env, max(args.n_parallel, args.n_eval, args.sweep_episodes))
    t0 = time.time()
    if args.sweep_only:
        return command_sweep(run, envs, args, t0)
    print(f"config: {json.dumps(dataclasses.asdict(args))}")
    n_gen = sum(p.numel() for p in run.generator.parameters())
    print(f"{args.env}: policy of {run.n_params} parameters, generator {n_gen / 1e6:.2f}M, evaluator "
          f"{sum(p.numel() for p in run.evaluator.parameters()) / 1e6:.2f}M, return range ({run.info['r_min']}, "
          f"{run.info['r_max']}), solved at {run.info['solved']}; starting at step {run.steps}")
    bar = progress_bar(args.total_steps, run.steps, unit="step")
    stop = done
    while run.steps < args.total_steps and not stop:
        steps, progress = train_round(run, envs, args, t0)
        bar.update(steps)
        bar.set_postfix(progress, refresh=False)
        if run.steps // args.eval_every > run.last_eval // args.eval_every or run.steps >= args.total_steps:
            stop = evaluate_and_log(run, envs, args, t0) and args.stop_solved
            check_finite(run.steps, args.out_dir, DIVERGED, {}, [run.generator, run.evaluator], bar)
            save_checkpoint(path, run.state())
            if args.stop_at and run.steps >= args.stop_at:
                bar.close()
                return
    bar.close()
    result = run.evaluate(envs, run.best, args.n_eval)
    log_metrics(args.out_dir, run.steps, "final", {"return": float(result.mean()), "std": float(result.std())}, t0)
    command_sweep(run, envs, args, t0)
    mark_final(path)  # the checkpoint of the last evaluation: the run's end
    solved = "not solved" if run.solved_at is None else f"solved at step {run.solved_at[0]} ({run.solved_at[1]:.0f}s)"
    print(f"final: eval return {result.mean():.1f} +- {result.std():.1f} over {args.n_eval} episodes for command "
          f"{run.best:.1f}; {solved}; {run.steps} steps, {run.episodes} episodes, {time.time() - t0:.0f}s")


# ----------------------------------------------------------------------------------------------
# Benchmark


def bench(args):
    """Median times of the parts of one iteration at the configured sizes, in one run."""
    run = make_run(args)
    envs = make_envs(args.env, args.n_parallel)

    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)

    def timed(fn, n=5):
        times = []
        for _ in range(n + 1):  # the first is a warm-up
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return float(np.median(times[1:])) * 1e3

    with torch.no_grad():
        theta = run.generator(run.command(0.0))
    for i in range(args.batch_size):  # distinct returns: every generator batch has batch_size distinct commands
        run.buffer.add(theta[0] + 0.1 * torch.randn(run.n_params, device=run.device), float(i))
    x = torch.zeros(args.n_parallel, 1, run.shapes[0][1], device=run.device)
    thetas = theta.expand(args.n_parallel, -1)
    print(f"{args.env}, threads {torch.get_num_threads()}, policy {run.n_params} parameters, batch {args.batch_size} "
          "(all commands distinct: the slowest update)")
    with torch.no_grad():
        print(f"generator, 1 command:                 {timed(lambda: run.generator(run.command(0.0))):8.2f} ms")
    t_up = timed(run.update, 3)
    print(f"update (evaluator {args.evaluator_steps} + generator {args.generator_steps} steps): {t_up:8.1f} ms")
    with torch.no_grad():
        t_pol = timed(lambda: policy_forward(thetas, x, run.shapes, run.act_limit), 50)
    print(f"policy forward, {args.n_parallel} policies, 1 step:      {t_pol:8.3f} ms")
    for env in envs:
        env.reset(seed=0)
    act = envs[0].action_space.sample()
    t_env = timed(lambda: [e.step(act) for e in envs], 50)
    print(f"environment step x {args.n_parallel}:                 {t_env:8.3f} ms")


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


def resume_from(path, run, flag="--resume"):
    """--resume, --sweep_only: the checkpoint of a run like this one (read_checkpoint); the networks, optimizers (at
    this run's learning rates), buffer, normaliser and counters of a GoGePo run loaded in place, the RNGs restored;
    returns the checkpoint dict."""
    ckpt = read_checkpoint(path, flag, run.device, run.args)
    try:
        for name in ("generator", "evaluator", "opt_g", "opt_v"):
            getattr(run, name).load_state_dict(ckpt[name])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"{flag}: the weights in {path} do not fit this run's nets ({str(e).strip().splitlines()[0]}); give the "
             "flags it was trained with, or another --out_dir")
    run.buffer.thetas, run.buffer.returns = ckpt["buffer"]
    vars(run.norm).update(ckpt["norm"])
    run.steps, run.episodes, run.best, run.solved_at, run.last_eval = ckpt["counters"]
    for opt, lr in ((run.opt_g, run.args.lr_generator), (run.opt_v, run.args.lr_evaluator)):
        for group in opt.param_groups:
            group["lr"] = lr  # this run's flags, as the other scripts' learning rates
    ckpt["rng"] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in ckpt["rng"].items()}
    random.setstate(ckpt["rng"]["python"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    run.gen.set_state(ckpt["rng"]["gen"])
    run.rng.bit_generator.state = ckpt["rng"]["np"]
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


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.bench:
        return bench(args)
    if not args.sweep_only:
        open_out_dir(args)
    train(args)


if __name__ == "__main__":
    main()
