"""The RL experiment of the recurrent FWP paper: an IMPALA agent whose core is a recurrent fast weight programmer.

Irie, Schlag, Csordas, Schmidhuber, "Going Beyond Linear Transformers with Recurrent Fast Weight Programmers",
NeurIPS 2021, arXiv 2106.06295, section 4.4 (Atari 2600); IMPALA: Espeholt et al. 2018, arXiv 1802.01561 (the deep
residual encoder, fig. 3; V-trace, eq. 1 and section 4.2). The cores (Delta RNN, Delta LSTM, Recurrent Delta Net,
DeltaNet, ... and the LSTM) are rfwp.py's: this script imports it, so copying it means copying rfwp.py, data.py
(which rfwp.py imports), cpu_kernels.cpp and cuda_kernels.cu too.

Per environment step: obs -> encoder (IMPALA CNN for Atari frames; vectors: standardised by running statistics, then
an MLP) -> [features, clipped last reward] -> linear to d_model -> core (one step; its state carried across unrolls,
zeroed where an episode ended; by default the official RL code's core forms, --official_rl_core) -> policy logits,
baseline V. Synchronous: one process (or each of N under torchrun, its share) steps a batch of environments with the
current policy, keeping the graph, and learns from each unroll of T steps with the loss
    -sum_s log pi(a_s) A_s + 0.5 baseline_cost sum_s (v_s - V(x_s))^2 - entropy_cost sum_s H(pi(.|x_s))
    v_s = V(x_s) + sum_{t>=s} (prod_{i=s}^{t-1} gamma_i c_i) rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t))    (V-trace)
    A_s = rho_s (r_s + gamma_s v_{s+1} - V(x_s))
Gradients flow through the fast weights within an unroll (--truncate 1 detaches them every step). One RMSProp step
per unroll (alpha 0.99, eps 0.01 outside the square root as torch's, lr decayed linearly to 0, gradient clip 40);
entropy_cost 0.01, baseline_cost 0.5, discount 0.99, rewards clipped to [-1, 1] in the loss, sums over time and batch
as torchbeast. vtrace() takes general log-ratios and is tested off-policy.

Glossary: T unroll length, B environments stepped together (--batch_size), A actions, s, t steps of an unroll,
gamma_t the discount (0 where a life or episode ended), rho_t = min(1, pi/mu), c_i = min(1, pi/mu) the clipped
importance weights (1 here: the behaviour policy mu is the current one), v_s the V-trace target.

Commands:
    python rfwp_rl.py                                  # rdn core on CartPole without velocities: ~2.5 CPU min
    python rfwp_rl.py --preset tiny                    # smoke run
    python rfwp_rl.py --model delta --eval 100         # the greedy policy of out/rfwp_rl/ckpt.pt, 100 episodes
    python rfwp_rl.py --env ALE/Breakout-v5 --env_steps 50_000_000   # Atari, the official settings (GPU advised)
    python rfwp_rl.py --bench                          # agent steps per second of every core, loops and kernels
    torchrun --nproc_per_node 2 rfwp_rl.py             # data-parallel: each process steps half the environments

Fidelity. IMPALA/torchbeast as written (V-trace with rho and c clipped at 1, summed losses, RMSProp eps outside the
square root, clip 40, the clipped last reward as a core input), except: learning is synchronous (one process, or N
data-parallel ones under torchrun, instead of 48 actors and a learner), so the importance weights are exactly 1; the
fast weights are backpropagated through the unroll unless --truncate 1; a time-limit truncation ends the bootstrap
like a termination (as torchbeast); a lost Atari life stops the bootstrap and is followed by a FIRE (as the official
wrappers: AtariEnvs) but neither resets the core state nor ends the reported episode (torchbeast's episodic-life
wrapper does both: the official cores zero their state at every lost life, and its test() scores single lives, which
is --eval_per_life); vector observations are standardised by running statistics. The RL cores are the official ones
by default (--official_rl_core; test_rl_cores_equal_the_official_forms steps each against the official layers'
equations written out), at the official commands' sizes for Atari and other gymnasium ids; the official RL code has
no Delta LSTM, Delta MLP or Delta Delta Net core, so those run in their sequence-task forms with no final LN. The
official policy and baseline heads are one linear layer here (the same function and initial distribution). The CPU
task CartPole-NoVel, which has no official counterpart, uses smaller cores (Args).

Runs: --out_dir gets metrics.jsonl (every episode's return, every update's losses) and ckpt.pt. The scaffolding at the
end, the same in every script, refuses an --out_dir that holds another run (--resume continues it, --overwrite replaces
it), checks a checkpoint before resuming from it (the script, RESUME_FLAGS, a truncated file) and stops a diverging run
before it logs or saves anything of it (open_out_dir, read_checkpoint, nothing_left, truncate_metrics, check_finite). A
non-finite policy logit on any rank stops the run too. --resume restores the agent, optimizer and RNGs but starts fresh
episodes (the emulators' state is not saved), so a resumed run is not step for step the uninterrupted one. Under
torchrun rank r steps the environments one process would number r n / N ... (r + 1) n / N - 1, seeded as there, each
sampling its actions from a generator of its own; the episodes' returns are gathered to rank 0, which logs and
checkpoints; the summed loss is scaled by N. --eval and --bench run in one process.
"""

