"""Tests for the FWP scripts: exactness (float64), state carrying, smoke runs, resume, CLI errors, data.

Run: python -m pytest test_all.py (one script's tests: -k dn_, lt_, rf_, rl_, od_, pg_, data_ or fig_; rfwp_rl.py's
are rl_, not rf_). CUDA tests skip without a GPU; wherever nvcc is, cuda_kernels.cu is compiled to PTX for sm_90.

What the sections check (each test's name and docstring say more). In every script: each fast form against the
reference loop in float64 (outputs, final state, the gradients of every input and of the initial state; T not a
multiple of the chunk), gradcheck on the small ops, a state carried across calls, the layers built from keywords (a
bad value a ValueError naming it), the README's "Use a layer" blocks run in a folder holding only the files they
name; smoke runs from a copy of just the script and its files; resume (the metrics equal the uninterrupted run's to
1e-5 relative; the lines a killed run logged past its checkpoint, and a line cut short, dropped); the output-folder,
checkpoint and divergence rules (each file byte-identical afterwards); CLI errors (every int and float flag refuses
-1); 2 processes under torchrun against 1 on the same global batch (losses and final weights to 1e-5 relative).
  dn_  the gated rule (the log decay's gradient; alpha in (1e-6, 1), near 0 in the kernels' backward), the Gated
       DeltaNet layer against its equations by hand, its forms agreeing with the short convolution's state carried
       and token by token; the CPU kernels; the chunk pass's CUDA device code on CPU threads.
  lt_  loop = chunk = parallel for every feature map and normalisation (z carried), FAVOR+ unbiased (a fixed-seed
       statistical test), DPFP's formula and size, the softmax baseline's cache, sinusoidal positions breaking
       softmax attention's invariance to the order of the prefix, --repeat_keys targets against a dict.
  rf_  every model's step-by-step forward = its full-sequence forward, split calls = one call, the reset mask, the
       recurrent layers against their equations written out, --post_ln against nn.TransformerEncoderLayer, the code
       generator against an independent interpreter, ListOps labels against a stack evaluator and its trees' depth
       and length against the official generator's; the CPU kernels against the loops (every compiled width and the
       generic code, inputs scaled by 1e-6 and by 30, a missing compiler falling back with one warning); the CUDA
       kernels' device code on CPU threads (each CUDA thread a fiber).
  rl_  each official RL core against the official layers' equations, V-trace against Espeholt et al.'s eq. 1 term by
       term (off-policy, with episode ends), the core state zeroed exactly where an episode ended, the state
       detached every --truncate steps, --memoryless, the running observation statistics against numpy, smoke runs
       on CartPole-NoVel (with resume and --eval) and Atari Breakout, FIRE after a lost life, --eval_per_life.
  od_  euler and rk4 at orders 1 and 4 on closed forms, dopri5 within its tolerance (its gradient the exact one), the
       missing-value fill against np.interp, both paths through their knots, the natural spline C2 and equal to a
       dense solve, a series alone = in a padded batch, each rule's vector field and closed-form solution, both
       layouts against their equations, --impl precomputed and kernel against generic (float64, logits and every
       gradient), the CPU kernel against the PyTorch affine maps, the .ts parser, MFCC against numpy, the speech,
       sepsis and UEA loaders on small files.
  pg_  a generated vector = an nn.Sequential MLP with those weights, the tiles and fan-in scaling, the fingerprint
       unchanged by a permutation of hidden units, the buffer's recency weights, distinct-command generation = the
       full batch's gradient, the normaliser against numpy, short runs on MountainCar, Pendulum and InvertedPendulum.
  data_ the downloads against a local HTTP server; fig_ figures/plot.py draws every figure from the committed logs.

A fast form is trusted as far as a test fails when it is wrong. For a new one, plant a bug and check that it is caught:
copy the repository (cp -r . /tmp/planted), change one line of the fast form in the copy, run that script's tests there
(cd /tmp/planted && python -m pytest test_all.py -k <prefix>_) and expect failures; if none fails, add the test that
would. An edited cpu_kernels.cpp builds again on first use (about a minute). Bugs planted so, and what caught them:
  A. cpu_kernels.cpp's dispatch_width sends d_head 32 to the 16-wide code (-k rf_: the d 32 cases of
     test_rf_kernel_recurrence_equals_loop and test_rf_kernel_fast_weight_equals_loop, and
     test_rf_cpu_kernel_shapes_cover_every_compiled_width); the same in dispatch_ct_width (-k od_: the d 32 cases of
     test_od_cpu_kernel_linear_rule_solve_equals_the_pytorch_form).
  B. delta_net.py's state_dtype returns the input's dtype (-k dn_: test_dn_bf16_inputs_keep_state_fp32).
  C. delta_net.py's feature map replaced by a softmax (-k dn_: test_dn_feature_maps[elu_sumnorm]).
  D. policy_generator.py's generator step on the distinct commands without their multiplicity (-k pg_:
     test_pg_distinct_commands_give_the_full_batch_gradient).
  E. cuda_kernels.cu's Delta RNN backward with one buffer of partial sums instead of two, or without its
     __syncthreads; the chunk pass without one of its __syncthreads (-k on_cpu, no GPU needed:
     test_rf_kernels_on_cpu_equal_loops[delta_rnn], test_dn_chunk_pass_kernel_on_cpu_equals_the_chunk_loop).
"""

import dataclasses
import functools
import http.server
import inspect
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)


# ----------------------------------------------------------------------------------------------
# Shared helpers: run a script as a user would (from a temporary copy of just that script, data.py and the kernel
# files), read its metrics, compare two runs. Each section below imports its own script.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


CXX = shutil.which(os.environ.get("CXX", "c++"))  # the compiler torch.utils.cpp_extension builds with: $CXX, else c++
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler ($CXX, else c++)")


def script_copy(tmp_path, name="delta_net.py"):
    for f in (name, "data.py", "cuda_kernels.cu", "cpu_kernels.cpp"):
        if os.path.exists(os.path.join(HERE, f)):
            shutil.copy(os.path.join(HERE, f), tmp_path)
    return str(tmp_path / name)


def run(script, *args, check=True, env=None):
    p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=os.path.dirname(script),
                       env=env, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def readme_snippets(module):
    """The README's "Use a layer" blocks that import from `module`: [(the files their first line names, the code)]."""
    with open(os.path.join(HERE, "README.md")) as f:
        blocks = re.findall(r"```python\n# files: (.*?)\n(.*?)```", f.read(), re.S)
    found = [(files.split(), code) for files, code in blocks if re.search(rf"^from {module} import ", code, re.M)]
    assert found, f"README.md has no 'Use a layer' block importing from {module}"
    return found


def run_readme_snippets(tmp_path, module, extra=""):
    """Run each such block, then `extra`, in an empty folder holding only the files the block names (no PYTHONPATH:
    the module comes from that folder); -> the stdout of each."""
    outputs = []
    for i, (files, code) in enumerate(readme_snippets(module)):
        folder = tmp_path / f"snippet{i}"
        folder.mkdir()
        for f in files:
            shutil.copy(os.path.join(HERE, f), folder)
        check = f"\nimport os, {module}\nassert {module}.__file__.startswith(os.getcwd())\n"
        p = subprocess.run([sys.executable, "-c", code + check + extra], cwd=folder, capture_output=True, text=True,
                           timeout=600, env=dict(os.environ, PYTHONPATH=""))
        assert p.returncode == 0, f"README block {i} of {module}:\n{code}\n{p.stderr[-3000:]}"
        assert "warning" not in p.stderr, p.stderr
        outputs.append(p.stdout)
    return outputs


