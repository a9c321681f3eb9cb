"""What users, schedulers and full disks do to a run: signals, a second run into the same folder, files a user put
beside an export, an export cut short while being replaced, loading an export without gift_quant, weights replaced
on disk mid-run, a full disk. Each ends as one line (exit 2, or 128 + the signal) or resumes; nothing a user wrote is
lost. Malformed inputs refused before any work are in ``test_malformed.py``."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gift_quant.checkpoint import MANIFEST
from gift_quant.ownership import install_export, owned_files, remove_export

from conftest import tiny_llama

REPO = Path(__file__).resolve().parents[1]

QUICK = """
model: {name: tiny}
stages:
  - calibrate: {dataset: TRAIN, num_samples: 4, seq_len: 32}
  - select: {count: 4}
  - quantize: {method: rtn, bits: 4}
  - recover: {dataset: TRAIN, max_steps: 2, seq_len: 32, LOSS}
  - export: {EXPORT}
"""


def recipe(export: str = "", loss: str = "loss: lm") -> str:
    return QUICK.replace("EXPORT", export).replace("LOSS", loss)


def status(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_recovery_is_one_line_status_interrupted_and_a_rerun_resumes(sig, tiny_run, monkeypatch,
                                                                                      capsys):
    import gift_quant.recover as recover

    real, handlers = recover.run_method, (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))

    def killed(*args, **kwargs):
        os.kill(os.getpid(), sig)  # what a scheduler (or Ctrl-C) does while training runs
        return real(*args, **kwargs)

    monkeypatch.setattr(recover, "run_method", killed)
    rc, out = tiny_run(recipe())
    assert rc == 128 + sig
    assert "interrupted by " + signal.Signals(sig).name in one_error_line(capsys)
    doc = status(out)
    assert doc["status"] == "interrupted" and "recover" in doc["error"]
    assert not (out / "packed").exists()
    monkeypatch.setattr(recover, "run_method", real)
    rc, out = tiny_run(recipe())
    assert rc == 0 and status(out)["status"] == "complete"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # main() gave them back


# ---------------------------------------------------------------- one run per output folder


def test_a_second_run_into_a_folder_in_use_is_refused_with_the_holders_pid(tiny_run, tmp_path, capsys):
    from gift_quant.lock import output_lock, record_holder

    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out):  # another run holds the folder (this process, as far as the lock can tell)
        record_holder(out)
        rc, _ = tiny_run(recipe())
        assert rc == 2
        assert f"in use by another gift_quant run (pid {os.getpid()})" in one_error_line(capsys)
        assert (out / ".gift_quant.lock").read_text().strip() == str(os.getpid())  # the refused run touched nothing
    assert not (out / "results.json").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny_run, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".gift_quant.lock").write_text(dead.stdout)
    rc, _ = tiny_run(recipe())
    assert rc == 0 and status(out)["status"] == "complete"
    assert not (out / ".gift_quant.lock").exists()  # a run that ends takes its pid file with it


def test_results_are_readable_by_others_as_the_umask_allows(tiny_run):
    old = os.umask(0o022)
    try:
        rc, out = tiny_run(recipe())
    finally:
        os.umask(old)
    assert rc == 0
    for name in ("results.json", "report.md", "recipe.resolved.yaml"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


# ---------------------------------------------------------------- the export owns only what it wrote


def test_a_rerun_keeps_the_users_files_beside_the_export(tiny_run, tmp_path):
    external = tmp_path / "external"
    for export in ("", f"path: {external}"):
        rc, out = tiny_run(recipe(export))
        assert rc == 0
        folder = external if export else out / "packed"
        (folder / "README.md").write_text("my model card")
        rc, _ = tiny_run(recipe(export))
        assert rc == 0
        assert (folder / "README.md").read_text() == "my model card"
        assert "README.md" not in owned_files(folder) and (folder / "model.safetensors").is_file()
        from gift_quant import load_quantized

        load_quantized(folder, dtype=torch.float32)  # what was installed is whole


def test_a_failed_rerun_removes_the_old_export_but_not_the_users_files(tiny_run, monkeypatch, capsys):
    rc, out = tiny_run(recipe())
    (out / "packed" / "README.md").write_text("mine")
    import gift_quant.recover as recover

    real = recover.run_method
    monkeypatch.setattr(recover, "run_method", lambda *a, **k: (_ for _ in ()).throw(recover.UserError("boom")))
    assert tiny_run(recipe())[0] == 2
    assert sorted(p.name for p in (out / "packed").iterdir()) == ["README.md", MANIFEST]
    assert owned_files(out / "packed") == []
    monkeypatch.setattr(recover, "run_method", real)
    assert tiny_run(recipe())[0] == 0  # an emptied export is still ours to write into
    assert (out / "packed" / "README.md").read_text() == "mine"


def _fake_export(folder: Path, files: dict[str, str]) -> None:
    """A folder shaped like an export: files and a manifest listing them (ownership reads names only)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    from gift_quant.checkpoint import write_manifest

    write_manifest(folder)


