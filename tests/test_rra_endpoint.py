"""The OpenAI-compatible endpoint teacher against a real local HTTP server process
(tests/_rra_chat_server.py serving the tiny model on 127.0.0.1): retries after HTTP 503, the
API key from the named environment variable, the on-disk answer cache (a rerun sends
nothing), errors, and `rankgrpo rra` end to end through the endpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rankgrpo.records import load_records
from rankgrpo.redial import load_default_redial
from rankgrpo.rra.cli import main as rra_main
from rankgrpo.rra.teacher import (
    EndpointTeacher,
    TeacherError,
    conversation_of,
    recommend_prompt,
)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))  # tests/_rra_tiny.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from _rra_tiny import build_trained_teacher_model, save_teacher

    from rankgrpo.catalog import load_default_catalog

    recs = load_default_redial("train")[:10]
    model, tok = build_trained_teacher_model(recs, list(load_default_catalog("redial"))[:200]
                                             + [tuple(x) for r in recs for x in
                                                r["groundtruth_with_release_year"]],
                                             steps=30)
    folder = tmp_path_factory.mktemp("teacher")
    save_teacher(model, tok, folder)
    return folder


class Server:
    def __init__(self, model_dir, *args):
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
               "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH",
                                                                               "")])}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_rra_chat_server.py"), "--model-dir", str(model_dir),
             "--idle", "60", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env)
        line = self.proc.stdout.readline()  # blocks until the server listens (or dies)
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}/v1"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def server(model_dir):
    s = Server(model_dir, "--fail-first", "1", "--max-requests", "200")
    yield s
    s.stop()


def test_endpoint_round_trip_retry_key_and_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("RRA_TEST_KEY", "sekrit")
    recs = load_default_redial("train")[:3]
    convs = [conversation_of(r) for r in recs]
    t = EndpointTeacher(server.url, "tiny", cache_dir=tmp_path / "c", api_key_env="RRA_TEST_KEY",
                        max_new_tokens=30, backoff=0.05, concurrency=2)
    texts = t.recommend(convs, 20)
    assert len(texts) == 3 and all(isinstance(x, str) for x in texts)
    assert any("(" in x for x in texts)  # the taught list format came back over HTTP
    assert t.requests_sent == 4  # one 503 answer retried, then three answers
    cached = [json.loads(p.read_text()) for p in (tmp_path / "c").glob("*.json")]
    assert len(cached) == 3
    assert {c["request"]["messages"][0]["content"] for c in cached} == \
        {recommend_prompt(c, 20) for c in convs}
    # the key travelled as a bearer token (the server echoes the header back)
    body = t._post(t._body("hello", 5))
    assert body["auth"] == "Bearer sekrit"
    # a 4xx answer is not retried and says what went wrong
    bad = EndpointTeacher(server.url.replace("/v1", "/v2"), "tiny", cache_dir=tmp_path / "e",
                          backoff=0.01)
    with pytest.raises(TeacherError, match="HTTP 404.*no route"):
        bad.recommend(convs[:1], 20)
    assert bad.requests_sent == 1
    # a rerun re-asks nothing, even with the server gone
    server.stop()
    t2 = EndpointTeacher(server.url, "tiny", cache_dir=tmp_path / "c",
                         api_key_env="RRA_TEST_KEY", max_new_tokens=30, max_retries=0)
    assert t2.recommend(convs, 20) == texts
    assert t2.requests_sent == 0 and t2.cache_hits == 3
    # an answer not in the cache now fails clearly after the retries
    with pytest.raises(TeacherError, match="no answer after 2 tries"):
        EndpointTeacher(server.url, "tiny", cache_dir=tmp_path / "d", max_retries=1,
                        backoff=0.01).recommend(convs[:1], 20)


@pytest.mark.slow  # ~20-30 s on a busy 2-core machine; still runs in CI
def test_rra_cli_through_the_endpoint(model_dir, tmp_path):
    from rankgrpo.catalog import load_default_catalog, write_catalog_tsv
    from rankgrpo.records import groundtruth_pairs

    # a small catalog (the records' ground truth and 150 others) keeps the embedding cheap
    full = list(load_default_catalog("redial"))
    keep = set(full[:150])
    for split, n in (("train", 5), ("test", 3)):
        keep.update(it for r in load_default_redial(split)[:n] for it in groundtruth_pairs(r)
                    if it in set(full))
    write_catalog_tsv(keep, tmp_path / "catalog.tsv")
    s = Server(model_dir, "--max-requests", "200")
    args = ["teacher=endpoint", f"endpoint_url={s.url}", "endpoint_model=tiny",
            "max_records=5", "max_eval_records=3", "reflect_top=5", "max_new_tokens=30",
            "rate_max_new_tokens=30", "disable_tqdm=true", f"catalog={tmp_path / 'catalog.tsv'}",
            f"output_dir={tmp_path / 'out'}"]
    try:
        assert rra_main(args) == 0
    finally:
        s.stop()
    recs = load_records(tmp_path / "out" / "sft.jsonl")
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(recs) == man["train"]["written"] == 5
    assert man["teacher"]["kind"] == "endpoint"
    assert man["train"]["counts"]["reflect rated conversations"] == 5
    assert set(man["eval"]["ablation"]) == {"teacher", "remap", "remap+reflect", "full"}
    # with the server gone and no retries, a rerun must be answered wholly from the cache
    first = (tmp_path / "out" / "sft.jsonl").read_text()
    assert rra_main(args + ["max_retries=0"]) == 0
    assert (tmp_path / "out" / "sft.jsonl").read_text() == first
    man2 = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # every list (train + eval) and every rating request came from the cache
    rated = sum(m["counts"].get("reflect rated conversations", 0)
                for m in (man2["train"], man2["eval"]))
    assert man2["cache"]["answer_hits"] == 5 + 3 + rated
    assert rated == 5 + man2["eval"]["scored"]