def leave_as_killed(out_dir, full_dir, step):
    """metrics.jsonl as a run killed some time after its checkpoint at `step` leaves it: lines of the steps after the
    checkpoint (here the uninterrupted run's) and a last line cut short. --resume must drop both."""
    with open(os.path.join(full_dir, "metrics.jsonl")) as f:
        later = [line for line in f if json.loads(line)["step"] > step]
    assert later
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.writelines(later[: max(1, len(later) // 2)])
        f.write('{"step": 1')


def error_line(stderr):
    """A user error's message: stderr's one line, after nothing but a progress bar (tqdm's lines start with a \\r)."""
    *before, last = stderr.rstrip("\n").split("\n")
    assert all(line.startswith("\r") for line in before), stderr
    return last


def assert_cli_error(script, argv, message, capsys):
    """script.main(argv) in this process (the code a subprocess runs, without its start-up): exit status 2 and the
    one-line message holding `message`; any other exception fails the test, as a traceback would."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and error_line(err).startswith("error: ") and message in error_line(err), err


def assert_cli_error_without_traceback(script, *args, message):
    """The script run as a user runs it (a subprocess, through `if __name__ == "__main__"`) with a user error: exit
    status 2, the one-line message, no traceback. One case per script; its other CLI errors run in this process."""
    p = run(script, *args, check=False)
    assert p.returncode == 2 and error_line(p.stderr).startswith("error: ") and message in error_line(p.stderr), p.stderr
    assert "Traceback" not in p.stderr


def assert_help_lists_every_flag(script, capsys):
    """--help (in this process): every Args field with its type, then exit status 0."""
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for field in dataclasses.fields(script.Args):
        assert f"--{field.name} (" in out, field.name


def assert_negative_values_fail(script):
    """Every int and float flag refuses -1 with the one-line error (exit 2): none of them means anything negative."""
    for field in dataclasses.fields(script.Args):
        if field.type in (int, float):
            with pytest.raises(SystemExit) as exit_info:
                script.parse_args([f"--{field.name}", "-1"])
            assert exit_info.value.code == 2, field.name


def assert_same_run(a, b, rtol=1e-5):
    """Two processes' metrics agree: every key and string exactly, every number to rtol (nested lists and tuples
    alike). CPU math libraries may round differently in two processes (their code paths can depend on memory
    alignment), so bit equality is not guaranteed; a skipped step or a lost optimizer or RNG state changes a loss far
    more than 1e-5."""

    def close(x, y):
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return len(x) == len(y) and all(close(u, w) for u, w in zip(x, y))
        if isinstance(x, float) or isinstance(y, float):
            return math.isclose(x, y, rel_tol=rtol, abs_tol=rtol * 1e-2)
        return x == y

    assert len(a) == len(b), (len(a), len(b))
    for x, y in zip(a, b):
        assert close(x, y), (x, y)


# Every training script's scaffolding keeps saved results: the same checks for each, one body per behaviour below and
# one test per script in its section (test_dn_saved_runs_are_never_lost = saved_runs_test(delta_net, ...)), run in
# this process through main(argv) (a user error is a SystemExit; anything else would be a traceback).


def main_exit(script, argv, capsys):
    """script.main(argv) here -> (exit status, stdout, stderr); status 0 when it returns."""
    capsys.readouterr()
    try:
        script.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def run_files(out_dir):
    """The bytes of every file a run keeps in out_dir (checkpoints and metrics.jsonl)."""
    return {f: (out_dir / f).read_bytes() for f in ("ckpt.pt", "best.pt", "metrics.jsonl") if (out_dir / f).exists()}


def assert_one_line_error(code, err, *words, status=2):
    assert code == status and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    for word in words:
        assert word in err, (word, err)


def assert_all_finite(out_dir):
    """No NaN or inf among the weights and optimizer states of any checkpoint, nor among the logged values."""
    def finite(x):
        if torch.is_tensor(x):
            return not x.is_floating_point() or bool(torch.isfinite(x).all())
        if isinstance(x, float):
            return math.isfinite(x)
        if isinstance(x, dict):
            return all(finite(v) for v in x.values())
        return all(finite(v) for v in x) if isinstance(x, (list, tuple)) else True

    for f in ("ckpt.pt", "best.pt"):
        if (out_dir / f).exists():
            ckpt = torch.load(out_dir / f, weights_only=False)
            weights = {k: v for k, v in ckpt.items() if k not in ("plateau", "args")}  # the scheduler's sentinel: inf
            assert finite(weights), f
    if (out_dir / "metrics.jsonl").exists():
        assert finite([m["value"] for m in read_metrics(out_dir)])


def saved_runs_test(script, argv, stop_at, other):
    """A run stopped at --stop_at, then: --resume --stop_at at the same step has nothing to do; a run without --resume
    into the same --out_dir stops with one line naming --resume and --out_dir; --resume finishes it; --resume again
    says it is finished; a checkpoint of another model (the flags `other`), of another script, a truncated one, an
    --out_dir that is a file: one line each. Every refusal leaves ckpt.pt, best.pt and metrics.jsonl byte-identical.
    --overwrite then replaces the run with a fresh one of the same lines."""

    def test(tmp_path, capsys):
        out = tmp_path / "out"
        common = argv + ["--out_dir", str(out)]
        assert main_exit(script, common + ["--stop_at", str(stop_at)], capsys)[0] == 0
        stopped = run_files(out)
        assert "ckpt.pt" in stopped and "metrics.jsonl" in stopped
        code, text, _ = main_exit(script, common + ["--resume", "--stop_at", str(stop_at)], capsys)
        assert code == 0 and f"at or past --stop_at {stop_at}; nothing to do" in text
        assert_one_line_error(*main_exit(script, common, capsys)[::2], "holds a run", "--resume", "--out_dir")
        assert run_files(out) == stopped
        assert main_exit(script, common + ["--resume"], capsys)[0] == 0
        finished = run_files(out)
        code, text, _ = main_exit(script, common + ["--resume"], capsys)
        assert code == 0 and "is finished" in text and "nothing to do" in text
        assert_one_line_error(*main_exit(script, common, capsys)[::2], "--resume", "--out_dir", "--overwrite")
        assert_one_line_error(*main_exit(script, common + other + ["--resume"], capsys)[::2], f"{other[0]} ")
        assert_one_line_error(*main_exit(script, common + ["--resume", "--overwrite"], capsys)[::2], "one of them")
        assert run_files(out) == finished
        ckpt = torch.load(out / "ckpt.pt", weights_only=False)
        assert ckpt["script"] == os.path.basename(script.__file__)
        for name, content in (("truncated", finished["ckpt.pt"][: len(finished["ckpt.pt"]) // 2]), ("other", None)):
            (tmp_path / name).mkdir()
            if content is None:
                torch.save(dict(ckpt, script="another.py"), tmp_path / name / "ckpt.pt")
            else:
                (tmp_path / name / "ckpt.pt").write_bytes(content)
            code, _, err = main_exit(script, argv + ["--out_dir", str(tmp_path / name), "--resume"], capsys)
            assert_one_line_error(code, err, "truncated or corrupt" if content else "another.py")
        (tmp_path / "file").write_text("")
        assert_one_line_error(*main_exit(script, argv + ["--out_dir", str(tmp_path / "file")], capsys)[::2], "a file")

        def lines():  # an RL run's episodes after a resume are fresh ones: their count may differ
            return [(m["step"], m["split"], m["metric"]) for m in read_metrics(out) if m["split"] != "episode"]

        resumed = lines()
        assert main_exit(script, common + ["--overwrite"], capsys)[0] == 0
        assert lines() == resumed  # a fresh run's lines, each once: the overwritten run's are gone

    return test


def divergence_test(script, argv, stop_at, diverge):
    """A run that diverges (the flags `diverge`: a huge learning rate) stops with exit 1 before it saves anything of
    it, and its message tells the truth: no checkpoint when none was written; the last one and its step, unchanged,
    when a healthy run left one; no saved file holds a NaN or inf."""

    def test(tmp_path, capsys):
        out = tmp_path / "new"
        code, _, err = main_exit(script, argv + diverge + ["--out_dir", str(out)], capsys)
        assert code == 1 and "became" in err and "never written" in err and "Traceback" not in err, err
        assert not (out / "ckpt.pt").exists() and not (out / "best.pt").exists()
        assert_all_finite(out)
        out = tmp_path / "resumed"
        assert main_exit(script, argv + ["--out_dir", str(out), "--stop_at", str(stop_at)], capsys)[0] == 0
        before = run_files(out)
        code, _, err = main_exit(script, argv + diverge + ["--out_dir", str(out), "--resume"], capsys)
        assert code == 1 and f"ckpt.pt (step {stop_at}), stays" in err and "Traceback" not in err, err
        assert run_files(out)["ckpt.pt"] == before["ckpt.pt"]
        assert_all_finite(out)

    return test


def final_evaluation_test(script, argv, final_splits):
    """A run killed after its last checkpoint, before its final evaluation was recorded (the checkpoint says so; the
    metrics hold part of that evaluation's lines and a line cut short): --resume writes the final evaluation once, the
    metrics then equal the uninterrupted run's; a second --resume has nothing to do and changes no byte."""

    def test(tmp_path, capsys):
        full, cut = tmp_path / "full", tmp_path / "cut"
        assert main_exit(script, argv + ["--out_dir", str(full)], capsys)[0] == 0
        shutil.copytree(full, cut)
        ckpt = torch.load(cut / "ckpt.pt", weights_only=False)
        assert ckpt["final"] is True
        torch.save(dict(ckpt, final=False), cut / "ckpt.pt")
        lines = (full / "metrics.jsonl").read_text().splitlines(keepends=True)
        last = [line for line in lines if json.loads(line)["split"] in final_splits and
                json.loads(line)["step"] == ckpt["step"]]
        assert last
        kept = [line for line in lines if line not in last]
        (cut / "metrics.jsonl").write_text("".join(kept + last[: len(last) // 2]) + '{"step": 1')
        code, text, _ = main_exit(script, argv + ["--out_dir", str(cut), "--resume"], capsys)
        assert code == 0 and "nothing to do" not in text
        strip = lambda d: [(m["step"], m["split"], m["metric"], m["value"]) for m in read_metrics(d)]  # noqa: E731
        assert_same_run(strip(cut), strip(full))
        done = run_files(cut)
        code, text, _ = main_exit(script, argv + ["--out_dir", str(cut), "--resume"], capsys)
        assert code == 0 and "is finished" in text and run_files(cut) == done

    return test


def flag_values_test(script, bad=()):
    """The command line's values: NaN and infinities refused for every float flag; an empty value is an empty string
    (never "true"), refused for --out_dir; a seed numpy cannot take, a device this machine does not have, and the
    argument lists `bad`: each one line, exit 2."""

    def test(capsys):
        def refused(argv, *words):
            with pytest.raises(SystemExit) as exit_info:
                script.parse_args(argv)
            assert_one_line_error(exit_info.value.code, capsys.readouterr().err, *words)

        for field in dataclasses.fields(script.Args):
            if field.type is float:
                for value in ("nan", "inf", "-inf", "NaN"):
                    refused([f"--{field.name}", value], f"--{field.name} expects a finite float")
            if field.type is str and field.name != "out_dir":
                try:
                    assert getattr(script.parse_args([f"--{field.name}", ""]), field.name) == ""
                except SystemExit:
                    assert "true" not in capsys.readouterr().err
        for argv in (["--out_dir", ""], ["--out_dir="]):
            refused(argv, "--out_dir must name a folder")
        refused(["--seed", str(2**32)], "--seed must be in [0, 2**32 - 1]")
        assert script.parse_args(["--seed", str(2**32 - 1), "--resume"]).resume is True  # a bare flag: true
        refused(["--resume="], "--resume expects bool")
        refused(["--device", "cuda:x"], "is not a device")
        refused(["--device", "xla"], "cpu, cuda or mps")
        refused(["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA GPU")
        if not torch.backends.mps.is_available():
            refused(["--device", "mps"], "no MPS")
        for argv, message in bad:
            refused(argv, message)

    return test


def run_processes(script, n, *args, torchrun=False):
    """The script in n processes on the CPU, one thread each: as torchrun starts them (the variables RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT at a free port; without torchrun's own process: seconds of CPU per run saved) or, with
    torchrun=True, through torchrun --standalone. n = 1: a plain run. -> returncode and the ranks' stdout, stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if torchrun or n == 1:
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)] if torchrun else []
        p = subprocess.run([sys.executable, *launch, script, *args], capture_output=True, text=True,
                           cwd=os.path.dirname(script), env=env, timeout=600)
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        procs = [subprocess.Popen([sys.executable, script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=os.path.dirname(script),
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n),
                                           LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                 for r in range(n)]
        try:
            outs = [proc.communicate(timeout=600) for proc in procs]
        finally:
            for proc in procs:
                proc.kill()  # a rank left waiting for one that failed
        p = subprocess.CompletedProcess(script, max(proc.returncode for proc in procs),
                                        "".join(o for o, _ in outs), "".join(e for _, e in outs))
    if p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def logged_values(out_dir, skip=("steps_per_s", "env_time_frac")):
    """metrics.jsonl without the times (and the RL's speed lines): (step, split, metric, value) in the order logged."""
    return [(m["step"], m["split"], m["metric"], m["value"]) for m in read_metrics(out_dir) if m["metric"] not in skip]


def assert_same_weights(path_a, path_b, rtol=1e-5):
    """The model of two checkpoints: every float tensor to rtol relative to its largest entry, the rest exactly."""
    a, b = (torch.load(p, map_location="cpu", weights_only=False)["model"] for p in (path_a, path_b))
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            scale = b[key].abs().max().item()
            assert (a[key] - b[key]).abs().max().item() <= rtol * scale + 1e-12, key
        else:
            assert torch.equal(a[key], b[key]), key


def assert_two_processes_train_as_one(script, *args, torchrun=False):
    """The data-parallel proof: 2 processes (torchrun, gloo; each takes half of the global --batch_size) against 1 with
    the same global batch, data and seed log the same training losses and evaluations and end with the same weights,
    to 1e-5 relative (the same sums in another order). A rank reading another's rows, a loss counted twice or a batch
    silently doubled is far above that; "the ranks agree" alone would pass all three. -> the 2-process stdout."""
    one, two = (os.path.join(os.path.dirname(script), name) for name in ("one", "two"))
    run_processes(script, 1, *args, "--out_dir", one)
    p = run_processes(script, 2, *args, "--out_dir", two, torchrun=torchrun)
    assert "2 process(es)" in p.stdout and "ddp: parameters identical on all 2 ranks: True" in p.stdout
    assert len([m for m in logged_values(two) if m[1] == "train"]) > 0
    assert_same_run(logged_values(one), logged_values(two))  # only rank 0 writes: no line twice
    assert_same_weights(os.path.join(one, "ckpt.pt"), os.path.join(two, "ckpt.pt"))
    return p


# ----------------------------------------------------------------------------------------------
# delta_net.py: the delta rule

import delta_net  # noqa: E402


def delta_inputs(B=2, H=3, T=37, d_k=8, d_v=10, seed=0, dtype=torch.float64, state=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d_k, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(B, H, T, d_k, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, d_v, generator=g, dtype=dtype)
    beta = torch.rand(B, H, T, generator=g, dtype=dtype)
    W = torch.randn(B, H, d_v, d_k, generator=g, dtype=dtype) if state else None
    return [t.requires_grad_() if t is not None else None for t in (q, k, v, beta, W)]


def gated_inputs(B=2, H=3, T=37, d_k=8, d_v=10, seed=0, state=True, lo=1e-6):
    """delta_inputs and the gated rule's log decay g (B, H, T), alpha = exp(g) log-uniform in (lo, 1)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    g = torch.rand(B, H, T, generator=gen, dtype=torch.float64) * math.log(lo)
    return delta_inputs(B, H, T, d_k, d_v, seed, state=state) + [g.requires_grad_()]


def outputs_and_grads(fn, inputs, seed=1):
    y, W = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)
    gW = torch.randn(W.shape, generator=g, dtype=torch.float64).to(W.device, W.dtype)
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad((y * gy).sum() + (W * gW).sum(), leaves)
    return y, W, grads


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])
@pytest.mark.parametrize("state", [True, False])
def test_dn_chunk_equals_loop_float64(chunk_size, state):
    """Outputs, final state and the gradients of q, k, v, beta and W0; T=37 is not a multiple of C."""
    x = delta_inputs(state=state)
    y1, W1, g1 = outputs_and_grads(delta_net.delta_rule_loop, x)
    y2, W2, g2 = outputs_and_grads(functools.partial(delta_net.delta_rule_chunk, chunk_size=chunk_size), x)
    assert y1.dtype == y2.dtype == torch.float64
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(W2, W1, rtol=1e-10, atol=1e-10)
    assert len(g1) == (5 if state else 4)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_dn_chunk_equals_loop_with_large_beta_keys():
    """Unnormalised keys with betas near 1 make (I + A) far from the identity: T must still be exact. The betas are
    random (in [0.8, 1)), so an output that took one step's beta for another's would differ."""
    q, k, v, beta, W = delta_inputs(T=50, d_k=6, d_v=6, seed=3)
    with torch.no_grad():
        k.mul_(1.5)
        beta.copy_(0.8 + 0.2 * torch.rand(beta.shape, generator=torch.Generator().manual_seed(4), dtype=beta.dtype))
    y1, W1, g1 = outputs_and_grads(delta_net.delta_rule_loop, [q, k, v, beta, W])
    y2, W2, g2 = outputs_and_grads(functools.partial(delta_net.delta_rule_chunk, chunk_size=16), [q, k, v, beta, W])
    torch.testing.assert_close(y2, y1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(W2, W1, rtol=1e-9, atol=1e-9)
    assert len(g1) == 5
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])
@pytest.mark.parametrize("state", [True, False])
def test_dn_gated_chunk_equals_loop_float64(chunk_size, state):
    """The gated rule: outputs, final state and the gradients of q, k, v, beta, W0 and g, alpha in (1e-6, 1) (within a
    chunk of 64 the decay reaches exp(-800): factors underflow to 0, none divides); T = 37 not a multiple of C."""
    q, k, v, beta, W, g = gated_inputs(state=state)
    x = [q, k, v, beta, W, g] if state else [q, k, v, beta, g]

    def call(fn, *a):
        return fn(*a[:4], *((a[4],) if state else (None,)), g=a[-1])

    y1, W1, g1 = outputs_and_grads(lambda *a: call(delta_net.delta_rule_loop, *a), x)
    y2, W2, g2 = outputs_and_grads(lambda *a: call(functools.partial(delta_net.delta_rule_chunk,
                                                                     chunk_size=chunk_size), *a), x)
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(W2, W1, rtol=1e-10, atol=1e-10)
    assert len(g1) == (6 if state else 5)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_dn_gated_loop_matches_plain_python_recurrence():
    """The gated loop against W_t = alpha_t W_{t-1} + beta_t (v_t - alpha_t W_{t-1} k_t) k_t^T written out per head."""
    q, k, v, beta, W0, g = [t.detach() for t in gated_inputs(B=1, H=2, T=5, d_k=3, d_v=4)]
    y, W = delta_net.delta_rule_loop(q, k, v, beta, W0, g)
    for h in range(2):
        Wh = W0[0, h].clone()
        for t in range(5):
            a = math.exp(g[0, h, t].item())
            Wh = a * Wh + beta[0, h, t] * torch.outer(v[0, h, t] - a * Wh @ k[0, h, t], k[0, h, t])
            torch.testing.assert_close(y[0, h, t], Wh @ q[0, h, t])
        torch.testing.assert_close(W[0, h], Wh)


def test_dn_gradcheck_loop_and_chunk():
    x = delta_inputs(B=1, H=2, T=7, d_k=3, d_v=4)
    assert torch.autograd.gradcheck(delta_net.delta_rule_loop, x)
    assert torch.autograd.gradcheck(functools.partial(delta_net.delta_rule_chunk, chunk_size=3), x)
    x = gated_inputs(B=1, H=2, T=7, d_k=3, d_v=4, lo=0.01)
    assert torch.autograd.gradcheck(delta_net.delta_rule_loop, x)
    assert torch.autograd.gradcheck(lambda *a: delta_net.delta_rule_chunk(*a[:5], chunk_size=3, g=a[5]), x)


def test_dn_loop_matches_plain_python_recurrence():
    """The loop against the equations written out per head with vectors (guards the spec itself)."""
    q, k, v, beta, W0 = [t.detach() for t in delta_inputs(B=1, H=2, T=5, d_k=3, d_v=4)]
    y, W = delta_net.delta_rule_loop(q, k, v, beta, W0)
    for h in range(2):
        Wh = W0[0, h].clone()
        for t in range(5):
            v_bar = Wh @ k[0, h, t]
            Wh = Wh + beta[0, h, t] * torch.outer(v[0, h, t] - v_bar, k[0, h, t])
            torch.testing.assert_close(y[0, h, t], Wh @ q[0, h, t])
        torch.testing.assert_close(W[0, h], Wh)


def test_dn_delta_rule_stores_and_overwrites():
    """beta = 1 with an orthonormal key: W k returns exactly the last value written under k."""
    k = torch.eye(4, dtype=torch.float64)[None, None, [0, 1, 0]]  # keys e0, e1, e0 again
    v = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]], dtype=torch.float64)[None, None]
    beta = torch.ones(1, 1, 3, dtype=torch.float64)
    y, W = delta_net.delta_rule_loop(k, k, v, beta)
    torch.testing.assert_close(W[0, 0] @ k[0, 0, 0], v[0, 0, 2])  # overwritten
    torch.testing.assert_close(W[0, 0] @ k[0, 0, 1], v[0, 0, 1])  # kept


@pytest.mark.parametrize("impl", ["loop", "chunk", pytest.param("kernel", marks=needs_cxx)])
@pytest.mark.parametrize("gated", [False, True])
def test_dn_state_carried_across_calls(impl, gated):
    """One call over T1 + T2 equals two calls with the state passed along: outputs, final state, and the gradients
    of q, k, v, beta, W0 (and g) under random cotangents of y and W."""
    x = gated_inputs(T=37) if gated else delta_inputs(T=37)
    fn = functools.partial(delta_net.delta_rule, impl=impl, chunk_size=8)

    def call(lo, hi, W):
        return fn(*[t[:, :, lo:hi] for t in x[:4]], W, g=x[5][:, :, lo:hi] if gated else None)

    y, W = call(0, 37, x[4])
    t1 = 20
    ya, Wa = call(0, t1, x[4])
    yb, Wb = call(t1, 37, Wa)
    torch.testing.assert_close(torch.cat([ya, yb], 2), y, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(Wb, W, rtol=1e-11, atol=1e-11)
    g = torch.Generator().manual_seed(1)
    gy, gW = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(W.shape, generator=g, dtype=W.dtype)
    g_one = torch.autograd.grad((y * gy).sum() + (W * gW).sum(), x)
    g_two = torch.autograd.grad((torch.cat([ya, yb], 2) * gy).sum() + (Wb * gW).sum(), x)
    assert len(g_one) == (6 if gated else 5)
    for a, b in zip(g_two, g_one):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@needs_cxx
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T, d_k, d_v", [(1, 16, 16), (37, 8, 10), (70, 32, 32), (100, 64, 64)])
def test_dn_cpu_kernel_equals_loop_float64(gated, T, d_k, d_v):
    """--impl kernel on the CPU (cpu_kernels.cpp) against the loop in float64: outputs, final state and the gradients
    of q, k, v, beta, W0 (and g, alpha in (1e-6, 1)); T = 1 and across the gated backward's segments of 32 steps (the
    last one partial), d_k at each compiled width (16, 32, 64) and the generic code (8, with d_v 10)."""
    x = gated_inputs(T=T, d_k=d_k, d_v=d_v, seed=T) if gated else delta_inputs(T=T, d_k=d_k, d_v=d_v, seed=T)
    call = (lambda impl: lambda *a: delta_net.delta_rule(*a[:5], impl=impl, g=a[5])) if gated else \
        (lambda impl: lambda *a: delta_net.delta_rule(*a, impl=impl))
    ref = outputs_and_grads(call("loop"), x)
    got = outputs_and_grads(call("kernel"), x)
    assert got[0].dtype == got[1].dtype == torch.float64 and len(got[2]) == len(x)
    for a, b in zip((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@needs_cxx
def test_dn_cpu_kernel_gradcheck():
    for x in (delta_inputs(B=1, H=2, T=7, d_k=3, d_v=4), gated_inputs(B=1, H=2, T=40, d_k=3, d_v=2, lo=0.01)):
        assert torch.autograd.gradcheck(lambda *a: delta_net.delta_rule(*a[:5], impl="kernel", g=a[5] if len(a) > 5
                                                                        else None), x)


@needs_cxx
def test_dn_gated_backward_at_alpha_near_zero_is_finite_and_exact():
    """alpha_t near 0 at a third of the steps (g from -30 to -80: alpha down to 1e-35; undoing such a write would
    divide by it) and 0 at one (g = -inf, the state wiped): the kernel's backward, which recomputes instead, is finite
    and equals the loop's in float64, and in float32 within 1e-5 of it; the chunk form too (at finite g)."""
    q, k, v, beta, W0, g = [t.detach() for t in gated_inputs(T=70, d_k=16, d_v=16, lo=0.3)]
    gen = torch.Generator().manual_seed(5)
    near_zero = torch.rand(g.shape, generator=gen) < 1 / 3
    g = torch.where(near_zero, -30 - 50 * torch.rand(g.shape, generator=gen, dtype=g.dtype), g)
    g_inf = g.clone()
    g_inf[0, 1, 40] = -math.inf
    for gate, impls in ((g, ("kernel", "chunk")), (g_inf, ("kernel",))):
        x = [t.clone().requires_grad_() for t in (q, k, v, beta, W0, gate)]
        y, W, grads = outputs_and_grads(lambda *a: delta_net.delta_rule_loop(*a[:5], g=a[5]), x)
        for impl in impls:
            for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
                xs = [t.detach().to(dtype).requires_grad_() for t in x]
                out = outputs_and_grads(lambda *a: delta_net.delta_rule(*a[:5], impl=impl, chunk_size=16, g=a[5]), xs)
                for name, a, b in zip(["y", "W", "dq", "dk", "dv", "dbeta", "dW0", "dg"], (out[0], out[1], *out[2]),
                                      (y, W, *grads)):
                    assert torch.isfinite(a).all() and rel_err(a, b) < tol, (impl, dtype, name, rel_err(a, b))


def test_dn_autocast_keeps_state_fp32():
    """Under bf16 autocast the inputs may be bf16, but the state and its products stay fp32 in both forms."""
    x = [t.detach().float().requires_grad_() for t in delta_inputs(T=20, d_k=8, d_v=8)]
    for fn in (delta_net.delta_rule_loop, delta_net.delta_rule_chunk):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, W = fn(*x)
        assert y.dtype == W.dtype == torch.float32
        y_ref, W_ref = fn(*x)
        torch.testing.assert_close(y, y_ref)
        (y.sum() + W.sum()).backward()


def test_dn_bf16_inputs_keep_state_fp32():
    """bf16 q, k, v, beta (as autocast gives them): the state returned is fp32 in both forms, a carried one too, and
    equals the float64 result on the same rounded inputs to fp32 accuracy; so is each layer's state of the model
    under CPU bf16 autocast."""
    x = [t.detach().to(torch.bfloat16) for t in delta_inputs(T=20, d_k=8, d_v=8, state=False)[:4]]
    _, W_ref = delta_net.delta_rule_loop(*[t.double() for t in x])
    for impl in ("loop", "chunk", "kernel"):  # kernel: without a compiler the chunk form, as auto
        y, W = delta_net.delta_rule(*x, impl=impl, chunk_size=8)
        assert y.dtype == torch.bfloat16 and W.dtype == torch.float32, impl
        assert (W.double() - W_ref).norm() / W_ref.norm() < 1e-5, impl
        _, W = delta_net.delta_rule(*x, W, impl=impl, chunk_size=8)
        assert W.dtype == torch.float32, impl
    model = dn_model(n_layer=2)
    ids = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = model(ids)
        assert [W.dtype for W in state] == [torch.float32] * 2
        _, state = model(ids, state)
    assert [W.dtype for W in state] == [torch.float32] * 2


def test_dn_chunk_fp32_close_to_float64_loop():
    x64 = [t.detach() for t in delta_inputs(B=2, H=2, T=300, d_k=64, d_v=64)]
    y64, W64 = delta_net.delta_rule_loop(*x64)
    y32, W32 = delta_net.delta_rule_chunk(*[t.float() for t in x64], chunk_size=64)
    assert y32.dtype == torch.float32 and W32.dtype == torch.float32
    assert (y32.double() - y64).norm() / y64.norm() < 1e-5
    assert (W32.double() - W64).norm() / W64.norm() < 1e-5


def tiny_args(**kw):
    return delta_net.parse_args(["--preset", "tiny"] + [s for k, v in kw.items() for s in (f"--{k}", str(v))])


def dn_model(vocab_size=16, **kw):
    """DeltaNet from keywords, at the tiny preset's sizes unless kw says otherwise (weights from the seed 0)."""
    torch.manual_seed(0)
    return delta_net.DeltaNet(vocab_size, **{**dict(d_model=32, n_head=2, n_layer=1, d_ff=64), **kw})


@pytest.mark.parametrize("qk_map", ["elu_sumnorm", "l2"])
def test_dn_model_impls_agree_and_carry_state(qk_map):
    """The whole model: loop and chunk (C = 8 in every layer) give the same logits, and segment-by-segment = all at
    once."""
    model = dn_model(qk_map=qk_map, n_layer=2, impl="loop").double()
    chunk = dn_model(qk_map=qk_map, n_layer=2, impl="chunk", chunk_size=8).double()
    chunk.load_state_dict(model.state_dict())
    x = torch.randint(0, 16, (3, 29), generator=torch.Generator().manual_seed(1))
    logits_loop, state_loop = model(x)
    logits_chunk, state_chunk = chunk(x)
    torch.testing.assert_close(logits_chunk, logits_loop, rtol=1e-10, atol=1e-10)
    for W1, W2 in zip(state_chunk, state_loop):
        torch.testing.assert_close(W1, W2, rtol=1e-10, atol=1e-10)
    part1, s = model(x[:, :11])
    part2, s = model(x[:, 11:], s)
    torch.testing.assert_close(torch.cat([part1, part2], 1), logits_loop, rtol=1e-10, atol=1e-10)
    for W1, W2 in zip(s, state_loop):
        torch.testing.assert_close(W1, W2, rtol=1e-10, atol=1e-10)


def dn_phi_by_hand(x, qk_map):
    """elu_sumnorm: sumnorm(elu(x) + 1), elu(x) + 1 = x + 1 for x > 0 and exp(x) else; l2: silu(x) / |silu(x)|, silu(x)
    = x sigmoid(x) = x / (1 + exp(-x))."""
    if qk_map == "l2":
        s = x / (1 + torch.exp(-x))
        return s / s.pow(2).sum(-1, keepdim=True).sqrt()
    e = torch.where(x > 0, x + 1, torch.exp(x))
    return e / e.sum(-1, keepdim=True)


@pytest.mark.parametrize("qk_map", ["elu_sumnorm", "l2"])
def test_dn_feature_maps(qk_map):
    """Each feature map against its formula written out, and the layer's output against the equations by hand: its
    projections, that map, beta = sigmoid(w_beta x), the reference loop, the output projection."""
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(4, 7, 16, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    layer = delta_net.DeltaLayer(d_model=32, n_head=2, qk_map=qk_map).double()
    torch.testing.assert_close(layer.feature_map(x), dn_phi_by_hand(x, qk_map), rtol=1e-12, atol=1e-12)
    h = torch.randn(2, 9, 32, generator=g, dtype=torch.float64)
    q, k, v = (h @ layer.qkv.weight.T).view(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)  # (B, H, T, d_head) each
    beta = torch.sigmoid(h @ layer.w_beta.weight.T).transpose(1, 2)
    scale = 16 ** -0.5 if qk_map == "l2" else 1.0  # l2: q / sqrt(d_head), as the official code
    y, W = delta_net.delta_rule_loop(scale * dn_phi_by_hand(q, qk_map), dn_phi_by_hand(k, qk_map), v, beta)
    out, state = layer(h)
    torch.testing.assert_close(out, y.transpose(1, 2).reshape(2, 9, 32) @ layer.out.weight.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, W, rtol=1e-10, atol=1e-10)


def flat_state(state):
    return [x for s in state for x in (s if isinstance(s, tuple) else (s,))]


@pytest.mark.parametrize("impl", ["chunk", pytest.param("kernel", marks=needs_cxx)])
@pytest.mark.parametrize("flags", [dict(gate=True), dict(short_conv=True, neg_eigval=True),
                                   dict(gate=True, neg_eigval=True, short_conv=True, out_gate=True, qk_map="l2")])
def test_dn_gated_model_impls_agree_carry_state_and_step_by_step(impl, flags):
    """The model with the Gated DeltaNet layer's parts, float64: the fast form (chunk with C = 8, or the CPU kernel)
    gives the loop's logits and final states; two segments with the state carried (the convolution's last 3 inputs
    with W) = one call; and token by token = the full forward, every step's logits and the final state."""
    model = dn_model(n_layer=2, impl="loop", **flags).double()
    fast = dn_model(n_layer=2, impl=impl, chunk_size=8, **flags).double()
    fast.load_state_dict(model.state_dict())
    x = torch.randint(0, 16, (3, 29), generator=torch.Generator().manual_seed(1))
    logits, state = model(x)
    logits_fast, state_fast = fast(x)
    torch.testing.assert_close(logits_fast, logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(flat_state(state_fast), flat_state(state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    part1, s = fast(x[:, :11])
    part2, s = fast(x[:, 11:], s)
    torch.testing.assert_close(torch.cat([part1, part2], 1), logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(flat_state(s), flat_state(state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    s = None
    for t in range(29):
        step_logits, s = fast(x[:, t : t + 1], s)
        torch.testing.assert_close(step_logits[:, 0], logits[:, t], rtol=1e-10, atol=1e-10)
    for a, b in zip(flat_state(s), flat_state(state), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_dn_gated_deltanet_layer_by_hand():
    """--preset gated_deltanet's layer (and --neg_eigval) against its equations written out: the causal depthwise
    convolution (kernel 4) as a sum over the last 4 inputs, SiLU, q and k L2-normalised with q / sqrt(d_head),
    beta = 2 sigmoid(w_beta x), g = -exp(A_log) softplus(w_a x + dt_bias), the gated loop, each head's
    RMSNorm(y) weight silu(W_g x), the output projection; the state's second part is the last 3 inputs. And the official
    initialisation's ranges: A = exp(A_log) in (0, 16), softplus(dt_bias) in [1e-3, 0.1], log-uniform."""
    torch.manual_seed(0)
    layer = delta_net.DeltaLayer(d_model=32, n_head=2, qk_map="l2", gate=True, neg_eigval=True, short_conv=True,
                                 out_gate=True).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.out_norm.weight.copy_(0.5 + torch.rand(16, generator=gen, dtype=torch.float64))  # not its initial ones
    h = torch.randn(2, 9, 32, generator=gen, dtype=torch.float64)
    qkv = h @ layer.qkv.weight.T  # (B, T, 96)
    w = layer.conv.weight[:, 0]  # (96, 4): y_t = sum_j w[3 - j] x_{t-j}
    conv = sum(w[:, 3 - j] * F.pad(qkv, (0, 0, j, 0))[:, :9] for j in range(4))
    silu = conv / (1 + torch.exp(-conv))
    q, k, v = silu.view(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k = q / q.pow(2).sum(-1, keepdim=True).sqrt() / 4, k / k.pow(2).sum(-1, keepdim=True).sqrt()
    beta = (2 / (1 + torch.exp(-h @ layer.w_beta.weight.T))).transpose(1, 2)
    g = (-torch.exp(layer.A_log) * torch.log(1 + torch.exp(h @ layer.w_a.weight.T + layer.dt_bias))).transpose(1, 2)
    y, W = delta_net.delta_rule_loop(q, k, v, beta, None, g)
    y = y.transpose(1, 2)  # (B, T, H, D)
    y = y / (y.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * layer.out_norm.weight
    z = (h @ layer.w_g.weight.T).view(2, 9, 2, 16)
    out = (y * z / (1 + torch.exp(-z))).reshape(2, 9, 32) @ layer.out.weight.T
    got, (W_got, last) = layer(h)
    torch.testing.assert_close(got, out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(W_got, W, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, qkv[:, -3:])
    torch.manual_seed(0)
    many = delta_net.DeltaLayer(d_model=512, n_head=512, gate=True)
    A, dt = many.A_log.exp(), F.softplus(many.dt_bias)
    assert 0 < A.min() and A.max() < 16 and 7 < A.mean() < 9
    assert 1e-3 <= dt.min() and dt.max() <= 0.1 + 1e-6
    assert abs(dt.log().mean().item() - (math.log(1e-3) + math.log(0.1)) / 2) < 0.2  # log-uniform


def test_dn_recall_batch_structure():
    gen = torch.Generator().manual_seed(0)
    n, V = 5, 20
    x, y = delta_net.recall_batch(64, n, V, gen)
    assert x.shape == (64, 2 * n, 2) and y.shape == (64, 2 * n)
    keys, values, queries = x[:, :n, 0], x[:, :n, 1], x[:, n:, 0]
    assert (keys < V // 2).all() and (values >= V // 2).all() and (values < V).all()
    assert (x[:, n:, 1] == V).all() and (y[:, :n] == -100).all()  # blank value id while querying
    for b in range(64):
        assert len(set(keys[b].tolist())) == n  # distinct keys
        assert sorted(queries[b].tolist()) == sorted(keys[b].tolist())  # every key queried once
        lookup = dict(zip(keys[b].tolist(), values[b].tolist()))
        assert y[b, n:].tolist() == [lookup[k] for k in queries[b].tolist()]


@pytest.mark.parametrize("script", ["delta_net", "linear_transformer"])
def test_dn_lt_recall_repeat_keys_asks_for_the_latest_value(script):
    """--repeat_keys: keys drawn with replacement; each query's target is the value of the key's latest write
    (checked against a plain dict that every write overwrites); the queries are the written keys, permuted."""
    recall_batch = {"delta_net": delta_net, "linear_transformer": linear_transformer}[script].recall_batch
    gen = torch.Generator().manual_seed(0)
    n, V = 12, 16
    x, y = recall_batch(64, n, V, gen, repeat_keys=True)
    assert x.shape == (64, 2 * n, 2) and (x[:, n:, 1] == V).all() and (y[:, :n] == -100).all()
    keys, values, queries = x[:, :n, 0], x[:, :n, 1], x[:, n:, 0]
    rewritten = 0
    for b in range(64):
        latest = {}
        for k, v in zip(keys[b].tolist(), values[b].tolist()):
            rewritten += k in latest and latest[k] != v
            latest[k] = v
        assert sorted(queries[b].tolist()) == sorted(keys[b].tolist())
        assert y[b, n:].tolist() == [latest[k] for k in queries[b].tolist()]
    assert rewritten > 64  # 12 keys from 8: overwrites are common, so the test sees them
    # without the flag the keys stay distinct
    x0, _ = recall_batch(4, 3, V, torch.Generator().manual_seed(1))
    assert all(len(set(r.tolist())) == 3 for r in x0[:, :3, 0])


def check_paper_optimizer(script):
    """--preset paper: the official LM optimizer (Adam, no weight decay, cosine to 0); the default: AdamW (0.9, 0.98),
    weight decay 0.1 on matrices, cosine to lr / 10."""
    paper, default = script.parse_args(["--preset", "paper"]), script.parse_args([])
    model = torch.nn.Linear(3, 3)
    assert [(g["weight_decay"], g["betas"]) for g in script.build_optimizer(model, paper).param_groups] == \
        [(0.0, (0.9, 0.999))] * 2
    assert [(g["weight_decay"], g["betas"]) for g in script.build_optimizer(model, default).param_groups] == \
        [(0.1, (0.9, 0.98)), (0.0, (0.9, 0.98))]
    assert script.lr_at(paper.warmup, paper) == paper.lr and script.lr_at(paper.steps, paper) == 0
    assert math.isclose(script.lr_at(default.steps, default), default.lr / 10)


def test_dn_paper_preset_optimizer():
    check_paper_optimizer(delta_net)


def test_dn_summed_embeddings_for_id_tuples():
    model = dn_model(10)
    ids = torch.randint(0, 10, (2, 5, 2), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.embed(ids).sum(-2), model.embed(ids[..., 0]) + model.embed(ids[..., 1]))
    assert model(ids)[0].shape == (2, 5, 10)


def run_in_bare_folder(tmp_path, script, code):
    """Python code run in a folder holding only the script, data.py and the kernel files (what a user copies), with
    nothing from this folder on the path; returns its stdout."""
    for f in (script, "data.py", "cpu_kernels.cpp", "cuda_kernels.cu"):
        shutil.copy(os.path.join(HERE, f), tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([script, "data.py", "cpu_kernels.cpp", "cuda_kernels.cu"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


DN_LAYER_USE = """
import os, torch
import delta_net
from delta_net import DeltaLayer
assert os.path.dirname(os.path.abspath(delta_net.__file__)) == os.getcwd()
torch.manual_seed(0)
layer = DeltaLayer(d_model=64, n_head=4)
x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
y, W = layer(x)  # no state: W starts at zeros
assert y.shape == (2, 10, 64) and W.shape == (2, 4, 16, 16) and W.dtype == torch.float32
y1, W1 = layer(x[:, :6])
y2, W2 = layer(x[:, 6:], W1)  # the state carried into the next call
torch.testing.assert_close(torch.cat([y1, y2], 1), y)
torch.testing.assert_close(W2, W)
(y2.square().sum() + W2.sum()).backward()
assert x.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in layer.parameters())
for kw, name in ((dict(n_head=5), "n_head"), (dict(impl="chunkk"), "impl")):
    try:
        DeltaLayer(d_model=64, **kw)
    except ValueError as e:
        assert name in str(e), e
        print(e)
    else:
        raise AssertionError(kw)
"""


def test_dn_readme_block_runs_from_a_folder_with_only_the_files_it_needs(tmp_path):
    """The README's "Use a layer" block for delta_net.py, run as written in a folder holding only the files it names."""
    run_readme_snippets(tmp_path, "delta_net")


def test_dn_layer_keyword_construction(tmp_path):
    """DeltaLayer imported and used from a copy of the script: keywords, forward and backward with and without a
    carried state, and a bad keyword is a ValueError naming it."""
    out = run_in_bare_folder(tmp_path, "delta_net.py", DN_LAYER_USE)
    assert "not divisible by n_head 5" in out and "impl must be one of" in out


def test_dn_constructors_check_their_arguments():
    """Every layer and the model: a bad keyword is a ValueError naming it and the fix, the command line's message
    without its dashes; delta_rule checks impl too."""
    cases = [(dict(d_model=30, n_head=4), "d_model 30 is not divisible by n_head 4; pick n_head dividing d_model"),
             (dict(impl="chunkk"), "impl must be one of auto, loop, chunk, kernel, cuda, chunk_cuda, got 'chunkk'"),
             (dict(gate=1), "gate must be true or false, got 1"),
             (dict(short_conv="yes"), "short_conv must be true or false"),
             (dict(qk_map="elu"), "qk_map must be one of"), (dict(chunk_size=0), "chunk_size must be positive"),
             (dict(n_head=-2), "n_head must be positive"), (dict(d_model=32.0), "d_model must be an integer")]
    for cls in (delta_net.DeltaLayer, delta_net.Block, delta_net.DeltaNet):
        for kw, message in cases:
            with pytest.raises(ValueError, match=re.escape(message)):
                cls(**({"vocab_size": 16} if cls is delta_net.DeltaNet else {}), **kw)
    for kw, message in [(dict(d_ff=0), "d_ff must be positive"), (dict(dropout=1.0), "dropout must be in [0, 1)")]:
        for cls in (delta_net.Block, delta_net.DeltaNet):
            with pytest.raises(ValueError, match=re.escape(message)):
                cls(**({"vocab_size": 16} if cls is delta_net.DeltaNet else {}), **kw)
    for kw, message in [(dict(vocab_size=0), "vocab_size must be positive"), (dict(n_layer=0), "n_layer must be "),
                        (dict(pos_enc="auto"), "pos_enc must be one of sin, none")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            delta_net.DeltaNet(**{"vocab_size": 16, **kw})
    with pytest.raises(ValueError, match="impl must be one of"):
        delta_net.delta_rule(*delta_inputs(T=3)[:4], impl="chunkk")


def test_dn_build_model_maps_every_flag_and_the_defaults_are_the_command_lines():
    import inspect

    defaults = delta_net.parse_args([])
    for cls in (delta_net.DeltaLayer, delta_net.Block, delta_net.DeltaNet):
        for name, p in inspect.signature(cls).parameters.items():
            assert p.default is inspect.Parameter.empty or p.default == getattr(defaults, name), (cls, name)
    args = tiny_args(task="lm", d_model=48, n_head=3, n_layer=3, d_ff=40, dropout=0.25, qk_map="l2", impl="loop",
                     chunk_size=8, scale_out="true", gate="true", neg_eigval="true", short_conv="true", out_gate="true")
    assert args.pos_enc == "sin"
    torch.manual_seed(0)
    built = delta_net.build_model(args, 17)
    torch.manual_seed(0)
    by_hand = delta_net.DeltaNet(17, d_model=48, n_head=3, n_layer=3, d_ff=40, dropout=0.25, pos_enc="sin",
                                 qk_map="l2", impl="loop", chunk_size=8, scale_out=True, gate=True, neg_eigval=True,
                                 short_conv=True, out_gate=True)
    assert delta_net.parse_args(["--preset", "gated_deltanet"]).__dict__ == {
        **defaults.__dict__, **dict(gate=True, short_conv=True, qk_map="l2", out_gate=True)}
    assert repr(built) == repr(by_hand)
    for a, b in zip(built.state_dict().values(), by_hand.state_dict().values()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# delta_net.py: the script (subprocesses from a temporary copy of just the script and its helpers)


def test_dn_resume_is_exact(tmp_path):
    """The smoke run (a tiny run: its final line, checkpoint and metrics); then a run stopped at step 10 and resumed
    ends where that uninterrupted run ends (CPU, fixed seed; to float rounding), so its first 10 steps in another
    process also check that the same seed gives the same losses."""
    script = script_copy(tmp_path)
    common = ["--preset", "tiny", "--dropout", "0.1", "--steps", "20", "--eval_every", "5"]
    p = run(script, *common, "--out_dir", str(tmp_path / "full"))
    assert "final: test acc" in p.stdout and os.path.exists(tmp_path / "full" / "ckpt.pt")
    assert len([m for m in read_metrics(tmp_path / "full") if m["metric"] == "loss"]) == 20 + 4 + 1  # + evals, test
    run(script, *common, "--out_dir", str(tmp_path / "split"), "--stop_at", "10")
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)["step"] == 10
    leave_as_killed(tmp_path / "split", tmp_path / "full", 10)
    run(script, *common, "--out_dir", str(tmp_path / "split"), "--resume")
    full = [(m["step"], m["split"], m["metric"], m["value"]) for m in read_metrics(tmp_path / "full")]
    split = [(m["step"], m["split"], m["metric"], m["value"]) for m in read_metrics(tmp_path / "split")]
    assert_same_run(split, full)  # each step once: the killed run's lines past step 10 are gone


def test_dn_nan_loss_stops_and_keeps_checkpoint(tmp_path):
    script = script_copy(tmp_path)
    out = str(tmp_path / "out")
    run(script, "--preset", "tiny", "--steps", "10", "--out_dir", out)
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    p = run(script, "--preset", "tiny", "--steps", "30", "--lr", "1e38", "--warmup", "0", "--grad_clip", "0",
            "--out_dir", out, "--resume", check=False)
    assert p.returncode == 1 and "the loss became" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before


def write_corpus(folder, n_lines=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["the", "fast", "weight", "programmer", "writes", "reads", "a", "key", "value", "delta"]
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", n_lines), ("valid", n_lines // 10), ("test", n_lines // 10)):
        with open(os.path.join(folder, f"wiki.{split}.tokens"), "w") as f:
            for _ in range(n):
                f.write(" ".join(words[i] for i in torch.randint(0, 10, (8,), generator=g).tolist()) + " \n")


def sampled_tokens(stdout, tokenizer):
    """The tokens of a --sample printout, undoing its join: <eos> printed as a line break (word), <unk> one token (char;
    the test corpus has no '<'), and print's final newline."""
    assert stdout.endswith("\n")
    text = stdout[:-1]
    return list(text.replace("<unk>", "\0")) if tokenizer == "char" else text.replace("\n", " <eos> ").split(" ")


@pytest.mark.parametrize("tokenizer", ["word", "char"])
def test_dn_smoke_lm_carry_state_and_sample(tmp_path, tokenizer):
    script = script_copy(tmp_path)
    corpus, out = str(tmp_path / "corpus"), str(tmp_path / "out")
    write_corpus(corpus)
    p = run(script, "--preset", "tiny", "--task", "lm", "--dataset", corpus, "--tokenizer", tokenizer,
            "--carry_state", "--out_dir", out, "--batch_size", "4", "--seq_len", "16")
    metric = "ppl" if tokenizer == "word" else "bpc"
    assert f"final: test {metric}" in p.stdout
    assert any(m["metric"] == metric and m["split"] == "test" for m in read_metrics(out))
    p = run(script, "--task", "lm", "--out_dir", out, "--sample", "12", "--prompt", "the fast")
    prompt = sampled_tokens("the fast\n", tokenizer)
    tokens = sampled_tokens(p.stdout, tokenizer)
    assert tokens[: len(prompt)] == prompt and len(tokens) == len(prompt) + 12, p.stdout


@pytest.mark.parametrize("pos_enc", ["none", "sin"])
def test_dn_sample_constant_memory_state_matches_parallel(pos_enc):
    """Token-by-token generation (positions counted by the caller) carries exactly the state a parallel pass over
    the same tokens ends with."""
    model = dn_model(pos_enc=pos_enc).double().eval()
    x = torch.randint(0, 16, (1, 9), generator=torch.Generator().manual_seed(1))
    logits, state = model(x)
    s = None
    for t in range(9):
        step_logits, s = model(x[:, t : t + 1], s, pos=t)
        torch.testing.assert_close(step_logits[:, 0], logits[:, t])
    for a, b in zip(s, state):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("args, message", [
    (["--bogus", "1"], "unknown argument '--bogus'"),
    (["--d_model", "abc"], "--d_model expects int"),
    (["--d_model", "30", "--n_head", "4"], "not divisible by --n_head"),
    (["--n_layer", "-1"], "--n_layer must be positive"),
    (["--impl", "fast"], "--impl must be one of"),
    (["--preset", "huge"], "unknown preset"),
    (["--steps"], "--steps needs a value"),
    (["--n_pairs", "40", "--vocab_size", "64"], "--vocab_size of at least 80"),
    (["--task", "lm", "--dataset", "/no/such/file.txt"], "unknown dataset"),
    (["--resume"], "no checkpoint"),
    (["--device", "tpu9"], "is not a device"),
    (["--task", "lm", "--sample", "5"], "no checkpoint"),
])
def test_dn_cli_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert_cli_error(delta_net, ["--preset", "tiny", "--out_dir", str(tmp_path / "out"), *args], message, capsys)


def test_dn_cli_error_without_traceback(tmp_path):
    assert_cli_error_without_traceback(script_copy(tmp_path), "--preset", "tiny", "--out_dir", str(tmp_path / "out"),
                                       "--resume", message="no checkpoint")


def test_dn_negative_flag_values_are_errors():
    assert_negative_values_fail(delta_net)


DN_RUN = ["--preset", "tiny"]  # 20 steps, an evaluation and a checkpoint every 10
test_dn_saved_runs_are_never_lost = saved_runs_test(delta_net, DN_RUN, 10, ["--d_model", "64", "--n_head", "4"])
test_dn_divergence_saves_nothing_and_says_what_stays = divergence_test(
    delta_net, DN_RUN, 10, ["--lr", "1e30", "--warmup", "0", "--grad_clip", "0", "--eval_every", "1"])
test_dn_final_evaluation_is_written_once = final_evaluation_test(delta_net, DN_RUN, ("valid", "test"))
test_dn_flag_values_are_checked = flag_values_test(
    delta_net, [(["--repeat_keys", "--vocab_size", "1"], "--vocab_size must be at least 2")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_dn_cuda_device_without_cuda_is_an_error(tmp_path, capsys):
    assert_cli_error(delta_net, ["--preset", "tiny", "--device", "cuda", "--out_dir", str(tmp_path / "out")],
                     "no CUDA GPU", capsys)


def test_dn_sample_from_a_recall_checkpoint_is_an_error(tmp_path, capsys):
    out = str(tmp_path / "out")
    delta_net.main(["--preset", "tiny", "--steps", "2", "--out_dir", out])
    assert_cli_error(delta_net, ["--task", "lm", "--sample", "5", "--out_dir", out], "trained on --task recall", capsys)


def test_dn_help_lists_every_flag(capsys):
    assert_help_lists_every_flag(delta_net, capsys)


def test_dn_empty_corpus_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_cli_error(delta_net, ["--preset", "tiny", "--task", "lm", "--dataset", str(empty), "--out_dir",
                                 str(tmp_path / "out")], "empty", capsys)


def test_dn_ddp_two_processes_train_as_one(tmp_path):
    p = assert_two_processes_train_as_one(script_copy(tmp_path), "--preset", "tiny", torchrun=True)
    assert p.stdout.count("final: test acc") == 1  # only rank 0 logs


def test_dn_ddp_lm_carried_state_resumes_across_process_counts(tmp_path):
    """lm with --carry_state: each rank carries its own streams' fast weights. 2 processes stopped at step 7, resumed
    by 1 up to step 14, then by 2 to the end, end as 1 process uninterrupted (the checkpoint holds every stream)."""
    script, corpus = script_copy(tmp_path), str(tmp_path / "corpus")
    write_corpus(corpus)
    common = ["--preset", "tiny", "--task", "lm", "--dataset", corpus, "--tokenizer", "char", "--seq_len", "16",
              "--carry_state", "--eval_every", "5"]
    full, out = str(tmp_path / "full"), str(tmp_path / "out")
    run_processes(script, 1, *common, "--out_dir", full)
    run_processes(script, 2, *common, "--out_dir", out, "--stop_at", "7")
    run_processes(script, 1, *common, "--out_dir", out, "--stop_at", "14", "--resume")
    run_processes(script, 2, *common, "--out_dir", out, "--resume")
    trained = [[m for m in logged_values(d) if m[1] != "valid"] for d in (full, out)]  # --stop_at evaluates too
    assert_same_run(*trained)
    assert_same_weights(os.path.join(full, "ckpt.pt"), os.path.join(out, "ckpt.pt"))


def test_dn_ddp_batch_not_divisible_by_the_processes_is_an_error(tmp_path):
    script = script_copy(tmp_path)
    p = run(script, "--preset", "tiny", "--batch_size", "9", check=False,
            env=dict(os.environ, WORLD_SIZE="2", RANK="0"))
    assert p.returncode == 2 and "global batch" in p.stderr and "Traceback" not in p.stderr


# ----------------------------------------------------------------------------------------------
# linear_transformer.py: the sum rule, feature maps, softmax baseline

import linear_transformer  # noqa: E402


def lt_inputs(B=2, H=3, T=37, d_phi=8, d_v=10, seed=0, dtype=torch.float64, denom=True):
    """Positive feature-mapped q, k (as elu1 gives them), a random initial state (W, z)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (F.elu(torch.randn(B, H, T, d_phi, generator=g, dtype=dtype)) + 1 for _ in range(2))
    v = torch.randn(B, H, T, d_v, generator=g, dtype=dtype)
    W = torch.randn(B, H, d_v, d_phi, generator=g, dtype=dtype)
    z = torch.rand(B, H, d_phi, generator=g, dtype=dtype) + 1
    return [t.requires_grad_() for t in (q, k, v, W)] + ([z.requires_grad_()] if denom else [])


def lt_outputs_and_grads(impl, x, denom, chunk_size=8):
    q, k, v, W = x[:4]
    y, (W_T, z_T) = linear_attention(q, k, v, (W, x[4] if denom else None), denom, impl, chunk_size)
    g = torch.Generator().manual_seed(1)
    outs = [y, W_T] + ([z_T] if denom else [])
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, x)


linear_attention = linear_transformer.linear_attention


@pytest.mark.parametrize("denom", [True, False])
@pytest.mark.parametrize("impl, chunk_size", [("chunk", 1), ("chunk", 8), ("chunk", 64), ("parallel", 0),
                                              pytest.param("kernel", 0, marks=needs_cxx)])
def test_lt_fast_forms_equal_loop_float64(impl, chunk_size, denom):
    """Outputs, the carried state (W and z) and the gradients of q, k, v, W0 and z0; T=37 is not a multiple of C."""
    x = lt_inputs(denom=denom)
    outs_loop, g_loop = lt_outputs_and_grads("loop", x, denom)
    outs, g = lt_outputs_and_grads(impl, x, denom, chunk_size)
    assert len(outs) == (3 if denom else 2) and len(g) == (5 if denom else 4)
    for a, b in zip(outs + list(g), outs_loop + list(g_loop)):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lt_loop_is_the_textbook_recurrence():
    """y_t = (sum_{i<=t} v_i k_i^T) q_t / (sum_{i<=t} k_i . q_t), written out in plain Python."""
    q, k, v, _, _ = [t.detach() for t in lt_inputs(B=1, H=1, T=5, d_phi=3, d_v=2)]
    y, (W, z) = linear_attention(q, k, v, None, True, "loop")
    for t in range(5):
        num = sum(v[0, 0, i, :, None] * k[0, 0, i, None, :] for i in range(t + 1)) @ q[0, 0, t]
        den = sum(k[0, 0, i] @ q[0, 0, t] for i in range(t + 1))
        torch.testing.assert_close(y[0, 0, t], num / (den + linear_transformer.EPS))
    torch.testing.assert_close(z[0, 0], k[0, 0].sum(0))


def test_lt_gradcheck_loop_and_chunk():
    x = lt_inputs(B=1, H=2, T=6, d_phi=3, d_v=2)
    for impl in ("loop", "chunk", "kernel"):  # kernel: without a compiler the chunk form
        fn = lambda q, k, v, W, z: linear_attention(q, k, v, (W, z), True, impl, 4)  # noqa: E731
        assert torch.autograd.gradcheck(lambda *a: (fn(*a)[0], *fn(*a)[1]), x)


@pytest.mark.parametrize("impl", ["loop", "chunk", "parallel", pytest.param("kernel", marks=needs_cxx)])
def test_lt_state_carried_across_calls(impl):
    """One call over T1 + T2 equals two calls with (W, z) passed along: outputs, final state, and the gradients of q,
    k, v, W0 and z0 under random cotangents of y, W and z."""
    x = lt_inputs(T=37)
    q, k, v, W0, z0 = x
    y, state = linear_attention(q, k, v, (W0, z0), True, impl, 8)
    ya, sa = linear_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], (W0, z0), True, impl, 8)
    yb, sb = linear_attention(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], sa, True, impl, 8)
    torch.testing.assert_close(torch.cat([ya, yb], 2), y, rtol=1e-11, atol=1e-11)
    for a, b in zip(sb, state):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    g = torch.Generator().manual_seed(1)
    gy, gW, gz = (torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (y, *state))
    g_one = torch.autograd.grad((y * gy).sum() + (state[0] * gW).sum() + (state[1] * gz).sum(), x)
    g_two = torch.autograd.grad((torch.cat([ya, yb], 2) * gy).sum() + (sb[0] * gW).sum() + (sb[1] * gz).sum(), x)
    assert len(g_one) == 5
    for a, b in zip(g_two, g_one):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lt_autocast_keeps_state_fp32():
    x = [t.detach().float().requires_grad_() for t in lt_inputs(T=20)]
    for impl in ("loop", "chunk", "parallel"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, (W, z) = linear_attention(x[0], x[1], x[2], (x[3], x[4]), True, impl)
        assert W.dtype == z.dtype == torch.float32
        y_ref, _ = linear_attention(x[0], x[1], x[2], (x[3], x[4]), True, impl)
        torch.testing.assert_close(y, y_ref)


def test_lt_bf16_inputs_keep_state_fp32():
    """bf16 q, k, v (as autocast gives them): the state (W, z) returned is fp32 in every form, a carried one too, and
    equals the float64 result on the same rounded inputs to fp32 accuracy; so is each layer's state of the model
    under CPU bf16 autocast."""
    q, k, v = (t.detach().to(torch.bfloat16) for t in lt_inputs(T=20)[:3])
    _, ref = linear_attention(q.double(), k.double(), v.double(), None, True, "loop")
    for impl in ("loop", "chunk", "parallel", "kernel"):
        y, state = linear_attention(q, k, v, None, True, impl, 8)
        assert y.dtype == torch.bfloat16 and [s.dtype for s in state] == [torch.float32] * 2, impl
        for a, b in zip(state, ref):
            assert (a.double() - b).norm() / b.norm() < 1e-5, impl
        _, state = linear_attention(q, k, v, state, True, impl, 8)
        assert [s.dtype for s in state] == [torch.float32] * 2, impl
    for phi in ("elu1", "favor"):
        model = lt_model(n_layer=2, phi=phi)
        ids = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, state = model(ids)
            assert [s.dtype for layer in state for s in layer] == [torch.float32] * 4, phi
            _, state = model(ids, state)
        assert [s.dtype for layer in state for s in layer] == [torch.float32] * 4, phi


def lt_args(**kw):
    return linear_transformer.parse_args(["--preset", "tiny"] + [s for k, v in kw.items() for s in (f"--{k}", str(v))])


def lt_model(vocab_size=16, **kw):
    """LinearTransformer from keywords, at the tiny preset's sizes unless kw says otherwise (weights from the seed 0)."""
    torch.manual_seed(0)
    return linear_transformer.LinearTransformer(vocab_size, **{**dict(d_model=32, n_head=2, n_layer=1, d_ff=64), **kw})


@pytest.mark.parametrize("normalize", ["denom", "sumnorm", "none"])
@pytest.mark.parametrize("phi", ["elu1", "dpfp", "favor", "relu"])
def test_lt_model_impls_agree_and_carry_state(phi, normalize):
    """The whole model for every phi and normalisation: loop = chunk (C = 8) = parallel logits and final states, and
    segment by segment (state carried, z included) = all at once."""
    kw = dict(phi=phi, normalize=normalize, n_layer=2, dpfp_nu=2, n_features=24)
    model = lt_model(**kw, impl="loop").double()
    x = torch.randint(0, 16, (3, 29), generator=torch.Generator().manual_seed(1))
    logits_loop, state_loop = model(x)
    assert state_loop[0][0].shape == (3, 2, 16, {"dpfp": 64, "favor": 24}.get(phi, 16))  # (B, H, d_head, d_phi)
    assert (state_loop[0][1] is not None) == (normalize == "denom")
    for impl in ("chunk", "parallel"):
        other = lt_model(**kw, impl=impl, chunk_size=8).double()
        other.load_state_dict(model.state_dict())  # the weights and FAVOR+'s projection
        logits, state = other(x)
        torch.testing.assert_close(logits, logits_loop, rtol=1e-10, atol=1e-10)
        for layer, layer_loop in zip(state, state_loop):
            for a, b in zip(layer, layer_loop):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    part1, s = model(x[:, :11])
    part2, s = model(x[:, 11:], s)
    torch.testing.assert_close(torch.cat([part1, part2], 1), logits_loop, rtol=1e-10, atol=1e-10)
    for layer, layer_loop in zip(s, state_loop):
        for a, b in zip(layer, layer_loop):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lt_softmax_cache_equals_one_call():
    """Softmax attention's state is its KV cache: token by token = one causal pass, and it matches the formula."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
    y, (K, V) = linear_transformer.softmax_attention(q, k, v)
    scores = (q @ k.transpose(-1, -2) / 2).masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(y, scores.softmax(-1) @ v)
    ya, cache = linear_transformer.softmax_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4])
    yb, cache = linear_transformer.softmax_attention(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], cache)
    torch.testing.assert_close(torch.cat([ya, yb], 2), y)
    torch.testing.assert_close(cache[0], K)


def test_lt_dpfp_dimension_and_formula():
    x = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(0))
    for nu in (1, 2, 3):
        phi = linear_transformer.dpfp(x, nu)
        assert phi.shape == (5, 7, 2 * nu * 6)
        r = torch.cat([x, -x], -1).relu()
        for i in range(1, nu + 1):  # phi_{(i-1) 2d + j} = r_j r_{(j + i) mod 2d}
            for j in range(12):
                torch.testing.assert_close(phi[..., (i - 1) * 12 + j], r[..., j] * r[..., (j + i) % 12])
    assert (phi >= 0).all()


def lt_phi_by_hand(x, layer):
    """The layer's feature map written out: elu1 x + 1 for x > 0 and exp(x) else; relu max(x, 0); dpfp
    phi_{(i-1) 2d + j} = r_j r_{(j + i) mod 2d}, r = relu([x, -x]); favor exp(omega x' - |x'|^2 / 2) / sqrt(m) with
    x' = x / d^(1/4); sumnorm then divides by the sum (+ EPS)."""
    d = x.shape[-1]
    if layer.phi == "elu1":
        phi = torch.where(x > 0, x + 1, torch.exp(x))
    elif layer.phi == "relu":
        phi = torch.where(x > 0, x, torch.zeros_like(x))
    elif layer.phi == "dpfp":
        r = torch.cat([x, -x], -1)
        r = torch.where(r > 0, r, torch.zeros_like(r))
        phi = torch.stack([r[..., j] * r[..., (j + i) % (2 * d)] for i in range(1, layer.dpfp_nu + 1)
                           for j in range(2 * d)], -1)
    else:
        xs = x / d**0.25
        phi = torch.exp(xs @ layer.omega.T - (xs * xs).sum(-1, keepdim=True) / 2) / layer.omega.shape[0] ** 0.5
    return phi / (phi.sum(-1, keepdim=True) + linear_transformer.EPS) if layer.normalize == "sumnorm" else phi


@pytest.mark.parametrize("phi", ["elu1", "dpfp", "favor", "relu"])
def test_lt_feature_maps(phi):
    """Each feature map (and normalisation) against its formula written out, and the layer's output against the
    equations by hand: its projections, that map, the reference loop, the output projection."""
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(4, 7, 16, generator=g, dtype=torch.float64)
    h = torch.randn(2, 9, 32, generator=g, dtype=torch.float64)
    for normalize in ("denom", "sumnorm", "none"):
        torch.manual_seed(0)
        layer = linear_transformer.AttentionLayer(d_model=32, n_head=2, phi=phi, normalize=normalize, dpfp_nu=2,
                                                  n_features=24).double()
        assert layer.feature_map(x).shape[-1] == layer.d_phi == {"dpfp": 64, "favor": 24}.get(phi, 16)
        torch.testing.assert_close(layer.feature_map(x), lt_phi_by_hand(x, layer), rtol=1e-12, atol=1e-12)
        q, k, v = (h @ layer.qkv.weight.T).view(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)  # (B, H, T, d_head) each
        y, (W, z) = linear_transformer.linear_attention_loop(lt_phi_by_hand(q, layer), lt_phi_by_hand(k, layer), v,
                                                             None, normalize == "denom")
        out, state = layer(h)
        expected = y.transpose(1, 2).reshape(2, 9, 32) @ layer.out.weight.T
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state[0], W, rtol=1e-10, atol=1e-10)


def test_lt_favor_is_an_unbiased_softmax_kernel_estimate():
    """E[phi(q) . phi(k)] = exp(q . k / sqrt(d)) (fixed seed): the mean over 4000 independent draws of the
    orthogonal projection lies within 4 standard errors of the exact kernel for every pair, and those errors
    are small enough (< 5% of the value) that a biased estimator (e.g. one without the -|x|^2/2, off by a factor
    of about 4 here) would fail."""
    d, m, R = 8, 16, 4000
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, d, generator=g, dtype=torch.float64) * 0.7, torch.randn(6, d, generator=g, dtype=torch.float64) * 0.7
    exact = torch.exp((q * k).sum(-1) / d**0.5)
    est = []
    for _ in range(R):
        omega = linear_transformer.favor_projection(m, d, generator=g).double()
        est.append((linear_transformer.favor_features(q, omega) * linear_transformer.favor_features(k, omega)).sum(-1))
    est = torch.stack(est)
    mean, stderr = est.mean(0), est.std(0) / R**0.5
    assert ((mean - exact).abs() < 4 * stderr).all(), (mean, exact, stderr)
    assert (stderr / exact < 0.05).all()
    omega = linear_transformer.favor_projection(2 * d, d, generator=g)  # two blocks of d orthogonal rows
    for block in (omega[:d], omega[d:]):
        gram = block @ block.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-4, rtol=0)


def test_lt_favor_redraw_is_saved_and_resume_is_exact(tmp_path):
    """FAVOR+ redraws its projection every --favor_redraw steps; a run stopped at step 10 and resumed ends
    where an uninterrupted run ends (so the first 10 steps, in two processes, also check that the same seed gives the
    same losses), and the projection changed during training."""
    script = script_copy(tmp_path, "linear_transformer.py")
    common = ["--preset", "tiny", "--phi", "favor", "--favor_redraw", "4", "--steps", "20", "--eval_every", "5"]
    assert "final: test acc" in run(script, *common, "--out_dir", str(tmp_path / "full")).stdout
    run(script, *common, "--out_dir", str(tmp_path / "split"), "--stop_at", "10")
    omega_10 = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)["model"]["blocks.0.attn.omega"]
    leave_as_killed(tmp_path / "split", tmp_path / "full", 10)
    run(script, *common, "--out_dir", str(tmp_path / "split"), "--resume")
    full = [(m["step"], m["split"], m["metric"], m["value"]) for m in read_metrics(tmp_path / "full")]
    split = [(m["step"], m["split"], m["metric"], m["value"]) for m in read_metrics(tmp_path / "split")]
    assert_same_run(split, full)  # each step once: the killed run's lines past step 10 are gone
    omega_20 = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)["model"]["blocks.0.attn.omega"]
    assert not torch.equal(omega_10, omega_20)


LT_LAYER_USE = """
import os, torch
import linear_transformer
from linear_transformer import AttentionLayer
assert os.path.dirname(os.path.abspath(linear_transformer.__file__)) == os.getcwd()
torch.manual_seed(0)
layer = AttentionLayer(d_model=64, n_head=4)
x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
y, (W, z) = layer(x)  # no state: W and z start at zeros
assert y.shape == (2, 10, 64) and W.shape == (2, 4, 16, 16) and z.shape == (2, 4, 16) and W.dtype == torch.float32
y1, s1 = layer(x[:, :6])
y2, (W2, z2) = layer(x[:, 6:], s1)  # the state carried into the next call
torch.testing.assert_close(torch.cat([y1, y2], 1), y)
torch.testing.assert_close(W2, W)
torch.testing.assert_close(z2, z)
(y2.square().sum() + W2.sum()).backward()
assert x.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in layer.parameters())
favor = AttentionLayer(d_model=64, n_head=4, phi="favor", n_features=32).double()  # omega moves with the module
assert favor.omega.dtype == torch.float64 and favor(x.detach().double())[1][0].shape == (2, 4, 16, 32)
for kw, name in ((dict(n_head=5), "n_head"), (dict(impl="chunkk"), "impl")):
    try:
        AttentionLayer(d_model=64, **kw)
    except ValueError as e:
        assert name in str(e), e
        print(e)
    else:
        raise AssertionError(kw)
"""


def test_lt_readme_block_runs_from_a_folder_with_only_the_files_it_needs(tmp_path):
    """The README's "Use a layer" block for linear_transformer.py, run as written in a folder holding only the files it names."""
    run_readme_snippets(tmp_path, "linear_transformer")


def test_lt_layer_keyword_construction(tmp_path):
    """AttentionLayer imported and used from a copy of the script: keywords, forward and backward with and without a
    carried state, FAVOR+'s projection moving with .double(), and a bad keyword is a ValueError naming it."""
    out = run_in_bare_folder(tmp_path, "linear_transformer.py", LT_LAYER_USE)
    assert "not divisible by n_head 5" in out and "impl must be one of" in out


def test_lt_constructors_check_their_arguments():
    """Every layer and the model: a bad keyword is a ValueError naming it and the fix, the command line's message
    without its dashes; linear_attention checks impl too."""
    cases = [(dict(d_model=30, n_head=4), "d_model 30 is not divisible by n_head 4; pick n_head dividing d_model"),
             (dict(impl="chunkk"), "impl must be one of auto, loop, chunk, parallel, kernel, cuda, got 'chunkk'"),
             (dict(attn="local"), "attn must be one of"), (dict(phi="cosine"), "phi must be one of"),
             (dict(normalize="l2"), "normalize must be one of"), (dict(dpfp_nu=0), "dpfp_nu must be positive"),
             (dict(n_features=0), "n_features must be positive"), (dict(chunk_size=0), "chunk_size must be positive"),
             (dict(n_head=-2), "n_head must be positive"), (dict(d_model=32.0), "d_model must be an integer")]
    LT = linear_transformer
    for cls in (LT.AttentionLayer, LT.Block, LT.LinearTransformer):
        for kw, message in cases:
            with pytest.raises(ValueError, match=re.escape(message)):
                cls(**({"vocab_size": 16} if cls is LT.LinearTransformer else {}), **kw)
    for kw, message in [(dict(d_ff=0), "d_ff must be positive"), (dict(dropout=1.0), "dropout must be in [0, 1)")]:
        for cls in (LT.Block, LT.LinearTransformer):
            with pytest.raises(ValueError, match=re.escape(message)):
                cls(**({"vocab_size": 16} if cls is LT.LinearTransformer else {}), **kw)
    for kw, message in [(dict(vocab_size=0), "vocab_size must be positive"), (dict(n_layer=0), "n_layer must be "),
                        (dict(pos_enc="auto"), "pos_enc must be one of sin, none")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            LT.LinearTransformer(**{"vocab_size": 16, **kw})
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_attention(*lt_inputs(T=3)[:3], impl="chunkk")


def test_lt_build_model_maps_every_flag_and_the_defaults_are_the_command_lines():
    import inspect

    defaults = linear_transformer.parse_args([])
    for cls in (linear_transformer.AttentionLayer, linear_transformer.Block, linear_transformer.LinearTransformer):
        for name, p in inspect.signature(cls).parameters.items():
            assert p.default is inspect.Parameter.empty or p.default == getattr(defaults, name), (cls, name)
    args = lt_args(task="lm", d_model=48, n_head=3, n_layer=3, d_ff=40, dropout=0.25, phi="dpfp", dpfp_nu=3,
                   normalize="sumnorm", impl="parallel", chunk_size=8, scale_out="true")
    assert args.pos_enc == "sin"
    kw = dict(d_model=48, n_head=3, n_layer=3, d_ff=40, dropout=0.25, pos_enc="sin", phi="dpfp", dpfp_nu=3,
              normalize="sumnorm", impl="parallel", chunk_size=8, scale_out=True)
    for flags, keywords in ((dict(), dict()), (dict(phi="favor", n_features=24), dict(phi="favor", n_features=24)),
                            (dict(attn="softmax"), dict(attn="softmax"))):
        torch.manual_seed(0)
        built = linear_transformer.build_model(dataclasses.replace(args, **flags), 17)
        torch.manual_seed(0)
        by_hand = linear_transformer.LinearTransformer(17, **{**kw, **keywords})
        assert repr(built) == repr(by_hand)
        for a, b in zip(built.state_dict().values(), by_hand.state_dict().values()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("args", [[], ["--attn", "softmax"], ["--phi", "dpfp", "--normalize", "sumnorm"]])
def test_lt_smoke_recall(tmp_path, args):
    """A tiny run of each form (the same seed's losses in two processes: the resume test)."""
    out = str(tmp_path / "o")
    p = run(script_copy(tmp_path, "linear_transformer.py"), "--preset", "tiny", "--out_dir", out, *args)
    assert "final: test acc" in p.stdout
    assert len([m for m in read_metrics(out) if m["metric"] == "loss"]) == 20 + 2 + 1  # train steps, evals, test


@pytest.mark.parametrize("attn", ["linear", "softmax"])
def test_lt_smoke_lm_and_sample(tmp_path, attn):
    """lm through data.py; sampling carries the fast weights (linear) or the KV cache (softmax)."""
    script = script_copy(tmp_path, "linear_transformer.py")
    corpus, out = str(tmp_path / "corpus"), str(tmp_path / "out")
    write_corpus(corpus)
    carry = ["--carry_state"] if attn == "linear" else []
    p = run(script, "--preset", "tiny", "--task", "lm", "--dataset", corpus, "--attn", attn, *carry, "--out_dir", out,
            "--batch_size", "4", "--seq_len", "16")
    assert "final: test ppl" in p.stdout
    p = run(script, "--task", "lm", "--out_dir", out, "--sample", "12", "--prompt", "the fast")
    tokens = sampled_tokens(p.stdout, "word")
    assert tokens[:2] == ["the", "fast"] and len(tokens) == 2 + 12, p.stdout


def test_lt_ddp_two_processes_train_as_one(tmp_path):
    """FAVOR+ redrawn every 5 steps: every rank computes with the projection one process would draw."""
    assert_two_processes_train_as_one(script_copy(tmp_path, "linear_transformer.py"), "--preset", "tiny", "--phi",
                                      "favor", "--favor_redraw", "5")


@pytest.mark.parametrize("pos_enc", ["none", "sin"])
def test_lt_sample_state_matches_parallel(pos_enc):
    for attn in ("linear", "softmax"):
        model = lt_model(attn=attn, pos_enc=pos_enc).double().eval()
        x = torch.randint(0, 16, (1, 9), generator=torch.Generator().manual_seed(1))
        logits, _ = model(x)
        s = None
        for t in range(9):
            step_logits, s = model(x[:, t : t + 1], s, pos=t)
            torch.testing.assert_close(step_logits[:, 0], logits[:, t])


def test_lt_pos_enc_breaks_the_softmax_baselines_permutation_invariance():
    """Causal softmax attention without positions sees the prefix as a set: permuting the tokens before the last
    one leaves the last output unchanged. Sinusoidal positions (the default for --attn softmax) make it order-aware."""
    assert lt_args(attn="softmax").pos_enc == "sin" and lt_args().pos_enc == "none"
    assert lt_args(task="lm").pos_enc == "sin" and lt_args(task="lm", carry_state="true").pos_enc == "none"
    paper = linear_transformer.parse_args(["--preset", "paper"])
    assert paper.pos_enc == "sin" and paper.scale_out
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (2, 12), generator=g)
    x_perm = torch.cat([x[:, :-1][:, torch.randperm(11, generator=g)], x[:, -1:]], 1)
    assert not torch.equal(x, x_perm)
    for pos_enc, invariant in (("none", True), ("sin", False)):
        model = lt_model(attn="softmax", pos_enc=pos_enc).double().eval()
        last, last_perm = model(x)[0][:, -1], model(x_perm)[0][:, -1]
        assert torch.allclose(last, last_perm, rtol=1e-10, atol=1e-12) == invariant
        assert (last - last_perm).abs().max() > 1e-3 or invariant


@pytest.mark.parametrize("script", ["delta_net", "linear_transformer"])
def test_dn_lt_scale_out_multiplies_the_fast_weight_output(script):
    """--scale_out: the official LM layers' y / sqrt(d_head) before the output projection (linear, so the layer's
    output is exactly the unscaled one times d_head^-1/2); the paper preset turns it on with the positions."""
    mod = {"delta_net": delta_net, "linear_transformer": linear_transformer}[script]
    layer = mod.DeltaLayer if script == "delta_net" else mod.AttentionLayer
    torch.manual_seed(0)
    plain, scaled = layer(d_model=32, n_head=2).double(), layer(d_model=32, n_head=2, scale_out=True).double()
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(scaled(x)[0], plain(x)[0] / math.sqrt(16))
    paper = mod.build_model(mod.parse_args(["--preset", "paper"]), 10)
    assert paper.pos_enc == "sin" and all(block.attn.scale_out for block in paper.blocks)
    assert mod.parse_args(["--task", "lm"]).pos_enc == "sin" and mod.parse_args([]).pos_enc == "none"


def test_lt_bench_runs(tmp_path):
    p = run(script_copy(tmp_path, "linear_transformer.py"), "--bench", "--bench_T", "64,128", "--bench_d", "16")
    for impl in ("loop", "chunk", "parallel", "softmax"):
        assert len(re.findall(rf"^{impl} +\d+ ", p.stdout, re.M)) == 2, p.stdout
    assert "chunk vs softmax" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["--phi", "cosine"], "--phi must be one of"),
    (["--normalize", "l2"], "--normalize must be one of"),
    (["--attn", "softmax", "--carry_state"], "--carry_state needs --attn linear"),
    (["--dpfp_nu", "0"], "--dpfp_nu must be positive"),
    (["--impl", "fast"], "--impl must be one of"),
    (["--favor_redraw", "-1"], "--favor_redraw non-negative"),
])
def test_lt_cli_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert_cli_error(linear_transformer, ["--preset", "tiny", "--out_dir", str(tmp_path / "o"), *args], message, capsys)


def test_lt_cli_error_without_traceback(tmp_path):
    assert_cli_error_without_traceback(script_copy(tmp_path, "linear_transformer.py"), "--preset", "tiny", "--out_dir",
                                       str(tmp_path / "o"), "--resume", message="no checkpoint")


def test_lt_negative_flag_values_are_errors():
    assert_negative_values_fail(linear_transformer)


LT_RUN = ["--preset", "tiny"]  # 20 steps, an evaluation and a checkpoint every 10
test_lt_saved_runs_are_never_lost = saved_runs_test(linear_transformer, LT_RUN, 10, ["--phi", "relu"])
test_lt_divergence_saves_nothing_and_says_what_stays = divergence_test(
    linear_transformer, LT_RUN, 10, ["--lr", "1e30", "--warmup", "0", "--grad_clip", "0", "--eval_every", "1"])
test_lt_final_evaluation_is_written_once = final_evaluation_test(linear_transformer, LT_RUN, ("valid", "test"))
test_lt_flag_values_are_checked = flag_values_test(
    linear_transformer, [(["--repeat_keys", "--vocab_size", "1"], "--vocab_size must be at least 2")])


def test_lt_paper_preset_optimizer():
    check_paper_optimizer(linear_transformer)


def test_lt_help_lists_every_flag(capsys):
    assert_help_lists_every_flag(linear_transformer, capsys)


# ----------------------------------------------------------------------------------------------
# rfwp.py: recurrent FWPs, the tasks

import rfwp  # noqa: E402


def rf_model(name, **kw):
    torch.manual_seed(0)
    a = rfwp.parse_args(["--preset", "tiny", "--model", name, "--n_layer", "2", "--chunk_size", "4"] +
                        [s for k, v in kw.items() for s in (f"--{k}", str(v))])
    return rfwp.build_model(a, 12, 7).double().eval()


def flat(state):
    return [s for layer in state for s in layer]


@pytest.mark.parametrize("name", rfwp.MODELS)
def test_rf_step_by_step_equals_full_sequence(name):
    """Every model: T calls of one token each, state carried, = one call over T tokens (outputs and final state);
    and one call split in two = one call."""
    model = rf_model(name)
    x = torch.randint(0, 12, (3, 11), generator=torch.Generator().manual_seed(0))
    logits, state = model(x)
    s, steps = None, []
    for t in range(11):
        out, s = model(x[:, t : t + 1], s)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(flat(s), flat(state)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    part1, s = model(x[:, :6])
    part2, s = model(x[:, 6:], s)
    torch.testing.assert_close(torch.cat([part1, part2], 1), logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", rfwp.MODELS)
def test_rf_reset_mask(name):
    """Rows whose reset flag is set start from zero state (= a fresh call); the other rows keep theirs."""
    model = rf_model(name)
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randint(0, 12, (4, 5), generator=g), torch.randint(0, 12, (4, 6), generator=g)
    _, s = model(x1)
    carried, _ = model(x2, s)
    fresh, _ = model(x2)
    reset = torch.tensor([True, False, True, False])
    out, _ = model(x2, s, reset=reset)
    torch.testing.assert_close(out[reset], fresh[reset], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[~reset], carried[~reset], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(carried[reset], fresh[reset])  # the state mattered


@pytest.mark.parametrize("beta", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_rf_fast_weight_chunk_equals_loop(beta, chunk_size):
    """The chunkwise form of the delta rule (beta) and of the sum rule (no beta): outputs, state, all gradients."""
    q, k, v, b, W = delta_inputs(T=23)
    b = b if beta else None
    y1, W1 = rfwp.fast_weight_loop(q, k, v, b, W)
    y2, W2 = rfwp.fast_weight_chunk(q, k, v, b, W, chunk_size)
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(W2, W1, rtol=1e-10, atol=1e-10)
    leaves = [t for t in (q, k, v, b, W) if t is not None]
    g1 = torch.autograd.grad((y1 * y1.detach()).sum() + W1.sum(), leaves)
    g2 = torch.autograd.grad((y2 * y1.detach()).sum() + W2.sum(), leaves)
    for a, c in zip(g2, g1):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-9)


def test_rf_fast_weight_loop_equals_delta_net():
    q, k, v, b, W = [t.detach() for t in delta_inputs(T=17)]
    y1, W1 = rfwp.fast_weight_loop(q, k, v, b, W)
    y2, W2 = delta_net.delta_rule_loop(q, k, v, b, W)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(W1, W2)


@pytest.mark.parametrize("name", ["linear", "delta", "delta_mlp", "delta_delta", "delta_rnn", "delta_lstm"])
def test_rf_model_chunk_equals_loop(name):
    model = rf_model(name, impl="chunk")
    x = torch.randint(0, 12, (2, 13), generator=torch.Generator().manual_seed(2))
    logits_chunk, _ = model(x)
    for block in model.blocks:
        block.fwp.impl = "loop"
    logits_loop, _ = model(x)
    torch.testing.assert_close(logits_chunk, logits_loop, rtol=1e-10, atol=1e-10)


def rf_layer_inputs(name, **kw):
    """One head of width 4 (keywords as make_layer takes them) and a float64 input of 5 steps."""
    torch.manual_seed(0)
    layer = rfwp.make_layer(name, d_model=4, n_head=1, **kw).double()
    return layer, torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_rf_post_ln_transformer_equals_torch_encoder_layers():
    """--model transformer --post_ln = post-LN nn.TransformerEncoderLayer blocks (the official algorithmic baseline)
    with the same weights under a causal mask, then the final LN and the head."""
    a = rfwp.parse_args(["--model", "transformer", "--post_ln", "--d_model", "16", "--n_head", "2", "--d_ff", "32"])
    torch.manual_seed(0)
    model = rfwp.build_model(a, 12, 7).double().eval()
    x = torch.randint(0, 12, (3, 9), generator=torch.Generator().manual_seed(0))
    h = model.embed(x)
    for block in model.blocks:
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).double().eval()
        layer.self_attn.in_proj_weight.data.copy_(block.fwp.slow.weight.view(2, 3, 8, 16).transpose(0, 1).reshape(48, 16))
        layer.self_attn.in_proj_bias.data.zero_()  # the slow projections have no bias
        layer.self_attn.out_proj.weight.data.copy_(block.fwp.out.weight)
        layer.self_attn.out_proj.bias.data.zero_()
        for mine, theirs in ((block.ff[0], layer.linear1), (block.ff[3], layer.linear2), (block.ln1, layer.norm1),
                             (block.ln2, layer.norm2)):
            theirs.load_state_dict(mine.state_dict())
        h = layer(h, src_mask=torch.nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64))
    torch.testing.assert_close(model(x)[0], model.head(model.ln_f(h)))


def test_rf_delta_rnn_and_lstm_equations():
    """The recurrent layers against their equations written out step by step (one head, d = 4)."""
    layer, x = rf_layer_inputs("delta_rnn", impl="loop")
    q, k, v, b, k_r, v_r, b_r = layer.project(x)
    z, _ = rfwp.fast_weight_loop(rfwp.elu1_sumnorm(q), rfwp.elu1_sumnorm(k), v, torch.sigmoid(b))
    R, y, ys = torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, 1, 4, dtype=torch.float64), []
    for t in range(5):
        kr = F.softmax(k_r[:, :, t], -1)
        R = R + torch.sigmoid(b_r[:, :, t])[..., None, None] * (v_r[:, :, t, :, None] - R @ kr[..., None]) * kr[..., None, :]
        y = z[:, :, t] + (R @ F.softmax(y, -1)[..., None])[..., 0]
        ys.append(y)
    torch.testing.assert_close(layer(x)[0], layer.out(rfwp.merge(torch.stack(ys, 2))))

    layer, x = rf_layer_inputs("delta_lstm", impl="loop")
    p = layer.project(x)
    c, h, Rs, hs = (torch.zeros(2, 1, 4, dtype=torch.float64),) * 2 + ([torch.zeros(2, 1, 4, 4, dtype=torch.float64)] * 3,) + ([],)
    zs = [rfwp.fast_weight_loop(rfwp.elu1_sumnorm(p[7 * g]), rfwp.elu1_sumnorm(p[7 * g + 1]), p[7 * g + 2],
                                torch.sigmoid(p[7 * g + 3]))[0] for g in range(3)]
    for t in range(5):
        s, pre = F.softmax(h, -1), []
        for g in range(3):
            kr, vr, br = F.softmax(p[7 * g + 4][:, :, t], -1), p[7 * g + 5][:, :, t], torch.sigmoid(p[7 * g + 6][:, :, t])
            Rs[g] = Rs[g] + br[..., None, None] * (vr[..., None] - Rs[g] @ kr[..., None]) * kr[..., None, :]
            pre.append(zs[g][:, :, t] + (Rs[g] @ s[..., None])[..., 0])
        i, u, o = torch.sigmoid(pre[0]), pre[1], torch.sigmoid(pre[2])
        c = i * u + (1 - i) * c
        h = o * c
        hs.append(h)
    torch.testing.assert_close(layer(x)[0], layer.out(rfwp.merge(torch.stack(hs, 2))))


def test_rf_rdn_equations():
    layer, x = rf_layer_inputs("rdn")
    q, k, v, b = layer.project(x)
    W, y, ys = torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, 1, 4, dtype=torch.float64), []
    Rq, Rk, Rv = layer.R[:, 0]
    for t in range(5):
        s = torch.tanh(y)
        qt, kt = F.softmax(q[:, :, t] + s @ Rq.T, -1), F.softmax(k[:, :, t] + s @ Rk.T, -1)
        vt, bt = v[:, :, t] + s @ Rv.T, torch.sigmoid(b[:, :, t] + s @ layer.r_b[0])
        W = W + bt[..., None, None] * (vt[..., None] - W @ kt[..., None]) * kt[..., None, :]
        y = (W @ qt[..., None])[..., 0]
        ys.append(y)
    torch.testing.assert_close(layer(x)[0], layer.out(rfwp.merge(torch.stack(ys, 2))))


def run_code(tokens, official_if=False):
    """An independent interpreter: the program as text, ordinary semantics (official_if: a conditional assignment
    runs only while its variable is unassigned); returns the prints by token index."""
    env, printed = {}, {}
    text = " ".join(tokens).split(" ; ")
    pos = 0
    for stmt in text:
        words = stmt.replace(" ;", "").split()
        run = True
        if words[0] == "if":
            var, op, c = words[1], words[2], int(words[3])
            run = env[var] < c if op == "<" else env[var] > c
            pos += 5
            words = words[5:]
        pos += len(words) + 1  # the statement and its ";"
        if not run:
            continue
        if words[0] == "print":
            printed[pos - 1] = env[words[1]]
        elif words[1] == "=":
            if not (official_if and stmt.startswith("if") and words[0] in env):
                env[words[0]] = int(words[2])
        else:
            env[words[0]] += 1 if words[1] == "++" else -1
        assert all(rfwp.CODE_MIN <= val <= rfwp.CODE_MAX for val in env.values())
    return printed


@pytest.mark.parametrize("n_vars, official_if", [(3, False), (5, False), (3, True)])
def test_rf_code_targets_equal_an_interpreter(n_vars, official_if):
    rng = random.Random(0)
    n_prints, n_differ = 0, 0
    for _ in range(300):
        tokens, targets = rfwp.code_program(rng, 30, n_vars, official_if)
        assert tokens[0] in rfwp.CODE_VARS and tokens[1] == "=" and tokens[-3] == "print"
        expected = run_code(tokens, official_if)
        assert {i: t for i, t in enumerate(targets) if t is not None} == expected
        n_prints += len(expected)
        try:
            n_differ += expected != run_code(tokens, not official_if)
        except KeyError:  # under the other semantics a variable is read before it is assigned
            n_differ += 1
    assert n_prints > 300 * 5  # prints are common; some are skipped by false conditions
    assert n_differ > 30  # the two semantics differ on many programs


def test_rf_code_statement_kinds_are_drawn_as_the_official_generator_draws_them():
    """assign, ++/--, print, if with 1/4 each (statements 2 to n-1); inside an if, assign, ++/--, print 1/3 each."""
    rng = random.Random(0)
    top, inner = {}, {}
    for _ in range(400):
        tokens, _ = rfwp.code_program(rng, 50, 3)
        for stmt in " ".join(tokens).split(" ; ")[1:-1]:
            words = stmt.replace(" ;", "").split()
            kind = "if" if words[0] == "if" else "print" if words[0] == "print" else "=" if words[1] == "=" else "+-"
            top[kind] = top.get(kind, 0) + 1
            if kind == "if":
                w = words[5:]
                kind = "print" if w[0] == "print" else "=" if w[1] == "=" else "+-"
                inner[kind] = inner.get(kind, 0) + 1
    for counts, p in ((top, 1 / 4), (inner, 1 / 3)):
        n = sum(counts.values())
        for kind, c in counts.items():
            assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n), (kind, c / n, p)


def eval_listops_tokens(tokens):
    """An independent evaluator: a stack machine over the prefix tokens."""
    ops = dict(MIN=min, MAX=max, FIRST=lambda x: x[0], LAST=lambda x: x[-1], SM=lambda x: sum(x) % 10,
               MED=lambda x: sorted(x)[(len(x) - 1) // 2] if len(x) % 2 else (sorted(x)[len(x) // 2 - 1] + sorted(x)[len(x) // 2]) // 2)
    stack = []
    for tok in tokens:
        if tok.startswith("["):
            stack.append((tok[1:], []))
        elif tok == "]":
            op, args = stack.pop()
            val = ops[op](args)
            if not stack:
                return val
            stack[-1][1].append(val)
        else:
            stack[-1][1].append(int(tok))


def test_rf_listops_trees_are_drawn_as_the_official_generator_draws_them():
    """Depth exactly the asked one; at depth 10 the official data's median of about 91 tokens (the depth cap would
    lengthen them: 111); no node below level 20."""
    rng = random.Random(0)
    trees = [rfwp.listops_tree(rng, 10, ["MIN", "MAX", "FIRST"]) for _ in range(1000)]

    def depth(t):
        return 0 if isinstance(t, int) else 1 + max(depth(c) for c in t[1])

    assert all(depth(t) == 10 for t in trees)
    assert abs(statistics.median(len(rfwp.listops_tokens(t)) for t in trees) / 91 - 1) < 0.05
    with pytest.raises(SystemExit):
        rfwp.check_args(dataclasses.replace(rfwp.parse_args(["--task", "listops"]), depth=rfwp.LISTOPS_LEVELS))


def test_rf_listops_labels_equal_a_stack_evaluation():
    a = rfwp.parse_args(["--task", "listops", "--depth", "3", "--ops", "MIN,MAX,FIRST,LAST,MED,SM", "--n_eval", "300"])
    xs, ys, vocab, n_out = rfwp.make_examples(a, "valid")
    assert n_out == 10
    for x, y in zip(xs, ys):
        tokens = [vocab[i] for i in x]
        depth, d = 0, 0
        for tok in tokens:
            d += tok.startswith("[") - (tok == "]")
            depth = max(depth, d)
        assert depth == 3 and d == 0 and tokens[0].startswith("[")
        assert y[:-1] == [-100] * (len(y) - 1) and y[-1] == eval_listops_tokens(tokens)
    assert len({y[-1] for y in ys}) == 10


def test_rf_splits_are_fixed_and_distinct():
    a = rfwp.parse_args(["--preset", "tiny"])
    train1, train2, valid = rfwp.make_examples(a, "train")[0], rfwp.make_examples(a, "train")[0], rfwp.make_examples(a, "valid")[0]
    assert train1 == train2 and train1 != valid


def rf_state_task(task, split, *argv):
    a = rfwp.parse_args(["--task", task, "--n_train", "300", "--n_eval", "60", *argv])
    xs, ys, vocab, n_out = rfwp.make_examples(a, split)
    return a, xs, ys, vocab, n_out


def assert_lengths_in_buckets(a, xs, split, odd=False):
    """Training and valid lengths drawn from min_len to max_len (both ends reached); test: n_eval in each bucket."""
    buckets = rfwp.length_buckets(a) if split == "test" else rfwp.length_buckets(a)[:1]
    n = a.n_train if split == "train" else a.n_eval
    assert len(xs) == n * len(buckets)
    for i, (lo, hi) in enumerate(buckets):
        lengths = [len(x) for x in xs[i * n : (i + 1) * n]]
        allowed = {L - (1 - L % 2) if odd else L for L in range(lo, hi + 1)}
        assert set(lengths) <= allowed and min(allowed) in lengths and max(allowed) in lengths, (lo, hi, lengths)


def test_rf_length_buckets():
    a = rfwp.parse_args([])
    assert rfwp.length_buckets(a) == [(3, 40), (41, 64), (65, 128), (129, 256)]
    a = rfwp.parse_args(["--min_len", "1", "--max_len", "64", "--test_len", "100"])
    assert rfwp.length_buckets(a) == [(1, 64), (65, 100)]
    assert rfwp.length_buckets(rfwp.parse_args(["--max_len", "8", "--test_len", "8"])) == [(3, 8)]


@pytest.mark.parametrize("split", ["train", "test"])
def test_rf_parity_targets_equal_a_plain_loop(split):
    a, xs, ys, vocab, n_out = rf_state_task("parity", split, "--max_len", "20", "--test_len", "70")
    assert vocab == ["0", "1"] and n_out == 2
    assert_lengths_in_buckets(a, xs, split)
    for x, y in zip(xs, ys):
        parity, expected = 0, []
        for bit in x:
            parity = (parity + bit) % 2
            expected.append(parity)
        assert y == expected
    assert {b for x in xs for b in x} == {0, 1}


@pytest.mark.parametrize("modulus", [5, 7])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_rf_modarith_labels_equal_python_eval(modulus, split):
    """Odd lengths (an even one minus 1), numbers and operators alternating, the official ids (numbers, then + - *),
    each operator a third of the time; the label at the last token = Python's evaluation (* before + and -) mod the
    modulus."""
    a, xs, ys, vocab, n_out = rf_state_task("modarith", split, "--modulus", str(modulus), "--test_len", "100")
    assert vocab == [str(n) for n in range(modulus)] + ["+", "-", "*"] and n_out == modulus
    assert_lengths_in_buckets(a, xs, split, odd=True)
    ops = {}
    for x, y in zip(xs, ys):
        assert all(t < modulus for t in x[::2]) and all(modulus <= t < modulus + 3 for t in x[1::2])
        for t in x[1::2]:
            ops[vocab[t]] = ops.get(vocab[t], 0) + 1
        assert y[:-1] == [-100] * (len(x) - 1) and y[-1] == eval(" ".join(vocab[t] for t in x)) % modulus
    n = sum(ops.values())
    assert all(abs(c / n - 1 / 3) < 4 * math.sqrt(2 / 9 / n) for c in ops.values()), ops
    assert len({y[-1] for y in ys}) == modulus


def test_rf_modarith_official_examples():
    """The official docstring's examples (mod 5): 1 + 2 * 3 = 2, 1 - 1 - 1 = 4, 0 * 1 + 4 * 3 - 2 = 0."""

    class Draws:  # replays the numbers and operators of an expression as the generator draws them
        def __init__(self, text):
            self.draws = [int(t) if t.isdigit() else "+-*".index(t) for t in text.split()]

        def randrange(self, n):
            return self.draws.pop(0)

    for text, value in [("1 + 2 * 3", 2), ("1 - 1 - 1", 4), ("0 * 1 + 4 * 3 - 2", 0)]:
        ids, targets = rfwp.modarith_example(Draws(text), len(text.split()) + 1, 5)
        assert ids == [int(t) if t.isdigit() else 5 + "+-*".index(t) for t in text.split()] and targets[-1] == value


@pytest.mark.parametrize("n_perm", [3, 5])
def test_rf_permutation_targets_equal_matrix_products(n_perm):
    """Targets against permutation matrices: P(g)[i, g[i]] = 1 maps an arrangement a to a[g], so the prefix's
    arrangement is P(g_t) ... P(g_1) applied to (0, ..., n - 1); its index in itertools.permutations order."""
    a, xs, ys, vocab, n_out = rf_state_task("permutation", "test", "--n_perm", str(n_perm), "--max_len", "10",
                                            "--test_len", "40", "--n_eval", "30")
    perms = list(itertools.permutations(range(n_perm)))
    assert n_out == len(vocab) == math.factorial(n_perm) and vocab[1] == "".join(map(str, perms[1]))
    assert_lengths_in_buckets(a, xs, "test")
    for x, y in zip(xs, ys):
        M = np.eye(n_perm, dtype=np.int64)
        for g, target in zip(x, y):
            P = np.zeros((n_perm, n_perm), dtype=np.int64)
            P[np.arange(n_perm), perms[g]] = 1
            M = P @ M
            assert perms[target] == tuple(M @ np.arange(n_perm))
    assert len({t for y in ys for t in y}) == n_out


@pytest.mark.parametrize("task", rfwp.STATE_TASKS)
def test_rf_state_tasks_are_fixed_by_the_seed(task):
    first = rfwp.make_examples(rfwp.parse_args(["--task", task, "--n_train", "50", "--n_eval", "20"]), "test")[:2]
    again = rfwp.make_examples(rfwp.parse_args(["--task", task, "--n_train", "50", "--n_eval", "20"]), "test")[:2]
    other = rfwp.make_examples(rfwp.parse_args(["--task", task, "--n_eval", "20", "--seed", "1"]), "test")[:2]
    valid = rfwp.make_examples(rfwp.parse_args(["--task", task, "--n_eval", "20"]), "valid")[:2]
    assert first == again and first != other and first[0][:20] != valid[0]


@pytest.mark.parametrize("task, model", [("parity", "delta"), ("modarith", "rdn"), ("permutation", "delta_lstm")])
def test_rf_smoke_state_tasks(tmp_path, task, model):
    """--preset tiny: every valid line gives the training lengths' accuracy; the final line every bucket's, led by
    the longest."""
    p = run(script_copy(tmp_path, "rfwp.py"), "--preset", "tiny", "--task", task, "--model", model, "--out_dir",
            str(tmp_path / "o"))
    assert re.search(r"step 20 valid: loss [\d.]+ acc_3_40 [\d.]+$", p.stdout, re.M), p.stdout
    assert re.search(r"^final: test acc_129_256 [\d.]+ \(loss [\d.]+ acc_3_40 [\d.]+ acc_41_64 [\d.]+ acc_65_128 "
                     r"[\d.]+ acc_129_256 [\d.]+\) with the best valid checkpoint \(step \d+, valid acc_3_40", p.stdout,
                     re.M), p.stdout
    assert "warning" not in p.stderr, p.stderr


def assert_rf_smoke(p, out_dir):
    assert "final: test seq_acc" in p.stdout and os.path.exists(os.path.join(out_dir, "best.pt"))
    assert "warning" not in p.stderr, p.stderr


@pytest.mark.parametrize("name", [m for m in rfwp.MODELS if m != "delta_rnn"])  # delta_rnn: test_rf_resume_is_exact
def test_rf_smoke_every_model(tmp_path, name):
    script = script_copy(tmp_path, "rfwp.py")
    impl = ["--impl", "cuda"] if name == "rdn" else []  # the old name of --impl kernel: the CPU kernels here
    p = run(script, "--preset", "tiny", "--model", name, "--steps", "6", "--eval_every", "3", "--out_dir",
            str(tmp_path / "o"), *impl)
    assert_rf_smoke(p, tmp_path / "o")


@pytest.mark.parametrize("args", [["--task", "listops"], ["--task", "lm", "--carry_state", "--model", "rdn"]])
def test_rf_smoke_listops_and_lm(tmp_path, args):
    script = script_copy(tmp_path, "rfwp.py")
    if "lm" in args:
        write_corpus(str(tmp_path / "corpus"))
        args = args + ["--dataset", str(tmp_path / "corpus"), "--batch_size", "4", "--seq_len", "16"]
    p = run(script, "--preset", "tiny", "--out_dir", str(tmp_path / "o"), *args)
    assert ("final: test acc" if "listops" in args else "final: test ppl") in p.stdout


def test_rf_resume_is_exact(tmp_path):
    """delta_rnn's smoke run, then a run stopped at step 10 and resumed ends where it ends."""
    script = script_copy(tmp_path, "rfwp.py")
    common = ["--preset", "tiny", "--model", "delta_rnn", "--dropout", "0.1", "--steps", "20", "--eval_every", "5"]
    assert_rf_smoke(run(script, *common, "--out_dir", str(tmp_path / "full")), tmp_path / "full")
    run(script, *common, "--out_dir", str(tmp_path / "split"), "--stop_at", "10")
    leave_as_killed(tmp_path / "split", tmp_path / "full", 10)
    run(script, *common, "--out_dir", str(tmp_path / "split"), "--resume")
    full = [(m["step"], m["split"], m["metric"], m["value"]) for m in read_metrics(tmp_path / "full")]
    split = [(m["step"], m["split"], m["metric"], m["value"]) for m in read_metrics(tmp_path / "split")]
    assert_same_run(split, full)  # each step once: the killed run's lines past step 10 are gone


def test_rf_ddp_two_processes_train_as_one(tmp_path):
    """Code execution: the programs' lengths differ, so the ranks hold different numbers of targets; each rank's loss
    is its sum over the global batch's count (times 2), which DDP's average turns into the global mean."""
    p = assert_two_processes_train_as_one(script_copy(tmp_path, "rfwp.py"), "--preset", "tiny")
    assert p.stdout.count("final: test seq_acc") == 1


def test_rf_bench_runs(tmp_path):
    """Every model's row; each fast-weight model with chunk and kernel rows, each checked against --impl loop."""
    p = run(script_copy(tmp_path, "rfwp.py"), "--preset", "tiny", "--bench", "--bench_T", "16")
    for name in ("lstm", "transformer"):
        assert re.search(rf"^{name} +auto +\d", p.stdout, re.M), p.stdout
    for name in set(rfwp.MODELS) - {"lstm", "transformer"}:
        for impl in ("chunk", "kernel"):
            err = re.search(rf"^{name} +{impl} +.* ([\d.e+-]+)$", p.stdout, re.M)
            assert err and float(err.group(1)) < 1e-4, p.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "gru"], "--model must be one of"),
    (["--n_vars", "4"], "--n_vars must be 3 or 5"),
    (["--ops", "MIN,POW"], "unknown operator(s) POW"),
    (["--model", "transformer", "--carry_state"], "--carry_state needs"),
    (["--d_model", "30", "--n_head", "4"], "not divisible"),
    (["--resume"], "no checkpoint"),
    (["--impl", "chunkk"], "--impl must be one of auto, loop, chunk, kernel, got 'chunkk'"),
    (["--task", "rl"], "is rfwp_rl.py"),
    (["--task", "parity", "--max_len", "300"], "--min_len <= --max_len <= --test_len"),
    (["--task", "permutation", "--n_perm", "6"], "--n_perm 2 to 5"),
    (["--model", "linear", "--neg_eigval"], "--model linear has none"),
    (["--model", "delta", "--qk_map", "l3"], "--qk_map must be one of paper, l2, got 'l3'"),
])
def test_rf_cli_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert_cli_error(rfwp, ["--preset", "tiny", "--out_dir", str(tmp_path / "o"), *args], message, capsys)


def test_rf_cli_error_without_traceback(tmp_path):
    assert_cli_error_without_traceback(script_copy(tmp_path, "rfwp.py"), "--preset", "tiny", "--out_dir",
                                       str(tmp_path / "o"), "--resume", message="no checkpoint")


def test_rf_negative_flag_values_are_errors():
    assert_negative_values_fail(rfwp)


def test_rf_help_lists_every_flag(capsys):
    assert_help_lists_every_flag(rfwp, capsys)


RF_RUN = ["--preset", "tiny", "--model", "delta_rnn"]  # 20 steps, an evaluation and a checkpoint every 10
test_rf_saved_runs_are_never_lost = saved_runs_test(rfwp, RF_RUN, 10, ["--model", "delta"])
test_rf_divergence_saves_nothing_and_says_what_stays = divergence_test(
    rfwp, RF_RUN, 10, ["--lr", "1e30", "--warmup", "0", "--grad_clip", "0", "--eval_every", "1"])
test_rf_final_evaluation_is_written_once = final_evaluation_test(rfwp, RF_RUN, ("test",))
test_rf_flag_values_are_checked = flag_values_test(rfwp)



@pytest.mark.parametrize("name", list(rfwp.LAYERS))
def test_rf_layer_keyword_construction(name):
    """Every layer is a torch module built from keywords with defaults, each one it reads (no other: a keyword it
    does not read is a TypeError), checked with a ValueError naming the argument; forward and backward on (2, 10, 64)
    with and without a carried state (two calls = one call over both halves, float64); extra_repr shows the sizes."""
    cls = rfwp.LAYERS[name]
    params = inspect.signature(cls).parameters
    assert list(params)[:2] == ["d_model", "n_head"] and all(p.default is not p.empty for p in params.values())
    torch.manual_seed(0)
    layer = cls(d_model=64, n_head=4)
    assert layer.extra_repr().startswith("d_model=64, n_head=4" + (", impl='auto'" if "impl" in params else ""))
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y, state = layer(x)
    y2, state2 = layer(x.flip(1), state)
    (y.square().sum() + y2.square().sum()).backward()
    assert y.shape == y2.shape == (2, 10, 64) and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in layer.parameters())
    layer.double()
    xd = x.detach().double()
    y, state = layer(xd)
    y2, state2 = layer(xd.flip(1), state)
    y12, state12 = layer(torch.cat([xd, xd.flip(1)], 1))
    torch.testing.assert_close(torch.cat([y, y2], 1), y12, rtol=1e-10, atol=1e-10)
    for a, b in zip(state2, state12):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    bad = [dict(n_head=5), dict(n_head=0), dict(d_model=-8), dict(d_model=64.0)]
    bad += [dict(impl="chunkk"), dict(impl="cuda")] if "impl" in params else []
    bad += [dict(chunk_size=0)] if "chunk_size" in params else []
    bad += [dict(fast_net_depth=0)] if "fast_net_depth" in params else []
    bad += [dict(official_rl_core="yes")] if "official_rl_core" in params else []
    for kw in bad:
        with pytest.raises(ValueError, match=list(kw)[0]):
            cls(**kw)
    for unread in {"impl", "chunk_size", "fast_net_depth", "official_rl_core"} - set(params):
        with pytest.raises(TypeError):
            cls(**{unread: 1})


RF_BAD_MODEL_KEYWORDS = [
    (rfwp.FWPModel, dict(model="lstm"), "model"), (rfwp.FWPModel, dict(model="gru"), "model"),
    (rfwp.FWPModel, dict(n_layer=0), "n_layer"), (rfwp.FWPModel, dict(n_in=0), "n_in"),
    (rfwp.FWPModel, dict(embed=torch.nn.Identity()), "n_in 12 must equal d_model 64"),
    (rfwp.FWPModel, dict(d_model=30), "n_head"), (rfwp.FWPModel, dict(dropout=1.0), "dropout"),
    (rfwp.FWPModel, dict(impl="chunkk"), "impl"), (rfwp.LSTMModel, dict(n_layer=0), "n_layer"),
    (rfwp.LSTMModel, dict(dropout=-0.1), "dropout"), (rfwp.Block, dict(d_ff=0), "d_ff"),
    (rfwp.Block, dict(post_ln=1), "post_ln")]


def test_rf_model_keyword_construction_and_checks():
    """Block, FWPModel and LSTMModel from keywords; each bad value a ValueError naming it (the command line's messages
    come from the same checks): FWPModel's n_in is its embedding's size or, with an embed module given, must equal
    d_model; the lstm is LSTMModel, not an FWPModel; a keyword a class does not read is a TypeError."""
    torch.manual_seed(0)
    model = rfwp.FWPModel(12, 7, model="rdn", d_model=16, n_head=2, n_layer=2, d_ff=32)
    assert model.embed.num_embeddings == 12 and len(model.blocks) == 2 and isinstance(model.blocks[0].fwp, rfwp.RDNLayer)
    g = torch.Generator().manual_seed(1)
    logits, state = model(torch.randint(0, 12, (3, 5), generator=g))
    assert logits.shape == (3, 5, 7) and len(state) == 2
    core = rfwp.FWPModel(16, 7, model="delta", d_model=16, n_head=2, embed=torch.nn.Identity())
    assert core(torch.randn(3, 5, 16, generator=g))[0].shape == (3, 5, 7)
    lstm = rfwp.LSTMModel(12, 7, d_model=16, n_layer=1)
    assert lstm(torch.randint(0, 12, (3, 5), generator=g))[0].shape == (3, 5, 7)
    for cls, kw, message in RF_BAD_MODEL_KEYWORDS:
        with pytest.raises(ValueError, match=message):
            cls(**kw) if cls is rfwp.Block else cls(**{"n_in": 12, "n_out": 7, **kw})
    with pytest.raises(TypeError):
        rfwp.LSTMModel(12, 7, n_head=4)


def test_rf_readme_layers_run_from_a_folder_with_only_the_files_they_need(tmp_path):
    """The README's "Use a layer" block for rfwp.py, run in a folder holding only the files it names; there, bad
    keywords are ValueErrors naming the argument."""
    out = run_readme_snippets(tmp_path, "rfwp", """
for bad in (dict(n_head=5), dict(impl="chunkk")):
    try:
        RDNLayer(d_model=64, **bad)
    except ValueError as e:
        print("ValueError:", e)
""")[0]
    assert "ValueError: d_model 64 is not divisible by n_head 5" in out, out
    assert "ValueError: impl must be one of auto, loop, chunk, kernel, got 'chunkk'" in out, out


# ----------------------------------------------------------------------------------------------
# rfwp_rl.py: the IMPALA agent with rfwp.py's cores

import rfwp_rl  # noqa: E402


def rl_script_copy(tmp_path):
    """rfwp_rl.py with the files its docstring says a copy needs: rfwp.py, data.py and the kernel files."""
    shutil.copy(os.path.join(HERE, "rfwp.py"), tmp_path)
    return script_copy(tmp_path, "rfwp_rl.py")


def vtrace_reference(log_rhos, discounts, rewards, values, bootstrap, rho_bar=1.0, c_bar=1.0):
    """Espeholt et al. 2018, eq. 1, term by term: v_s = V(x_s) + sum_{t=s}^{T-1} (prod_{i=s}^{t-1} gamma_i c_i)
    delta_t V, with delta_t V = rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t)); advantage_s = rho_s (r_s + gamma_s v_{s+1}
    - V(x_s)). Plain Python floats, one batch column at a time."""
    T, B = len(rewards), len(bootstrap)
    vs, adv = torch.zeros(T, B, dtype=torch.float64), torch.zeros(T, B, dtype=torch.float64)
    for b in range(B):
        V = [float(values[t, b]) for t in range(T)] + [float(bootstrap[b])]
        rho = [min(rho_bar, math.exp(float(log_rhos[t, b]))) for t in range(T)]
        c = [min(c_bar, math.exp(float(log_rhos[t, b]))) for t in range(T)]
        g, r = [float(discounts[t, b]) for t in range(T)], [float(rewards[t, b]) for t in range(T)]
        for s in range(T):
            total = V[s]
            for t in range(s, T):
                weight = 1.0
                for i in range(s, t):
                    weight *= g[i] * c[i]
                total += weight * rho[t] * (r[t] + g[t] * V[t + 1] - V[t])
            vs[s, b] = total
        for s in range(T):
            v_next = float(vs[s + 1, b]) if s + 1 < T else V[T]
            adv[s, b] = rho[s] * (r[s] + g[s] * v_next - V[s])
    return vs, adv


@pytest.mark.parametrize("rho_bar, c_bar", [(1.0, 1.0), (0.7, 1.3)])
def test_rl_vtrace_equals_reference(rho_bar, c_bar):
    """Off-policy (importance weights above and below the clips) with episode ends (discount 0) inside the unroll."""
    g = torch.Generator().manual_seed(0)
    T, B = 9, 3
    log_rhos = torch.randn(T, B, generator=g, dtype=torch.float64)
    discounts = 0.95 * (torch.rand(T, B, generator=g, dtype=torch.float64) > 0.2)
    rewards = torch.randn(T, B, generator=g, dtype=torch.float64)
    values = torch.randn(T, B, generator=g, dtype=torch.float64)
    bootstrap = torch.randn(B, generator=g, dtype=torch.float64)
    vs, adv = rfwp_rl.vtrace(log_rhos, discounts, rewards, values, bootstrap, rho_bar, c_bar)
    vs_ref, adv_ref = vtrace_reference(log_rhos, discounts, rewards, values, bootstrap, rho_bar, c_bar)
    torch.testing.assert_close(vs, vs_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adv, adv_ref, rtol=1e-12, atol=1e-12)


def test_rl_vtrace_on_policy_is_the_discounted_return():
    """pi = mu, gamma = 1, V = 0, bootstrap 0: v_s is the plain sum of the rewards to the end of the unroll."""
    r = torch.arange(1.0, 6.0, dtype=torch.float64).view(5, 1)
    vs, _ = rfwp_rl.vtrace(torch.zeros(5, 1), torch.ones(5, 1), r, torch.zeros(5, 1), torch.zeros(1))
    torch.testing.assert_close(vs.flatten(), torch.tensor([15.0, 14, 12, 9, 5], dtype=torch.float64))


class ScriptedEnvs:
    """A batch of 2 environments: env 0 ends its episode every 3 steps, env 1 every 5; reward 1 per step."""
    obs_shape, n_actions = (3,), 2

    def __init__(self):
        self.t, self.rng = np.zeros(2, dtype=int), np.random.default_rng(0)

    def reset(self):
        self.t[:] = 0
        return self.rng.standard_normal((2, 3)).astype(np.float32)

    def step(self, actions):
        self.t += 1
        done = self.t % np.array([3, 5]) == 0
        return self.rng.standard_normal((2, 3)).astype(np.float32), np.ones(2, np.float32), done, done


@pytest.mark.parametrize("name", ["lstm", "delta", "rdn"])
def test_rl_core_state_resets_where_an_episode_ends(name):
    """rl_unroll zeroes the core state of an environment right after its episode ends (and of no other): each
    step's policy and value equal a fresh agent run over that environment's current episode alone."""
    torch.manual_seed(0)
    a = rfwp_rl.parse_args(["--preset", "tiny", "--model", name, "--unroll", "8"])
    agent = rfwp_rl.build_agent(a, (3,), 2).double()
    seen = []  # (obs, last_reward) each step
    forward = agent.forward
    agent.forward = lambda obs, r, state, reset: (seen.append((obs.double(), r.double(), reset)),
                                                  forward(obs.double(), r.double(), state, reset))[1]
    envs = ScriptedEnvs()
    carry = rfwp_rl.rl_start(envs, torch.device("cpu"), 2)
    stats = {k: v.clone() for k, v in agent.state_dict().items() if k.startswith("obs_")}
    traj, finished, _, carry = rfwp_rl.rl_unroll(agent, envs, carry, a, torch.device("cpu"))
    assert sorted(finished) == [3.0, 3.0, 5.0]
    assert agent.obs_count == 16  # the unroll's observations, merged after it
    agent.load_state_dict(stats, strict=False)
    agent.forward = forward
    for b, length in enumerate([3, 5]):
        for t in range(8):
            start = t - t % length  # the first step of the current episode
            assert bool(seen[t][2][b]) == (t % length == 0)
            state = None
            for i in range(start, t + 1):
                logit, value, state = agent(seen[i][0][b : b + 1], seen[i][1][b : b + 1], state)
            torch.testing.assert_close(traj["logits"][t, b], logit[0], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(traj["values"][t, b], value[0], rtol=1e-10, atol=1e-10)
    # the discounts stop the bootstrap exactly at the ends
    ends = traj["discounts"][:, 0] == 0
    assert ends.tolist() == [False, False, True, False, False, True, False, False]


@pytest.mark.parametrize("truncate", [0, 1, 3])
def test_rl_truncate_detaches_the_state_every_k_steps(truncate):
    """rl_unroll with --truncate K: the state entering step t carries a graph unless t % K == 0 (K = 0: never
    detached within an unroll); between unrolls it is always detached."""
    torch.manual_seed(0)
    a = rfwp_rl.parse_args(["--preset", "tiny", "--model", "rdn", "--unroll", "7", "--truncate", str(truncate)])
    agent = rfwp_rl.build_agent(a, (3,), 2)
    has_graph = []
    forward = agent.forward
    agent.forward = lambda obs, r, state, reset: (
        has_graph.append(state is not None and any(s.grad_fn is not None for layer in state for s in layer)),
        forward(obs, r, state, reset))[1]
    envs = ScriptedEnvs()
    carry = rfwp_rl.rl_start(envs, torch.device("cpu"), 2)
    for _ in range(2):
        _, _, _, carry = rfwp_rl.rl_unroll(agent, envs, carry, a, torch.device("cpu"))
    steps = has_graph[:7] + has_graph[8:15]  # the bootstrap calls (8th of each unroll) aside
    assert steps == [t > 0 and not (truncate and t % truncate == 0) for t in list(range(7)) * 2]


def official_rl_core_step(agent, name, x, state):
    """One step of the official RL core (torchbeast/ of the official code: layer.py, model.py), written out with the
    agent's parameters: input_proj (the lstm: none), per layer a pre-LN fast-weight sub-layer and a pre-LN FF
    sub-layer, each residual, no final LN, the heads. x (B, n_feat + 1); state: a list per layer (None: zero)."""
    if name == "lstm":  # nn.LSTM directly on the 257 (here n_feat + 1) inputs, gates i, f, g, o
        lstm, new, h = agent.core.lstm, [], x
        for l in range(lstm.num_layers):
            hp, cp = state[l] if state[l] is not None else (torch.zeros_like(h[:, :lstm.hidden_size]),) * 2
            w_ih, b_ih, w_hh, b_hh = (getattr(lstm, f"{n}_l{l}") for n in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"))
            i, f, g, o = (h @ w_ih.T + b_ih + hp @ w_hh.T + b_hh).chunk(4, -1)
            c = torch.sigmoid(f) * cp + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            new.append((h, c))
        out = agent.core.head(h)
        return out[:, :-1], out[:, -1], new
    def elu_p1_sum_norm_eps(u):
        return (F.elu(u) + 1) / ((F.elu(u) + 1).sum(-1, keepdim=True) + 1e-5)

    def delta(M, k, v, beta):  # M + beta (v - M k) k^T
        return M + beta[..., None, None] * (v - (M @ k[..., None])[..., 0])[..., None] * k[..., None, :]
    h, new = agent.core_in(x), []  # input_proj
    for block, st in zip(agent.core.blocks, state):
        layer, B = block.fwp, h.shape[0]
        H, d = layer.H, layer.d
        parts = layer.slow(block.ln1(h)).view(B, H, -1).split(layer.sizes, -1)
        zero = torch.zeros(B, H, d, d, dtype=h.dtype)
        if name == "linear":
            q, k, v = parts
            W = (st or {}).get("W", zero) + v[..., None] * elu_p1_sum_norm_eps(k)[..., None, :]
            y, st = (W @ elu_p1_sum_norm_eps(q)[..., None])[..., 0], dict(W=W)
        elif name == "delta":
            q, k, v, b = parts
            W = delta((st or {}).get("W", zero), elu_p1_sum_norm_eps(k), v, torch.sigmoid(b[..., 0]))
            y, st = (W @ elu_p1_sum_norm_eps(q)[..., None])[..., 0], dict(W=W)
        elif name == "delta_rnn":  # fast_weight_delta with softmax q, k, then fast_rnn_v2
            q, k, v, b, kr, vr, br = parts
            st = st or dict(W=zero, R=zero, y=torch.zeros(B, H, d, dtype=h.dtype))
            W = delta(st["W"], F.softmax(k, -1), v, torch.sigmoid(b[..., 0]))
            R = delta(st["R"], F.softmax(kr, -1), vr, torch.sigmoid(br[..., 0]))
            y = (W @ F.softmax(q, -1)[..., None])[..., 0] + (R @ F.softmax(st["y"], -1)[..., None])[..., 0]
            st = dict(W=W, R=R, y=y)
        else:  # rdn: rec_update_fwm_tanh
            q, k, v, b = parts
            st = st or dict(W=zero, y=torch.zeros(B, H, d, dtype=h.dtype))
            s = torch.tanh(st["y"])
            Rq, Rk, Rv = ((layer.R[i] @ s[..., None])[..., 0] for i in range(3))
            beta = torch.sigmoid(b[..., 0] + (layer.r_b * s).sum(-1))
            W = delta(st["W"], F.softmax(k + Rk, -1), v + Rv, beta)
            y = (W @ F.softmax(q + Rq, -1)[..., None])[..., 0]
            st = dict(W=W, y=y)
        h = h + layer.out(y.reshape(B, H * d))
        h = h + block.ff(block.ln2(h))
        new.append(st)
    out = agent.core.head(h)  # no final LN
    return out[:, :-1], out[:, -1], new


@pytest.mark.parametrize("name", ["linear", "delta", "delta_rnn", "rdn", "lstm"])
def test_rl_cores_equal_the_official_forms(name):
    """rfwp_rl.py uses the official RL cores (--official_rl_core, on by default): each core, stepped through 6
    environment steps with its state carried, equals the official layer's equations written out."""
    a = rfwp_rl.parse_args(["--model", name, "--d_model", "8", "--n_head", "2", "--d_ff", "16", "--n_layer", "2"])
    assert a.official_rl_core
    torch.manual_seed(0)
    agent = rfwp_rl.build_agent(a, (3,), 2).double()
    g = torch.Generator().manual_seed(1)
    obs, r = torch.randn(6, 4, 3, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    state, ref_state = None, [None] * a.n_layer
    for t in range(6):
        logit, value, state = agent(obs[t], r[t], state)
        standardised = ((obs[t] - agent.obs_mean) / (agent.obs_var + 1e-8).sqrt()).clamp(-10, 10)
        x = torch.cat([agent.encoder(standardised), r[t].clamp(-1, 1)[:, None]], -1)
        ref_logit, ref_value, ref_state = official_rl_core_step(agent, name, x, ref_state)
        torch.testing.assert_close(logit, ref_logit, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-10)


def test_rl_memoryless_agent_starts_every_step_from_zero():
    """--memoryless: each step's output = a fresh agent's on that observation alone, whatever state is passed."""
    torch.manual_seed(0)
    a = rfwp_rl.parse_args(["--preset", "tiny", "--model", "delta", "--memoryless"])
    agent = rfwp_rl.build_agent(a, (3,), 2).double()
    obs = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = torch.ones(2, dtype=torch.float64)
    state = None
    for t in range(5):
        logit, value, state = agent(obs[t], r, state)
        fresh_logit, fresh_value, _ = agent(obs[t], r)
        torch.testing.assert_close(logit, fresh_logit, rtol=0, atol=0)
        torch.testing.assert_close(value, fresh_value, rtol=0, atol=0)
    agent.memoryless = False
    assert not torch.allclose(agent(obs[1], r, agent(obs[0], r)[2])[0], agent(obs[1], r)[0])  # memory matters


def test_rl_smoke_cartpole_resume_and_eval(tmp_path):
    """The CPU memory task for a few hundred steps, a resumed run, then --eval of the checkpoint."""
    script = rl_script_copy(tmp_path)
    common = ["--preset", "tiny", "--model", "delta", "--env_steps", "640", "--unroll", "10",
              "--batch_size", "4", "--eval_every", "4", "--out_dir", str(tmp_path / "o")]
    p = run(script, *common, "--stop_at", "8")
    assert "update 8 (320 steps)" in p.stdout and "final" not in p.stdout
    with open(tmp_path / "o" / "metrics.jsonl", "a") as f:  # as a run killed at environment step 360 leaves it
        f.write(json.dumps(dict(step=360, split="train", metric="loss", value=0.0, time=1.0)) + '\n{"step": 3')
    p = run(script, *common, "--resume")
    assert "starting at update 8" in p.stdout and "final: mean return" in p.stdout
    losses = [m["step"] for m in read_metrics(tmp_path / "o") if m["metric"] == "loss"]
    assert losses == list(range(40, 641, 40))  # each update once (its environment steps), the killed run's gone
    episodes = [m for m in read_metrics(tmp_path / "o") if m["split"] == "episode"]
    assert episodes and all(m["value"] >= 1 for m in episodes)
    p = run(script, *common, "--eval", "3")
    assert re.search(r"eval: .* 3 episodes of CartPole-NoVel: return [\d.]+ \+- [\d.]+", p.stdout), p.stdout


def test_rl_ddp_two_processes_train_as_one(tmp_path):
    """2 processes x 4 CartPole environments against 1 x 8: rank r steps the environments r*4 ... r*4+3 of the one
    process, seeded alike, each sampling its actions from a generator of its own; so the same 8 episodes run, and the
    episodes' returns (gathered by rank 0), the losses (IMPALA's sums over all 8) and the final weights (the
    observation statistics too) agree."""
    p = assert_two_processes_train_as_one(rl_script_copy(tmp_path), "--preset", "tiny")
    assert p.stdout.count("final: mean return") == 1
    assert len([m for m in read_metrics(tmp_path / "two") if m["split"] == "episode"]) > 10


def test_rl_smoke_atari(tmp_path):
    """ale_py's vector environment with the IMPALA CNN: a few hundred agent steps of Breakout."""
    script = rl_script_copy(tmp_path)
    p = run(script, "--preset", "tiny", "--model", "lstm", "--env", "ALE/Breakout-v5", "--env_steps",
            "200", "--unroll", "25", "--batch_size", "4", "--out_dir", str(tmp_path / "o"))
    assert "observation (4, 84, 84), 4 actions" in p.stdout and "final: mean return" in p.stdout, p.stdout


def test_rl_atari_fire_after_a_lost_life():
    """Breakout waits for FIRE after each lost life. An agent that only ever sends NOOP still loses all 5 lives
    (the step after each loss executes FIRE, as the official FireResetEnv over the episodic-life wrapper); with the
    forced FIRE switched off, the ball is never served again and the game stalls at 4 lives."""
    envs = rfwp_rl.AtariEnvs("ALE/Breakout-v5", 2, seed=0)
    assert envs.fire == 1  # Breakout's minimal action set: NOOP, FIRE, RIGHT, LEFT
    noop = np.zeros(2, dtype=np.int64)
    envs.reset()
    lives_lost, fired, game_over = 0, 0, np.zeros(2, dtype=bool)
    for _ in range(2000):
        fire_next = envs.fire_next.copy()
        _, _, done, life_end = envs.step(noop)
        fired += fire_next.sum()
        lives_lost += (life_end & ~done).sum()
        game_over |= done
        if game_over.all():
            break
    assert game_over.all() and lives_lost >= 8 and fired == lives_lost
    envs.fire = None  # the old behaviour: nothing is pressed after a lost life
    envs.reset()
    for _ in range(600):
        _, _, done, _ = envs.step(noop)
        assert not done.any()
    assert (envs.lives == 4).all()
    envs.close()


def test_rl_eval_per_life_scores_one_life(tmp_path, monkeypatch):
    """--eval_per_life: an episode ends at the first lost life (the official test()); the default scores the whole
    game. Scripted environments: reward 1 per step, a life lost every 4 steps, game over at step 12, so a life
    scores exactly 4 and a game 12, whatever the policy."""

    class LivesEnvs:
        obs_shape, n_actions = (3,), 2

        def __init__(self, n):
            self.t = np.zeros(n, dtype=int)

        def reset(self):
            self.t[:] = 0
            return np.zeros((len(self.t), 3), np.float32)

        def step(self, actions):
            self.t += 1
            done = self.t % 12 == 0
            life_end = self.t % 4 == 0
            return np.zeros((len(self.t), 3), np.float32), np.ones(len(self.t), np.float32), done, life_end

        def close(self):
            pass

    args = rfwp_rl.parse_args(["--preset", "tiny", "--model", "lstm", "--out_dir", str(tmp_path)])
    agent = rfwp_rl.build_agent(args, LivesEnvs.obs_shape, LivesEnvs.n_actions)
    torch.save({"args": dataclasses.asdict(args), "model": agent.state_dict(), "step": 0}, tmp_path / "ckpt.pt")
    monkeypatch.setattr(rfwp_rl, "make_envs", lambda saved, n, seed: LivesEnvs(n))
    assert rfwp_rl.evaluate(dataclasses.replace(args, eval=2)).tolist() == [12.0, 12.0]
    assert rfwp_rl.evaluate(dataclasses.replace(args, eval=2, eval_per_life=True)).tolist() == [4.0, 4.0]


def test_rl_bench_runs(tmp_path):
    p = run(rl_script_copy(tmp_path), "--preset", "tiny", "--bench", "--unroll", "4", "--batch_size", "2")
    assert re.search(r"^emulator only +\d+ steps/s", p.stdout, re.M), p.stdout
    assert re.search(r"^lstm +auto +\d", p.stdout, re.M), p.stdout
    for name in ("delta", "rdn"):
        for impl in ("loop", "kernel"):
            assert re.search(rf"^{name} +{impl} +\d", p.stdout, re.M), p.stdout


def test_rl_defaults_follow_the_official_commands():
    """rfwp_rl.py's defaults are the CPU memory task's; any other environment gets what flags and presets leave unset
    from the official settings: the official cores and sizes (the LSTM one layer of 256), IMPALA's batch, unroll,
    raw rewards and lr; an explicit flag and the preset win. rfwp.py's sequence tasks keep their own defaults and
    forms (a final LN) and the default 100k training examples (--preset paper: the paper's 10k)."""
    size = lambda a: (a.official_rl_core, a.d_model, a.n_layer, a.d_ff, a.batch_size, a.lr, a.unroll,  # noqa: E731
                      a.reward_scale)
    atari = ["--env", "ALE/Pong-v5"]
    assert size(rfwp_rl.parse_args(atari)) == (True, 128, 2, 512, 32, 6e-4, 50, 1.0)
    assert size(rfwp_rl.parse_args(atari + ["--model", "lstm"])) == (True, 256, 1, 512, 32, 6e-4, 50, 1.0)
    assert size(rfwp_rl.parse_args(atari + ["--d_model", "64", "--official_rl_core", "false"])) == \
        (False, 64, 2, 512, 32, 6e-4, 50, 1.0)
    assert size(rfwp_rl.parse_args(atari + ["--preset", "tiny"]))[1:5] == (32, 1, 64, 8)
    assert size(rfwp_rl.parse_args([])) == (True, 64, 2, 256, 8, 3e-3, 20, 0.1)
    assert size(rfwp_rl.parse_args(["--model", "lstm"])) == (True, 64, 2, 256, 8, 3e-3, 20, 0.1)
    a = rfwp.parse_args([])
    assert (a.d_model, a.n_layer, a.d_ff, a.batch_size, a.lr, a.n_train) == (64, 2, 256, 32, 3e-3, 100_000)
    assert isinstance(rfwp.build_model(a, 5, 5).ln_f, torch.nn.LayerNorm)
    assert rfwp.parse_args(["--preset", "paper"]).n_train == 10_000


@pytest.mark.parametrize("args, message", [
    (["--model", "transformer"], "needs a fast-weight or recurrent core"),
    (["--env", "NoSuchEnv-v0"], "gymnasium cannot make it"),
    (["--env", "Pendulum-v1"], "discrete actions"),
    (["--env", "ALE/NoSuchGame-v5"], "has no ROM"),
    (["--eval", "3"], "no checkpoint"),
    (["--discount", "1.5"], "--discount in [0, 1]"),
])
def test_rl_cli_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert_cli_error(rfwp_rl, ["--preset", "tiny", "--out_dir", str(tmp_path / "o"), *args], message, capsys)


def test_rl_cli_error_without_traceback(tmp_path):
    assert_cli_error_without_traceback(rl_script_copy(tmp_path), "--preset", "tiny", "--out_dir", str(tmp_path / "o"),
                                       "--env", "Pendulum-v1", message="discrete actions")


def test_rl_agent_keyword_construction():
    """Agent from keywords (build_agent maps the flags to them); a transformer core, a bad size or impl is a
    ValueError with the command line's message."""
    torch.manual_seed(0)
    agent = rfwp_rl.Agent((3,), 2, model="delta_lstm", d_model=16, n_head=2, n_layer=1, d_ff=32)
    logits, value, state = agent(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.zeros(4))
    assert logits.shape == (4, 2) and value.shape == (4,) and state[0][1].shape == (4, 6, 8, 8)
    assert isinstance(agent.core.ln_f, torch.nn.Identity)  # official_rl_core by default
    for kw, message in [(dict(model="transformer"), "needs a fast-weight or recurrent core"),
                        (dict(d_model=30), "d_model 30 is not divisible by n_head 4"), (dict(impl="chunkk"), "impl")]:
        with pytest.raises(ValueError, match=message):
            rfwp_rl.Agent((3,), 2, **kw)


def test_rl_negative_flag_values_are_errors():
    assert_negative_values_fail(rfwp_rl)


def test_rl_help_lists_every_flag(capsys):
    assert_help_lists_every_flag(rfwp_rl, capsys)


RL_RUN = ["--preset", "tiny", "--model", "delta", "--env_steps", "160", "--unroll", "10", "--batch_size", "4",
          "--eval_every", "2"]  # 4 updates, a checkpoint every 2
test_rl_saved_runs_are_never_lost = saved_runs_test(rfwp_rl, RL_RUN, 2, ["--model", "lstm"])
test_rl_divergence_saves_nothing_and_says_what_stays = divergence_test(rfwp_rl, RL_RUN, 2,
                                                                       ["--lr", "1e30", "--grad_clip", "0"])
test_rl_flag_values_are_checked = flag_values_test(rfwp_rl)



def test_rl_observation_statistics_merge_exactly():
    """Running mean and variance merged batch by batch = numpy's over all observations."""
    a = rfwp_rl.parse_args(["--preset", "tiny"])
    agent = rfwp_rl.build_agent(a, (3,), 2).double()
    x = np.random.default_rng(0).normal(2.0, 3.0, (23, 3))
    for part in np.split(x, [5, 6, 17]):
        agent.observe(torch.as_tensor(part))
    np.testing.assert_allclose(agent.obs_mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(agent.obs_var.numpy(), x.var(0), rtol=1e-12)


def test_rl_ale_game_names():
    assert [rfwp_rl.ale_game(n) for n in ("ALE/Breakout-v5", "ALE/MsPacman-v5", "ALE/MontezumaRevenge-v5")] == [
        "breakout", "ms_pacman", "montezuma_revenge"]


# ----------------------------------------------------------------------------------------------
# ode_fwp.py: solvers, control paths, learning rules, data parsers, the script

import ode_fwp  # noqa: E402


def linear_ode(dtype=torch.float64):
    A = torch.tensor([[-1.0, 2.0], [-2.0, -1.0]], dtype=dtype)
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=dtype)  # two initial values (a batch)
    return (lambda s, y: y @ A.T), y0, y0 @ torch.linalg.matrix_exp(A).T  # y(1) = exp(A) y0


@pytest.mark.parametrize("solver, order", [("euler", 1), ("rk4", 4)])
def test_od_fixed_step_solvers_converge_at_their_order(solver, order):
    """y' = A y (a damped rotation) against exp(A) y0, and y' = cos(5 s) against sin(5) / 5 (the s argument)."""
    solve = getattr(ode_fwp, solver)
    f, y0, exact = linear_ode()
    errs = [(solve(f, y0, n)[0] - exact).abs().max().item() for n in (20, 40, 80)]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.2 for r in rates), (errs, rates)
    g = lambda s, y: torch.full_like(y, math.cos(5 * s))  # noqa: E731
    errs = [abs(solve(g, torch.zeros(1, dtype=torch.float64), n)[0].item() - math.sin(5) / 5) for n in (20, 40)]
    assert abs(math.log2(errs[0] / errs[1]) - order) < 0.3, errs
    assert solve(f, y0, 7)[1] == 7 * (4 if solver == "rk4" else 1)  # NFE


def test_od_dopri5_meets_its_tolerance_and_its_gradient_is_the_exact_one():
    f, y0, exact = linear_ode()
    errs, nfes = [], []
    for tol in (1e-4, 1e-6, 1e-8):
        y, nfe = ode_fwp.dopri5(f, y0, tol, tol, 10_000)
        errs.append((y - exact).abs().max().item())
        nfes.append(nfe)
        assert errs[-1] < 10 * tol, (tol, errs)
    assert errs[0] > errs[1] > errs[2] and nfes[0] < nfes[1] < nfes[2]
    exp_growth, _ = ode_fwp.dopri5(lambda s, y: y, torch.ones(3, dtype=torch.float64), 1e-9, 1e-9, 10_000)
    assert torch.allclose(exp_growth, torch.full((3,), math.e, dtype=torch.float64), rtol=1e-8)
    x0 = y0.clone().requires_grad_()
    g = torch.randn(y0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (ode_fwp.dopri5(f, x0, 1e-9, 1e-9, 10_000)[0] * g).sum().backward()
    A = torch.tensor([[-1.0, 2.0], [-2.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(x0.grad, g @ torch.linalg.matrix_exp(A), rtol=1e-7, atol=1e-9)
    with pytest.raises(RuntimeError, match="max_steps"):
        ode_fwp.dopri5(f, y0, 1e-12, 1e-12, 5)


def test_od_gradcheck_rk4_and_euler():
    g = torch.Generator().manual_seed(0)
    y0 = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for solve in (ode_fwp.rk4, ode_fwp.euler):
        assert torch.autograd.gradcheck(lambda y, M: solve(lambda s, z: torch.tanh(z @ M) * (1 + s), y, 3)[0], (y0, A))


def irregular_batch(B=3, N=9, C=2, seed=0, missing=0.2):
    """Irregular times, NaNs, lengths 9, 5, 2; padded times continue past each end."""
    g = torch.Generator().manual_seed(seed)
    t = torch.cumsum(0.3 + torch.rand(B, N, generator=g, dtype=torch.float64), 1)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    x[torch.rand(B, N, C, generator=g) < missing] = float("nan")
    lengths = torch.tensor([N, 5, 2][:B])
    for b in range(B):
        x[b, lengths[b]:] = float("nan")
        t[b, lengths[b]:] = t[b, lengths[b] - 1] + torch.arange(1, N - lengths[b] + 1)
    x[0, :, 1] = float("nan")  # an empty channel
    x[0, 3, 0] = 1.5  # an observed value at least
    return t, x, lengths


def test_od_fill_missing_is_linear_interpolation_in_time():
    t, x, lengths = irregular_batch()
    y = ode_fwp.fill_missing(t, x, lengths)
    for b in range(3):
        for c in range(2):
            n = lengths[b]
            obs = ~torch.isnan(x[b, :n, c])
            ref = (torch.zeros(n, dtype=torch.float64) if not obs.any() else
                   torch.tensor(np.interp(t[b, :n], t[b, :n][obs], x[b, :n, c][obs])))  # holds at the ends
            torch.testing.assert_close(y[b, :n, c], ref)


@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_od_path_passes_through_knots_and_batches_exactly(interp):
    t, x, lengths = irregular_batch()
    path = ode_fwp.ControlPath(t, x, lengths, interp)
    filled = ode_fwp.fill_missing(t, x, lengths)
    for b in range(3):
        n = int(lengths[b])
        for i in range(n):
            X, _ = path(t[:, i].clone().index_fill_(0, torch.tensor([b]), t[b, i].item()))
            torch.testing.assert_close(X[b], filled[b, i], rtol=0, atol=1e-12)
        alone = ode_fwp.ControlPath(t[b : b + 1, :n], x[b : b + 1, :n], lengths[b : b + 1], interp)
        u = torch.rand(20, generator=torch.Generator().manual_seed(b), dtype=torch.float64)
        s = t[b, 0] + u * (t[b, n - 1] - t[b, 0])
        for si in s:
            X1, dX1 = alone(si.view(1))
            X2, dX2 = path(torch.full((3,), si.item(), dtype=torch.float64))
            torch.testing.assert_close((X1[0], dX1[0]), (X2[b], dX2[b]), rtol=0, atol=1e-12)
    if interp == "linear":  # dX/dt is the slope of the interval
        _, dX = path(((t[:, 0] + t[:, 1]) / 2))
        torch.testing.assert_close(dX, (filled[:, 1] - filled[:, 0]) / (t[:, 1] - t[:, 0])[:, None])


def test_od_natural_cubic_spline_is_c2_and_solves_the_dense_system():
    t, x, lengths = irregular_batch()
    path = ode_fwp.ControlPath(t, x, lengths, "cubic")
    filled = ode_fwp.fill_missing(t, x, lengths)
    for b in range(3):
        n = int(lengths[b])
        a, bb, c, d = path.coeffs[b, : n - 1].unbind(-1)  # (n-1, C)
        h = (t[b, 1:n] - t[b, : n - 1])[:, None]
        end = (a + bb * h + c * h**2 + d * h**3, bb + 2 * c * h + 3 * d * h**2, 2 * c + 6 * d * h)  # at t_i+1 from the left
        torch.testing.assert_close(end[0], filled[b, 1:n], rtol=0, atol=1e-12)  # continuous, through the knots
        torch.testing.assert_close(end[1][:-1], bb[1:], rtol=0, atol=1e-12)  # C1
        torch.testing.assert_close(end[2][:-1], 2 * c[1:], rtol=0, atol=1e-12)  # C2
        torch.testing.assert_close(c[0], torch.zeros_like(c[0]))  # natural: X'' = 0 at both ends
        torch.testing.assert_close(end[2][-1], torch.zeros_like(c[0]), rtol=0, atol=1e-12)
        if n > 2:  # the second derivatives against a dense solve of the interior equations
            hh, y = h[:, 0], filled[b, :n]
            K = torch.zeros(n - 2, n - 2, dtype=torch.float64)
            for i in range(n - 2):
                K[i, i] = 2 * (hh[i] + hh[i + 1])
                if i > 0:
                    K[i, i - 1] = hh[i]
                if i < n - 3:
                    K[i, i + 1] = hh[i + 1]
            slopes = (y[1:] - y[:-1]) / h
            M = torch.linalg.solve(K, 6 * (slopes[1:] - slopes[:-1]))
            torch.testing.assert_close(2 * c[1:], M)


def od_args(**kw):
    return dataclasses.replace(ode_fwp.Args(), **{**ode_fwp.PRESETS["tiny"], **kw})


def constant_path(B=2, C=3, value=0.7, t_end=5.0):
    t = torch.tensor([[0.0, 2.0, t_end]] * B, dtype=torch.float64)
    x = torch.full((B, 3, C), value, dtype=torch.float64)
    return ode_fwp.ControlPath(t, x, torch.tensor([3] * B), "cubic")


@pytest.mark.parametrize("rule", ["hebb", "oja", "delta"])
def test_od_constant_control_vector_field_is_the_rule_by_hand(rule):
    """X(t) constant, so dX/dt = 0: k, v, beta are constants computed here by hand from the parameters."""
    torch.manual_seed(0)
    a = od_args(rule=rule, d_model=6, n_head=2)
    model = ode_fwp.build_model(a, 3, 4).double()
    path = constant_path()
    H, d = 2, 3
    x = torch.full((3,), 0.7, dtype=torch.float64)
    z = model.W_in.bias  # W_in dX/dt + b with dX/dt = 0
    h = (z - z.mean()) / torch.sqrt(((z - z.mean()) ** 2).mean() + model.ln_in.eps) * model.ln_in.weight + model.ln_in.bias
    kb = (model.W_kb.weight @ h + model.W_kb.bias).view(H, d + 1)
    k = torch.exp(kb[:, :d]) / torch.exp(kb[:, :d]).sum(-1, keepdim=True)
    beta = 1 / (1 + torch.exp(-kb[:, d]))
    v = torch.tanh(model.W_v.weight @ x + model.W_v.bias).view(H, d)
    W = torch.randn(2, H, d, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.zeros_like(W)
    for b in range(2):
        for i in range(H):
            if rule == "hebb":
                expected[b, i] = beta[i] * torch.outer(v[i], k[i])
            elif rule == "oja":
                expected[b, i] = beta[i] * torch.outer(v[i], k[i] - W[b, i].T @ v[i])
            else:
                expected[b, i] = beta[i] * torch.outer(v[i] - W[b, i] @ k[i], k[i])
    f = model.vector_field(path)
    with torch.no_grad():
        torch.testing.assert_close(f(0.3, W), 5.0 * expected)  # dW/ds = span dW/dt, span 5
        W0 = ode_fwp.hebb(None, *model.rule_kvb(path, path.t0)[1:])
        torch.testing.assert_close(W0[0], beta[:, None, None] * v[:, :, None] * k[:, None, :])
        if rule != "oja":  # closed forms with constant k, v, beta over t in [0, 5]
            WT, _ = ode_fwp.rk4(f, W0, 200)
            if rule == "hebb":
                ref = W0 + 5.0 * W0
            else:  # u = W k relaxes to v at rate beta |k|^2
                rate = beta * (k * k).sum(-1)
                u0 = (W0 @ k[..., None])[..., 0]
                ref = W0 + ((v - u0)[..., None] * k[:, None, :] * ((1 - torch.exp(-5.0 * rate)) / (k * k).sum(-1))[:, None, None])
            torch.testing.assert_close(WT, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("rule", ["hebb", "oja", "delta"])
@pytest.mark.parametrize("values_from", ["x", "dx"])
def test_od_layouts_vector_field_and_readout_by_hand(values_from, rule):
    """Both layouts on a linear control path (X(t) = x0 + t g, so dX/dt = g): the vector field, W(t_1) and the
    readout against the formulas written out here from the parameters.
    values_from x (official delta_cde / hebb_cde_v2): k, beta from LN(W_in g), v = tanh(W_v X), y = W q.
    values_from dx (official hebb_cde / oja_cde): k_raw, b from LN(W_in X), u = W_v g; hebb: b u softmax(k_raw)^T
    (the raw logit, no tanh); oja: sigmoid(b) tanh(u) softmax(k_raw - W^T tanh(u))^T; delta:
    sigmoid(b) (tanh(u) - W k) k^T; y = W^T q with q from X(t_N)."""
    torch.manual_seed(0)
    args = ode_fwp.check_args(od_args(rule=rule, values_from=values_from, d_model=6, n_head=2, interp="linear"))
    assert args.drive == ("dx" if values_from == "x" else "x")
    model = ode_fwp.build_model(args, 3, 4).double()
    H, d, B = 2, 3, 2
    gen = torch.Generator().manual_seed(1)
    x0, g = torch.randn(B, 3, generator=gen, dtype=torch.float64), torch.randn(B, 3, generator=gen, dtype=torch.float64)
    t, xs = torch.tensor([[0.0, 4.0]] * B, dtype=torch.float64), torch.stack([x0, x0 + 4.0 * g], 1)
    lengths = torch.tensor([2] * B)
    path = ode_fwp.ControlPath(t, xs, lengths, "linear")
    lin = lambda layer, z: z @ layer.weight.T + layer.bias
    ln = lambda z, m: (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + m.eps) \
        * m.weight + m.bias
    sm = lambda z: torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)
    sig = lambda z: 1 / (1 + torch.exp(-z))

    def field(tau, W):  # dW/dt at data time tau, by hand
        X = x0 + tau * g
        kb = lin(model.W_kb, ln(lin(model.W_in, g if values_from == "x" else X), model.ln_in)).view(B, H, d + 1)
        k_raw, b = kb[..., :d], kb[..., d]
        out = torch.zeros_like(W)
        for n in range(B):
            for i in range(H):
                if values_from == "x":
                    k, beta, v = sm(k_raw[n, i]), sig(b[n, i]), torch.tanh(lin(model.W_v, X[n])).view(H, d)[i]
                    rule_v = {"hebb": v, "oja": v, "delta": v - W[n, i] @ k}[rule]
                    rule_k = k - W[n, i].T @ v if rule == "oja" else k
                    out[n, i] = beta * torch.outer(rule_v, rule_k)
                    continue
                u = lin(model.W_v, g[n]).view(H, d)[i]
                if rule == "hebb":
                    out[n, i] = b[n, i] * torch.outer(u, sm(k_raw[n, i]))
                elif rule == "oja":
                    out[n, i] = sig(b[n, i]) * torch.outer(torch.tanh(u), sm(k_raw[n, i] - W[n, i].T @ torch.tanh(u)))
                else:
                    k = sm(k_raw[n, i])
                    out[n, i] = sig(b[n, i]) * torch.outer(torch.tanh(u) - W[n, i] @ k, k)
        return out

    W = torch.randn(B, H, d, d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        f = model.vector_field(path)
        torch.testing.assert_close(f(0.25, W), 4.0 * field(1.0, W))  # dW/ds = span dW/dt at s = 1/4, t = 1
        W0 = field(0.0, torch.zeros_like(W))  # the rule with W = 0 at the first observation
        WT, _ = ode_fwp.rk4(f, W0, 40)
        logits, _ = model(t, xs, lengths, 40, solver="rk4")
        u_N = lin(model.W_in, g if values_from == "x" else x0 + 4.0 * g)
        q = sm(lin(model.W_q, ln(u_N, model.ln_in)).view(B, H, d))
        read = (WT @ q[..., None] if values_from == "x" else WT.transpose(-1, -2) @ q[..., None]).flatten(1)
        y = lin(model.out, read)
        y = y + model.ff(model.ln_ff(y))
        torch.testing.assert_close(logits, lin(model.head, y))


@pytest.mark.parametrize("model_name, rule", [("ctfwp", "hebb"), ("ctfwp", "oja"), ("ctfwp", "delta"), ("ncde", "delta")])
def test_od_series_predictions_do_not_depend_on_the_batch(model_name, rule):
    """A series alone and inside a padded batch of other lengths: the same logits (float64, rk4), and every
    parameter gets a gradient."""
    torch.manual_seed(0)
    a = od_args(model=model_name, rule=rule, interp="cubic")
    t, x, lengths = irregular_batch(missing=0.1)
    x = torch.cat([t[..., None] / 10, x], -1)  # the time channel
    model = ode_fwp.build_model(a, 3, 4).double()
    logits, _ = model(t, x, lengths, 30)
    for b in range(3):
        n = int(lengths[b])
        alone, _ = model(t[b : b + 1, :n], x[b : b + 1, :n], lengths[b : b + 1], 30)
        torch.testing.assert_close(alone[0], logits[b], rtol=1e-10, atol=1e-12)
    logits.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_od_rk4_and_dopri5_agree_on_the_model():
    torch.manual_seed(0)
    t, x, lengths = irregular_batch(missing=0.1)
    x = torch.cat([t[..., None] / 10, x], -1)
    model = ode_fwp.build_model(od_args(rule="delta"), 3, 4).double()
    with torch.no_grad():
        fine, _ = model(t, x, lengths, 400, solver="rk4")
        adaptive, nfe = model(t, x, lengths, solver="dopri5", rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(adaptive, fine, rtol=1e-6, atol=1e-7)
    assert nfe > 6


def test_od_spirals_turn_the_way_their_label_says():
    """torchcde's spirals: class 0 turns counter-clockwise (the angle of (x, y) grows), class 1 clockwise; each series
    keeps its first and last grid point and about half of the rest; `missing` of the values are NaN."""
    series, y = ode_fwp.spirals(300, 64, 0.0, np.random.default_rng(0))
    grid = np.linspace(0, 4 * np.pi, 64)
    assert 100 < y.sum() < 200
    for (t, xy), label in zip(series, y):
        assert t[0] == 0 and t[-1] == grid[-1] and np.isin(t, grid).all() and 8 < len(t) < 56
        turn = xy[:-1, 0] * xy[1:, 1] - xy[:-1, 1] * xy[1:, 0]  # z of consecutive positions' cross products
        assert (np.median(turn) > 0) == (label == 0)
    series, _ = ode_fwp.spirals(200, 64, 0.3, np.random.default_rng(1))
    assert abs(np.mean(np.concatenate([np.isnan(xy).ravel() for _, xy in series])) - 0.3) < 0.03


def test_od_synthetic_task_labels_follow_the_events():
    """Both label bits read back from the observed series: the sign of channel 0's early bump (always), the order
    of the two early bumps (from the sampled peaks, which a dropped grid point can blur: 95% or more)."""
    rng = np.random.default_rng(0)
    series, y = ode_fwp.synthetic_series(200, 64, 0.0, rng)
    assert set(y.tolist()) == {0, 1, 2, 3} and all(t[0] == 0 and 48 <= t[-1] < 64 for t, _ in series)
    order_right = 0
    for (t, x), label in zip(series, y):
        early = t < 64 / 3 + 4
        peak0, peak1 = np.abs(x[early, 0]).argmax(), x[early, 1].argmax()
        assert (x[early, 0][peak0] > 0) == (label >= 2)
        order_right += (t[early][peak0] < t[early][peak1]) == (label % 2 == 1)
    assert order_right >= 190, order_right


TS_FILE = """# a comment
@problemName Toy
@timeStamps false
@univariate false
@dimensions 2
@equalLength false
@classLabel true cat dog
@data
1.0,2.0,3.0:4.0,?,6.0:cat
1.5,?:2.5,3.5:dog

7,8,9,10:1,2,3,4:dog
"""


def test_od_ts_parser_variable_lengths_missing_values_string_labels(tmp_path):
    path = tmp_path / "Toy_TRAIN.ts"
    path.write_text(TS_FILE)
    cases, labels, C = ode_fwp.parse_ts(str(path))
    assert C == 2 and labels == ["cat", "dog", "dog"] and [len(c) for c in cases] == [3, 2, 4]
    np.testing.assert_array_equal(cases[0], [[1, 4], [2, np.nan], [3, 6]])
    np.testing.assert_array_equal(cases[1], [[1.5, 2.5], [np.nan, 3.5]])


@pytest.mark.parametrize("bad, message", [
    ("1.0,x,3.0:4.0,5.0,6.0:cat", "line 9: a value is not a number"),
    ("1.0,2.0:4.0,5.0:bird", "line 9: class label 'bird' is not declared"),
    ("1.0,2.0:cat", "line 10: 1 dimensions, but earlier cases have 2"),
    ("1.0,2.0,3.0:4.0,5.0,6.0:", "line 9: a case needs at least one dimension and a class label"),
])
def test_od_malformed_ts_names_the_line(tmp_path, bad, message):
    path = tmp_path / "Toy_TRAIN.ts"
    lines = TS_FILE.splitlines()
    path.write_text("\n".join(lines[:8] + [lines[8]] + [bad]) + "\n" if "dimensions" in message
                    else "\n".join(lines[:8] + [bad]) + "\n")
    with pytest.raises(data.DataError, match=re.escape(message)):
        ode_fwp.parse_ts(str(path))
    if "bird" in bad:  # the script's message (one subprocess is enough)
        (tmp_path / "Toy_TEST.ts").write_text(TS_FILE)
        p = run(script_copy(tmp_path, "ode_fwp.py"), "--preset", "tiny", "--data", str(path), check=False)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr


def test_od_auroc_counts_pairs():
    rng = np.random.default_rng(0)
    score, y = rng.integers(0, 5, 60).astype(float), rng.integers(0, 2, 60)  # many ties
    pos, neg = score[y == 1], score[y == 0]
    ref = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert abs(ode_fwp.auroc(score, y) - ref) < 1e-12


def write_wav(path, samples):
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.clip(samples, -1, 1 - 2**-15) * 32768).astype("<i2").tobytes())


def test_od_mfcc_matches_a_direct_computation():
    """torch.stft + filterbank + DCT against a frame-by-frame numpy computation of the same definition."""
    rng = np.random.default_rng(0)
    wav = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) + 0.05 * rng.standard_normal(16000))
    ours = ode_fwp.mfcc(torch.tensor(wav[None]))[0].numpy()
    assert ours.shape == (161, 20)
    padded = np.pad(wav, 100, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(200) / 200)  # periodic Hann
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    edges = 700 * (10 ** (np.linspace(0, mel(8000), 66) / 2595) - 1)
    freqs = np.arange(101) * 8000 / 100
    fb = np.zeros((101, 64))
    for m in range(64):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        for j, f in enumerate(freqs):
            fb[j, m] = max(0.0, min((f - lo) / (mid - lo), (hi - f) / (hi - mid)))
    for frame in (0, 37, 160):
        power = np.abs(np.fft.rfft(padded[frame * 100 : frame * 100 + 200] * window)) ** 2
        logmel = np.log(power @ fb + 1e-6)
        coef = [sum(logmel[n] * np.cos(np.pi * k * (2 * n + 1) / 128) for n in range(64)) *
                (np.sqrt(1 / 64) if k == 0 else np.sqrt(2 / 64)) for k in range(20)]
        np.testing.assert_allclose(ours[frame], coef, rtol=1e-7, atol=1e-7)


def test_od_speech_commands_from_a_local_archive(tmp_path, http_server, monkeypatch):
    root, base = http_server
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for word in ode_fwp.SPEECH_WORDS + ("_background_noise_", "bed"):
        (src / word).mkdir(parents=True)
        write_wav(src / word / "a.wav", 0.1 * rng.standard_normal(16000))
    write_wav(src / "yes" / "short.wav", 0.1 * rng.standard_normal(9000))  # not 16000 samples: dropped
    import tarfile

    with tarfile.open(root / "sc.tar.gz", "w:gz") as tar:
        tar.add(src, arcname=".")
    monkeypatch.setitem(data.URLS, "speech_commands", f"{base}/sc.tar.gz")
    folder = data.fetch_speech_commands(ode_fwp.SPEECH_WORDS, str(tmp_path / "cache"))
    assert sorted(os.listdir(folder)) == sorted(ode_fwp.SPEECH_WORDS)
    series, y, names = ode_fwp.load_speech(folder)
    assert len(series) == 10 and sorted(y.tolist()) == list(range(10)) and names[0] == "yes"
    assert series[0][0].shape == (161,) and series[0][1].shape == (161, 20)
    assert os.path.exists(os.path.join(folder, "mfcc_10words.pt"))


PSV_HEAD = "HR|O2Sat|Temp|Age|Gender|Unit1|Unit2|HospAdmTime|ICULOS|SepsisLabel"


def test_od_sepsis_from_a_local_server(tmp_path, http_server, monkeypatch):
    root, base = http_server
    for part, patients in (("training_setA", ("p000001", "p000002")), ("training_setB", ("p100001",))):
        (root / part).mkdir()
        links = []
        for j, pid in enumerate(patients):
            hours = 80 if j == 0 else 3
            rows = [f"{70 + h}|{'NaN' if h % 2 else 97}|NaN|60|1|NaN|1|-2.5|{h + 1}|{int(j == 0 and h > 50)}"
                    for h in range(hours)]
            (root / part / f"{pid}.psv").write_text(PSV_HEAD + "\n" + "\n".join(rows) + "\n")
            links.append(f'<a href="{pid}.psv">{pid}.psv</a>')
        (root / part / "index.html").write_text("<html>" + "".join(links) + "</html>")
    monkeypatch.setitem(data.URLS, "sepsis", f"{base}/")
    folder = data.fetch_sepsis(str(tmp_path / "cache"))
    assert os.path.exists(os.path.join(folder, "training_setA", "COMPLETE"))
    series, y, names = ode_fwp.load_sepsis(folder)
    assert y.tolist() == [1, 0, 1] and names == ["no sepsis", "sepsis"]
    t, x = series[0]
    assert t[0] == 1 and t[-1] == 72 and x.shape == (72, 3 + 5)  # HR, O2Sat, Temp + 5 static
    assert np.isnan(x[1, 1]) and x[0, 1] == 97 and x[0, 3] == 60 and x[0, 5] == 0.0  # Unit1 NaN -> 0


def test_od_uea_download_and_ts_training(tmp_path, http_server, monkeypatch):
    root, base = http_server
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    lines = ["@problemName Toy", "@classLabel true cat dog", "@data"]
    for i in range(24):
        n = rng.integers(5, 9)
        lines.append(",".join(f"{v:.3f}" for v in rng.standard_normal(n)) + ":" +
                     ",".join(f"{v:.3f}" for v in rng.standard_normal(n)) + (":cat" if i % 2 else ":dog"))
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("Toy/Toy_TRAIN.ts", "\n".join(lines))
        z.writestr("Toy/Toy_TEST.ts", "\n".join(lines[:12]))
    (root / "Toy.zip").write_bytes(buf.getvalue())
    monkeypatch.setitem(data.URLS, "uea", f"{base}/{{name}}.zip")
    train_path, test_path = data.fetch_uea("Toy", str(tmp_path / "cache"))
    task = ode_fwp.load_task(od_args(dataset="Toy", data_dir=str(tmp_path / "cache")))
    assert task["names"] == ["cat", "dog"] and task["n_channels"] == 3
    assert [len(task[s]["y"]) for s in ("train", "valid", "test")] == [23, 5, 5]  # 24 + 9 cases pooled, 70/15/15
    with pytest.raises(data.DataError, match="has no Nope_TRAIN.ts"):
        (root / "Nope.zip").write_bytes(buf.getvalue())
        data.fetch_uea("Nope", str(tmp_path / "cache"))
    out = tmp_path / "o"
    p = run(script_copy(tmp_path, "ode_fwp.py"), "--preset", "tiny", "--data", train_path, "--out_dir", str(out))
    assert "2 classes" in p.stdout and "final: test acc" in p.stdout


OD_SOLVE_CASES = [dict(rule=r, values_from=vf, solver=so, interp=ip) for r in ("hebb", "oja", "delta")
                  for vf in ("x", "dx") for so, ip in (("rk4", "cubic"), ("euler", "linear"))]
OD_SOLVE_CASES += [dict(rule="delta", post_tanh=True), dict(rule="delta", post_tanh=True, values_from="dx"),
                   dict(rule="oja", v_layernorm=True), dict(rule="delta", drive="x"),
                   dict(rule="delta", intensity=True), dict(model="ncde"), dict(model="ncde", solver="euler",
                                                                                  interp="linear")]


@pytest.mark.parametrize("impl,chunk", [("precomputed", 0), ("precomputed", 4), pytest.param("kernel", 4,
                                                                                              marks=needs_cxx)])
@pytest.mark.parametrize("kw", OD_SOLVE_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_od_precomputed_solve_equals_the_generic_one(kw, impl, chunk, monkeypatch):
    """--impl precomputed (every stage's inputs in one pass, then the rule's steps: a weighted sum for Hebb, affine
    maps for delta and Oja, the solver with a table otherwise) and --impl kernel (delta and Oja's steps in
    cpu_kernels.cpp) against --impl generic, float64, three series of lengths 9, 5, 2 in one batch (each on its own
    interval), 11 steps in one chunk or in chunks of 4, 4 and 3 (W carried over): logits and the gradient of every
    parameter."""
    assert impl == "precomputed" or ode_fwp.kernels("cpu") is not None, "cpu_kernels.cpp failed to build"
    a = ode_fwp.check_args(od_args(d_model=6, n_head=2, solve_chunk=chunk, **kw))
    t, x, lengths = irregular_batch(missing=0.1)
    x = torch.cat([t[..., None] / 10, x], -1)
    if a.intensity:  # the observation counts as channels, as pad_split makes them
        x = torch.cat([x, torch.cumsum(~torch.isnan(x[..., 1:]), 1).double()], -1)
    calls = []  # --impl kernel must run the kernel exactly where the rule is linear in W (delta, the paper's Oja)
    monkeypatch.setattr(ode_fwp.LinearRuleKernel, "apply", lambda *x, f=ode_fwp.LinearRuleKernel.apply: calls.append(1)
                        or f(*x))
    linear = a.model == "ctfwp" and not a.post_tanh and (a.rule == "delta" or a.rule == "oja" and a.values_from == "x")
    assert ("kernel" in ode_fwp.fast_paths(a, torch.device("cpu"))) == (linear and ode_fwp.kernels("cpu") is not None)
    results = []
    for b in (dataclasses.replace(a, impl="generic"), dataclasses.replace(a, impl=impl)):
        torch.manual_seed(0)
        model = ode_fwp.build_model(b, x.shape[-1], 4).double()
        logits, nfe = model(t, x, lengths, 11)
        grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
        results.append((logits, grads, nfe))
    assert len(calls) == (linear and impl == "kernel") * 3  # once per chunk
    (generic, g_generic, nfe_generic), (fast, g_fast, nfe_fast) = results
    torch.testing.assert_close(fast, generic, rtol=1e-10, atol=1e-12)
    for g1, g2 in zip(g_fast, g_generic):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    assert nfe_generic == 11 * (4 if a.solver == "rk4" else 1)
    assert nfe_fast == (nfe_generic if a.model == "ncde" else 11 * (2 if a.solver == "rk4" else 1) + 1)


@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_od_stage_nodes_are_the_solvers_own_times_and_weights_integrate(solver):
    """The tabulated nodes are the very floats the solver passes to f (so a linear path's kinks land on the same
    side), and the weights integrate dy/ds = g(s): Simpson's rule (rk4) is exact for cubics, euler for constants."""
    seen = []
    getattr(ode_fwp, solver)(lambda s, y: seen.append(s) or y, torch.zeros(1), 7)
    nodes = ode_fwp.stage_nodes(solver, 7).tolist()
    assert len(set(nodes)) == len(nodes) and set(seen) == set(nodes[: len(nodes) - (solver == "euler")])
    w = ode_fwp.solver_weights(solver, 7, 1 / 7)
    s = torch.tensor(nodes, dtype=torch.float64)
    g, exact = ((3 * s**2 - 2 * s + 1), 1.0) if solver == "rk4" else (torch.ones_like(s), 1.0)
    assert math.isclose((w * g).sum().item(), exact, rel_tol=1e-13)


@needs_cxx
@pytest.mark.parametrize("d", [5, 8, 16, 32])  # the widths the kernel compiles apart (8, 16, 32) and its generic code
@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_od_cpu_kernel_linear_rule_solve_equals_the_pytorch_form(solver, d):
    """cpu_kernels.cpp's ct_linear_rule against linear_rule_solve's affine maps: float64 at each width (B 2, H 3,
    7 steps of 1/10, as in a chunk of a longer solve; outputs and the gradient of every input; gradcheck at the generic
    width d 5), and float32 at the default width (d 8, 50 steps of 1/50)."""
    assert ode_fwp.kernels("cpu") is not None, "cpu_kernels.cpp failed to build (the warning above says why)"
    g = torch.Generator().manual_seed(1)
    cases = [(2, 3, d, 7, 0.1, torch.float64, 1e-12)] + [(4, 4, 8, 50, 0.02, torch.float32, 1e-5)] * (d == 8)
    for B, H, d, n, h, dtype, tol in cases:
        S = n * (2 if solver == "rk4" else 1) + 1
        a, p = (torch.randn(B, S, H, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
        p = p.softmax(-1)  # keys as the model makes them
        c = (0.5 * torch.rand(B, S, H, generator=g, dtype=torch.float64)).to(dtype)
        inputs = [x.clone().requires_grad_() for x in (torch.randn(B, H, d, d, generator=g).to(dtype), a, p, c)]
        dY = torch.randn(B, H, d, d, generator=g).to(dtype)
        outs = []
        for fused in (False, True):
            Y = ode_fwp.linear_rule_solve(*inputs, solver, h, fused)
            outs.append([Y, *torch.autograd.grad((Y * dY).sum(), inputs)])
        for x, y in zip(*outs):
            torch.testing.assert_close(y, x, rtol=tol, atol=tol)
        if d == 5:
            assert torch.autograd.gradcheck(lambda *z: ode_fwp.linear_rule_solve(*z, solver, h, True), inputs)


def test_od_kernel_build_failure_falls_back_with_one_warning(tmp_path):
    """No working compiler (and no earlier build): one warning, then the PyTorch form trains as before."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    p = run(script_copy(tmp_path, "ode_fwp.py"), "--preset", "tiny", "--out_dir", str(tmp_path / "o"), env=env)
    assert "final: test acc" in p.stdout
    assert p.stderr.count("warning: cpu_kernels.cpp unavailable") == 1, p.stderr


def test_od_softmax_is_torchs():
    """The written-out softmax: torch's values and gradients (float64, large and tied logits), and gradcheck."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64) * 30
    x[0, 0] = 700.0  # all equal and large: exp would overflow without the shift
    x = x.requires_grad_()
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    y = ode_fwp.softmax(x)
    torch.testing.assert_close(y, x.softmax(-1), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(x.softmax(-1), x, dy)[0],
                               rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(ode_fwp.softmax, torch.randn(2, 3, 4, generator=g, dtype=torch.float64,
                                                                 requires_grad=True))


def test_od_linear_rule_solve_gradcheck_and_the_plain_solver():
    """The affine-map solve on odd shapes (B 2, H 3, d 5, 6 rk4 steps) against rk4 on dY/ds = c (a - Y p) p^T with the
    same table, and gradcheck of every input."""
    g = torch.Generator().manual_seed(0)
    B, H, d, n = 2, 3, 5, 6
    a, p = (torch.randn(B, 2 * n + 1, H, d, generator=g, dtype=torch.float64) for _ in range(2))
    c, Y0 = torch.rand(B, 2 * n + 1, H, generator=g, dtype=torch.float64), torch.randn(B, H, d, d, dtype=torch.float64)
    at = ode_fwp.tabulated((a, p, c), 2 * n + 1)

    def f(s, Y):
        a_s, p_s, c_s = at(s)
        return c_s[..., None, None] * (a_s - (Y @ p_s[..., None])[..., 0])[..., None] * p_s[..., None, :]

    torch.testing.assert_close(ode_fwp.linear_rule_solve(Y0, a, p, c, "rk4", 1 / n), ode_fwp.rk4(f, Y0, n)[0])
    inputs = [x.clone().requires_grad_() for x in (Y0, a, p, c)]
    for solver, n_nodes in (("rk4", 2 * n + 1), ("euler", n + 1)):
        assert torch.autograd.gradcheck(lambda Y, a, p, c: ode_fwp.linear_rule_solve(Y, a[:, :n_nodes], p[:, :n_nodes],
                                        c[:, :n_nodes], solver, 1 / n), inputs)


def od_smoke_run(script, out_dir, *args):
    """A tiny run of the script: its final line, and finite losses at every step; -> the losses."""
    p = run(script, "--preset", "tiny", "--out_dir", str(out_dir), *args)
    assert "final: test acc" in p.stdout
    losses = [m["value"] for m in read_metrics(out_dir) if m["metric"] == "loss"]
    assert len(losses) > 4 and all(math.isfinite(v) for v in losses)
    return losses


@pytest.mark.parametrize("args", [["--rule", "hebb", "--interp", "linear"], ["--rule", "oja", "--drive", "x"],
                                  ["--model", "ncde", "--solver", "dopri5"], ["--solver", "euler", "--step_size", "2"]])
def test_od_smoke(tmp_path, args):
    od_smoke_run(script_copy(tmp_path, "ode_fwp.py"), tmp_path / "o", *args)


def test_od_resume_is_exact_and_evaluate_compares_solvers(tmp_path):
    """The default smoke run; a run stopped at step 2 and resumed ends where it ends (so the same seed gives the same
    losses in two processes); --evaluate of its checkpoint with another solver."""
    script = script_copy(tmp_path, "ode_fwp.py")
    od_smoke_run(script, tmp_path / "full", "--steps", "6")
    run(script, "--preset", "tiny", "--steps", "6", "--stop_at", "2", "--out_dir", str(tmp_path / "cut"))
    leave_as_killed(tmp_path / "cut", tmp_path / "full", 2)
    run(script, "--preset", "tiny", "--steps", "6", "--resume", "--out_dir", str(tmp_path / "cut"))
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    strip = lambda ms: [(m["step"], m["split"], m["metric"], m["value"]) for m in ms]  # noqa: E731
    assert_same_run(strip(cut), strip(full))
    p = run(script, "--evaluate", "--solver", "dopri5", "--rtol", "1e-6", "--atol", "1e-8", "--out_dir",
            str(tmp_path / "full"))
    rows = re.findall(r"^(trained|asked|reference) +(\w+).* same class ([\d.]+), max \|logit diff\| ([\d.e+-]+)$",
                      p.stdout, re.M)
    assert [r[:2] for r in rows] == [("trained", "rk4"), ("asked", "dopri5"), ("reference", "dopri5")], p.stdout
    assert float(rows[1][2]) == 1.0 and float(rows[1][3]) < 1e-3 and float(rows[2][3]) == 0.0


def test_od_ddp_two_processes_train_as_one(tmp_path):
    """Spirals with the L2 penalty (added on every rank: DDP's average keeps its gradient once)."""
    p = assert_two_processes_train_as_one(script_copy(tmp_path, "ode_fwp.py"), "--preset", "tiny", "--steps", "6",
                                          "--l2", "0.03")
    assert p.stdout.count("final: test acc") == 1


def test_od_official_recipe_pieces(tmp_path):
    """The pieces of the official recipes (--preset speech, sepsis, sepsis_oi): the observation-count channels,
    raw time, the L2 penalty (unsquared norms) in the training loss, the weighted binary loss, the plateau schedule."""
    x = np.array([[1.0, np.nan], [np.nan, np.nan], [2.0, 3.0], [np.nan, 4.0]])
    np.testing.assert_array_equal(ode_fwp.observation_counts(x), [[1, 0], [1, 0], [2, 1], [2, 2]])
    args = ode_fwp.check_args(od_args(intensity=True, raw_time=True))
    task = ode_fwp.load_task(args)
    assert task["n_channels"] == 1 + 2 * 2  # time, 2 values, 2 counts
    split = task["train"]
    for i in range(3):
        n = int(split["lengths"][i])
        np.testing.assert_array_equal(split["x"][i, :n, 0].numpy(), split["t"][i, :n].numpy().astype(np.float32))
        counts = ode_fwp.observation_counts(split["x"][i, :n, 1:3].numpy())
        np.testing.assert_array_equal(split["x"][i, :n, 3:].numpy(), counts)
    # the penalty: l2 x sum ||p|| over tensors, in the first logged training loss
    script = script_copy(tmp_path, "ode_fwp.py")
    for name, extra in (("plain", []), ("l2", ["--l2", "0.03"])):
        run(script, "--preset", "tiny", "--steps", "1", "--out_dir", str(tmp_path / name), *extra)
    first = [next(m["value"] for m in read_metrics(tmp_path / n) if m["metric"] == "loss") for n in ("plain", "l2")]
    _, _, model = ode_fwp.setup(od_args())
    by_hand = 0.03 * sum(math.sqrt((p.detach().double() ** 2).sum().item()) for p in model.parameters())
    assert math.isclose(first[1] - first[0], by_hand, rel_tol=1e-4)
    assert math.isclose(ode_fwp.l2_penalty(model, od_args(l2=0.03)).item(), by_hand, rel_tol=1e-6)
    # the weighted binary loss on the logit difference
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    z, w = logits[:, 1] - logits[:, 0], 10.0
    by_hand = -(w * y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).mean()
    torch.testing.assert_close(ode_fwp.task_loss(logits, y, od_args(pos_weight=w)), by_hand)
    # --plateau: no warm-up or cosine; the lr only ever drops by factors of 10
    run(script, "--preset", "tiny", "--steps", "6", "--eval_every", "1", "--plateau", "--lr", "0.01", "--out_dir",
        str(tmp_path / "plateau"))
    lrs = [m["value"] for m in read_metrics(tmp_path / "plateau") if m["metric"] == "lr"]
    assert lrs[0] == 0.01 and all(abs(math.log10(0.01 / lr) - round(math.log10(0.01 / lr))) < 1e-9 for lr in lrs) and lrs == sorted(lrs, reverse=True)
    presets = {n: ode_fwp.parse_args(["--preset", n]) for n in ("speech", "sepsis", "sepsis_oi")}
    assert presets["sepsis_oi"].intensity and presets["sepsis_oi"].post_tanh and presets["sepsis"].v_layernorm
    assert [presets[n].lr for n in presets] == [5e-5 * 32, 4e-5 * 32, 3e-5 * 32]  # base_lr x 1024 / 32


@pytest.mark.parametrize("L", [20, 21, 23])
def test_od_logsig_windows_against_increments(L):
    """--logsig_window 4: on each window [i, i + 4] (i = 0, 4, ... with i + 4 < L, the official windows; trailing
    points dropped) the linear path's dX/dt times the window's duration is its depth-1 log-signature, computed
    here directly as the increment x[i + 4] - x[i] of every channel (time included)."""
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.uniform(0.5, 1.5, L))
    x = rng.normal(size=(L, 3))
    tw, xw = ode_fwp.logsig_windows(t, x, 4)
    starts = [i for i in range(0, L - 4, 4)]
    assert len(tw) == len(starts) + 1
    full = np.concatenate([t[:, None], x], 1)
    path = ode_fwp.ControlPath(torch.tensor(tw)[None], torch.tensor(np.concatenate([tw[:, None], xw], 1))[None],
                               torch.tensor([len(tw)]), "linear")
    for j, i in enumerate(starts):
        mid = torch.tensor([(t[i] + t[i + 4]) / 2], dtype=torch.float64)
        _, dX = path(mid)
        np.testing.assert_allclose(dX[0].numpy() * (t[i + 4] - t[i]), full[i + 4] - full[i], rtol=1e-12)
    plain, windowed = (ode_fwp.load_task(ode_fwp.check_args(od_args(logsig_window=w, interp="linear")))
                       for w in (0, 2))
    assert [(n + 1) // 2 for n in plain["train"]["lengths"].tolist()] == windowed["train"]["lengths"].tolist()
    args = ode_fwp.parse_args(["--preset", "eigenworms"])
    assert (args.logsig_window, args.interp, args.post_tanh, args.d_model, args.n_head) == (4, "linear", True, 128, 16)


def test_od_post_tanh_and_value_layernorm_by_hand():
    """--post_tanh: dW/dt = beta tanh(u - W k) k^T; --v_layernorm: u = W_v2 LN(W_v X) (official delta_cde flags)."""
    torch.manual_seed(0)
    args = ode_fwp.check_args(od_args(rule="delta", post_tanh=True, v_layernorm=True, d_model=6, n_head=2))
    model = ode_fwp.build_model(args, 3, 4).double()
    H, d, B = 2, 3, 2
    gen = torch.Generator().manual_seed(1)
    x0, g = torch.randn(B, 3, generator=gen, dtype=torch.float64), torch.randn(B, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([[0.0, 4.0]] * B, dtype=torch.float64)
    path = ode_fwp.ControlPath(t, torch.stack([x0, x0 + 4.0 * g], 1), torch.tensor([2] * B), "linear")
    X = x0 + 1.0 * g
    kb = model.W_kb(model.ln_in(model.W_in(g))).view(B, H, d + 1)
    k, beta = kb[..., :d].softmax(-1), torch.sigmoid(kb[..., d])
    u = model.W_v2(torch.nn.functional.layer_norm(model.W_v(X), (6,), model.ln_v.weight, model.ln_v.bias)).view(B, H, d)
    W = torch.randn(B, H, d, d, generator=gen, dtype=torch.float64)
    expected = torch.stack([torch.stack([beta[n, i] * torch.outer(torch.tanh(u[n, i] - W[n, i] @ k[n, i]), k[n, i])
                                         for i in range(H)]) for n in range(B)])
    with torch.no_grad():
        torch.testing.assert_close(model.vector_field(path)(0.25, W), 4.0 * expected)
    with pytest.raises(SystemExit):
        ode_fwp.check_args(od_args(rule="hebb", post_tanh=True))


def test_od_bench_runs(tmp_path):
    """Every model by solver and path, then the scale table: each model at each length, the generic path (and its
    ratio) where asked, the memory column."""
    p = run(script_copy(tmp_path, "ode_fwp.py"), "--preset", "tiny", "--bench")
    kernel = ode_fwp.kernels("cpu") is not None
    for label in ("ctfwp-hebb", "ctfwp-oja", "ctfwp-delta", "ncde"):
        fused = ("kernel",) if kernel and label in ("ctfwp-oja", "ctfwp-delta") else ()
        for solver, impl in [(s, i) for s in ("euler", "rk4") for i in (*fused, "precomputed", "generic")]:
            assert re.search(rf"^{label} +{solver} +{impl} +\d", p.stdout, re.M), p.stdout
        assert re.search(rf"^{label} +dopri5 +generic +\d", p.stdout, re.M), p.stdout
    scale = re.findall(r"^ +(\d+) +(\d+) (\S+) +(\w+) +([\d.]+) +([\d.]+) +(\S+) +([\d.]+)$", p.stdout, re.M)
    # 4 models x 2 lengths, the generic delta rule and ncde at the first, the kernel rows of oja and delta
    assert len(scale) == 2 * 4 + 2 + 4 * kernel, p.stdout
    assert all(float(row[7]) > 0 for row in scale)
    for row in scale:  # ms/step = step ms / steps, to the printed digits
        assert math.isclose(float(row[5]), float(row[4]) / int(row[1]), abs_tol=0.05 / int(row[1]) + 5e-4), row
    assert [row[6] for row in scale if row[3] == "generic"] == ["1.0x", "1.0x"]


@pytest.mark.parametrize("args, message", [
    (["--rule", "hopfield"], "--rule must be one of"),
    (["--d_model", "30", "--n_head", "4"], "not divisible"),
    (["--data", "x.ts"], "NAME_TRAIN.ts"),
    (["--data", "missing_TRAIN.ts"], "cannot read missing_TRAIN.ts"),
    (["--evaluate"], "no checkpoint"),
    (["--solver", "dopri5", "--rtol", "1e-12", "--atol", "1e-12", "--max_steps", "3"], "max_steps 3"),
    (["--logsig_window", "-1"], "--logsig_window must be 0 (off) or at least 2"),
    (["--logsig_window", "1"], "--logsig_window must be 0 (off) or at least 2"),
    (["--impl", "precomputed", "--solver", "dopri5"], "needs a fixed-step solver"),
])
def test_od_cli_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert_cli_error(ode_fwp, ["--preset", "tiny", "--out_dir", str(tmp_path / "o"), *args], message, capsys)


def test_od_cli_error_without_traceback(tmp_path):
    assert_cli_error_without_traceback(script_copy(tmp_path, "ode_fwp.py"), "--preset", "tiny", "--out_dir",
                                       str(tmp_path / "o"), "--data", "missing_TRAIN.ts",
                                       message="cannot read missing_TRAIN.ts")


OD_LAYER_USE = """
import torch
from ode_fwp import CTFWP, NCDE

g = torch.Generator().manual_seed(0)
t = torch.cumsum(0.2 + torch.rand(4, 12, generator=g), 1)  # (B, N) times; a shorter series' padding keeps increasing
x = torch.cat([t[..., None] / t.max(), torch.randn(4, 12, 2, generator=g)], -1)  # (B, N, C): time and 2 values
x[1, 3, 1] = float("nan")  # missing
lengths = torch.tensor([12, 12, 9, 5])
torch.manual_seed(0)
model = CTFWP(n_channels=3, n_classes=2, d_model=16, n_head=2, rule="delta", solver="rk4", step_size=0.5)
assert "d_model=16, n_head=2 (d_head 8)" in repr(model), repr(model)
logits, nfe = model(t, x, lengths)  # 0.5 over the longest span: the batch's step count
span = max(float(t[b, lengths[b] - 1] - t[b, 0]) for b in range(4))
assert logits.shape == (4, 2) and nfe == 2 * -(-span // 0.5) + 1, (logits.shape, nfe, span)
logits.square().sum().backward()
assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
# the solver's settings at construction, or for one call: the same logits
fixed = CTFWP(3, 2, d_model=16, n_head=2, solver="euler", impl="generic")
fixed.load_state_dict(model.state_dict())
with torch.no_grad():
    a, nfe_a = fixed(t, x, lengths, 20)
    b, nfe_b = model(t, x, lengths, 20, solver="euler", impl="generic")
    c, nfe_c = model(t, x, lengths, solver="dopri5", rtol=1e-4, atol=1e-6)
    d, _ = model.double()(t.double(), x.double(), lengths, solver="dopri5", rtol=1e-4, atol=1e-6)
assert torch.equal(a, b) and nfe_a == nfe_b == 20 and nfe_c > 6 and (a - c).abs().max() < 0.05, (a, c)
assert d.dtype == torch.float64 and (c - d).abs().max() < 1e-3, (c, d)
ncde = NCDE(n_channels=3, n_classes=2, d_model=8, d_ff=16, interp="linear", solver="euler", step_size=0.5)
z, _ = ncde(t, x, lengths)
z.sum().backward()
bad = [(dict(d_model=30, n_head=4), "d_model 30 is not divisible by n_head 4"), (dict(rule="hopfield"), "rule must be"),
       (dict(solver="midpoint"), "solver must be"), (dict(impl="fast"), "impl must be"),
       (dict(interp="spline"), "interp must be"), (dict(d_ff=0), "d_ff must be positive"),
       (dict(n_head=-2), "n_head must be positive"), (dict(n_classes=0), "n_classes must be positive"),
       (dict(solver="dopri5", impl="kernel"), "impl kernel needs a fixed-step solver"),
       (dict(rule="hebb", post_tanh=True), "post_tanh changes the delta rule"),
       (dict(step_size=-1.0), "step_size must be non-negative"), (dict(rtol=0.0), "rtol must be positive")]
for kw, message in bad:
    try:
        CTFWP(**dict(dict(n_channels=3, n_classes=2), **kw))
    except ValueError as e:
        assert message in str(e), (kw, str(e))
    else:
        raise AssertionError(kw)
for call, message in [(lambda: model(t, x, lengths, solver="dopri5", impl="precomputed"), "impl precomputed needs"),
                      (lambda: model(t, x, lengths, 0), "n_steps must be positive"),
                      (lambda: NCDE(3, 2, d_model=0), "d_model must be positive")]:
    try:
        call()
    except ValueError as e:
        assert message in str(e), str(e)
    else:
        raise AssertionError(message)
print("ok")
"""


def test_od_readme_block_runs_from_a_folder_with_only_the_files_it_needs(tmp_path):
    """The README's "Use a layer" block for ode_fwp.py, run as written in a folder holding only the files it names."""
    run_readme_snippets(tmp_path, "ode_fwp")


def test_od_model_keyword_construction(tmp_path):
    """A user's copy (ode_fwp.py, data.py, cpu_kernels.cpp, nothing else): the models built from keywords alone, forward
    and backward on a small batch of series, the solver's settings given at construction or for one call, extra_repr,
    .double(); bad values raise ValueError naming the argument and the fix."""
    for f in ("ode_fwp.py", "data.py", "cpu_kernels.cpp"):
        shutil.copy(os.path.join(HERE, f), tmp_path)
    (tmp_path / "use_layer.py").write_text(OD_LAYER_USE)
    p = run(str(tmp_path / "use_layer.py"))
    assert p.stdout.strip() == "ok", p.stdout
    assert ode_fwp.kernels("cpu") is None or "warning" not in p.stderr, p.stderr  # the kernel ran where it builds


def test_od_negative_flag_values_are_errors():
    assert_negative_values_fail(ode_fwp)


def test_od_help_lists_every_flag(capsys):
    assert_help_lists_every_flag(ode_fwp, capsys)


OD_RUN = ["--preset", "tiny"]  # 4 steps, an evaluation and a checkpoint every 2
test_od_saved_runs_are_never_lost = saved_runs_test(ode_fwp, OD_RUN, 2, ["--d_model", "16"])
test_od_divergence_saves_nothing_and_says_what_stays = divergence_test(ode_fwp, OD_RUN, 2,
                                                                       ["--lr", "1e30", "--eval_every", "1"])
test_od_final_evaluation_is_written_once = final_evaluation_test(ode_fwp, OD_RUN, ("test",))
test_od_flag_values_are_checked = flag_values_test(ode_fwp)


def test_od_a_solve_of_too_many_steps_and_a_dimension_never_observed_are_refused(tmp_path, capsys):
    """A step size that makes more than 100,000 steps per solve: one line naming the step size that fits, before any
    file is written. A .ts case with a dimension of '?' only is dropped with a count; a file of such cases, an error."""
    for step_size in ("1e-5", "1e-9"):
        code, _, err = main_exit(ode_fwp, OD_RUN + ["--step_size", step_size, "--out_dir", str(tmp_path / "o")], capsys)
        assert_one_line_error(code, err, f"--step_size {float(step_size):g} makes", "rk4 steps per solve",
                              "at most 100,000", "give --step_size 0.000126 or more")
        assert run_files(tmp_path / "o") == {}
    path = tmp_path / "Toy_TRAIN.ts"
    path.write_text(TS_FILE + "?,?:5,6:cat\n")
    cases, labels, C = ode_fwp.parse_ts(str(path))
    assert len(cases) == 3 and labels == ["cat", "dog", "dog"] and "dropped 1 of 4 cases" in capsys.readouterr().err
    header = TS_FILE.split("@data")[0] + "@data\n"
    for name in ("Empty_TRAIN.ts", "Empty_TEST.ts"):
        (tmp_path / name).write_text(header + "?,?,?:1,2,3:cat\n1,2:?,?:dog\n")
    code, _, err = main_exit(ode_fwp, OD_RUN + ["--data", str(tmp_path / "Empty_TRAIN.ts"), "--out_dir",
                                                str(tmp_path / "e")], capsys)
    assert_one_line_error(code, err, "every case has a dimension with no observed value")



# ----------------------------------------------------------------------------------------------
# policy_generator.py: GoGePo

import policy_generator  # noqa: E402


def pg_run(**kw):
    a = dataclasses.replace(policy_generator.Args(), **{**policy_generator.PRESETS["tiny"], **kw})
    return policy_generator.GoGePo(a)


def test_pg_generated_vector_is_a_plain_mlp():
    """unpack(theta) loaded into nn.Sequential(Linear, Tanh, Linear, Tanh, Linear, Tanh) gives the same actions."""
    run = pg_run(env="Pendulum-v1")  # act_limit 2
    with torch.no_grad():
        theta = run.generator(run.command(torch.tensor([-300.0, -1200.0]))).double()
    (o, i1), (h2, i2), (a, i3) = run.shapes
    mlp = torch.nn.Sequential(torch.nn.Linear(i1, o), torch.nn.Tanh(), torch.nn.Linear(i2, h2), torch.nn.Tanh(),
                              torch.nn.Linear(i3, a), torch.nn.Tanh()).double()
    obs = torch.randn(2, 7, i1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    acts = policy_generator.policy_forward(theta, obs, run.shapes, run.act_limit.double())
    for p in range(2):
        torch.nn.utils.vector_to_parameters(theta[p], mlp.parameters())  # W1, b1, W2, b2, W3, b3: the same order
        torch.testing.assert_close(acts[p], 2.0 * mlp(obs[p]))
    assert theta.shape[1] == run.n_params == sum(p.numel() for p in mlp.parameters())


def test_pg_generator_tiles_and_fan_in_scaling():
    """Hidden weight (r, c) comes from tile (in c // tile, out r // tile) of the hidden tile MLP, scaled by
    2 / sqrt(fan_in); a hidden bias is the mean over the input-side tiles."""
    run = pg_run(hidden=32, tile=16)
    g, c = run.generator, torch.tensor([0.3])
    theta = g(c)[0]
    (W1, b1), (W2, b2), (W3, b3) = policy_generator.unpack(theta[None], run.shapes)
    e = g.embeddings[1]  # (2 in-tiles, 2 out-tiles, E)
    for ti in range(2):
        for to in range(2):
            block = g.w_nets["hidden"](torch.cat([e[ti, to], c])).view(16, 16) * 2 / 32**0.5
            torch.testing.assert_close(W2[0, to * 16 : (to + 1) * 16, ti * 16 : (ti + 1) * 16], block)
    bias = torch.stack([g.b_nets["hidden"](torch.cat([e[ti, 0], c])) for ti in range(2)]).mean(0) * 2 / 32**0.5
    torch.testing.assert_close(b2[0, :16], bias)
    first = g.w_nets["first"](torch.cat([g.embeddings[0][0, 1], c])).view(16, 2) * 2 / 2**0.5  # obs_dim 2
    torch.testing.assert_close(W1[0, 16:32], first)


def test_pg_fingerprint_depends_only_on_the_actions_on_the_probes():
    run = pg_run(env="Pendulum-v1")
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(1, run.n_params, generator=g) * 0.3
    (W1, b1), (W2, b2), (W3, b3) = [(W[0], b[0]) for W, b in policy_generator.unpack(theta, run.shapes)]
    perm = torch.randperm(len(b1), generator=g)  # the first hidden layer's units permuted: other weights, same function
    other = torch.cat([W1[perm].flatten(), b1[perm], W2[:, perm].flatten(), b2, W3.flatten(), b3])[None]
    assert not torch.equal(other, theta)
    with torch.no_grad():
        torch.testing.assert_close(run.evaluator(other), run.evaluator(theta))
        actions = policy_generator.policy_forward(theta, run.evaluator.probes[None], run.shapes, run.act_limit)
        torch.testing.assert_close(run.evaluator(theta), run.evaluator.net(actions.flatten(1)).squeeze(-1))
        run.evaluator.probes.add_(0.5)  # other probes, another fingerprint
        assert not torch.allclose(run.evaluator(theta), run.evaluator.net(actions.flatten(1)).squeeze(-1))


def test_pg_buffer_recency_weighting_and_size():
    buf = policy_generator.Buffer(size=5, recency=1.1)
    for i in range(8):
        buf.add(torch.full((3,), float(i)), float(i))
    assert buf.returns == [3.0, 4.0, 5.0, 6.0, 7.0]  # the newest 5
    w = buf.weights()
    expected = np.array([1 / 5, 1 / 4, 1 / 3, 1 / 2, 1.0]) ** 1.1
    np.testing.assert_allclose(w, expected / expected.sum())
    gen = torch.Generator().manual_seed(0)
    draws = [buf.sample(16, gen) for _ in range(4000)]  # 5 per draw: at most the buffer's size, as the official code
    assert all(len(r) == 5 and torch.equal(t[:, 0], r) for t, r in draws)
    freq = np.bincount(torch.cat([r for _, r in draws]).numpy().astype(int) - 3, minlength=5) / 20_000
    np.testing.assert_allclose(freq, w, atol=0.015)


def test_pg_distinct_commands_give_the_full_batch_gradient():
    """GoGePo.update's generator step generates each distinct command once (generator_loss); the step it takes (plain
    SGD here) must be the one of the whole batch, every drawn return counted as often as it was drawn: the loss and
    the new parameters against that batch's loss and gradient computed here directly (float64)."""
    run = pg_run(evaluator_steps=0, generator_steps=1, batch_size=12)
    run.generator.double()
    run.evaluator.double()
    g = torch.Generator().manual_seed(0)
    for ret in (5.0, -3.0, 12.0, 40.0):
        run.buffer.add(0.3 * torch.randn(run.n_params, generator=g, dtype=torch.float64), ret)
    state = run.gen.get_state()
    _, rets = run.buffer.sample(12, run.gen)  # the draw update() will make
    run.gen.set_state(state)
    counts = torch.unique(rets, return_counts=True)[1].tolist()
    assert len(counts) < len(rets) and len(set(counts)) > 1, counts  # repeats, not all equally often
    params = list(run.generator.parameters())
    loss = F.mse_loss(run.evaluator(run.generator(rets / run.r_range)), rets)  # every drawn command generated
    grads = torch.autograd.grad(loss, params)
    expected = [p.detach() - 0.1 * dp for p, dp in zip(params, grads)]
    run.opt_g = torch.optim.SGD(params, lr=0.1)
    loss_v, loss_g = run.update()
    assert math.isnan(loss_v) and math.isclose(loss_g, loss.item(), rel_tol=1e-12)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-13)


def test_pg_running_norm_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 3)) * [1.0, 5.0, 0.1] + [2.0, -1.0, 0.0]
    norm = policy_generator.RunningNorm(3)
    for chunk in np.split(x, [1, 7, 40, 41]):
        norm.push(chunk)
    np.testing.assert_allclose(norm(x), (x - x.mean(0)) / (x.std(0, ddof=1) + 1e-8))


def assert_pg_smoke(p, out_dir):
    assert "final: eval return" in p.stdout and "command sweep" in p.stdout
    assert {"train", "eval", "final", "sweep"} <= {m["split"] for m in read_metrics(out_dir)}


@pytest.mark.parametrize("env", ["MountainCarContinuous-v0", "InvertedPendulum-v5"])  # Pendulum: the resume test
def test_pg_smoke_each_env_family(tmp_path, env):
    p = run(script_copy(tmp_path, "policy_generator.py"), "--preset", "tiny", "--env", env, "--out_dir",
            str(tmp_path / "o"))
    assert_pg_smoke(p, tmp_path / "o")


def test_pg_resume_is_exact(tmp_path):
    """Pendulum's smoke run, then a run stopped at step 400 and resumed ends where it ends; the sweep of its
    checkpoint."""
    script = script_copy(tmp_path, "policy_generator.py")
    args = ["--preset", "tiny", "--env", "Pendulum-v1", "--total_steps", "1000", "--eval_every", "200",
            "--n_parallel", "1"]  # 200-step episodes: an evaluation after each
    assert_pg_smoke(run(script, *args, "--out_dir", str(tmp_path / "full")), tmp_path / "full")
    run(script, *args, "--stop_at", "400", "--out_dir", str(tmp_path / "cut"))
    leave_as_killed(tmp_path / "cut", tmp_path / "full", 400)
    run(script, *args, "--resume", "--out_dir", str(tmp_path / "cut"))
    strip = lambda ms: [(m["step"], m["split"], m["metric"], m["value"]) for m in ms]  # noqa: E731
    assert_same_run(strip(read_metrics(tmp_path / "cut")), strip(read_metrics(tmp_path / "full")))
    p = run(script, "--preset", "tiny", "--env", "Pendulum-v1", "--sweep_only", "--out_dir", str(tmp_path / "full"))
    assert len(re.findall(r"^ +-?\d+\.\d +-?\d", p.stdout, re.M)) == 3  # the tiny preset's 3 commands


@pytest.mark.parametrize("args, message", [
    (["--env", "Ant-v5"], "--env must be one of"),
    (["--hidden", "30"], "not divisible by --tile"),
    (["--resume"], "no checkpoint"),
    (["--noise", "-1"], "non-negative"),
])
def test_pg_cli_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert_cli_error(policy_generator, ["--preset", "tiny", "--out_dir", str(tmp_path / "o"), *args], message, capsys)


def test_pg_cli_error_without_traceback(tmp_path):
    assert_cli_error_without_traceback(script_copy(tmp_path, "policy_generator.py"), "--preset", "tiny", "--out_dir",
                                       str(tmp_path / "o"), "--resume", message="no checkpoint")


PG_LAYER_USE = """
import torch
from policy_generator import Evaluator, Generator, policy_forward

torch.manual_seed(0)
G = Generator(obs_dim=3, act_dim=2, hidden=32, tile=16, embed_dim=4, gen_hidden=16)
V = Evaluator(obs_dim=3, act_dim=2, hidden=32, act_limit=[1.0, 2.0], n_probes=8, eval_hidden=16)
assert G.n_params == (32 * 3 + 32) + (32 * 32 + 32) + (2 * 32 + 2) == sum(o * i + o for o, i in G.shapes)
assert "3 -> 32 -> 32 -> 2 (1250 parameters), tile=16" in repr(G) and "n_probes=8" in repr(V), (repr(G), repr(V))
theta = G(torch.tensor([0.2, -0.5, 0.9]))  # normalised commands (B,) -> (B, n_params)
obs = torch.randn(3, 5, 3, generator=torch.Generator().manual_seed(1))
actions = policy_forward(theta, obs, G.shapes, V.act_limit)  # (B, N, obs_dim) -> (B, N, act_dim)
assert theta.shape == (3, 1250) and actions.shape == (3, 5, 2)
assert torch.equal(actions, policy_forward(theta, obs, G.shapes, 1.0) * torch.tensor([1.0, 2.0]))
V(theta).square().sum().backward()
assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*G.parameters(), *V.parameters()])
assert V.double()(G.double()(torch.tensor([0.3], dtype=torch.float64))).dtype == torch.float64
bad = [(Generator, dict(hidden=60, tile=16), "hidden 60 is not divisible by tile 16"),
       (Generator, dict(hidden=0), "hidden must be positive"), (Generator, dict(tile=-16), "tile must be positive"),
       (Generator, dict(embed_dim=0), "embed_dim must be positive"),
       (Generator, dict(gen_hidden=0), "gen_hidden must be positive"),
       (Generator, dict(obs_dim=0), "obs_dim must be positive"),
       (Evaluator, dict(n_probes=0), "n_probes must be positive"),
       (Evaluator, dict(eval_hidden=-1), "eval_hidden must be positive"),
       (Evaluator, dict(act_dim=0), "act_dim must be positive"),
       (Evaluator, dict(act_limit=[1.0, 1.0, 1.0]), "act_limit must be positive, one number or one per action"),
       (Evaluator, dict(act_limit=-1.0), "act_limit must be positive")]
for cls, kw, message in bad:
    try:
        cls(**dict(dict(obs_dim=3, act_dim=2), **kw))
    except ValueError as e:
        assert message in str(e), (kw, str(e))
    else:
        raise AssertionError(kw)
print("ok")
"""


def test_pg_readme_block_runs_from_a_folder_with_only_the_files_it_needs(tmp_path):
    """The README's "Use a layer" block for policy_generator.py, run as written in a folder holding only the files it names."""
    run_readme_snippets(tmp_path, "policy_generator")


def test_pg_model_keyword_construction(tmp_path):
    """A user's copy (policy_generator.py alone): the generator and the evaluator built from keywords alone, forward
    and backward, the sizes in extra_repr, .double(); bad sizes (a tile that does not divide the width) raise
    ValueError naming the argument and the fix."""
    shutil.copy(os.path.join(HERE, "policy_generator.py"), tmp_path)
    (tmp_path / "use_layer.py").write_text(PG_LAYER_USE)
    assert run(str(tmp_path / "use_layer.py")).stdout.strip() == "ok"


def test_pg_negative_flag_values_are_errors():
    assert_negative_values_fail(policy_generator)


def test_pg_help_lists_every_flag(capsys):
    assert_help_lists_every_flag(policy_generator, capsys)


PG_RUN = ["--preset", "tiny", "--env", "Pendulum-v1", "--total_steps", "400", "--eval_every", "200",
          "--n_parallel", "1"]  # two 200-step episodes, an evaluation and a checkpoint after each
test_pg_saved_runs_are_never_lost = saved_runs_test(policy_generator, PG_RUN, 200, ["--hidden", "64"])
test_pg_divergence_saves_nothing_and_says_what_stays = divergence_test(
    policy_generator, PG_RUN, 200, ["--lr_evaluator", "1e30", "--lr_generator", "1e30"])
test_pg_final_evaluation_is_written_once = final_evaluation_test(policy_generator, PG_RUN, ("final", "sweep"))
test_pg_flag_values_are_checked = flag_values_test(policy_generator)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_pg_runs_and_resumes_on_the_device_it_is_given(tmp_path, capsys, device):
    """The nets, the buffer's parameter vectors and the optimizers' states live on --device; a run stopped and resumed
    there ends with the final evaluation."""
    out = str(tmp_path / "o")
    argv = PG_RUN + ["--device", device, "--out_dir", out]
    assert main_exit(policy_generator, argv + ["--stop_at", "200"], capsys)[0] == 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    tensors = [*ckpt["generator"].values(), *ckpt["buffer"][0], *ckpt["opt_v"]["state"][0].values()]
    assert all(t.device.type == device for t in tensors if t.dim() > 0)
    code, text, _ = main_exit(policy_generator, argv + ["--resume"], capsys)
    assert code == 0 and "final: eval return" in text



# ----------------------------------------------------------------------------------------------
# cuda_kernels.cu: compile check everywhere nvcc is; the kernels where CUDA is

@pytest.fixture(scope="session", autouse=True)
def nvcc_ptx(request, tmp_path_factory):
    """nvcc's compile check of cuda_kernels.cu takes a minute or more of one core and needs nothing else: where
    test_kernels_compile is selected and nvcc is on the PATH, it starts with the session and runs beside the other
    tests (the test collects its result). (process, .ptx path, stderr path), or None."""
    if shutil.which("nvcc") is None or not any(i.originalname == "test_kernels_compile" for i in request.session.items):
        yield None
        return
    import sysconfig

    out = tmp_path_factory.mktemp("nvcc")
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = ["nvcc", "--ptx", "-std=c++20", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=fwp_check",
           "-arch=sm_90", "-I", include, "-I", os.path.join(include, "torch", "csrc", "api", "include"),
           "-I", sysconfig.get_paths()["include"], "-o", str(out / "k.ptx"), os.path.join(HERE, "cuda_kernels.cu")]
    with open(out / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
    yield proc, out / "k.ptx", out / "stderr.txt"
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on the PATH")
def test_kernels_compile(nvcc_ptx):
    proc, ptx, stderr = nvcc_ptx
    returncode = proc.wait(timeout=900)
    errors = [line for line in stderr.read_text().splitlines() if "error" in line]
    assert returncode == 0, "\n".join(errors[:20]) or stderr.read_text()[-3000:]
    ptx = ptx.read_text()
    n_fast_weight = 2 * 2 * 4 * 4  # forward/backward x sum/delta x 4 dtypes x 4 widths of d_k
    n_recurrent = (5 * 4 + 2) * 3  # rnn, lstm forward/backward and rdn forward x 4 dtypes, rdn backward x 2; 3 layouts
    n_gated = 2 * 4 * 4  # forward/backward x 4 dtypes x 4 widths of d_k
    n_chunk = 2  # the chunk pass, fp32 and fp64
    assert ptx.count(".entry") == n_fast_weight + n_gated + n_recurrent + n_chunk


def cuda_delta(q, k, v, beta, W):
    return delta_net.DeltaRuleKernel.apply(q, k, v, beta, W)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@needs_cuda
@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("T", [1, 37, 1000])
@pytest.mark.parametrize("BH", [(1, 1), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dn_cuda_delta_kernel_equals_loop(d, T, BH, dtype):
    """Outputs, final W and all five gradients against the float64 loop on the same (rounded) inputs."""
    assert delta_net.kernels("cuda") is not None, "cuda_kernels.cu failed to build"
    x = [t.detach().cuda() for t in delta_inputs(B=BH[0], H=BH[1], T=T, d_k=d, d_v=d, seed=T + d)]
    x = [t.to(dtype) if i < 4 else t.float() for i, t in enumerate(x)]  # the state W0 is fp32
    ref = outputs_and_grads(delta_net.delta_rule_loop, [t.double().requires_grad_() for t in x])
    out = outputs_and_grads(cuda_delta, [t.requires_grad_() for t in x])
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    names = ["y", "W", "dq", "dk", "dv", "dbeta", "dW0"]
    for name, a, b in zip(names, (out[0], out[1], *out[2]), (ref[0], ref[1], *ref[2])):
        assert a.dtype == (torch.float32 if name in ("W", "dW0") else dtype), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


@needs_cuda
def test_dn_cuda_delta_kernel_float64_exact_and_gradcheck():
    x = [t.detach().cuda().requires_grad_() for t in delta_inputs(T=37, d_k=40, d_v=24)]
    ref = outputs_and_grads(delta_net.delta_rule_loop, x)
    out = outputs_and_grads(cuda_delta, x)
    for a, b in zip((out[0], out[1], *out[2]), (ref[0], ref[1], *ref[2])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    small = [t.detach().cuda().requires_grad_() for t in delta_inputs(B=1, H=2, T=6, d_k=3, d_v=5)]
    assert torch.autograd.gradcheck(cuda_delta, small)  # W0's gradient by finite differences too


@needs_cuda
def test_dn_cuda_delta_state_split_equals_one_call():
    q, k, v, beta, W0 = [t.detach().cuda().float() for t in delta_inputs(T=100, d_k=64, d_v=64)]
    y, W = cuda_delta(q, k, v, beta, W0)
    ya, Wa = cuda_delta(q[:, :, :60].contiguous(), k[:, :, :60].contiguous(), v[:, :, :60].contiguous(),
                        beta[:, :, :60].contiguous(), W0)
    yb, Wb = cuda_delta(q[:, :, 60:].contiguous(), k[:, :, 60:].contiguous(), v[:, :, 60:].contiguous(),
                        beta[:, :, 60:].contiguous(), Wa)
    torch.testing.assert_close(torch.cat([ya, yb], 2), y)
    torch.testing.assert_close(Wb, W)


@needs_cuda
@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("T", [1, 37, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dn_cuda_gated_kernel_equals_loop(d, T, dtype):
    """The gated rule's kernel (alpha in (1e-6, 1)): outputs, final W and the gradients of q, k, v, beta, W0 and g
    against the float64 loop on the same (rounded) inputs; T across tiles of 16 steps (the last partial)."""
    x = [t.detach().cuda() for t in gated_inputs(B=2, H=4, T=T, d_k=d, d_v=d, seed=T + d)]
    x = [t.float() if i == 4 else t.to(dtype) for i, t in enumerate(x)]  # the state W0 is fp32
    ref = outputs_and_grads(lambda *a: delta_net.delta_rule_loop(*a[:5], g=a[5]), [t.double().requires_grad_()
                                                                                   for t in x])
    out = outputs_and_grads(delta_net.DeltaRuleKernel.apply, [t.requires_grad_() for t in x])
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(["y", "W", "dq", "dk", "dv", "dbeta", "dW0", "dg"], (out[0], out[1], *out[2]),
                          (ref[0], ref[1], *ref[2])):
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


@needs_cuda
def test_dn_cuda_gated_kernel_float64_exact_near_zero_and_gradcheck():
    """float64: equal to the loop with alpha near 0 at a third of the steps (g down to -80); gradcheck."""
    q, k, v, beta, W0, g = [t.detach().cuda() for t in gated_inputs(T=70, d_k=40, d_v=24, lo=0.3)]
    gen = torch.Generator().manual_seed(5)
    near_zero = (torch.rand(g.shape, generator=gen) < 1 / 3).cuda()
    g = torch.where(near_zero, -30 - 50 * torch.rand(g.shape, generator=gen, dtype=g.dtype).cuda(), g)
    x = [t.requires_grad_() for t in (q, k, v, beta, W0, g)]
    ref = outputs_and_grads(lambda *a: delta_net.delta_rule_loop(*a[:5], g=a[5]), x)
    out = outputs_and_grads(delta_net.DeltaRuleKernel.apply, x)
    for a, b in zip((out[0], out[1], *out[2]), (ref[0], ref[1], *ref[2])):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    small = [t.detach().cuda().requires_grad_() for t in gated_inputs(B=1, H=2, T=20, d_k=3, d_v=5, lo=0.01)]
    assert torch.autograd.gradcheck(delta_net.DeltaRuleKernel.apply, small)


@needs_cuda
@pytest.mark.parametrize("d", [16, 128])
def test_lt_cuda_sum_kernel_equals_loop(d):
    """The sum rule W_t = W_{t-1} + v_t k_t^T, y_t = W_t q_t (linear_transformer.py's), through the raw op."""
    ext = delta_net.kernels("cuda")
    q, k, v, _, W0 = [t.detach().cuda() for t in delta_inputs(B=2, H=3, T=200, d_k=d, d_v=d)]
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    W0 = W0.float().requires_grad_()
    W, ys = W0.double(), []
    for t in range(200):
        W = W + v[:, :, t, :, None].double() * k[:, :, t, None, :].double()
        ys.append((W @ q[:, :, t, :, None].double()).squeeze(-1))
    y_ref = torch.stack(ys, 2)
    g = torch.Generator().manual_seed(1)
    dy, dW = (torch.randn(t.shape, generator=g, dtype=t.dtype).cuda() for t in (y_ref, W))
    g_ref = torch.autograd.grad((y_ref * dy).sum() + (W * dW).sum(), (q, k, v, W0))
    y, W_out, _ = ext.forward(q.detach(), k.detach(), v.detach(), q.new_empty(0), W0.detach(), False)
    dq, dk, dv, _, dW0 = ext.backward(q.detach(), k.detach(), v.detach(), q.new_empty(0), q.new_empty(0), W_out,
                                      dy.float(), dW.float(), False)
    assert rel_err(y, y_ref) < 2e-5 and rel_err(W_out, W) < 2e-5
    for a, b in zip((dq, dk, dv, dW0), g_ref):
        assert rel_err(a, b) < 2e-5


@needs_cuda
@pytest.mark.parametrize("kernel", [False, True])
def test_dn_cuda_chunk_equals_cpu_loop(kernel):
    """The chunk form on the GPU (kernel: its loops over chunks as cuda_kernels.cu's chunk_state_pass, --impl
    chunk_cuda) against the float64 loop on the CPU, T = 100 (not a multiple of the chunk), d_v 80 (five column tiles,
    the last full), then d_v 70 (the last partly masked), and d_v 70 with the gated rule (the state decayed per
    chunk): outputs, the final state, every gradient."""
    for d_v, gated in ((80, False), (70, False), (70, True)):
        x = gated_inputs(T=100, d_k=64, d_v=d_v, lo=0.5) if gated else delta_inputs(T=100, d_k=64, d_v=d_v)
        y1, W1, g1 = outputs_and_grads(lambda *a: delta_net.delta_rule_loop(*a[:5], g=a[5] if gated else None), x)
        x_gpu = [t.detach().cuda().requires_grad_() for t in x]
        for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            xs = [t.detach().to(dtype).requires_grad_() for t in x_gpu]
            y2, W2, g2 = outputs_and_grads(lambda *a: delta_net.delta_rule_chunk(*a[:5], kernel=kernel,
                                                                                 g=a[5] if gated else None), xs)
            for a, b in zip((y2, W2, *g2), (y1, W1, *g1)):
                assert ((a.double().cpu() - b).norm() / b.norm()).item() < tol


@needs_cuda
@pytest.mark.parametrize("impl", ["cuda", "chunk", "chunk_cuda"])
@pytest.mark.parametrize("gate", [False, True])
def test_dn_cuda_bf16_training_smoke(tmp_path, impl, gate):
    script = os.path.join(HERE, "delta_net.py")  # not a copy: a new source path would rebuild the kernel (1 min)
    p = run(script, "--preset", "tiny", "--device", "cuda", "--dtype", "bfloat16", "--impl", impl,
            "--out_dir", str(tmp_path / "o"), *(["--gate"] if gate else []))
    assert "device cuda" in p.stdout and "final: test acc" in p.stdout and "warning" not in p.stderr


@needs_cuda
@pytest.mark.parametrize("d_phi", [16, 64, 128, 384])
@pytest.mark.parametrize("T", [1, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("denom", [True, False])
def test_lt_cuda_equals_loop(d_phi, T, dtype, denom):
    """linear_attention on CUDA (the sum kernel; d_phi 384 > 128 falls back to chunk) against the float64 loop on
    the CPU: outputs, (W, z) and the gradients of q, k, v, W0, z0."""
    x = lt_inputs(B=2, H=3, T=T, d_phi=d_phi, d_v=64, denom=denom)
    x = [(t / d_phi if i < 2 else t).detach().requires_grad_() for i, t in enumerate(x)]  # keys of unit-ish sum
    outs_ref, g_ref = lt_outputs_and_grads("loop", x, denom)
    xs = [t.detach().cuda().to(dtype if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(x)]
    outs, g = lt_outputs_and_grads("cuda", xs, denom)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(outs + list(g), outs_ref + list(g_ref)):
        assert rel_err(a.cpu(), b) < tol


@needs_cuda
def test_lt_cuda_state_split_equals_one_call():
    q, k, v, W0, z0 = [t.detach().cuda().float() for t in lt_inputs(T=100, d_phi=64, d_v=64)]
    y, (W, z) = linear_attention(q, k, v, (W0, z0), True, "cuda")
    ya, sa = linear_attention(q[:, :, :60], k[:, :, :60], v[:, :, :60], (W0, z0), True, "cuda")
    yb, (Wb, zb) = linear_attention(q[:, :, 60:], k[:, :, 60:], v[:, :, 60:], sa, True, "cuda")
    torch.testing.assert_close(torch.cat([ya, yb], 2), y)
    torch.testing.assert_close(Wb, W)
    torch.testing.assert_close(zb, z)


@needs_cuda
@pytest.mark.parametrize("args", [["--impl", "cuda"], ["--impl", "chunk"], ["--attn", "softmax"],
                                  ["--phi", "favor", "--impl", "cuda"]])
def test_lt_cuda_bf16_training_smoke(tmp_path, args):
    p = run(os.path.join(HERE, "linear_transformer.py"), "--preset", "tiny", "--device", "cuda", "--dtype", "bfloat16",
            "--out_dir", str(tmp_path / "o"), *args)  # the repo's copy: its kernel build is cached
    assert "device cuda" in p.stdout and "final: test acc" in p.stdout and "warning" not in p.stderr



# The kernels' device code on the CPU (the delta rule's kernels, plain and gated; rfwp.py's recurrent kernels,
# delta_net.py's chunk pass): each CUDA thread a fiber (ucontext), at most 4 OS threads per block; __syncthreads and
# warp shuffles wait as on the GPU (the kernels keep their warps converged, so a shuffle is a warp-wide exchange),
# atomicAdd with std::atomic_ref

CUDA_ON_CPU = r"""
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(n)
using std::max;
using std::min;
template <class T> T atomicAdd(T* p, T x) { return std::atomic_ref<T>(*p).fetch_add(x); }
struct Dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local Dim3 threadIdx;  // the running fiber's, set by its worker before each resume
Dim3 blockIdx, blockDim;
unsigned char smem_raw[1 << 22];

// A block's warps are dealt out to at most kWorkers OS threads (a block of 1,024 CUDA threads would otherwise be 1,024
// OS threads). A worker runs its runnable fibers one at a time, in a random order, each until it waits: at a warp
// exchange, which goes on once all 32 lanes of the warp are there, or at __syncthreads, which goes on once every thread
// of the block is there (the workers meet at an OS barrier). In a random order a thread reads before or after another
// thread's write of the same phase, so a missing __syncthreads shows; a __syncthreads or an exchange that not every
// thread reaches (a hang on the GPU) is an error.
constexpr unsigned kWorkers = 4;
constexpr size_t kStack = 1 << 18;
enum class Wait { run, warp, block, done };
struct Fiber { ucontext_t ctx; unsigned t, exchanges; Wait wait; };
thread_local ucontext_t worker_ctx;
thread_local Fiber* current;
std::function<void()> kernel_body;
std::vector<double> lanes;  // (warps, 2, 32): a warp's exchanges alternate between two rows of 32 lanes
std::atomic<bool> failed;
std::atomic<unsigned> arrived;  // the fibers at the block's current __syncthreads
std::string error;
std::mutex error_mutex;
void fail(const char* msg) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (!failed.exchange(true)) error = msg;
}
struct PhaseEnd {  // the workers' barrier completes a phase: every thread of the block came, or none (all returned)
  void operator()() noexcept {
    unsigned n = arrived.exchange(0);
    if (n != 0 && n != blockDim.x) fail("a __syncthreads that only part of the block reached (the rest returned)");
  }
};
std::barrier<PhaseEnd>* workers;
void park(Wait w) {
  current->wait = w;
  swapcontext(&current->ctx, &worker_ctx);
}
void __syncthreads() { park(Wait::block); }
template <class T> T shfl(T x, int src) {
  Fiber* f = current;
  double* row = &lanes[((f->t / 32) * 2 + f->exchanges++ % 2) * 32];
  row[f->t % 32] = x;
  park(Wait::warp);
  return T(row[src]);
}
template <class T> T __shfl_xor_sync(unsigned, T x, int mask) { return shfl(x, (threadIdx.x % 32) ^ mask); }
template <class T> T __shfl_sync(unsigned, T x, int src) { return shfl(x, src); }
namespace at { template <class T> using opmath_type = T; }
void fiber_main() {
  kernel_body();
  current->wait = Wait::done;
  setcontext(&worker_ctx);
}
void work(std::vector<Fiber>& fibers, unsigned first_warp, unsigned n_workers, unsigned seed) {
  std::vector<std::vector<Fiber*>> warps;  // this worker's: first_warp, first_warp + n_workers, ...
  std::vector<Fiber*> order;
  for (unsigned w = first_warp; 32 * w < fibers.size(); w += n_workers) {
    warps.emplace_back();
    for (unsigned lane = 0; lane < 32; ++lane) warps.back().push_back(&fibers[32 * w + lane]);
    order.insert(order.end(), warps.back().begin(), warps.back().end());
  }
  std::minstd_rand rng(seed);
  for (;;) {
    if (rng() % 4 == 0) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 500));  // the workers' timing
    for (bool progress = true; progress;) {
      progress = false;
      std::shuffle(order.begin(), order.end(), rng);
      for (Fiber* f : order)
        if (f->wait == Wait::run) {
          current = f, threadIdx.x = f->t, progress = true;
          swapcontext(&worker_ctx, &f->ctx);
        }
      for (auto& warp : warps)
        if (std::all_of(warp.begin(), warp.end(), [](Fiber* f) { return f->wait == Wait::warp; }))
          for (Fiber* f : warp) f->wait = Wait::run, progress = true;
    }
    unsigned done = 0, block = 0;
    for (Fiber* f : order) done += f->wait == Wait::done, block += f->wait == Wait::block;
    if (done + block < order.size()) fail("a warp exchange that only part of the warp reached");
    if (failed || done == order.size()) return workers->arrive_and_drop();
    arrived += block;
    workers->arrive_and_wait();
    if (failed) return workers->arrive_and_drop();
    for (Fiber* f : order) f->wait = Wait::run;
  }
}
template <class... A, class... B> int launch_grid(void (*kernel)(A...), Dim3 grid, int threads, B... args) {
  blockDim.x = threads;
  const unsigned n_warps = threads / 32, n_workers = std::min(n_warps, kWorkers);
  std::vector<Fiber> fibers(threads);
  std::vector<std::unique_ptr<char[]>> stacks(threads);
  for (auto& s : stacks) s.reset(new char[kStack]);
  kernel_body = [&] { kernel(args...); };
  failed = false, arrived = 0;
  for (unsigned b = 0; b < grid.x * grid.y && !failed; ++b) {
    blockIdx.x = b % grid.x, blockIdx.y = b / grid.x;
    lanes.assign(n_warps * 64, std::nan(""));
    std::memset(smem_raw, 0xff, sizeof(smem_raw));  // NaNs: shared memory starts uninitialised
    for (int t = 0; t < threads; ++t) {
      Fiber& f = fibers[t];
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks[t].get(), f.ctx.uc_stack.ss_size = kStack, f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_main, 0);
      f.t = t, f.exchanges = 0, f.wait = Wait::run;
    }
    std::barrier<PhaseEnd> barrier(n_workers);
    workers = &barrier;
    std::vector<std::thread> pool;
    for (unsigned w = 0; w < n_workers; ++w) pool.emplace_back(work, std::ref(fibers), w, n_workers, 7919u * b + w);
    for (auto& p : pool) p.join();
  }
  return failed;
}
template <class... A, class... B> int launch(void (*kernel)(A...), int grid, int threads, B... args) {
  return launch_grid(kernel, Dim3{(unsigned)grid, 1, 1}, threads, args...);
}
DEVICE_CODE
template <class F> void by_kpl(int d_k, F f) {
  switch ((d_k + 31) / 32) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    default: f(std::integral_constant<int, 4>()); break;
  }
}
// the delta rule, gated or plain: in q, k, v, beta, g, W0 -> out y, the saved states (gated: W at every tile's start;
// plain: v̄), W_T
extern "C" int delta_fwd(const double** in, double** out, int BH, int T, int d_k, int d_v, int gated) {
  const Dim3 grid{(unsigned)BH, (unsigned)((d_v + kRowsPerBlock - 1) / kRowsPerBlock), 1};
  int failed_launch = 0;
  by_kpl(d_k, [&](auto kpl) {
    constexpr int K = decltype(kpl)::value;
    if (gated) failed_launch = launch_grid(gated_delta_forward_kernel<double, K>, grid, 32 * kRowsPerBlock, in[0], in[1], in[2], in[3],
                           in[4], (const void*)in[5], out[0], (void*)out[1], (void*)out[2], T, d_k, d_v);
    else failed_launch = launch_grid(fast_weight_forward_kernel<double, K, true>, grid, 32 * kRowsPerBlock, in[0], in[1], in[2], in[3],
                     (const float*)nullptr, in[5], out[0], (void*)out[1], (void*)out[2], T, d_k, d_v);
  });
  return failed_launch;
}
// in q, k, v, beta, g, the saved states, W_T (plain), dy, dW_T -> out dq, dk, dv, dbeta, dg (gated), dW0; dq, dk, dbeta
// and dg zeroed by the caller
extern "C" int delta_bwd(const double** in, double** out, int BH, int T, int d_k, int d_v, int gated) {
  const Dim3 grid{(unsigned)BH, (unsigned)((d_v + kRowsPerBlock - 1) / kRowsPerBlock), 1};
  int failed_launch = 0;
  by_kpl(d_k, [&](auto kpl) {
    constexpr int K = decltype(kpl)::value;
    if (gated) failed_launch = launch_grid(gated_delta_backward_kernel<double, K>, grid, 32 * kRowsPerBlock, in[0], in[1], in[2], in[3],
                           in[4], (const void*)in[5], in[7], (const void*)in[8], (void*)out[0], (void*)out[1],
                           (void*)out[2], (void*)out[3], (void*)out[4], (void*)out[5], T, d_k, d_v);
    else failed_launch = launch_grid(fast_weight_backward_kernel<double, K, true>, grid, 32 * kRowsPerBlock, in[0], in[1], in[2], in[3],
                     (const void*)in[5], (const void*)in[6], in[7], (const void*)in[8], (void*)out[0], (void*)out[1],
                     (void*)out[2], (void*)out[3], (void*)out[5], T, d_k, d_v);
  });
  return failed_launch;
}
int warps_for(int d) { return d <= 32 ? d : d <= 64 ? (d + 1) / 2 : (d + 3) / 4; }
template <template <class, int, int> class K, class... A> int run(int d, int grid, A... args) {
  auto go = [&](auto n) {
    return launch(K<double, decltype(n)::value, decltype(n)::value>::f, grid, 32 * warps_for(d), args...);
  };
  if (d <= 32) return go(std::integral_constant<int, 1>());
  if (d <= 64) return go(std::integral_constant<int, 2>());
  return go(std::integral_constant<int, 4>());
}
#define ENTRY(name, kernel, ...) template <class S, int R, int K> struct name##_k { static constexpr auto f = kernel<S, R, K>; }; \
  extern "C" int name(const double** in, double** out, int grid, int H, int T, int d) { \
    return run<name##_k>(d, grid, __VA_ARGS__); \
  }
#define I(i) in[i]
#define O(i) out[i]
ENTRY(rnn_fwd, delta_rnn_forward_kernel, I(0), I(1), I(2), I(3), I(4), I(5), O(0), O(1), O(2), T, d)
ENTRY(rnn_bwd, delta_rnn_backward_kernel, I(0), I(1), I(2), I(3), I(4), I(5), I(6), I(7), I(8), O(0), O(1), O(2), O(3), O(4), O(5), T, d)
ENTRY(lstm_fwd, delta_lstm_forward_kernel, I(0), I(1), I(2), I(3), I(4), I(5), I(6), O(0), O(1), O(2), O(3), H, T, d)
ENTRY(lstm_bwd, delta_lstm_backward_kernel, I(0), I(1), I(2), I(3), I(4), I(5), I(6), I(7), I(8), I(9), I(10), I(11), I(12), O(0), O(1), O(2), O(3), O(4), O(5), O(6), H, T, d)
#define ENTRY_RDN(name, kernel, ...) template <class S, int R, int K> struct name##_k { static constexpr auto f = kernel<S, R, K>; }; \
  extern "C" int name(const double** in, double** out, int grid, int H, int T, int d, double beta_scale, int l2) { \
    return run<name##_k>(d, grid, __VA_ARGS__, H, T, d, beta_scale, (bool)l2); \
  }
ENTRY_RDN(rdn_fwd, rdn_forward_kernel, I(0), I(1), I(2), I(3), I(4), I(5), I(6), I(7), O(0), O(1), O(2), O(3), O(4), O(5), O(6))
ENTRY_RDN(rdn_bwd, rdn_backward_kernel, I(0), I(1), I(2), I(3), I(4), I(5), I(6), I(7), I(8), I(9), I(10), I(11), O(0), O(1), O(2), O(3), O(4), O(5))
extern "C" int chunk_pass(const double** in, double** out, int grid, int N, int C, int d_k, int d_v, double sx,
                          double sm, int reverse) {
  return launch(chunk_state_pass_kernel<double>, grid, 64, in[0], in[1], in[2], in[3], in[5], in[4], out[0], out[1],
                out[2], N, C, d_k, d_v, sx, sm, (bool)reverse);
}
extern "C" int chunk_cols() { return kStateCols; }
extern "C" const char* emulation_error() { return error.c_str(); }
"""


@pytest.fixture(scope="session")
def kernels_on_cpu(tmp_path_factory):
    """cuda_kernels.cu's device code compiled with CUDA_ON_CPU: the delta rule's kernels (from kRowsPerBlock to the
    host code) and the recurrent kernels and chunk pass (from `using acc_type` to the host code)."""
    import ctypes

    src = open(os.path.join(HERE, "cuda_kernels.cu")).read()
    start1, end1 = src.find("constexpr int kRowsPerBlock"), src.find("void check_inputs(")
    start, end = src.find("template <typename scalar_t>\nusing acc_type"), src.find("// (RPW, KPL) = (N, N)")
    assert 0 < start1 < end1 < start < end, "the kernels' section markers moved in cuda_kernels.cu"
    device_code = (src[start1:end1] + src[start:end]).replace("extern __shared__ unsigned char smem_raw[];", "")
    folder = tmp_path_factory.mktemp("cuda_on_cpu")
    (folder / "k.cpp").write_text(CUDA_ON_CPU.replace("DEVICE_CODE", device_code))
    p = subprocess.run([CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-o", str(folder / "k.so"),
                        str(folder / "k.cpp"), "-lpthread"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lib = ctypes.CDLL(str(folder / "k.so"))
    lib.emulation_error.restype = ctypes.c_char_p
    return lib


def launch_on_cpu(lib, name, *args):
    """One emulated launch; a __syncthreads or a warp exchange that not every thread reached fails the test."""
    assert getattr(lib, name)(*args) == 0, f"{name}: {lib.emulation_error().decode()}"


def call_on_cpu(lib, name, inputs, out_shapes, grid, H, T, d, extra=()):
    """Run one emulated kernel on float64 tensors; the outputs start as NaN, so an unwritten entry shows. extra: more
    arguments after d (ctypes values)."""
    import ctypes

    outs = [torch.full(s, math.nan, dtype=torch.float64) for s in out_shapes]
    ptrs = lambda ts: (ctypes.c_void_p * len(ts))(*[t.contiguous().data_ptr() for t in ts])  # noqa: E731
    keep = [t.contiguous() for t in inputs]
    launch_on_cpu(lib, name, ptrs(keep), ptrs(outs), grid, H, T, d, *extra)
    return outs


def chunk_pass_on_cpu(lib, A, L, R, F, M0, sx, sm, reverse, D=None):
    """cuda_kernels.cu's chunk_state_pass_kernel on CPU threads (float64, 64 threads per block); D: the decay per chunk
    (B, H, N) or None."""
    import ctypes

    B, H, N, C, d_v = A.shape
    d_k = L.shape[-1]
    outs = [torch.full(shape, math.nan, dtype=torch.float64) for shape in [(B, H, N, d_k, d_v), A.shape, M0.shape]]
    ins = [t.contiguous() for t in (A, L, R)] + [None if t is None else t.contiguous() for t in (F, M0, D)]
    blocks = B * H * -(-d_v // lib.chunk_cols())  # a block per (b h, column tile of the state)
    launch_on_cpu(lib, "chunk_pass", (ctypes.c_void_p * 6)(*[None if t is None else t.data_ptr() for t in ins]),
                  (ctypes.c_void_p * 3)(*[t.data_ptr() for t in outs]), blocks, N, C, d_k, d_v, ctypes.c_double(sx),
                  ctypes.c_double(sm), int(reverse))
    return outs


@needs_cxx
@pytest.mark.parametrize("decay", [False, True])
def test_dn_chunk_pass_kernel_on_cpu_equals_the_chunk_loop(kernels_on_cpu, decay):
    """The chunk kernel's device code on CPU threads, float64, against DeltaRuleChunk's two loops over chunks written
    out: forward (S_n, U'_n, S_N from W, U, K, S_0) and backward (dS_{n+1}, dU'_n, dS_0 from K, W, G, E, dS_N), for
    d_v within one column tile and across two (the second partly masked), C and d_k not multiples of anything; decay:
    the gated rule's, the state scaled by D_n in (0, 1) per chunk in both loops."""
    g = torch.Generator().manual_seed(0)
    for B, H, N, C, d_k, d_v in [(1, 2, 3, 5, 7, 9), (2, 1, 4, 3, 6, 20)]:
        r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
        w, u, k, G = r(B, H, N, C, d_k), r(B, H, N, C, d_v), r(B, H, N, C, d_k), r(B, H, N, C, d_v)
        S0, E, dS = r(B, H, d_k, d_v), r(B, H, N, d_k, d_v), r(B, H, d_k, d_v)
        Dn = torch.rand(B, H, N, generator=g, dtype=torch.float64) if decay else torch.ones(B, H, N,
                                                                                           dtype=torch.float64)
        S, S_n, ups = S0, [], []
        for n in range(N):  # the forward's loop
            S_n.append(S)
            ups.append(u[:, :, n] - w[:, :, n] @ S)
            S = Dn[:, :, n, None, None] * S + k[:, :, n].transpose(-1, -2) @ ups[-1]
        got = chunk_pass_on_cpu(kernels_on_cpu, u, w, k, None, S0, -1.0, 1.0, False, Dn if decay else None)
        for a, b in zip(got, [torch.stack(S_n, 2), torch.stack(ups, 2), S]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        D, dS_next, dups = dS, [None] * N, [None] * N
        for n in reversed(range(N)):  # the backward's loop
            dS_next[n] = D
            dups[n] = G[:, :, n] + k[:, :, n] @ D
            D = Dn[:, :, n, None, None] * D + E[:, :, n] - w[:, :, n].transpose(-1, -2) @ dups[n]
        got = chunk_pass_on_cpu(kernels_on_cpu, G, k, w, E, dS, 1.0, -1.0, True, Dn if decay else None)
        for a, b in zip(got, [torch.stack(dS_next, 2), torch.stack(dups, 2), D]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def delta_kernel_on_cpu(lib, q, k, v, beta, g, W0, dy, dW):
    """cuda_kernels.cu's delta-rule kernels (g None: the plain rule's, else the gated rule's), forward then backward,
    on CPU threads in float64 -> y, W_T, dq, dk, dv, dbeta, dg (None for the plain rule), dW0."""
    import ctypes

    B, H, T, d_k = q.shape
    d_v = v.shape[-1]
    saved = (B, H, -(-T // 8), d_v, d_k) if g is not None else v.shape  # fp64 tiles of 8 steps; v̄
    ptrs = lambda ts: (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])  # noqa: E731
    nan = lambda shape: torch.full(shape, math.nan, dtype=torch.float64)  # noqa: E731
    ins = [t.detach().contiguous() for t in (q, k, v, beta, beta if g is None else g, W0)]
    y, kept, W = nan(v.shape), nan(saved), nan(W0.shape)
    launch_on_cpu(lib, "delta_fwd", ptrs(ins), ptrs([y, kept, W]), B * H, T, d_k, d_v, int(g is not None))
    grads = [torch.zeros_like(q), torch.zeros_like(q), nan(v.shape), torch.zeros_like(beta), torch.zeros_like(beta),
             nan(W0.shape)]
    launch_on_cpu(lib, "delta_bwd", ptrs(ins[:5] + [kept, W, dy.contiguous(), dW.contiguous()]), ptrs(grads), B * H, T,
                  d_k, d_v, int(g is not None))
    return [y, W] + grads[:4] + [grads[4] if g is not None else None, grads[5]]


@needs_cxx
def test_dn_delta_kernels_on_cpu_equal_the_loop(kernels_on_cpu):
    """The delta rule's CUDA kernels, plain and gated, run on CPU threads in float64 against delta_rule_loop and
    autograd: outputs, final state, the gradients of q, k, v, beta, g and W0, for each register layout (d_k = 8, 40, 70,
    128: 1 to 4 entries per lane), d_v across several blocks of 4 rows (the last partly masked), T not a multiple of
    the tile (8 steps in fp64), alpha in (1e-6, 1)."""
    for B, H, T, d_k, d_v in [(1, 2, 37, 8, 10), (1, 1, 19, 40, 6), (1, 1, 9, 70, 5), (1, 1, 3, 128, 4)]:
        q, k, v, beta, W0, g = gated_inputs(B=B, H=H, T=T, d_k=d_k, d_v=d_v, seed=d_k)
        gen = torch.Generator().manual_seed(1)
        dy, dW = (torch.randn(s, generator=gen, dtype=torch.float64) for s in (v.shape, W0.shape))
        for gate in (g, None):
            x = [q, k, v, beta, W0] + ([gate] if gate is not None else [])
            y, W = delta_net.delta_rule_loop(q, k, v, beta, W0, gate)
            ref = [y, W] + list(torch.autograd.grad((y * dy).sum() + (W * dW).sum(), x))
            got = delta_kernel_on_cpu(kernels_on_cpu, q, k, v, beta, gate, W0, dy, dW)
            got = got[:6] + got[7:] + ([got[6]] if gate is not None else [])  # y, W, dq, dk, dv, dbeta, dW0, dg
            for name, a, b in zip(["y", "W", "dq", "dk", "dv", "dbeta", "dW0", "dg"], got, ref):
                assert rel_err(a, b) < 1e-12, (gate is not None, (B, H, T, d_k, d_v), name, rel_err(a, b))


@needs_cxx
@pytest.mark.parametrize("model", ["delta_rnn", "delta_lstm", "rdn", "rdn_neg_eigval_l2"])
def test_rf_kernels_on_cpu_equal_loops(kernels_on_cpu, model):
    """The recurrent kernels' device code, run on CPU threads in float64, against the loops and autograd: outputs,
    final states, every gradient (the RDN's slow weights through the outer products rfwp.RDNKernel forms), for each
    register layout (d = 3, 16 (two blocks), 40, 70, 128) and T = 1; the RDN also with beta = 2 sigmoid and the l2
    map. Checks the indexing, the masking and (with threads held back at random) the synchronisation; the host code,
    the GPU's rounding and speed are for the CUDA tests below."""
    import ctypes

    lib = kernels_on_cpu
    options = (2.0, "l2") if model == "rdn_neg_eigval_l2" else (1.0, "paper")
    model = model[:3] if model.startswith("rdn") else model
    loop = functools.partial(rfwp.rdn_loop, beta_scale=options[0], qk_map=options[1]) if model == "rdn" else \
        RF_RECURRENCES[model][0]
    extra = (ctypes.c_double(options[0]), int(options[1] == "l2"))
    for B, H, T, d in [(2, 2, 7, 3), (1, 2, 5, 16), (1, 1, 4, 40), (1, 1, 3, 70), (1, 1, 1, 128)]:
        x = rf_recurrence_inputs(model, B=B, H=H, T=T, d=d, seed=d)
        outs = loop(*[t.requires_grad_() for t in x])
        g = torch.Generator().manual_seed(1)
        gs = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
        ref = torch.autograd.grad(sum((o * go).sum() for o, go in zip(outs, gs)), x)
        x = [t.detach() for t in x]
        seq, G = (B, H, T, d), 3 * H if model == "delta_lstm" else H
        if model == "delta_rnn":
            y, R, v_bar = call_on_cpu(lib, "rnn_fwd", x, [seq, (B, H, d, d), seq], B * H, H, T, d)
            got = [y, R]
            dy = gs[0].clone()
            dy[:, :, -1] += gs[2]
            grads = call_on_cpu(lib, "rnn_bwd", [x[1], x[2], x[3], v_bar, y, x[5], R, dy, gs[1]],
                                [seq] * 3 + [(B, H, T), (B, H, d, d), (B, H, d)], B * H, H, T, d)
        elif model == "delta_lstm":
            h, c, R, v_bar = call_on_cpu(lib, "lstm_fwd", x, [seq, seq, (B, G, d, d), (B, G, T, d)], B * H, H, T, d)
            got = [h, R, c[:, :, -1]]
            dh = gs[0].clone()
            dh[:, :, -1] += gs[3]
            grads = call_on_cpu(lib, "lstm_bwd", x[:4] + [v_bar, h, c, x[6], x[5], R, dh, gs[2], gs[1]],
                                [(B, G, T, d)] * 3 + [(B, G, T), (B, G, d, d), (B, H, d), (B, H, d)], B * H, H, T, d)
        else:
            y, W, *saved = call_on_cpu(lib, "rdn_fwd", x, [seq, (B, H, d, d), seq, seq, seq, (B, H, T), seq], B * H, H,
                                       T, d, extra)
            got = [y, W]
            dy = gs[0].clone()
            dy[:, :, -1] += gs[2]
            dq, dk, dv, db, dW0, dy0 = call_on_cpu(lib, "rdn_bwd", x[4:6] + saved + [y, x[7], W, dy, gs[1]],
                                                   [seq] * 3 + [(B, H, T), (B, H, d, d), (B, H, d)], B * H, H, T, d,
                                                   extra)
            s = torch.tanh(torch.cat([x[7].unsqueeze(2), y[:, :, :-1]], 2))
            dR = torch.stack([torch.einsum("bhti,bhtj->hij", gr, s) for gr in (dq, dk, dv)])
            grads = [dq, dk, dv, db, dR, torch.einsum("bht,bhtj->hj", db, s), dW0, dy0]
        for a, b in zip(got + grads, [o.detach() for o in outs[:len(got)]] + list(ref)):
            assert rel_err(a, b) < 1e-12, (model, (B, H, T, d), rel_err(a, b))


# rfwp.py's fused kernels against their loops: cpu_kernels.cpp on the CPU (wherever a C++ compiler is), the same tests
# with cuda_kernels.cu where CUDA is. Both files serve the same autograd Functions.

RF_RECURRENCES = {"delta_rnn": (rfwp.delta_rnn_loop, rfwp.DeltaRNNKernel),
                  "delta_lstm": (rfwp.delta_lstm_loop, rfwp.DeltaLSTMKernel), "rdn": (rfwp.rdn_loop, rfwp.RDNKernel)}
ON_CPU, ON_CUDA = pytest.param("cpu", marks=needs_cxx), pytest.param("cuda", marks=needs_cuda)


def rf_kernels(device):
    ext = rfwp.kernels(device)
    assert ext is not None, f"{rfwp.KERNEL_FILES[device]} failed to build (the warning above says why)"
    return ext


def rf_recurrence_inputs(model, B=2, H=3, T=37, d=16, dtype=torch.float64, seed=0):
    """The inputs of one recurrent part as its layer makes them (keys through softmax, beta through sigmoid) in dtype,
    its states (and the RDN's slow weights) in fp32 (fp64 for fp64), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    sd = torch.float64 if dtype == torch.float64 else torch.float32

    def r(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dt)

    if model == "rdn":
        return [r(B, H, T, d), r(B, H, T, d), r(B, H, T, d), r(B, H, T), r(3, H, d, d, scale=d**-0.5, dt=sd),
                r(H, d, dt=sd), r(B, H, d, d, scale=0.3, dt=sd), r(B, H, d, dt=sd)]
    G = 3 * H if model == "delta_lstm" else H
    x = [r(B, G, T, d), F.softmax(r(B, G, T, d).double(), -1).to(dtype), r(B, G, T, d),
         torch.sigmoid(r(B, G, T).double()).to(dtype), r(B, G, d, d, scale=0.3, dt=sd), r(B, H, d, dt=sd)]
    return x + [r(B, H, d, dt=sd)] if model == "delta_lstm" else x


def rf_fast_weight_inputs(rule, B=2, H=3, T=37, d_k=16, d_v=16, dtype=torch.float64, seed=0):
    """q, k (unit norm), v, W0 and, for the delta rule, beta in (0, 1): the inputs of fast_weight."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x = [r(B, H, T, d_k), F.normalize(r(B, H, T, d_k), dim=-1), r(B, H, T, d_v), 0.3 * r(B, H, d_v, d_k)]
    return [t.to(dtype) for t in x + ([torch.sigmoid(r(B, H, T))] if rule == "delta" else [])]


def fast_weight_of(kernel):
    """fast_weight_loop or the kernel as a function of (q, k, v, W0[, beta])"""
    if kernel:
        return lambda q, k, v, W0, *beta: rfwp.FastWeightKernel.apply(q, k, v, beta[0] if beta else None, W0)
    return lambda q, k, v, W0, *beta: rfwp.fast_weight_loop(q, k, v, beta[0] if beta else None, W0)


def rf_outputs_and_grads(fn, inputs, seed=1):
    outs = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    gs = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    return list(outs), list(torch.autograd.grad(sum((o * go).sum() for o, go in zip(outs, gs)), inputs))


def assert_kernel_equals_loop(loop, kernel, x, device, tol):
    """kernel on x (moved to device) against loop on x in float64: every output and every input's gradient."""
    ref = rf_outputs_and_grads(loop, [t.double().requires_grad_() for t in x])
    got = rf_outputs_and_grads(kernel, [t.to(device).requires_grad_() for t in x])
    assert [g.dtype for g in got[1]] == [t.dtype for t in x]
    for i, (a, b) in enumerate(zip(got[0] + got[1], ref[0] + ref[1])):
        assert rel_err(a.cpu(), b) < tol, (i, rel_err(a.cpu(), b))


RF_KERNEL_SHAPES = {  # (T, d, dtype) per device: T in {1, 37, 300}, every width class of both files, fp64 and fp32
    "cpu": [(1, 3, torch.float64), (37, 16, torch.float64), (37, 32, torch.float64), (37, 40, torch.float64),
            (300, 64, torch.float64), (37, 128, torch.float64), (1, 128, torch.float64), (300, 16, torch.float32),
            (300, 128, torch.float32)],
    "cuda": [(1, 16, torch.float64), (37, 16, torch.float64), (37, 40, torch.float64), (300, 64, torch.float64),
             (37, 128, torch.float32), (300, 16, torch.float32), (300, 64, torch.float32), (37, 16, torch.bfloat16),
             (300, 64, torch.bfloat16)]}
RF_KERNEL_CASES = [pytest.param(dev.values[0], T, d, dt, marks=dev.marks, id=f"{dev.values[0]}-{T}-{d}-{str(dt)[6:]}")
                   for dev in (ON_CPU, ON_CUDA) for T, d, dt in RF_KERNEL_SHAPES[dev.values[0]]]


def test_rf_cpu_kernel_shapes_cover_every_compiled_width():
    """cpu_kernels.cpp compiles the loops over a row for a few widths (dispatch_width) and a generic one: each case
    sends its width to the code of that width, and the kernel tests above and below (every recurrence, the delta and
    sum rules, against the float64 loops) run each compiled width and a generic one in float64."""
    with open(os.path.join(HERE, "cpu_kernels.cpp")) as f:
        src = f.read()
    body = src[src.index("void dispatch_width("):]
    body = body[: body.index("\n}\n")]
    cases = re.findall(r"case (\d+): return f\(std::integral_constant<int, (\d+)>\(\)\);", body)
    assert cases and "default: return f(std::integral_constant<int, 0>());" in body, body
    assert all(a == b for a, b in cases), cases
    widths = {d for _, d, dtype in RF_KERNEL_SHAPES["cpu"] if dtype == torch.float64}
    assert {int(a) for a, _ in cases} <= widths and widths - {int(a) for a, _ in cases}, (cases, widths)


@pytest.mark.parametrize("model", list(RF_RECURRENCES))
@pytest.mark.parametrize("device, T, d, dtype", RF_KERNEL_CASES)
def test_rf_kernel_recurrence_equals_loop(model, device, T, d, dtype):
    """Each recurrent kernel against its loop run in float64 on the same (rounded) inputs: outputs, final states and
    the gradients of every input, initial state and slow weight."""
    rf_kernels(device)
    loop, kernel = RF_RECURRENCES[model]
    x = rf_recurrence_inputs(model, T=T, d=d, dtype=dtype, seed=T + d)
    assert_kernel_equals_loop(loop, kernel.apply, x, device, 1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("model", list(RF_RECURRENCES))
@pytest.mark.parametrize("scale", [1e-6, 30.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@needs_cxx
def test_rf_cpu_kernel_recurrence_at_tiny_and_saturating_inputs(model, scale, dtype):
    """cpu_kernels.cpp's own exp, expm1 and tanh (vectorizable arithmetic, not the library's calls) where they are
    hardest: the recurrent inputs z, v (and the RDN's q, k, b) times 1e-6 (tanh and expm1 near 0, softmax near
    uniform) and times 30 (saturated sigmoids and tanh, softmax of a large spread): the kernel against the float64
    loop, outputs and every gradient."""
    rf_kernels("cpu")
    x = rf_recurrence_inputs(model, T=37, d=16, dtype=dtype, seed=3)
    x = [t * scale if i in (0, 2) or (model == "rdn" and i < 4) else t for i, t in enumerate(x)]
    loop, kernel = RF_RECURRENCES[model]
    assert_kernel_equals_loop(loop, kernel.apply, x, "cpu", 1e-12 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("device, T, d, dtype", RF_KERNEL_CASES)
def test_rf_kernel_fast_weight_equals_loop(rule, device, T, d, dtype):
    """The delta-rule and sum-rule kernel against fast_weight_loop in float64: outputs, final W, the gradients of q, k,
    v, W0 and beta; d_v = d and, where the file allows it, a d_v of its own (d_k <= 128 on CUDA)."""
    rf_kernels(device)
    for d_v in {d, 24 if d > 100 else 2 * d + 1}:
        x = rf_fast_weight_inputs(rule, T=T, d_k=d, d_v=d_v, dtype=dtype, seed=T + d)
        assert_kernel_equals_loop(fast_weight_of(False), fast_weight_of(True), x, device,
                                  1e-10 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("device", [ON_CPU, ON_CUDA])
@pytest.mark.parametrize("part", ["delta", "sum", *RF_RECURRENCES])
def test_rf_kernel_gradcheck(device, part):
    rf_kernels(device)
    if part in RF_RECURRENCES:
        fn, x = RF_RECURRENCES[part][1].apply, rf_recurrence_inputs(part, B=1, H=2, T=5, d=3)
    else:
        fn, x = fast_weight_of(True), rf_fast_weight_inputs(part, B=1, H=2, T=5, d_k=3, d_v=4)
    assert torch.autograd.gradcheck(fn, [t.to(device).requires_grad_() for t in x])


@pytest.mark.parametrize("device", [ON_CPU, ON_CUDA])
@pytest.mark.parametrize("part", ["delta", "sum", *RF_RECURRENCES])
def test_rf_kernel_state_split_equals_one_call(device, part):
    """One call over 100 steps = two calls of 60 and 40 with the state passed along (float32, without autograd: the
    forward that saves nothing for a backward); then the same with autograd, float64, gradients too."""

    def inputs(dtype):
        if part in RF_RECURRENCES:
            return rf_recurrence_inputs(part, T=100, d=16, dtype=dtype)
        x = rf_fast_weight_inputs(part, T=100, d_k=16, d_v=16, dtype=dtype)
        return x[:3] + x[4:] + x[3:4]  # q, k, v, [beta,] W0: the state last

    def call(x):
        if part in RF_RECURRENCES:
            return RF_RECURRENCES[part][1].apply(*x)
        return fast_weight_of(True)(*x[:3], x[-1], *x[3:-1])

    def split(x):
        n_seq = 4 if part in RF_RECURRENCES else len(x) - 1  # the sequences (B, H, T, ...) come first
        ya, *sa = call([t[:, :, :60] for t in x[:n_seq]] + x[n_seq:])
        kept = x[4:6] if part == "rdn" else []  # the RDN's slow weights R, r_b stay; the states are carried
        yb, *sb = call([t[:, :, 60:] for t in x[:n_seq]] + kept + sa)
        return [torch.cat([ya, yb], 2), *sb]

    rf_kernels(device)
    with torch.no_grad():
        x = [t.to(device) for t in inputs(torch.float32)]
        for a, b in zip(split(x), call(x)):
            torch.testing.assert_close(a, b)
    x = [t.to(device).requires_grad_() for t in inputs(torch.float64)]
    one, two = call(x), split(x)
    for a, b in zip(two, one):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    gen = torch.Generator().manual_seed(1)
    g = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in one]
    for a, b in zip(torch.autograd.grad(sum((o * go).sum() for o, go in zip(two, g)), x),
                    torch.autograd.grad(sum((o * go).sum() for o, go in zip(one, g)), x)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", [ON_CPU, ON_CUDA])
@pytest.mark.parametrize("name", ["delta_rnn", "delta_lstm", "rdn", "delta", "linear", "delta_mlp", "delta_delta"])
def test_rf_kernel_model_equals_loop_with_state_and_reset(device, name):
    """The whole model, --impl kernel against --impl loop in float64: a first call, then a second with the state
    carried and a reset mask; logits of both and the gradients of every parameter."""
    rf_kernels(device)
    x1, x2 = (torch.randint(0, 12, (4, n), generator=torch.Generator().manual_seed(n)).to(device) for n in (9, 13))
    reset = torch.tensor([True, False, True, False], device=device)
    results = []
    for impl in ("loop", "kernel"):
        model = rf_model(name, impl=impl).to(device)
        out1, s = model(x1)
        out2, _ = model(x2, s, reset=reset)
        grads = torch.autograd.grad(out1.square().sum() + out2.square().sum(), list(model.parameters()))
        results.append([out1, out2, *grads])
        assert any(type(fn).__name__.endswith("KernelBackward") for fn in grad_fns(out2)) == (impl == "kernel")
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-10


def test_rf_negative_eigenvalue_flips_the_state_along_the_key():
    """A write with a unit key and beta = 2 maps W k to -W k + 2 v (the eigenvalue 1 - beta |k|^2 = -1) and leaves W
    unchanged orthogonally to k; with a paper key (sumnorm, |k|^2 <= 1) the same beta keeps 1 - beta |k|^2 >= -1 and
    usually well above 0."""
    g = torch.Generator().manual_seed(0)
    W, v = torch.randn(1, 1, 5, 6, generator=g, dtype=torch.float64), torch.randn(1, 1, 5, generator=g, dtype=torch.float64)
    k = rfwp.l2_feature(torch.randn(1, 1, 6, generator=g, dtype=torch.float64))
    u = torch.randn(1, 1, 6, generator=g, dtype=torch.float64)
    u = u - (u * k).sum(-1, keepdim=True) * k  # orthogonal to k
    W2 = rfwp.delta_step(W, k, v, torch.full((1, 1), 2.0, dtype=torch.float64))
    torch.testing.assert_close(W2 @ k[..., None], -(W @ k[..., None]) + 2 * v[..., None])
    torch.testing.assert_close(W2 @ u[..., None], W @ u[..., None])
    k_paper = rfwp.elu1_sumnorm(torch.randn(1000, 16, generator=g, dtype=torch.float64))
    assert (1 - 2 * k_paper.square().sum(-1)).min() > 0  # a random paper key: |k|^2 far below 1 / 2


def rf_option_inputs(part, T=37, d=16, seed=0):
    """The inputs of fast_weight ("delta") or of a recurrent part with neg_eigval and qk_map l2: unit keys (l2_feature;
    fast_weight's queries too, over sqrt(d)) and beta = 2 sigmoid(3 x), spread over (0, 2), float64."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    if part == "delta":
        return [rfwp.l2_feature(r(2, 3, T, d), query=True), rfwp.l2_feature(r(2, 3, T, d)), r(2, 3, T, d),
                0.3 * r(2, 3, d, d), 2 * torch.sigmoid(3 * r(2, 3, T))]
    x = rf_recurrence_inputs(part, T=T, d=d, seed=seed)
    x[1], x[3] = rfwp.l2_feature(r(*x[1].shape)), 2 * torch.sigmoid(3 * r(*x[3].shape))
    assert x[3].max() > 1.9 and x[3].min() < 0.1
    return x


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_rf_fast_weight_chunk_with_beta_up_to_2_and_unit_keys_equals_loop(chunk_size):
    x = rf_option_inputs("delta", T=23)
    assert_kernel_equals_loop(fast_weight_of(False), lambda q, k, v, W0, beta: rfwp.fast_weight_chunk(
        q, k, v, beta, W0, chunk_size), x, "cpu", 1e-10)


@pytest.mark.parametrize("part", ["delta", "delta_rnn", "delta_lstm"])
def test_rf_cpu_kernels_with_beta_up_to_2_and_unit_keys_equal_loops(part):
    """fast_weight's, delta_rnn's and delta_lstm's kernels take beta and the keys as inputs: with beta in (0, 2) and
    unit keys they equal the loops in float64 (outputs, final states, every input's gradient), at d = 16 and 40."""
    rf_kernels("cpu")
    for T, d in [(37, 16), (5, 40)]:
        x = rf_option_inputs(part, T=T, d=d, seed=d)
        if part == "delta":
            assert_kernel_equals_loop(fast_weight_of(False), fast_weight_of(True), x, "cpu", 1e-10)
        else:
            assert_kernel_equals_loop(RF_RECURRENCES[part][0], RF_RECURRENCES[part][1].apply, x, "cpu", 1e-10)


RF_DELTA_MODELS = ["delta", "delta_mlp", "delta_delta", "delta_rnn", "delta_lstm", "rdn"]


@pytest.mark.parametrize("name", RF_DELTA_MODELS)
def test_rf_neg_eigval_and_l2_every_impl_equals_loop(name):
    """--neg_eigval --qk_map l2, the whole model in float64: --impl chunk, kernel and auto against loop (logits of a
    first call and of a second with the state carried, every parameter's gradient); the options change the logits."""
    x1, x2 = (torch.randint(0, 12, (3, n), generator=torch.Generator().manual_seed(n)) for n in (9, 13))

    def results(**kw):
        model = rf_model(name, **kw)
        out1, s = model(x1)
        out2, _ = model(x2, s)
        return [out1, out2, *torch.autograd.grad(out1.square().sum() + out2.square().sum(), list(model.parameters()))]

    ref = results(impl="loop", neg_eigval=True, qk_map="l2")
    for impl in ("chunk", "kernel", "auto"):
        for a, b in zip(results(impl=impl, neg_eigval=True, qk_map="l2"), ref):
            assert rel_err(a, b) < 1e-10, impl
    for kw in (dict(neg_eigval=True), dict(qk_map="l2")):
        assert rel_err(results(impl="loop", **kw)[0], ref[0]) > 1e-3 < rel_err(results(impl="loop")[0], ref[0])


def test_rf_neg_eigval_and_l2_layers_by_hand():
    """The options in the layers' equations, one head of width 4: DeltaNet's q = l2(q) / 2, k = l2(k), beta = 2
    sigmoid(b); Delta RNN's R keys l2, beta 2 sigmoid, read softmax(y_{t-1}) as before; the RDN's q', k' through l2
    and beta = 2 sigmoid(b_t + r_b . s)."""
    l2 = rfwp.l2_feature
    layer, x = rf_layer_inputs("delta", neg_eigval=True, qk_map="l2")
    q, k, v, b = layer.project(x)
    y, _ = rfwp.fast_weight_loop(F.normalize(F.silu(q), dim=-1) / 2, F.normalize(F.silu(k), dim=-1), v, 2 * torch.sigmoid(b))
    torch.testing.assert_close(layer(x)[0], layer.out(rfwp.merge(y)))

    layer, x = rf_layer_inputs("delta_rnn", neg_eigval=True, qk_map="l2", impl="loop")
    q, k, v, b, k_r, v_r, b_r = layer.project(x)
    z, _ = rfwp.fast_weight_loop(l2(q, query=True), l2(k), v, 2 * torch.sigmoid(b))
    R, y, ys = torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, 1, 4, dtype=torch.float64), []
    for t in range(5):
        kr, br = F.normalize(F.silu(k_r[:, :, t]), dim=-1), 2 * torch.sigmoid(b_r[:, :, t])
        R = R + br[..., None, None] * (v_r[:, :, t, :, None] - R @ kr[..., None]) * kr[..., None, :]
        y = z[:, :, t] + (R @ F.softmax(y, -1)[..., None])[..., 0]
        ys.append(y)
    torch.testing.assert_close(layer(x)[0], layer.out(rfwp.merge(torch.stack(ys, 2))))

    layer, x = rf_layer_inputs("rdn", neg_eigval=True, qk_map="l2")
    q, k, v, b = layer.project(x)
    W, y, ys = torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, 1, 4, dtype=torch.float64), []
    Rq, Rk, Rv = layer.R[:, 0]
    for t in range(5):
        s = torch.tanh(y)
        qt, kt = F.normalize(F.silu(q[:, :, t] + s @ Rq.T), dim=-1) / 2, F.normalize(F.silu(k[:, :, t] + s @ Rk.T), dim=-1)
        vt, bt = v[:, :, t] + s @ Rv.T, 2 * torch.sigmoid(b[:, :, t] + s @ layer.r_b[0])
        W = W + bt[..., None, None] * (vt[..., None] - W @ kt[..., None]) * kt[..., None, :]
        y = (W @ qt[..., None])[..., 0]
        ys.append(y)
    torch.testing.assert_close(layer(x)[0], layer.out(rfwp.merge(torch.stack(ys, 2))))


@pytest.mark.parametrize("name", RF_DELTA_MODELS)
def test_rf_neg_eigval_and_qk_map_are_checked_keywords(name):
    """Every layer with delta-rule writes takes neg_eigval and qk_map (defaults: the paper's), checked with a
    ValueError naming them; the layers without (linear, transformer) refuse them."""
    cls = rfwp.LAYERS[name]
    params = inspect.signature(cls).parameters
    assert params["neg_eigval"].default is False and params["qk_map"].default == "paper"
    for kw in (dict(neg_eigval="yes"), dict(qk_map="l3")):
        with pytest.raises(ValueError, match=list(kw)[0]):
            cls(d_model=16, n_head=2, **kw)
    assert "neg_eigval=True, qk_map='l2'" in cls(d_model=16, n_head=2, neg_eigval=True, qk_map="l2").extra_repr()
    for other in ("linear", "transformer"):
        with pytest.raises(TypeError):
            rfwp.LAYERS[other](neg_eigval=True)
        with pytest.raises(ValueError, match="has none"):
            rfwp.Block(model=other, qk_map="l2")


@pytest.mark.parametrize("impl", ["loop", "chunk", "kernel"])
def test_rf_smoke_neg_eigval_l2(tmp_path, impl):
    p = run(script_copy(tmp_path, "rfwp.py"), "--preset", "tiny", "--task", "parity", "--model", "delta_lstm",
            "--neg_eigval", "--qk_map", "l2", "--impl", impl, "--steps", "6", "--eval_every", "3", "--test_len", "64",
            "--out_dir", str(tmp_path / "o"))
    assert "final: test acc_41_64" in p.stdout and "warning" not in p.stderr, p.stderr


def grad_fns(t):
    """Every node of t's autograd graph."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo += [f for f, _ in fn.next_functions]
    return seen


@needs_cxx
@pytest.mark.parametrize("name", ["rdn", "delta_lstm", "delta"])
def test_rl_agent_steps_through_the_cpu_kernels(name):
    """rfwp_rl.py, default impl auto on the CPU: the agent's single steps run the fused kernels (equal to the loop)."""
    rf_kernels("cpu")
    obs = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reward = torch.zeros(3, dtype=torch.float64)
    outs = []
    for impl in ("auto", "loop"):
        torch.manual_seed(0)
        agent = rfwp_rl.Agent((2,), 2, model=name, d_model=16, n_head=2, d_ff=32, impl=impl).double()
        logits, value, state = agent(obs, reward)
        logits2, _, _ = agent(obs, reward, state)
        assert any(type(fn).__name__.endswith("KernelBackward") for fn in grad_fns(logits2)) == (impl == "auto")
        outs.append(logits2)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)


def test_rf_kernel_build_failure_falls_back_with_one_warning(tmp_path):
    """No working compiler (and no earlier build): one warning, then the PyTorch forms train as before."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    p = run(script_copy(tmp_path, "rfwp.py"), "--preset", "tiny", "--model", "delta_lstm", "--steps", "4",
            "--eval_every", "2", "--out_dir", str(tmp_path / "o"), env=env)
    assert "final: test seq_acc" in p.stdout
    assert p.stderr.count("warning: cpu_kernels.cpp unavailable") == 1, p.stderr


@needs_cuda
def test_rf_cuda_bench_and_training_smoke(tmp_path):
    p = run(os.path.join(HERE, "rfwp.py"), "--preset", "tiny", "--bench", "--bench_T", "16", "--device", "cuda")
    for name in ("delta", "delta_rnn", "delta_lstm", "rdn"):
        err = re.search(rf"^{name} +kernel +.* ([\d.e+-]+)$", p.stdout, re.M)
        assert err and float(err.group(1)) < 1e-4, p.stdout
    p = run(os.path.join(HERE, "rfwp.py"), "--preset", "tiny", "--model", "delta_lstm", "--device", "cuda", "--impl",
            "kernel", "--out_dir", str(tmp_path / "o"))
    assert "final: test seq_acc" in p.stdout and "warning" not in p.stderr


# ----------------------------------------------------------------------------------------------
# data.py


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_data_download_and_load_wikitext_from_local_server(tmp_path, http_server, monkeypatch):
    root, base = http_server
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), n_lines=50)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for split in ("train", "valid", "test"):
            z.write(corpus / f"wiki.{split}.tokens", f"wikitext-2/wiki.{split}.tokens")
    (root / "wikitext-2-v1.zip").write_bytes(buf.getvalue())
    monkeypatch.setitem(data.URLS, "wikitext-2", f"{base}/wikitext-2-v1.zip")
    cache = str(tmp_path / "cache")
    train, valid, test, vocab = data.load_text("wikitext-2", "word", cache)
    assert os.path.exists(os.path.join(cache, "wikitext-2-v1.zip"))
    assert train.numel() == 50 * 9 and valid.numel() == 5 * 9  # 8 words + <eos> per line
    assert "<eos>" in vocab and "<unk>" in vocab and len(vocab) == 12
    assert vocab[train[0]] == (corpus / "wiki.train.tokens").read_text().split()[0]
    assert not [f for f in os.listdir(cache) if ".part" in f]


def test_data_download_checksum_and_failure_messages(tmp_path, http_server):
    root, base = http_server
    (root / "f.bin").write_bytes(b"fast weights")
    dest = str(tmp_path / "d" / "f.bin")
    good = data.sha256sum(str(root / "f.bin"))
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.download(f"{base}/f.bin", dest, sha256="0" * 64)
    assert not os.listdir(tmp_path / "d")  # nothing half-written
    assert data.download(f"{base}/f.bin", dest, sha256=good) == dest
    assert open(dest, "rb").read() == b"fast weights"
    with pytest.raises(data.DataError, match="put it at .*missing.bin"):
        data.download(f"{base}/missing.bin", str(tmp_path / "d" / "missing.bin"))


def test_data_load_text_file_char_and_batching(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 20)
    train, valid, test, vocab = data.load_text(str(path), "char", str(tmp_path))
    assert (train.numel(), valid.numel(), test.numel()) == (180, 10, 10)
    assert "".join(vocab[i] for i in train[:10]) == "abcdefghij"
    streams = data.batchify(torch.arange(23), 2)  # rows continue across segments
    assert streams.tolist() == [list(range(11)), list(range(11, 22))]
    segs = [data.segment(streams, i, 4) for i in range(data.n_segments(streams, 4))]
    assert torch.cat([x for x, _ in segs], 1).tolist() == [list(range(10)), list(range(11, 21))]
    assert torch.cat([y for _, y in segs], 1).tolist() == [list(range(1, 11)), list(range(12, 22))]
    with pytest.raises(data.DataError):
        data.load_text(str(path), "bpe", str(tmp_path))


# ----------------------------------------------------------------------------------------------
# figures/plot.py: the README's figures from the committed logs


def test_fig_plot_draws_every_figure_from_the_committed_logs(tmp_path):
    sys.path.insert(0, os.path.join(HERE, "figures"))
    try:
        import plot
    finally:
        sys.path.pop(0)
    p = subprocess.run([sys.executable, os.path.join(HERE, "figures", "plot.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in plot.FIGURES:
        with open(tmp_path / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name