import ast
import contextlib
import dataclasses
import gc
import inspect
import io
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import rfwp


# ----------------------------------------------------------------------------------------------
# Configuration: every flag with its default and docstring (--help prints them), the presets, the official settings
# for other environments, and the checks of a command line's values (the agent's own checks, check_agent below).


@dataclass
class Args:
    # environment
    env: str = "CartPole-NoVel"
    """CartPole-NoVel (CartPole-v1 seeing only cart position and pole angle: it needs memory), a gymnasium id with
    vector observations and discrete actions, or ALE/<Game>-v5 (Atari through ale_py's vector environment)"""
    env_steps: int = 300_000
    """environment steps in all, summed over the environments (Atari: agent steps of 4 frames each)"""
    unroll: int = 20
    """steps of each environment per update, the V-trace trajectory length (other environments: 50)"""
    entropy_cost: float = 0.01
    """weight of the entropy bonus"""
    baseline_cost: float = 0.5
    """weight of the value (baseline) loss"""
    discount: float = 0.99
    """discount factor gamma"""
    reward_scale: float = 0.1
    """rewards are multiplied by this in the loss, before the clip to [-1, 1] (other environments: 1; CartPole-NoVel's
    reward of 1 per step would need values of ~100, which RMSProp's small steps reach slowly)"""
    truncate: int = 0
    """detach the core state every this many steps of an unroll (1: the official code's per-step detach of the fast
    weights; 0: backpropagate through the whole unroll)"""
    memoryless: bool = False
    """zero the core state before every step (an agent without memory: the ablation for the CPU task)"""
    # core
    model: str = "rdn"
    """lstm | linear | delta | delta_mlp | delta_delta | delta_rnn | delta_lstm | rdn (rfwp.py's models but the
    transformer, whose state grows with every step)"""
    d_model: int = 64
    """core width (lstm: hidden size; other environments: 128, lstm 256)"""
    n_layer: int = 2
    """core blocks (lstm: layers; other environments: lstm 1)"""
    n_head: int = 4
    """heads per layer; d_head = d_model / n_head"""
    d_ff: int = 256
    """feed-forward hidden width (other environments: 512)"""
    fast_net_depth: int = 1
    """delta_mlp: layers of the fast network"""
    official_rl_core: bool = True
    """the official RL cores' forms (torchbeast/ of the official code): linear and delta q, k = (elu + 1) / (sum +
    1e-5), delta_rnn q, k = softmax, no final LN before the heads, lstm = nn.LSTM on the core inputs themselves (no
    linear map to d_model first); false: the sequence tasks' forms of rfwp.py"""
    impl: str = "auto"
    """auto | loop | kernel (or its old name cuda; chunk is loop here: one step per call). kernel: every part as a
    fused kernel (cpu_kernels.cpp on the CPU, cuda_kernels.cu on CUDA); auto: on the CPU kernel, elsewhere loop"""
    # training
    batch_size: int = 8
    """environments stepped together, in all (other environments: 32); under torchrun each of the N processes steps
    batch_size / N of them, rank r those one process numbers r * batch_size / N onwards, seeded alike"""
    lr: float = 3e-3
    """RMSProp learning rate, decayed linearly to 0 (other environments: IMPALA's 6e-4)"""
    grad_clip: float = 40.0
    """gradient norm clip (0 disables)"""
    eval_every: int = 50
    """print and checkpoint every this many updates (other environments: 25)"""
    seed: int = 0
    """seed of python, numpy, torch and the environments"""
    device: str = "auto"
    """auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps"""
    out_dir: str = "out/rfwp_rl"
    """metrics.jsonl and ckpt.pt go here"""
    resume: bool = False
    """continue the run in out_dir from its ckpt.pt (the only way to add to a run there)"""
    overwrite: bool = False
    """start a new run in an out_dir that holds one: delete its ckpt.pt and metrics.jsonl first (without
    this flag or --resume, such a run stops before writing anything)"""
    stop_at: int = 0
    """exit after this update, checkpoint saved (a time-boxed job); --resume continues. 0: run to the end"""
    eval: int = 0
    """run the greedy policy of out_dir/ckpt.pt for this many episodes, print mean and std, and exit"""
    eval_per_life: bool = False
    """--eval on Atari: score one life as an episode (the official test(), which keeps the episodic-life wrapper);
    default: the whole game, the usual Atari score"""
    bench: bool = False
    """measure agent steps per second of every core (the emulator's share too), and exit"""


