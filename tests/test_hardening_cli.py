"""The console script as a user meets it, through subprocesses: one-line errors (exit 2)
before any compute, a non-empty output_dir refused unless --resume / --overwrite, SIGTERM
and Ctrl-C saving a checkpoint and exiting 143 / 130, --print-config without required keys
and into a closed pipe, --help naming the presets, a base install without the train extra."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _trainer_world import NUM_RANKS, make_records, make_tokenizer, movies

from rankgrpo.catalog import write_catalog_tsv
from rankgrpo.records import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tokenizer, records, a catalog and a config whose runs take a few seconds."""
    d = tmp_path_factory.mktemp("cli")
    make_tokenizer().save_pretrained(d / "tok")
    write_jsonl(make_records(8), d / "train.jsonl")
    write_jsonl(make_records(3, seed=5), d / "test.jsonl")
    write_catalog_tsv(movies(), d / "catalog.tsv")
    cfg = {
        "model": {"tiny": {"hidden_size": 32, "intermediate_size": 64,
                           "num_attention_heads": 2, "num_key_value_heads": 1},
                  "tokenizer_name_or_path": str(d / "tok")},
        "data": {"train_file": str(d / "train.jsonl"), "catalog": str(d / "catalog.tsv"),
                 "num_ranks": NUM_RANKS},
        "sft": {"output_dir": str(d / "sft"), "max_steps": 2, "max_length": 256,
                "per_device_train_batch_size": 4, "disable_tqdm": True,
                "kernel_backend": "torch", "save_total_limit": 2},
        "grpo": {"output_dir": str(d / "grpo"), "max_steps": 2, "num_generations": 2,
                 "per_device_train_batch_size": 4, "max_completion_length": 8,
                 "max_prompt_length": 128, "disable_tqdm": True, "kernel_backend": "torch"},
        "eval": {"max_new_tokens": 8, "ks": [5]},
    }
    (d / "c.yaml").write_text(yaml.safe_dump(cfg))
    return d


def _env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp / "hf_home"), RANKGRPO_HUB_TIMEOUT="3",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def cli(files: Path, *args: str, env: dict | None = None, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "rankgrpo.cli", *args], cwd=files,
                          capture_output=True, text=True, timeout=timeout,
                          env=env or _env(files))


def _one_line_error(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


# ----------------------------------------------------------------------------- before compute

def _bad_cases(d: Path):
    (d / "a_file").write_text("x")
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    c = ["-c", str(d / "c.yaml")]
    return [
        (["train", *c, "--model", str(d / "no_such_model")], ["no such folder",
                                                                "no_such_model"]),
        (["eval", *c, f"data.eval_file={d / 'test.jsonl'}", "--model", "./missing"],
         ["no such folder"]),
        (["train", *c, "grpo.learning_rate=inf"], ["grpo.learning_rate", "finite"]),
        (["sft", *c, "sft.max_grad_norm=-.inf"], ["sft.max_grad_norm", "finite"]),
        (["sft", *c, "sft.learning_rate=nan"], ["sft.learning_rate", "NaN"]),
        (["sft", *c, f"sft.output_dir={d / 'a_file'}"], ["is a file"]),
        (["sft", *c, f"sft.output_dir={d / 'a_file' / 'run'}"], ["is a file"]),
        (["sft", *c, f"data.catalog={d / 'nope.tsv'}"], ["data.catalog", "nope.tsv"]),
        (["sft", "-c", str(d)], ["is a folder"]),
        (["sft", *c, f"data.train_file={d / 'latin1.jsonl'}", f"sft.output_dir={d / 'o1'}"],
         ["latin1.jsonl", "not UTF-8"]),
        (["sft", *c, "sft.report_to=[jsonl,tensorboard]"], ["tensorboard", "pip install"]),
        (["train", *c, "grpo.kernel_backend=triton"], ["triton", "CUDA"]),
        (["sft", *c, "model.model_name_or_path=someorg/some-model"],
         ["someorg/some-model", "cannot be reached"]),
        (["sft", *c, "--resume", "--overwrite"], ["exclude each other"]),
    ]


def test_errors_before_compute_are_one_line_exit_2(files):
    """Each bad input: exit 2 and one line on stderr naming the problem, in seconds (no model
    is loaded, no step runs)."""
    import importlib.util
    from concurrent.futures import ThreadPoolExecutor

    cases = [(a, n) for a, n in _bad_cases(files)
             if not ("tensorboard" in " ".join(a) and importlib.util.find_spec("tensorboard"))]

    def timed(args):
        t0 = time.perf_counter()
        return cli(files, *args), time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=4) as pool:  # each is a Python start-up, mostly
        results = list(pool.map(timed, [a for a, _ in cases]))
    for (args, needles), (r, seconds) in zip(cases, results):
        _one_line_error(r, *needles)
        assert seconds < 90, args
    assert not (files / "o1" / "checkpoint-1").exists()


def test_hub_id_offline_says_so(files):
    r = cli(files, "sft", "-c", str(files / "c.yaml"), "model.model_name_or_path=org/m",
            env=_env(files, HF_HUB_OFFLINE="1"))
    _one_line_error(r, "org/m", "HF_HUB_OFFLINE")


# ----------------------------------------------------------------------------- never lose a run

def _state(d: Path) -> dict:
    """What a run left in its folder: checkpoint names, `latest`, metrics.jsonl."""
    return {"ckpts": sorted(p.name for p in d.glob("checkpoint-*")),
            "latest": (d / "latest").read_text() if (d / "latest").exists() else None,
            "metrics": (d / "metrics.jsonl").read_text()}


