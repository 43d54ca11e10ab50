"""hub.py against a local stand-in Hub (tests/hub_server.py): card, staging, push, retries, secrets.

Usage: HF_HUB_OFFLINE=1 pytest tests/test_hub.py
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, constants, metadata_load

from hftoolkit import hub
from hftoolkit.errors import UserError
from tests.hub_server import StandInHub

TOKEN = "hf_standin_secret_token_0123456789"
REPO = "alice/tiny-summarizer"


@pytest.fixture
def stand_in(monkeypatch):
    """A stand-in Hub that accepts TOKEN only, reached through HF_ENDPOINT like a user's private Hub."""
    server = StandInHub(accepted_tokens={TOKEN}).start()
    # The suite runs with HF_HUB_OFFLINE=1, which huggingface_hub reads once at import into this constant and
    # enforces in its HTTP client; the stand-in is local, so lift it for these tests only.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.stop()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tree_hash(root: Path) -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in tree(root).items()}


def push(run_dir, **kwargs) -> str:
    kwargs = {"token": TOKEN, "backoff_s": 0.01, **kwargs}
    return hub.push_run(run_dir, kwargs.pop("repo_id", REPO), **kwargs)


EXPECTED_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "hftoolkit.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "hftoolkit/config.yaml",
    "hftoolkit/results.json",
    "hftoolkit/predictions_sample.jsonl",
}


def test_push_creates_private_repo_with_expected_files(fake_run_dir, stand_in):
    """If this fails, `hftoolkit push` creates the wrong repo (visibility, namespace) or uploads a different
    layout than the one documented in hub.py (model files at the root, run records under hftoolkit/)."""
    url = push(fake_run_dir, private=True)

    (create,) = stand_in.requests_to("create")
    assert json.loads(create.body) == {
        "name": "tiny-summarizer",
        "organization": "alice",
        "visibility": "private",
        "type": "model",
    }
    assert stand_in.repos[REPO].private is True
    files = stand_in.files(REPO)
    assert set(files) == EXPECTED_FILES
    assert url == f"{stand_in.url}/{REPO}/commit/{stand_in.repos[REPO].heads['main']}"
    assert files["model.safetensors"] == (fake_run_dir / "model" / "model.safetensors").read_bytes()
    assert files["hftoolkit/config.yaml"] == (fake_run_dir / "config.yaml").read_bytes()
    sample = files["hftoolkit/predictions_sample.jsonl"].decode().splitlines()
    assert len(sample) == 50  # of 60
    assert sample == (fake_run_dir / "predictions.jsonl").read_text().splitlines()[:50]


