"""Shared test helpers: the repo on sys.path, the shared test data, and running a stage script as a user would."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
sys.path.insert(0, str(REPO))


def _env(env):
    # One intra-op thread, as torchrun gives each worker: a nano ViT gains nothing from more, and on a busy
    # 2-core machine two spinning OpenMP threads per process make a step ~10x slower.
    return {"OMP_NUM_THREADS": "1", **os.environ, **(env or {})}


def run_script(*args, timeout=120, env=None):
    """Run `python <args>` in the repo root (args[0] is the script); returns the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=_env(env))


def run_torchrun(*args, nproc=2, timeout=120, env=None):
    """`torchrun --standalone --nproc_per_node=N <args>` in the repo root, with this interpreter's torchrun."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=_env(env))


@pytest.fixture
def needs_cifar():
    path = SHARED_DATA / "cifar10-5k"
    if not path.is_dir():
        pytest.skip(f"shared test data absent: {path} (see /work/shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def needs_torchrun():
    """Two CPU processes need torch.distributed with gloo; torchrun itself runs as `python -m`."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available (torchrun cannot run on CPU)")



def run_in_process(script, *args, env=None, timeout=300):
    """Run `python script args` in this process, in the repo root, without the 4-second torch import that a
    subprocess pays on a slow 2-core machine. Returns (exit code, stdout, stderr). Unlike run_script: one intra-op
    thread whatever the caller's OMP_NUM_THREADS (CPU reductions may depend on it: every in-process run has the
    same), Python warnings go to pytest's record, not to stderr, and what bypasses sys.stdout/sys.stderr (C++
    warnings, DataLoader worker processes) is not captured; keep a subprocess where a test is about those.
    sys.argv, the working directory, the environment, the thread count and torch's global RNG are restored after,
    and a run longer than `timeout` seconds stops with TimeoutError (as run_script's subprocess timeout)."""
    import contextlib
    import io
    import runpy
    import signal
    import threading
    import torch

    def too_long(signum, frame):
        raise TimeoutError(f"{script} ran longer than {timeout} s")
    watchdog = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    saved = sys.argv, os.getcwd(), dict(os.environ), torch.get_num_threads(), torch.get_rng_state()
    out, err, code = io.StringIO(), io.StringIO(), 0
    if watchdog:
        old_handler = signal.signal(signal.SIGALRM, too_long)
        signal.alarm(timeout)
    try:
        sys.argv = [str(script), *map(str, args)]
        os.chdir(REPO)
        os.environ.update({"OMP_NUM_THREADS": "1", **(env or {})})
        torch.set_num_threads(1)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(REPO / script), run_name="__main__")
            except SystemExit as e:
                code = e.code or 0
    finally:
        if watchdog:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old_handler)
        sys.argv = saved[0]
        os.chdir(saved[1])
        os.environ.clear()
        os.environ.update(saved[2])
        torch.set_num_threads(saved[3])
        torch.set_rng_state(saved[4])
    return code, out.getvalue(), err.getvalue()


def run_here(script, *args, env=None, timeout=300):
    """run_in_process as a CompletedProcess: for run_script in tests that run several short stages."""
    return subprocess.CompletedProcess([str(script), *map(str, args)],
                                       *run_in_process(script, *args, env=env, timeout=timeout))