PRESETS = {"tiny": dict(d_model=32, n_layer=1, n_head=2, d_ff=64, batch_size=8, env_steps=1600, eval_every=10)}

# The defaults above are the CPU memory task's (smaller cores, more and smaller updates, a larger step, scaled
# rewards). Any other environment gets the official code's settings where neither a flag nor the preset sets them:
# IMPALA's (RMSProp 6e-4, batch 32, unroll 50, raw rewards clipped) and the official cores (2 layers of d 128, 4
# heads of 32, FF 512; the LSTM: one layer of 256).
IMPALA = dict(lr=6e-4, batch_size=32, unroll=50, reward_scale=1.0, eval_every=25, d_model=128, d_ff=512)
RL_DEFAULTS = {"lstm": dict(IMPALA, d_model=256, n_layer=1)}


RESUME_FLAGS = ("env", "model", "d_model", "n_layer", "n_head", "d_ff", "fast_net_depth", "official_rl_core",
                "memoryless")  # the flags a --resume must share with its checkpoint: the agent's shape and inputs


def check_args(args):
    args.impl = "kernel" if args.impl == "cuda" else args.impl  # the old name of --impl kernel
    sizes = ("d_model", "n_head", "n_layer", "d_ff", "fast_net_depth", "batch_size", "eval_every", "env_steps",
             "unroll")
    try:  # the agent's checks: the same messages
        check_agent(args.model, impl=args.impl, **{k: getattr(args, k) for k in sizes})
    except ValueError as e:
        fail(f"--{e}")
    if (args.lr <= 0 or args.reward_scale <= 0 or not 0 <= args.discount <= 1
            or min(args.grad_clip, args.stop_at, args.truncate, args.eval, args.entropy_cost, args.baseline_cost,
                   args.seed) < 0):
        fail("--lr and --reward_scale must be positive; --discount in [0, 1]; --grad_clip, --stop_at, --truncate, "
             "--eval, --entropy_cost, --baseline_cost and --seed non-negative.")
    return args


# ----------------------------------------------------------------------------------------------
# The agent: encoder, core (rfwp.py's), policy and baseline heads; V-trace and IMPALA's loss.