def test_a_removal_cut_short_is_still_recognised_and_finished(tmp_path):
    folder = tmp_path / "packed"
    _fake_export(folder, {f"model-{i:05d}.safetensors": "x" for i in range(44)} | {"config.json": "{}"})
    (folder / "README.md").write_text("mine")  # added by the user after the export
    for name in sorted(owned_files(folder))[:27]:  # a kill in the middle of a removal
        (folder / name).unlink()
    remove_export(folder)  # the manifest went last, so the next run finishes the job
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", MANIFEST] and owned_files(folder) == []
    (folder / "README.md").unlink()
    remove_export(folder)
    assert not folder.exists()


def test_a_replacement_cut_short_leaves_an_export_that_the_next_one_replaces(tmp_path, monkeypatch):
    target, new = tmp_path / "packed", tmp_path / "new"
    _fake_export(target, {"model-1.safetensors": "old", "config.json": "old"})
    (target / "NOTES.md").write_text("mine")
    _fake_export(new, {"model-a.safetensors": "new", "model-b.safetensors": "new", "config.json": "new"})
    real, calls = os.replace, []

    def dies_on_second_move(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the new files move in
        return real(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_second_move)
    with pytest.raises(KeyboardInterrupt):
        install_export(new, target)
    monkeypatch.setattr(os, "replace", real)
    claimed = set(owned_files(target))  # old and new files both claimed: nothing of ours is left unowned
    assert {"model-1.safetensors", "model-a.safetensors", "model-b.safetensors", "config.json"} <= claimed
    remove_export(target)
    assert sorted(p.name for p in target.iterdir()) == sorted([MANIFEST, "NOTES.md"])


def test_an_export_never_overwrites_a_users_file_of_the_same_name(tmp_path):
    from gift_quant.errors import UserError

    target, new = tmp_path / "packed", tmp_path / "new"
    _fake_export(target, {"config.json": "old"})
    (target / "model.safetensors").write_text("the user's")
    _fake_export(new, {"model.safetensors": "new", "config.json": "new"})
    with pytest.raises(UserError, match="not part of the earlier export"):
        install_export(new, target)
    assert (target / "model.safetensors").read_text() == "the user's"


def test_a_manifest_cannot_make_removal_leave_the_folder(tmp_path):
    folder = tmp_path / "packed"
    folder.mkdir()
    (tmp_path / "precious.txt").write_text("years of work")
    doc = {"format": "gift_quant", "files": {"../precious.txt": {}, str(tmp_path / "precious.txt"): {}}}
    (folder / MANIFEST).write_text(json.dumps(doc))
    remove_export(folder)
    assert (tmp_path / "precious.txt").read_text() == "years of work"


# ---------------------------------------------------------------- loading needs gift_quant


def test_an_export_loaded_without_gift_quant_fails_instead_of_returning_random_weights(tiny_run):
    rc, out = tiny_run(recipe())
    assert rc == 0
    code = ("import sys; from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(out / 'packed')!r})\n"
            "assert 'gift_quant' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert proc.returncode != 0 and "mismatch" in (proc.stderr + proc.stdout).lower(), proc.stderr[-2000:]
    with_it = code.replace("import sys;", "import sys, gift_quant;").replace(
        "assert 'gift_quant' not in sys.modules", "")
    proc = subprocess.run([sys.executable, "-c", with_it], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------- the model changes under the run


def test_weights_replaced_on_disk_before_the_teacher_reloads_them_are_refused(tiny_run, capsys):
    builds = iter([0, 1])  # the run's load, then the teacher's reload reads other weights
    tiny_run.build = lambda: tiny_llama(seed=next(builds))
    rc, out = tiny_run(recipe(loss="loss: kd, kd_top_k: 8"))
    assert rc == 2 and "changed on disk since this run loaded them" in one_error_line(capsys)
    assert status(out)["status"] == "failed"
    cache = Path(os.environ["GIFT_QUANT_CACHE"]) / "teacher"
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # nothing cached under the wrong digest


# ---------------------------------------------------------------- paths as a shell reads them


def test_a_tilde_in_output_dir_and_export_path_is_the_home_folder(tiny_run, tmp_path, monkeypatch):
    from gift_quant.recipe import main

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text("output_dir: ~/runs/a\n" + recipe("path: ~/exports/a").replace(
        "TRAIN", str(tmp_path / "train.jsonl")))
    assert main([str(path)]) == 0
    assert (home / "runs" / "a" / "results.json").is_file() and (home / "exports" / "a" / MANIFEST).is_file()
    assert not (tmp_path / "~").exists()


# ---------------------------------------------------------------- full disks


def cli_workspace(ws: Path, text: str) -> Path:
    """A tiny model folder, a training text and a recipe on disk, for runs in a real process."""
    from conftest import char_hf_tokenizer

    tiny_llama().save_pretrained(ws / "model")
    char_hf_tokenizer().save_pretrained(ws / "model")
    words = " ".join(["the cat sat on the mat and the dog ran far away home."] * 40)
    (ws / "train.jsonl").write_text("\n".join(json.dumps({"text": words}) for _ in range(20)))
    body = text.split("\n", 2)[2].replace("TRAIN", str(ws / "train.jsonl"))
    (ws / "r.yaml").write_text(f"model: {{name: {ws / 'model'}}}\n" + body)
    return ws / "r.yaml"


def error_lines(stderr: str) -> list[str]:
    """The 'error: ' lines (an interrupted progress bar leaves no newline before one, and redraws itself at exit)."""
    return re.findall(r"error: [^\r\n]*", stderr)


def cli(ws: Path, path: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GIFT_QUANT_CACHE": str(ws / "cache")}
    return subprocess.Popen([sys.executable, "-m", "gift_quant.recipe", str(path), "--output-dir", str(ws / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, **kwargs)


def test_sigterm_from_a_scheduler_during_training_is_one_line_and_status_interrupted(tmp_path):
    import time

    path = cli_workspace(tmp_path, recipe().replace("max_steps: 2", "max_steps: 100000"))
    proc = cli(tmp_path, path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "recover").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # well inside the training loop
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and len(error_lines(err)) == 1, err[-3000:].replace("\r", "\n")
    assert error_lines(err)[0].startswith("error: interrupted by SIGTERM")
    doc = status(tmp_path / "out")
    assert doc["status"] == "interrupted" and "recover" in doc["error"]


def test_a_file_size_limit_is_one_line_and_the_run_is_marked_failed(tmp_path):
    """RLIMIT_FSIZE makes every write past the limit fail with EFBIG, whatever library writes (safetensors,
    torch.save, Python): the run ends with one line, results.json says failed."""
    import resource

    limit = 40_000  # the tiny model's export is ~100 kB; results.json and the layers are smaller

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = cli(tmp_path, cli_workspace(tmp_path, recipe()), preexec_fn=cap)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and len(error_lines(err)) == 1
    assert "too large" in err.lower() or "disk full" in err.lower(), err[-1000:]
    assert status(tmp_path / "out")["status"] == "failed"


def test_dry_run_refuses_a_stage_estimated_at_months(tmp_path, capsys):
    from gift_quant.recipe import main

    path = cli_workspace(tmp_path, recipe().replace("max_steps: 2", "max_steps: 1000000000000"))
    assert main([str(path), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert "| recover |" in out  # the table is printed, then the refusal with the estimate
    assert "stages.3.recover: estimated at" in err and "days" in err


def _write_past_a_size_limit(writer) -> BaseException:
    """The exception ``writer`` raises when a file-size limit stops it (the real error of each library)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, hard))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        writer()
    except Exception as err:  # noqa: BLE001
        return err
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    raise AssertionError("the write did not fail")


@pytest.mark.parametrize("writer", ["safetensors", "torch", "python"])
def test_disk_errors_of_every_writer_are_one_line(writer, tmp_path):
    from safetensors.torch import save_file

    from gift_quant.recipe import user_message

    big = torch.zeros(100_000)
    write = {"safetensors": lambda: save_file({"x": big}, tmp_path / "x.safetensors"),
             "torch": lambda: torch.save({"x": big}, tmp_path / "x.pt"),
             "python": lambda: (tmp_path / "x.bin").write_bytes(bytes(100_000))}[writer]
    message = user_message(_write_past_a_size_limit(write))
    assert message is not None and "\n" not in message
    assert "disk full or file-size limit" in message or "File too large" in message, message


def test_a_finite_loss_beyond_exps_range_is_an_infinite_perplexity():
    """exp(mean NLL) overflows a float above ~709.8 nats: that perplexity is inf, not an OverflowError."""
    from gift_quant.evaluate import perplexity

    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)  # finite weights, logits in the millions
    ids = torch.arange(64).remainder(128)[None]
    result = perplexity(model, ids, seq_len=32, progress=False)
    assert result.value == float("inf") and math.isfinite(result.nll_sum) and result.nll_sum / result.tokens > 710


def test_a_rerun_with_fewer_shards_removes_the_old_ones_and_keeps_the_users_files(tiny_run):
    from gift_quant import load_quantized

    rc, out = tiny_run(recipe("max_shard_size: 1KB"))
    folder = out / "packed"
    many = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert rc == 0 and len(many) > 10
    (folder / "README.md").write_text("my model card")
    assert tiny_run(recipe())[0] == 0
    assert not list(folder.glob("model-*.safetensors")) and (folder / "model.safetensors").is_file()
    assert (folder / "README.md").read_text() == "my model card"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*owned_files(folder), MANIFEST, "README.md"])
    load_quantized(folder, dtype=torch.float32)