def test_plots_and_report_are_uploaded_when_present(fake_run_dir, stand_in):
    """If this fails, the curves and report.md written by report.py never reach the Hub repo."""
    (fake_run_dir / "plots").mkdir()
    (fake_run_dir / "plots" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n stand-in for a real plot")
    (fake_run_dir / "plots" / "notes.txt").write_text("not a plot")
    (fake_run_dir / "report.md").write_text("# Run report\n")
    push(fake_run_dir)
    files = stand_in.files(REPO)
    assert set(files) == EXPECTED_FILES | {"hftoolkit/plots/loss.png", "hftoolkit/report.md"}
    assert files["hftoolkit/plots/loss.png"] == (fake_run_dir / "plots" / "loss.png").read_bytes()
    assert files["hftoolkit/report.md"] == b"# Run report\n"


def test_checkpoints_are_never_uploaded(fake_run_dir, stand_in):
    """If this fails, optimizer states from checkpoints/ (large, private to the run) get published."""
    push(fake_run_dir)
    assert not [p for p in stand_in.files(REPO) if "checkpoint" in p or "optimizer" in p]
    for request in stand_in.requests:
        assert b"optimizer state must never be uploaded" not in request.body


def test_readme_metadata_parses_and_model_index_has_final_scores(fake_run_dir, stand_in, tmp_path):
    """If this fails, the Hub would reject or misread the card: model-index must carry the fine-tuned scores,
    and the body must show baseline vs fine-tuned."""
    from tests.conftest import FAKE_RUN_BASELINE, FAKE_RUN_FINAL

    push(fake_run_dir)
    readme = tmp_path / "README.md"
    readme.write_bytes(stand_in.files(REPO)["README.md"])

    meta = metadata_load(readme)
    assert meta["base_model"] == "openai-community/gpt2"
    assert meta["datasets"] == ["EdinburghNLP/xsum"]
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["library_name"] == "transformers"
    assert {"hftoolkit", "summarization", "gpt2"} <= set(meta["tags"])

    card = ModelCard.load(readme)
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == pytest.approx(FAKE_RUN_FINAL)
    assert {r.task_type for r in card.data.eval_results} == {"summarization"}
    assert {(r.dataset_type, r.dataset_split) for r in card.data.eval_results} == {
        ("EdinburghNLP/xsum", "validation")
    }
    assert card.data.model_name == "tiny-summarizer"

    rouge_l = f"| rougeL | {FAKE_RUN_BASELINE['rougeL']:.2f} | {FAKE_RUN_FINAL['rougeL']:.2f} | +23.50 |"
    assert rouge_l in card.text
    assert "{document}\nTL;DR:" in card.text  # the prompt template, fenced
    assert f'pipeline("text-generation", model="{REPO}")' in card.text
    assert "Context window: 64 tokens" in card.text


def test_card_from_scratch_eval_only_translation(fake_run_dir):
    """If this fails, cards for models built with model.init claim a fake base_model, translation cards lose
    their languages (or carry invalid codes), or an eval-only run (no baseline) crashes the card."""
    cfg = yaml.safe_load((fake_run_dir / "config.yaml").read_text())
    cfg["task"] = "translation"
    cfg["model"]["init"] = {"preset": "tiny", "tokenizer": "gpt2"}
    cfg["data"].update(dataset_name=None, source_lang="en", target_lang="de")
    (fake_run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (fake_run_dir / "results.json").write_text(json.dumps({"final": {"bleu": 12.5, "chrf": 40.0}}))
    generation = json.loads((fake_run_dir / "model" / "hftoolkit.json").read_text())
    generation["task"] = "translation"
    (fake_run_dir / "model" / "hftoolkit.json").write_text(json.dumps(generation))

    card = hub.build_model_card(fake_run_dir)
    data = card.data.to_dict()
    assert data.get("base_model") is None
    assert data.get("datasets") is None
    assert data["language"] == ["en", "de"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {"bleu": 12.5, "chrf": 40.0}
    assert {r.task_type for r in card.data.eval_results} == {"translation"}
    assert "| bleu | 12.50 |" in card.text
    assert "trained from scratch" in card.text


def test_usage_snippet_in_card_runs(fake_run_dir, capsys):
    """If this fails, the copy-paste usage code in every published card is broken (wrong pipeline arguments,
    template not applied, stop strings not handled)."""
    card = hub.build_model_card(fake_run_dir)
    (snippet,) = re.findall(r"```python\n(.*?)\n```", card.text, re.DOTALL)
    assert 'model="REPO_ID"' in snippet
    exec(snippet.replace("REPO_ID", str(fake_run_dir / "model")), {})
    printed = capsys.readouterr().out
    assert printed.endswith("\n") and "\n" not in printed[:-1]  # one line: cut at the "\n" stop string


def test_token_reaches_the_server_only_in_the_authorization_header(fake_run_dir, stand_in):
    """If this fails, the Hub token leaks into a published file or a request body (e.g. a recipe that
    recorded it), instead of only authenticating the requests."""
    config = fake_run_dir / "config.yaml"
    config.write_text(config.read_text() + f"hub_token_note: {TOKEN}\n")
    push(fake_run_dir)

    secret = TOKEN.encode()
    for path, data in stand_in.files(REPO).items():
        assert secret not in data, path
    pushed_config = yaml.safe_load(stand_in.files(REPO)["hftoolkit/config.yaml"])  # still a loadable recipe
    assert pushed_config["hub_token_note"] == "REDACTED"
    assert stand_in.requests
    for request in stand_in.requests:
        assert secret not in request.body, request.path
        assert secret not in request.path.encode()
        for name, value in request.headers.items():
            if name.lower() == "authorization":
                assert value == f"Bearer {TOKEN}"
            else:
                assert TOKEN not in value, name


def test_token_inside_a_model_file_refuses_the_push(fake_run_dir, stand_in):
    """If this fails, a token that ended up in a model file (which we must not rewrite) would be published."""
    tok_config = fake_run_dir / "model" / "tokenizer_config.json"
    tok_config.write_text(tok_config.read_text().replace("{", '{"oops": "' + TOKEN + '",', 1))
    with pytest.raises(UserError) as info:
        push(fake_run_dir)
    assert "tokenizer_config.json" in str(info.value)
    assert TOKEN not in str(info.value)
    assert stand_in.requests == []


def test_dry_run_folder_is_exactly_what_the_hub_receives(fake_run_dir, stand_in):
    """If this fails, `--dry-run` shows users something other than what a real push publishes."""
    dry = Path(push(fake_run_dir, dry_run=True))
    assert dry == fake_run_dir / "hub_dry_run"
    assert stand_in.requests == []  # a dry run talks to nobody
    push(fake_run_dir)
    assert tree(dry) == stand_in.files(REPO)


def test_server_error_is_retried_then_succeeds(fake_run_dir, stand_in):
    """If this fails, one Hub hiccup (HTTP 500) aborts a push that a retry would have completed."""
    stand_in.fail_next("create", 500, times=2)
    push(fake_run_dir)
    assert [r.status for r in stand_in.requests_to("create")] == [500, 500, 200]
    assert set(stand_in.files(REPO)) == EXPECTED_FILES


def test_unauthorized_fails_at_once_without_leaking_the_token(fake_run_dir, stand_in):
    """If this fails, a bad token is retried for minutes, or the error is a traceback / shows the token."""
    wrong = "hf_wrong_token_abcdefghijklmnop"
    with pytest.raises(UserError) as info:
        push(fake_run_dir, token=wrong, max_retries=4, backoff_s=5.0)  # a retry would take > 5 s
    message = str(info.value)
    assert "\n" not in message
    assert "401" in message and "HF_TOKEN" in message and "hf auth login" in message
    assert wrong not in message and TOKEN not in message
    assert len(stand_in.requests_to("create")) == 1
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_timeout_is_retried_then_fails_with_the_retry_command(fake_run_dir, stand_in):
    """If this fails, a stalled Hub hangs the push forever (huggingface_hub sets no timeout on API calls), or
    the final error does not tell the user how to resume."""
    from huggingface_hub.utils import _http

    factory_before = _http._GLOBAL_CLIENT_FACTORY
    stand_in.delay_next("create", 5.0, times=2)
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        push(fake_run_dir, timeout_s=0.3, max_retries=1, private=True)
    assert time.monotonic() - start < 4.0
    message = str(info.value)
    assert "failed after 2 attempts" in message and "Timeout" in message
    assert message.endswith(f"retry with: hftoolkit push {fake_run_dir} --repo-id {REPO} --private")
    assert len(stand_in.requests_to("create")) == 2
    assert _http._GLOBAL_CLIENT_FACTORY is factory_before  # our timeout does not outlive the push


def test_failed_push_leaves_the_run_dir_unchanged(fake_run_dir, stand_in):
    """If this fails, a push that dies mid-way (here: the commit is refused) leaves staging debris or modified
    files in the run directory."""
    before = tree_hash(fake_run_dir)
    stand_in.fail_next("commit", 403)
    with pytest.raises(UserError, match="403"):
        push(fake_run_dir)
    assert len(stand_in.requests_to("commit")) == 1
    assert tree_hash(fake_run_dir) == before
    assert [p.name for p in fake_run_dir.parent.iterdir()] == ["run"]  # the staging dir beside it is gone


def test_revision_pushes_to_a_branch(fake_run_dir, stand_in):
    """If this fails, `--revision` overwrites main instead of publishing to the named branch."""
    push(fake_run_dir, revision="experiment-1")
    assert set(stand_in.files(REPO, "experiment-1")) == EXPECTED_FILES
    assert stand_in.files(REPO, "main") == {}


def test_missing_model_is_a_clean_user_error(fake_run_dir, stand_in):
    """If this fails, pushing a run that has no saved model gives a traceback (or creates an empty repo)."""
    import shutil

    shutil.rmtree(fake_run_dir / "model")
    with pytest.raises(UserError, match=r"model/ is missing"):
        push(fake_run_dir)
    assert stand_in.requests == []


@pytest.mark.parametrize("bad", ["a/b/c", "has space", "double--dash", ""])
def test_bad_repo_id_is_a_clean_user_error(fake_run_dir, bad):
    """If this fails, a malformed --repo-id reaches the network layer and fails with an obscure message."""
    with pytest.raises(UserError, match="repo-id"):
        hub.push_run(fake_run_dir, bad, token=TOKEN)


def test_offline_mode_is_a_clean_user_error(fake_run_dir, monkeypatch):
    """If this fails, HF_HUB_OFFLINE=1 surfaces as huggingface_hub's OfflineModeIsEnabled traceback."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        hub.push_run(fake_run_dir, REPO, token=TOKEN)