def check_agent(model, **config):
    """The agent's checks, which the command line reuses: rfwp.check_config's (a ValueError naming the argument and
    the fix), and a core whose state keeps its size."""
    rfwp.check_config(model=model, **config)
    if model == "transformer":
        raise ValueError("model: the agent needs a fast-weight or recurrent core: the transformer's state (a KV cache) "
                         "grows with every environment step. Use lstm, delta, delta_rnn, rdn, ...")


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
    """Encoder (Atari frames (4, 84, 84): ImpalaCNN; vectors: standardised by running statistics, then a two-layer MLP
    of width d_model) -> concat the clipped last reward -> linear to d_model -> the core (rfwp.FWPModel of `model`, or
    rfwp.LSTMModel; one step per call) -> policy logits and baseline (one linear head). The core's reset mask zeroes
    the state of the environments whose episode just ended. With official_rl_core an lstm core reads the concatenation
    itself (the official LSTM agent has no linear map before its LSTM; its fast-weight agents have one, as here).
    memoryless: every step starts from the zero state. State: the core's (a list with one tuple per block)."""

    def __init__(self, obs_shape, n_actions, model="rdn", d_model=64, n_head=4, n_layer=2, d_ff=256, fast_net_depth=1,
                 impl="auto", official_rl_core=True, memoryless=False):
        super().__init__()
        check_agent(model, d_model=d_model, n_head=n_head, n_layer=n_layer, d_ff=d_ff, fast_net_depth=fast_net_depth,
                    impl=impl, official_rl_core=official_rl_core, n_actions=n_actions)
        self.image, self.memoryless = len(obs_shape) == 3, memoryless
        if self.image:
            self.encoder, n_feat = ImpalaCNN(obs_shape[0]), 256
        else:
            self.encoder = nn.Sequential(nn.Linear(obs_shape[0], d_model), nn.ReLU(), nn.Linear(d_model, d_model),
                                         nn.ReLU())
            n_feat = d_model
            self.register_buffer("obs_count", torch.zeros(()))
            self.register_buffer("obs_mean", torch.zeros(obs_shape))
            self.register_buffer("obs_var", torch.ones(obs_shape))
        raw = official_rl_core and model == "lstm"
        self.core_in = nn.Identity() if raw else nn.Linear(n_feat + 1, d_model)
        if model == "lstm":
            self.core = rfwp.LSTMModel(n_feat + 1 if raw else d_model, n_actions + 1, d_model=d_model, n_layer=n_layer,
                                       embed=nn.Identity())
        else:  # one step per call: no chunks
            self.core = rfwp.FWPModel(d_model, n_actions + 1, model=model, d_model=d_model, n_head=n_head,
                                      n_layer=n_layer, d_ff=d_ff, impl="loop" if impl == "chunk" else impl,
                                      fast_net_depth=fast_net_depth, official_rl_core=official_rl_core,
                                      embed=nn.Identity())

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
        if self.memoryless:
            reset = torch.ones(obs.shape[0], dtype=torch.bool, device=obs.device)
        if not self.image:
            obs = ((obs - self.obs_mean) / (self.obs_var + 1e-8).sqrt()).clamp(-10, 10)
        x = torch.cat([self.encoder(obs), last_reward.clamp(-1, 1).unsqueeze(-1)], -1)
        out, state = self.core(self.core_in(x).unsqueeze(1), state, reset)  # (B, 1, A + 1)
        return out[:, 0, :-1], out[:, 0, -1], state


def build_agent(args, obs_shape, n_actions):
    """The command line's agent: the flags mapped to Agent's keywords (the only place that reads Args for a module)."""
    return Agent(obs_shape, n_actions, model=args.model, d_model=args.d_model, n_head=args.n_head, n_layer=args.n_layer,
                 d_ff=args.d_ff, fast_net_depth=args.fast_net_depth, impl=args.impl,
                 official_rl_core=args.official_rl_core, memoryless=args.memoryless)


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