# A stand-in `python` (and `torchrun`) for the tests of the shell scripts that run the stages (reproduce.sh,
# gpu_check.sh): it appends each stage command to $CALLS and writes the files a stage would, so their order and
# flags are checked in seconds. `python -c/-/-m` run for real, except the GPU count, which is $NGPU when set, and
# gpu_check.sh's torch/torchvision version line.
# A command with --fail_here, or of the script $FAIL_SCRIPT, or whose --out_dir ends in /$FAIL_OUT, fails; one whose
# --out_dir ends in /$SLOW_OUT takes 20 s. Each call leaves its OMP_NUM_THREADS in its out_dir/threads.
FAKE_PYTHON = """#!/bin/bash
if [ "$1" = -c ] && [ -n "${{NGPU:-}}" ] && [[ "$2" == *device_count* ]]; then echo "$NGPU"; exit 0; fi
if [ "$1" = -c ] && [[ "$2" == *__version__* ]]; then echo "torch (fake python)"; exit 0; fi
case "$1" in -c|-|-m) exec {real} "$@";; esac
echo "$*" >> "$CALLS"
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out_dir" ] && out=$a; prev=$a; done
case "$1 $*" in *"--fail_here"*|"${{FAIL_SCRIPT:-none}} "*) exit 1;; esac
case "$out" in *"/${{FAIL_OUT:-//}}") exit 1;; esac
case "$out" in *"/${{SLOW_OUT:-//}}") sleep 20;; esac
mkdir -p "$out"
# a training stage's checkpoint (an evaluation writes none), then results and a log rich enough for the scripts' tables
[ "$1" = evaluate.py ] || touch "$out/ckpt.pt"
echo '{{"pooling": "mean", "knn10": 1.0, "feature_dim": 8, "dataset": "fake"}}' > "$out/results.json"
echo '{{"step": 1, "loss": 1.0, "nn_acc": 0.5, "nnclr_loss": 1.0, "mae_loss": 1.0}}' > "$out/log.jsonl"
echo "${{OMP_NUM_THREADS:-}}" > "$out/threads"
"""
STAGE_SCRIPTS = ("pretrain_mae.py", "init_head.py", "contrastive_tune.py", "evaluate.py")


def fake_python(bin_dir):
    """Write the fake `python` and a `torchrun` that runs it with a trailing --launched_by_torchrun into bin_dir."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "python").write_text(FAKE_PYTHON.format(real=sys.executable))
    (bin_dir / "torchrun").write_text(  # refuses a launch without --standalone (reproduce.sh's port and run id)
        '#!/bin/bash\n[[ " $* " == *" --standalone "* ]] || { echo "fake torchrun: no --standalone" >&2; exit 1; }\n'
        'while [[ $1 == --* ]]; do shift; done\nexec python "$@" --launched_by_torchrun\n')  # its own flags dropped
    for f in ("python", "torchrun"):
        (bin_dir / f).chmod(0o755)


def recorded_calls(calls_file):
    """The fake's recorded commands as (args, launched by torchrun). Every stage command must parse with the
    script's real argparse: a misspelt flag fails here, not on a GPU (the fake failure marker is exempt)."""
    import importlib
    out = []
    for line in calls_file.read_text().splitlines():
        args = line.split()
        torchrun = args[-1] == "--launched_by_torchrun"
        args = args[:-1] if torchrun else args
        if args[0] in STAGE_SCRIPTS and "--fail_here" not in args:
            importlib.import_module(args[0][:-3]).parse_args(args[1:])
        out.append((args, torchrun))
    return out


def ok(r):
    """Assert a CompletedProcess succeeded, showing the end of its output when it did not."""
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def load_ckpt(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(ca, cb, parts=("model",)):
    """Two checkpoints hold the same training state bit for bit: step, weights and buffers of each part (queue, BN
    statistics), optimizer state and param groups."""
    import torch
    assert ca["step"] == cb["step"]
    for part in parts:
        assert ca[part].keys() == cb[part].keys(), part
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for n in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][n]), torch.as_tensor(sb[i][n])), (i, n)
    assert ca["optimizer"]["param_groups"] == cb["optimizer"]["param_groups"]


def pytest_configure(config):
    config.addinivalue_line("markers", "multiprocess: starts several processes with torchrun (gloo, CPU)")
    config.addinivalue_line("markers", "slow: runs a stage script for a few seconds or more")
    config.addinivalue_line("markers", "chain: runs reproduce.sh or ablations.sh for real (the longest tests)")


def pytest_collection_modifyitems(config, items):
    """The chain tests first (a stable sort): under -n auto they then run beside the short ones, not alone at the
    end, where one of them would be the suite's last minute or two."""
    items.sort(key=lambda item: item.get_closest_marker("chain") is None)
