"""The console script end to end on files: sft -> train (from the SFT output) -> eval."""

import json

import yaml
from _trainer_world import NUM_RANKS, make_records, make_tokenizer

from rankgrpo.catalog import write_catalog_tsv
from rankgrpo.cli import main
from rankgrpo.records import write_jsonl


def test_cli_sft_train_eval(tmp_path, capsys):
    from _trainer_world import movies

    tok = make_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    write_jsonl(make_records(8), tmp_path / "train.jsonl")
    write_jsonl(make_records(3, seed=5), tmp_path / "test.jsonl")
    write_catalog_tsv(movies(), tmp_path / "catalog.tsv")
    cfg = {
        "model": {"tiny": {"hidden_size": 32, "intermediate_size": 64,
                           "num_attention_heads": 2, "num_key_value_heads": 1},
                  "tokenizer_name_or_path": str(tmp_path / "tok")},
        "data": {"train_file": str(tmp_path / "train.jsonl"),
                 "eval_file": str(tmp_path / "test.jsonl"),
                 "catalog": str(tmp_path / "catalog.tsv"), "num_ranks": NUM_RANKS},
        "sft": {"output_dir": str(tmp_path / "sft"), "max_steps": 2, "max_length": 256,
                "per_device_train_batch_size": 4, "disable_tqdm": True,
                "kernel_backend": "torch"},
        "grpo": {"output_dir": str(tmp_path / "grpo"), "max_steps": 1, "num_generations": 2,
                 "per_device_train_batch_size": 4, "max_completion_length": 8,
                 "max_prompt_length": 128, "disable_tqdm": True, "kernel_backend": "torch",
                 "init_from": str(tmp_path / "sft" / "final")},
        "eval": {"max_new_tokens": 8, "ks": [5, 10]},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["sft", "-c", str(tmp_path / "c.yaml")]) == 0
    assert (tmp_path / "sft" / "final" / "config.json").exists()
    assert main(["train", "-c", str(tmp_path / "c.yaml"), "grpo.beta=0.01"]) == 0
    assert (tmp_path / "grpo" / "final" / "config.json").exists()
    assert (tmp_path / "grpo" / "checkpoint-1").exists()
    capsys.readouterr()
    assert main(["eval", "-c", str(tmp_path / "c.yaml"), "--model",
                 str(tmp_path / "grpo" / "final")]) == 0
    out = capsys.readouterr()
    metrics = json.loads(out.out)
    assert {"recall@5", "ndcg@10"} <= set(metrics)
    assert "eval: 100%" in out.err and "3/3" in out.err  # progress over the 3 prompts
    assert "Writing model shards" not in out.err
    # resume of a finished run is a no-op that still reports, and evaluates nothing again
    log = tmp_path / "grpo" / "metrics.jsonl"
    before = log.read_text()
    assert sum('"eval/' in x for x in before.splitlines()) == 1
    assert main(["train", "-c", str(tmp_path / "c.yaml"), "--resume"]) == 2  # beta differs
    assert "beta: 0.01 -> 0.001" in capsys.readouterr().err
    assert main(["train", "-c", str(tmp_path / "c.yaml"), "--resume", "grpo.beta=0.01"]) == 0
    assert log.read_text() == before
    # eval.disable_tqdm: no bar
    assert main(["eval", "-c", str(tmp_path / "c.yaml"), "--model",
                 str(tmp_path / "grpo" / "final"), "eval.disable_tqdm=true"]) == 0
    assert "eval:" not in capsys.readouterr().err