# ----------------------------------------------------------------------------------------------
# Environments: a batch stepped in this process, reset where an episode ends

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
    V-trace (that step's policy-gradient term has zero mean). Games without a FIRE action are unaffected. The official
    reset also sends a no-op before the FIRE and action 2 after it, hidden from the agent; here the FIRE takes one
    agent step. --eval on Atari plays whole greedy games, which may last until ALE's 108k-frame limit."""

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


# ----------------------------------------------------------------------------------------------
# Training: each update steps every environment args.unroll times with the current policy (graph kept) and takes
# one RMSProp step on IMPALA's loss; --eval plays the greedy policy of a checkpoint; --bench times the cores.


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


def sample_actions(probs, samplers):
    """One action per environment by inverse transform sampling, environment j's from its own generator samplers[j]:
    the actions an environment gets depend neither on the others nor on the process that steps it. probs (B, A) ->
    actions (B,), on probs' device."""
    u = torch.tensor([g.random() for g in samplers], dtype=torch.float64)
    cdf = probs.detach().double().cpu().cumsum(-1)
    return (cdf < u[:, None]).sum(-1).clamp(max=probs.shape[-1] - 1).to(probs.device)


def rl_unroll(agent, envs, carry, args, device, world=1):
    """Step every environment args.unroll times with the current policy (graph kept), then compute the bootstrap
    value. Returns an Unroll: the trajectory, the returns of the episodes that ended (on every rank those of all
    ranks, in the order one process would list them), the emulator seconds, the new Carry. agent: the Agent, or its
    DDP wrapper when world > 1."""
    net = agent.module if world > 1 else agent
    obs, last_reward, reset, state = carry
    logits, values, actions, rewards, discounts, ended, env_time, seen = [], [], [], [], [], [], 0.0, [obs]
    bad = None  # this rank's first non-finite policy logits
    for t in range(args.unroll):
        if args.truncate and t % args.truncate == 0:
            state = rfwp.detach_state(state)
        logit, value, state = agent(torch.as_tensor(obs, device=device), last_reward, state, reset)
        if bad is None and not torch.isfinite(logit).all():  # a diverged agent: no distribution to sample from
            bad = logit.detach()  # raised after the unroll, on every rank alike (DDP's forwards stay in step)
        action = sample_actions(F.softmax(logit.detach().float(), -1), envs.samplers)
        t_env = time.perf_counter()
        obs, reward, done, life_end = envs.step(action.cpu().numpy())
        env_time += time.perf_counter() - t_env
        seen.append(obs)
        envs.returns += reward
        ended.append(np.where(done, envs.returns, np.nan))  # (B,) the return where an episode ended
        envs.returns[done] = 0
        # the next step's input: the new observation, this reward, and a reset where the episode ended
        last_reward = torch.as_tensor(reward, device=device)
        reset = torch.as_tensor(done, device=device)
        logits.append(logit), values.append(value), actions.append(action)
        rewards.append(args.reward_scale * last_reward)
        discounts.append(args.discount * (1 - torch.as_tensor(life_end, device=device, dtype=torch.float32)))
    if mean_over_ranks(torch.tensor(float(bad is not None), device=device), world).item() > 0:  # on any rank
        raise FloatingPointError(bad if bad is not None else torch.full((2,), math.nan))  # (2,): "non-finite"
    with torch.no_grad():  # V(x_T): the state is not advanced (the next unroll starts from x_T again)
        _, bootstrap, _ = agent(torch.as_tensor(obs, device=device), last_reward, state, reset)
    ended = np.concatenate(gather_ranks(np.stack(ended), world), 1)  # (T, all environments), as one process's
    finished = ended[~np.isnan(ended)].tolist()  # by step, then environment
    if not net.image:  # the observation statistics change between unrolls, never within one; every rank merges all
        seen = np.concatenate(gather_ranks(np.stack(seen[:-1]), world), 1)  # (T, all environments, n_obs)
        net.observe(torch.as_tensor(seen.reshape(-1, seen.shape[-1]), device=device))
    traj = dict(logits=torch.stack(logits), values=torch.stack(values), actions=torch.stack(actions),
                rewards=torch.stack(rewards), discounts=torch.stack(discounts), bootstrap=bootstrap)
    return Unroll(traj, finished, env_time, Carry(obs, last_reward, reset, rfwp.detach_state(state)))


def rl_update(agent, opt, envs, carry, args, device, world=1):
    """One unroll and, if its loss (over every rank's environments) is finite, one clipped RMSProp step. Returns an
    Update: the loss and its parts over all environments, the returns of the episodes that ended, the emulator seconds
    and the new Carry. agent: the Agent, or its DDP wrapper when world > 1."""
    unroll = rl_unroll(agent, envs, carry, args, device, world)
    loss, parts = rl_loss(unroll.traj, args)
    # IMPALA's loss is a sum over the environments: the global one is the sum of the ranks' (world x their mean), and
    # its gradient is world x the mean of the ranks' gradients that DDP computes, hence loss x world below
    mean = mean_over_ranks(torch.tensor([loss.item(), parts["pg_loss"], parts["baseline_loss"], parts["entropy"]],
                                        dtype=torch.float64, device=device), world).tolist()
    total = mean[0] * world
    parts = {"pg_loss": mean[1] * world, "baseline_loss": mean[2] * world, "entropy": mean[3]}  # entropy: per step
    if math.isfinite(total):
        opt.zero_grad(set_to_none=True)
        (loss * world).backward()
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(agent.parameters(), args.grad_clip)
        opt.step()
    return Update(torch.tensor(total), parts, unroll.finished, unroll.env_time, unroll.carry)


def rl_start(envs, device, n, seed=0):
    """Reset the environments: the first Carry (zero reward, a reset everywhere, no core state). Environment j samples
    its actions from a generator of its own, seeded by seed + j (and apart from the environment's own seed + j)."""
    envs.returns = np.zeros(n, dtype=np.float64)
    envs.samplers = [np.random.default_rng([seed + j, 1]) for j in range(n)]
    return Carry(envs.reset(), torch.zeros(n, device=device), torch.ones(n, dtype=torch.bool, device=device), None)


def rl_log_update(args, env_steps, update, returns, bar, t0):
    """metrics.jsonl: every finished episode's return and the update's losses; the bar: the last 100 returns."""
    for r in update.finished:
        log_metrics(args.out_dir, env_steps, "episode", {"return": r}, t0)
    log_metrics(args.out_dir, env_steps, "train", dict(loss=update.loss.item(), **update.parts), t0)
    if returns:
        bar.set_postfix(ret=f"{np.mean(returns[-100:]):.1f}", ent=f"{update.parts['entropy']:.2f}", refresh=False)


def rl_log_window(args, step, per_update, returns, dt, n_updates, env_time, t0):
    """One line per --eval_every updates: the mean of the last 100 returns, speed and the environments' share."""
    recent, n = returns[-100:], per_update * n_updates
    mean = np.mean(recent) if recent else float("nan")
    tqdm.write(f"update {step} ({step * per_update} steps): return {mean:.1f} (last {len(recent)} episodes), "
               f"{len(returns)} episodes, {n / dt:.0f} steps/s, {100 * env_time / dt:.0f}% of the time in the "
               "environments")
    log_metrics(args.out_dir, step * per_update, "train", {"steps_per_s": n / dt, "env_time_frac": env_time / dt}, t0)


def start_processes(args):
    """One process per rank under torchrun (RANK, WORLD_SIZE set; gloo on CPU, nccl on CUDA) -> rank, world, device.
    --batch_size is the global batch: each rank steps its part of the environments; rank 0 logs, evaluates and saves."""
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
    if args.impl == "kernel" and device.type not in rfwp.KERNEL_FILES:
        print(f"warning: --impl kernel runs on the CPU and CUDA, not {device}; using --impl chunk", file=sys.stderr)
    master = rank == 0
    seed_everything(args.seed + rank)  # the initial weights are rank 0's (DDP broadcasts them)
    n_envs = args.batch_size // world  # this rank's: one process's environments rank * n_envs ... + n_envs - 1
    envs = make_envs(args, n_envs, args.seed + rank * n_envs)  # environment j of them: seed + rank * n_envs + j
    agent = build_agent(args, envs.obs_shape, envs.n_actions).to(device)
    opt = torch.optim.RMSprop(agent.parameters(), lr=args.lr, alpha=0.99, eps=0.01)
    per_update = args.batch_size * args.unroll
    n_updates = max(1, args.env_steps // per_update)
    step, returns = 0, []
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume:
        ckpt = resume_from(ckpt_path, agent, opt, device, args)
        step, returns = ckpt["step"], ckpt["returns"]
        envs.seed += step  # fresh episodes: the environments' own state is not saved
        # every rank reads the same checkpoint, so all return here alike (rank 0 says why); then a clean teardown
        with contextlib.nullcontext() if master else contextlib.redirect_stdout(io.StringIO()):
            done = nothing_left(args.out_dir, step, n_updates, args.stop_at, True)  # its last checkpoint: its result
        if done:
            envs.close()
            finish_processes(agent, world, master)
            return
    ddp = agent  # what the unrolls call: the agent, wrapped in DDP when there are several processes
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(agent, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        if args.resume:
            truncate_metrics(args.out_dir, step * per_update)  # the RL logs count environment steps
        print(f"config: {json.dumps(dataclasses.asdict(args))}")
        print(f"device {device}, {world} process(es), env {args.env} (observation {envs.obs_shape}, {envs.n_actions} "
              f"actions), core {args.model}, {sum(p.numel() for p in agent.parameters()) / 1e6:.2f}M parameters, "
              f"{n_updates} updates of {args.batch_size} x {args.unroll} steps, starting at update {step}")
    carry = rl_start(envs, device, n_envs, envs.seed)
    t0, env_time, t_window, step_window = time.time(), 0.0, time.time(), step
    bar = progress_bar(n_updates * per_update, step * per_update, master, unit="step")
    while step < n_updates:
        for group in opt.param_groups:
            group["lr"] = args.lr * (1 - step / n_updates)  # linear decay to 0
        try:
            update = rl_update(ddp, opt, envs, carry, args, device, world)
        except FloatingPointError as e:  # rl_unroll's non-finite policy logits (on any rank: every rank raises)
            check_finite(step, args.out_dir, "Lower --lr.", {"the policy logits": e.args[0]}, bar=bar)
        check_finite(step, args.out_dir, "Lower --lr.", {"the loss": update.loss}, bar=bar)  # over every rank's
        carry, step, env_time = update.carry, step + 1, env_time + update.env_time
        returns += update.finished
        bar.update(per_update)
        if master:
            rl_log_update(args, step * per_update, update, returns, bar, t0)
        if step % args.eval_every == 0 or step == n_updates or step == args.stop_at:
            check_finite(step, args.out_dir, "Lower --lr.", {}, [agent], bar)  # the same weights on every rank (DDP)
            if master:  # the speed is rank 0's, the environments' share of the time too
                rl_log_window(args, step, per_update, returns, time.time() - t_window, step - step_window, env_time, t0)
                save_checkpoint(ckpt_path, {
                    "model": agent.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "args": dataclasses.asdict(args), "returns": returns, "rng": rng_state()})
            t_window, step_window, env_time = time.time(), step, 0.0
            if step == args.stop_at:
                break
    bar.close()
    envs.close()
    del ddp  # DDP holds the process group: release it here, not at interpreter exit (gloo aborts there)
    finish_processes(agent, world, master)
    if master and step == n_updates:
        print(f"final: mean return of the last {len(returns[-100:])} episodes {np.mean(returns[-100:]):.1f} after "
              f"{step * per_update} environment steps, {time.time() - t0:.0f}s")


@torch.no_grad()
def evaluate(args):
    """The greedy (argmax) policy of out_dir/ckpt.pt, one episode in each of args.eval environments."""
    device = pick_device(args.device)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        fail(f"--eval: no checkpoint at {ckpt_path}; train first (same --out_dir)")
    ckpt = read_checkpoint(ckpt_path, "--eval", device)
    if "env" not in ckpt["args"] or ckpt["args"].get("task", "rl") != "rl":  # task: rfwp.py's checkpoints
        fail(f"--eval: {ckpt_path} is not an agent's checkpoint; use the --out_dir of a run of this script")
    saved = Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__})
    envs = make_envs(saved, args.eval, args.seed + 10**6)  # seeds apart from training's
    agent = build_agent(saved, envs.obs_shape, envs.n_actions).to(device)
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


def bench(args):
    """Environment steps per second: the emulator alone (random actions), then a full update (acting, V-trace,
    backward, RMSProp) for each core, with the share of the update spent in the environments. Each fast-weight core
    with --impl loop (one Python step per environment step) and, where the device's kernels build, --impl kernel."""
    device = pick_device(args.device)
    envs = make_envs(args, args.batch_size, args.seed)
    n = args.batch_size * args.unroll
    impls = ["loop", "kernel"] if rfwp.kernels(device.type) else ["loop"]
    print(f"device {device}, threads {torch.get_num_threads()}, env {args.env}, {args.batch_size} environments x "
          f"unroll {args.unroll} = {n} steps per update, d_model {args.d_model}, n_layer {args.n_layer}, "
          f"n_head {args.n_head}")
    envs.reset()
    t = time.perf_counter()
    for _ in range(args.unroll):
        envs.step(np.random.randint(envs.n_actions, size=args.batch_size))
    print(f"{'emulator only':14} {n / (time.perf_counter() - t):9.0f} steps/s")
    print(f"{'core':14} {'impl':6} {'params':>8} {'steps/s':>9} {'in envs':>8}")
    for name in rfwp.MODELS:
        if name == "transformer":
            continue
        for impl in ["auto"] if name == "lstm" else impls:
            torch.manual_seed(0)
            agent = build_agent(dataclasses.replace(args, model=name, impl=impl), envs.obs_shape,
                                envs.n_actions).to(device)
            opt = torch.optim.RMSprop(agent.parameters(), lr=args.lr, alpha=0.99, eps=0.01)
            carry, times, env_times = rl_start(envs, device, args.batch_size, args.seed), [], []
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
    if kv.get("env", args.env) != Args.env:  # this script only: another environment gets the official settings
        for key, val in RL_DEFAULTS.get(kv.get("model", args.model), IMPALA).items():
            if key not in kv and key not in PRESETS.get(preset, {}):
                setattr(args, key, val)
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


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.bench:
        return bench(args)
    if args.eval:
        return evaluate(args)
    open_out_dir(args)
    train(args)


if __name__ == "__main__":
    main()