def test_nonempty_output_dir_refused_unless_resume_or_overwrite(files):
    """Before this check a fresh run into an old run's folder kept the old checkpoints
    (rotation then deleted the new ones), left `latest` dangling and wiped metrics.jsonl."""
    out = files / "sft_keep"
    c = ["sft", "-c", str(files / "c.yaml"), f"sft.output_dir={out}", "sft.save_steps=1"]
    r = cli(files, *c, "sft.max_steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    before = _state(out)
    assert before["ckpts"] == ["checkpoint-2", "checkpoint-3"]
    r = cli(files, *c)  # a fresh run into the same folder
    _one_line_error(r, "not empty", "--resume", "--overwrite")
    assert _state(out) == before  # nothing touched
    r = cli(files, *c, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--overwrite: removed" in r.stderr and "checkpoint-3" in r.stderr
    after = _state(out)
    assert after["ckpts"] == ["checkpoint-1", "checkpoint-2"]
    assert after["latest"] == "checkpoint-2"
    assert [json.loads(x)["step"] for x in after["metrics"].splitlines()] == [1, 2]


def _wait_for_step(path: Path, proc, step: int, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and any(json.loads(x).get("step", 0) >= step
                                 for x in path.read_text().splitlines() if x.strip()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("no step logged in time")


@pytest.mark.parametrize("command,sig,code", [("sft", signal.SIGINT, 130),
                                              ("train", signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_and_exits_nonzero(files, command, sig, code):
    """SIGTERM is handled like Ctrl-C: the step in progress finishes, a checkpoint is saved,
    the run stops with 128 + the signal's number; --resume continues it to the end."""
    section = "sft" if command == "sft" else "grpo"
    out = files / f"sig_{command}"
    args = [command, "-c", str(files / "c.yaml"), f"{section}.output_dir={out}",
            f"{section}.max_steps=200", f"{section}.save_steps=0"]
    proc = subprocess.Popen([sys.executable, "-m", "rankgrpo.cli", *args], cwd=files,
                            env=_env(files), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_step(out / "metrics.jsonl", proc, 1)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["interrupted"] and summary["final_dir"] is None
    stopped = summary["step"]
    assert (out / f"checkpoint-{stopped}" / "trainer_state.json").exists()
    assert (out / "latest").read_text() == f"checkpoint-{stopped}"
    name = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    assert f"stopped by {name} after step {stopped}" in stdout + stderr
    # a shorter run: SFT's cosine schedule depends on max_steps (so the change must be
    # allowed), GRPO's constant one does not
    more = ["--allow-config-change"] if command == "sft" else []
    r = cli(files, *args[:-2], f"{section}.max_steps={stopped + 1}",
            f"{section}.save_steps=0", "--resume", *more)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max_steps: 200 -> " in r.stdout + r.stderr
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stopped + 2))


# ----------------------------------------------------------------------------- output, packaging

def test_print_config_without_required_keys_and_into_a_closed_pipe(files):
    r = cli(files, "train", "--print-config")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["grpo"]["num_generations"] == 8
    r = subprocess.run(f"{sys.executable} -m rankgrpo.cli train --print-config | head -1",
                       shell=True, cwd=files, capture_output=True, text=True, env=_env(files))
    assert r.stdout == "model:\n" and r.stderr == "", r.stderr
    # a reader gone before the first write: no traceback, exit 128 + SIGPIPE
    p = subprocess.Popen([sys.executable, "-m", "rankgrpo.cli", "train", "--print-config"],
                         cwd=files, env=_env(files), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert "Traceback" not in err and "Exception" not in err, err
    assert p.returncode == 128 + signal.SIGPIPE


@pytest.mark.parametrize("command", ["sft", "train", "eval"])
def test_help_lists_presets_and_where_keys_are_documented(files, command):
    r = cli(files, command, "--help")
    assert r.returncode == 0
    assert "smollm2-135m-instruct" in r.stdout and "algo-grpo" in r.stdout
    assert "rankgrpo/config.py" in r.stdout
    top = cli(files, "--help").stdout
    assert "rra" in top and "demo" in top


def test_base_install_names_the_extra(files):
    """Without pyyaml (a base `pip install .`), the script names the extra to install."""
    code = ("import sys; sys.modules['yaml'] = None; from rankgrpo.cli import main; "
            "sys.exit(main(['train', '--print-config']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=files, capture_output=True,
                       text=True, env=_env(files))
    _one_line_error(r, "rankgrpo[train]", "yaml")


def test_rra_is_dispatched(monkeypatch):
    import types

    from rankgrpo.cli import main

    seen = []
    fake = types.ModuleType("rankgrpo.rra.cli")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "rankgrpo.rra.cli", fake)
    assert main(["rra", "--x", "1"]) == 7 and seen == [["--x", "1"]]


def test_unwritable_output_dir_is_refused_before_compute(tmp_path, monkeypatch):
    """As root every folder is writable, so the permission answer is simulated."""
    from rankgrpo import checkpoint as ck

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(PermissionError, match="is not writable"):
        ck.prepare_output_dir(tmp_path / "ro", resume=False, overwrite=False)
    with pytest.raises(PermissionError, match="cannot be created"):
        ck.prepare_output_dir(tmp_path / "ro" / "new", resume=False, overwrite=False)
