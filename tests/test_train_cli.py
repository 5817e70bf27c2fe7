"""`offload train`, the main job, run as a user runs it: a subprocess, checked for its output and leftovers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

FAST = ["--batch", "2", "--seq-len", "32", "--no-sample"]


def _train(tmp_path, *flags, check=True):
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "work").mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "offload", "train", *flags], cwd=tmp_path / "work", env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(stdout: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step=(\d+) loss=([\d.]+) tok/s=", stdout, re.M)}


def test_default_run_learns_and_leaves_nothing_behind(tmp_path):
    done = _train(tmp_path, "--steps", "40", "--log-every", "5", "--batch", "4", "--seq-len", "64")
    losses = _losses(done.stdout)
    assert sorted(losses) == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    assert losses[40] < losses[1] - 1.0, losses
    assert "parameters: nvme; optimizer state: 0 groups in RAM" in done.stdout
    assert re.search(r"fetch_wait_s=\S+ optimizer_s=\S+ rss_gib=\S+ nvme_read_mb=\S+", done.stdout)
    assert "sample: 'The " in done.stdout
    assert list((tmp_path / "tmp").iterdir()) == [] and list((tmp_path / "work").iterdir()) == []


def test_timeline_holds_the_spans_and_the_resource_counters(tmp_path):
    import json

    trace = tmp_path / "trace.json"
    done = _train(tmp_path, "--steps", "3", "--timeline", str(trace), *FAST)
    assert f"timeline written to {trace}" in done.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    assert {"compute", "adam", "nvme read"} <= {e.get("cat") for e in events if e["ph"] == "X"}
    assert any(e["ph"] == "C" and e["name"] == "CPU cores" for e in events)


def test_a_killed_run_resumes_exactly(tmp_path):
    """Killed (SIGKILL) after its step-4 checkpoint, then resumed with --resume: the same weights as a run that
    was never interrupted."""
    from offload.checkpoint.directory import CheckpointDir
    from safetensors.torch import load_file

    straight, split = tmp_path / "straight", tmp_path / "split"
    _train(tmp_path, "--steps", "8", "--checkpoint-dir", str(straight), *FAST)
    child = subprocess.Popen([sys.executable, "-m", "offload", "train", "--steps", "8", "--checkpoint-every", "4",
                              "--checkpoint-dir", str(split), "--log-every", "1", *FAST],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=dict(os.environ, TMPDIR=str(tmp_path / "tmp")))
    for line in child.stdout:
        if line.startswith("step=6 "):  # lines are printed before the step's save: step 4's save is done
            child.kill()
            break
    child.wait()
    resumed = _train(tmp_path, "--steps", "8", "--checkpoint-dir", str(split), "--resume", *FAST)
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    assert list((tmp_path / "tmp").iterdir()) == []  # the killed run's swap files were cleaned up by the next run
    a = load_file(CheckpointDir(straight).current()[0] / "master.safetensors")
    b = load_file(CheckpointDir(split).current()[0] / "master.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum,code,says", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "SIGTERM"),
                                              (signal.SIGHUP, 129, "SIGHUP")])
def test_a_stop_signal_ends_the_run_cleanly_and_removes_swap_files(tmp_path, signum, code, says):
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    # (the signal back to its default in the child: a shell that starts this suite in the background without job
    # control ignores SIGINT, the child would inherit that, and Python would then never raise KeyboardInterrupt)
    child = subprocess.Popen([sys.executable, "-m", "offload", "train", "--steps", "100000", "--log-every", "1",
                              *FAST], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    for line in child.stdout:
        if line.startswith("step=3 "):
            break
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == code, err[-2000:]
    assert f"{says}; swap files removed" in err
    assert list((tmp_path / "tmp").iterdir()) == []


def test_train_uses_the_io_settings_of_a_config_file(tmp_path):
    config = tmp_path / "offload.toml"
    config.write_text('dtype = "fp32"\n[io]\nblock_size = "1MiB"\nqueue_depth = 4\nthreads = 1\ndirect = "auto"\n')
    done = _train(tmp_path, "--config", str(config), "--steps", "2", "--log-every", "1", *FAST)
    assert "fp32 on cpu" in done.stdout and "io: 1 MiB blocks, 1 x 4 in flight" in done.stdout
    assert "parameters: nvme;" in done.stdout  # a file that does not set the placement keeps train's defaults


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "--steps: expected a positive integer; got 0"),
    (["--model", "nope"], "--model: 'nope' is neither a preset"),
    (["--resume"], "--resume: needs --checkpoint-dir"),
    (["--seq-len", "100000"], "fewer than one sequence of --seq-len 100000"),
    (["--params", "nvme", "--optimizer", "cpu", "--host-memory-limit", "1MiB"], "host_memory_limit"),
])
def test_bad_flags_give_one_line_errors(tmp_path, flags, message):
    done = _train(tmp_path, *flags, check=False)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("offload train: error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_fine_tuning_from_an_exported_checkpoint_starts_where_training_left_off(tmp_path):
    first = _train(tmp_path, "--steps", "30", "--log-every", "30", "--lr", "1e-2", "--checkpoint-dir",
                   str(tmp_path / "ckpt"), *FAST)
    trained_loss = _losses(first.stdout)[30]
    subprocess.run([sys.executable, "-m", "offload", "export", str(tmp_path / "ckpt"), "--out",
                    str(tmp_path / "exported")], check=True, capture_output=True, timeout=300)
    scratch = _train(tmp_path, "--steps", "1", "--log-every", "1", *FAST)
    tuned = _train(tmp_path, "--steps", "1", "--log-every", "1", "--init-from", str(tmp_path / "exported"), *FAST)
    assert f"weights from {tmp_path / 'exported'}" in tuned.stdout
    assert "byte tokens" in tuned.stdout  # the model is the checkpoint's own (a 256-token vocabulary: bytes)
    # the first step starts from the trained weights: its loss is near the trained one, far below a fresh start
    assert _losses(tuned.stdout)[1] < trained_loss + 0.5 < _losses(scratch.stdout)[1] - 1.0


def test_under_torchrun_two_ranks_train_the_run_of_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m offload train`: each rank takes half of every batch and half of the
    state; the losses are those of one process on the same batches (fp32), rank 0 alone prints, the
    checkpoint holds each rank's shard, and nothing is left behind. The data is prompt/completion pairs with
    prompts of different lengths, so the two halves of a batch train different numbers of tokens (Note [the
    loss of a step]); rank 0 tokenizes it into the cache, rank 1 reads it from there."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "data" / "pairs.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"prompt": "Q" * (1 + i % 23) + "? ", "completion": f"answer number {i}."})
                            + "\n" for i in range(200)))
    flags = ["--steps", "6", "--log-every", "1", "--dtype", "fp32", "--batch", "4", "--seq-len", "32",
             "--no-sample", "--data", str(data)]
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), OMP_NUM_THREADS="1")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "work").mkdir()
    ckpt = tmp_path / "ckpt"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(port), "-m", "offload", "train", *flags,
                           "--checkpoint-dir", str(ckpt)],
                          cwd=tmp_path / "work", env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 ranks: each trains on 2 of the 4 sequences" in done.stdout
    assert done.stdout.count("offload train:") == 1  # one rank speaks
    single = _train(tmp_path, *flags)
    ranks, alone = _losses(done.stdout), _losses(single.stdout)
    assert sorted(ranks) == list(range(1, 7))
    for step, loss in alone.items():
        assert ranks[step] == pytest.approx(loss, rel=1e-4), step
    version = next(ckpt.glob("v-*"))
    assert {p.name for p in version.glob("master*")} == {"master.rank0.safetensors", "master.rank1.safetensors"}
    # (torchrun's own agent leaves its torchelastic_* directory in TMPDIR; nothing of ours may remain)
    ours = [p for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchelastic_")]
    assert ours == [] and list((tmp_path / "work").iterdir()) == []


def test_bad_outputs_and_resume_fail_before_any_training(tmp_path):
    def fails(*flags) -> str:
        out = _train(tmp_path, "--steps", "3", *FAST, *flags, check=False)
        assert out.returncode == 1 and "step=" not in out.stdout, out.stdout[-2000:]
        return out.stderr.strip().splitlines()[-1]

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert "--checkpoint-dir: cannot write to" in fails("--checkpoint-dir", str(blocker / "ckpt"))
    assert "--timeline: cannot write" in fails("--timeline", str(tmp_path / "missing" / "trace.json"))
    empty = tmp_path / "empty"
    assert "--resume: no checkpoint in" in fails("--resume", "--checkpoint-dir", str(empty))
    assert not empty.exists()  # the checks leave nothing behind
    # --resume-if-exists starts at step 0 when there is nothing to resume, and resumes when there is
    first = _train(tmp_path, "--steps", "2", "--log-every", "1", *FAST, "--resume-if-exists", "--checkpoint-dir",
                   str(empty))
    assert "resumed" not in first.stdout and "step=2 " in first.stdout
    again = _train(tmp_path, "--steps", "3", "--log-every", "1", *FAST, "--resume-if-exists", "--checkpoint-dir",
                   str(empty))
    assert "resumed from" in again.stdout and "step=3 " in again.stdout and "step=1 " not in again.stdout


def test_an_unknown_flag_is_named_with_the_subcommands_usage_and_clean_checks_its_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "offload", "train", "--bogus"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage: offload train" in out.stderr
    assert "offload train: error: unrecognized arguments: --bogus" in out.stderr
    out = subprocess.run([sys.executable, "-m", "offload", "clean", str(tmp_path / "nowhere")], capture_output=True,
                         text=True)
    assert out.returncode == 2 and "no such directory" in out.stderr
