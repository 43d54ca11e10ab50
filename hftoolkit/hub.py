"""Publish a run directory to the Hugging Face Hub: model card, the exact folder uploaded, and a retried push.

Usage: hftoolkit push runs/example --repo-id your-name/gpt2-xsum [--private] [--revision REV] [--dry-run]

The only module that talks to huggingface_hub. What gets uploaded is staged first into a folder (a temp dir
beside the run, or RUN_DIR/hub_dry_run/ with --dry-run), so a dry run shows byte-for-byte what a push sends and
a failed push never touches the run directory:

    config.json, model.safetensors, tokenizer files, generation_config.json, hftoolkit.json   (RUN_DIR/model/*)
    README.md                                  the model card (hftoolkit.card.build_model_card)
    hftoolkit/config.yaml, results.json        the resolved recipe and the scores
    hftoolkit/predictions_sample.jsonl         the first 50 evaluation predictions
    hftoolkit/plots/*.png, hftoolkit/report.md when report.py wrote them

checkpoints/ is never uploaded.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2  # huggingface_hub 2.x is built on httpx2 (not requests, not httpx): its transport errors
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
from huggingface_hub.utils import get_token, set_client_factory, validate_repo_id

from hftoolkit import __version__
from hftoolkit.card import build_model_card
from hftoolkit.errors import UserError

logger = logging.getLogger(__name__)

DRY_RUN_DIR = "hub_dry_run"
PREDICTIONS_SAMPLE_LINES = 50

# Retried: the network and the server's bad moments. Not retried: 4xx, which no amount of waiting fixes.
_TRANSIENT_ERRORS = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)
_TRANSIENT_STATUS = {408, 429}
_AUTH_STATUS = {401, 403, 404}

# Tokens shorter than this are not searched for in files: a short string would match innocent bytes.
_MIN_SECRET_LEN = 8


# Long on purpose: what a push sends is assembled here group by group (model, card, run records, plots), in one
# place a reader can check against the docstring of this module.
def stage_upload(
    run_dir: str | os.PathLike,
    dest_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    token: str | None = None,
    merge_adapters: bool = False,
) -> Path:
    """Write exactly the folder a push uploads into `dest_dir` (must be empty or absent) and return it.

    A LoRA run's adapter goes up as it is when its base is a Hub model (adapter_config.json names the Hub id); a
    base the Hub cannot resolve (built with model.init, or a local folder) needs `merge_adapters`, which uploads the
    merged weights instead.

    The Hub token (`token`, else HF_TOKEN / the login cache) is replaced by REDACTED (valid in YAML and JSON,
    unlike '***', a YAML alias) in the text files written here; if it turns up in any other staged file the push is refused rather than leak it.
    """
    run_path = _check_run_dir(run_dir)
    dest = Path(dest_dir)
    if dest.exists() and any(dest.iterdir()):
        raise UserError(f"staging folder {dest} is not empty: remove it or choose another folder")
    dest.mkdir(parents=True, exist_ok=True)
    secret = token if token is not None else get_token()
    secret = secret if secret and len(secret) >= _MIN_SECRET_LEN else None

    from hftoolkit.lora import upload_model_dir

    model_dir = upload_model_dir(run_path, dest, repo_id, merge_adapters)
    for src in sorted(model_dir.rglob("*")):
        rel = src.relative_to(model_dir)
        # Temp files of an interrupted save (".x.tmp") and an old README are not part of the model.
        if (
            not src.is_file()
            or any(part.startswith(".") for part in rel.parts)
            or rel.as_posix() == "README.md"
        ):
            continue
        _link_or_copy(src, dest / rel)

    texts = {"README.md": str(build_model_card(run_path, repo_id))}
    for name in ("config.yaml", "results.json", "report.md"):
        if (run_path / name).is_file():
            texts[f"hftoolkit/{name}"] = (run_path / name).read_text(encoding="utf-8")
    if "hftoolkit/config.yaml" in texts:  # where the run lived on this machine means nothing on the Hub
        texts["hftoolkit/config.yaml"] = texts["hftoolkit/config.yaml"].replace(
            str(run_path.resolve()), run_path.name
        )
    predictions = run_path / "predictions.jsonl"
    if predictions.is_file():
        with predictions.open(encoding="utf-8") as f:
            head = list(itertools.islice(f, PREDICTIONS_SAMPLE_LINES))
        texts["hftoolkit/predictions_sample.jsonl"] = "".join(head)
    for rel, text in texts.items():
        if secret and secret in text:
            logger.warning("redacted the Hub token from %s before staging it", rel)
            text = text.replace(secret, "REDACTED")
        _write_new(dest / rel, text.encode("utf-8"))
    for png in sorted((run_path / "plots").glob("*.png")):
        _link_or_copy(png, dest / "hftoolkit" / "plots" / png.name)

    if secret:
        _refuse_if_leaking(dest, secret, run_path)
    return dest


def _refuse_if_leaking(dest: Path, secret: str, run_path: Path) -> None:
    """The token in a staged file that was not redacted (weights, tokenizer files): remove the staging, refuse."""
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        if _file_contains(path, secret.encode("utf-8")):
            rel = path.relative_to(dest).as_posix()
            shutil.rmtree(dest, ignore_errors=True)
            raise UserError(
                f"{rel} (staged from {run_path}) contains your Hub token: remove it from that file before "
                "pushing; nothing was uploaded"
            )


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link when possible (multi-GB weights cost no space or time), else copy. Never written through."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_new(path: Path, data: bytes) -> None:
    # Unlink first: `path` may be a hard link into the run directory, which must not change.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def _file_contains(path: Path, needle: bytes) -> bool:
    if path.stat().st_size < len(needle):
        return False
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(needle) != -1


def _check_run_dir(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(
            f"run directory {path} does not exist: pass the output_dir of a finished training run"
        )
    if not (path / "model").is_dir():
        raise UserError(
            f"{path}/model/ is missing: {path} has no saved model to push (let the training run finish)"
        )
    from hftoolkit.lora import is_adapter_dir

    if not (path / "model" / "config.json").is_file() and not is_adapter_dir(path / "model"):
        raise UserError(f"{path}/model/config.json is missing: {path}/model is not a save_pretrained folder")
    return path


def _check_repo_id(repo_id: Any) -> None:
    try:
        if not isinstance(repo_id, str) or not repo_id:
            raise HFValidationError("empty")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(
            f"--repo-id {repo_id!r} is not a Hub repo id: use NAME or NAMESPACE/NAME "
            "(letters, digits, '-', '_', '.'; no '--' or '..'), e.g. your-name/gpt2-xsum"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Push


# Long on purpose: each HTTP outcome of an attempt (refused, rejected, transient, last try) is decided where
# the attempt is made, so the retry policy reads in one place.
def push_run(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    max_retries: int = 4,
    backoff_s: float = 1.0,
    endpoint: str | None = None,
    timeout_s: float | None = 60.0,
    merge_adapters: bool = False,
) -> str:
    """Create (or reuse) `repo_id` and upload the staged run in one commit; return the commit URL.

    dry_run: stage into RUN_DIR/hub_dry_run/ and return that path; nothing is sent.
    token: None uses HF_TOKEN or the `hf auth login` cache. endpoint: None uses $HF_ENDPOINT, else the Hub.
    Network errors, timeouts (`timeout_s` per HTTP request) and 5xx/408/429 are retried `max_retries` times
    with exponential backoff from `backoff_s`; 401/403/404 fail at once.
    """
    run_path = _check_run_dir(run_dir)
    _check_repo_id(repo_id)
    if dry_run:
        return str(_dry_run(run_path, repo_id, token, merge_adapters))

    secret = token or get_token()
    retry_command = f"hftoolkit push {run_path} --repo-id {repo_id}"
    retry_command += " --private" if private else ""
    retry_command += f" --revision {revision}" if revision else ""
    if constants.is_offline_mode():
        raise UserError(
            f"HF_HUB_OFFLINE is set, so nothing can be pushed: unset it, then run: {retry_command}"
        )

    api = HfApi(
        endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None,
        token=token,
        library_name="hftoolkit",
        library_version=__version__,
    )
    attempts = max(1, max_retries + 1)
    with _staging_dir(run_path) as tmp:
        staged = stage_upload(
            run_path, Path(tmp) / "upload", repo_id=repo_id, token=secret, merge_adapters=merge_adapters
        )
        for attempt in range(1, attempts + 1):
            try:
                with _request_timeout(timeout_s):
                    url = _push_once(api, staged, repo_id, private, revision, commit_message, run_path.name)
                logger.info("pushed %s to %s", run_path, _scrub(url, secret))
                return url
            except OfflineModeIsEnabled:
                raise UserError(
                    f"HF_HUB_OFFLINE is set, so nothing can be pushed: unset it, then run: {retry_command}"
                ) from None
            except (HfHubHTTPError, *_TRANSIENT_ERRORS) as err:
                reason = _scrub(_short_reason(err, timeout_s), secret)
                status = _status(err)
                if status in _AUTH_STATUS:
                    raise UserError(
                        f"push of {run_path} to {repo_id} was refused ({reason}): check HF_TOKEN or run "
                        "`hf auth login`, and that the token can write to that namespace"
                    ) from None
                if status is not None and status < 500 and status not in _TRANSIENT_STATUS:
                    raise UserError(
                        f"push of {run_path} to {repo_id} was rejected ({reason}); fix that, then run: {retry_command}"
                    ) from None
                if attempt == attempts:
                    raise UserError(
                        f"push of {run_path} to {repo_id} failed after {attempts} attempts ({reason}); "
                        f"retry with: {retry_command}"
                    ) from None
                delay = backoff_s * 2 ** (attempt - 1)
                logger.warning(
                    "push attempt %d/%d failed (%s); retrying in %.1fs", attempt, attempts, reason, delay
                )
                time.sleep(delay)
    raise AssertionError("unreachable")


def _dry_run(run_path: Path, repo_id: str, token: str | None, merge_adapters: bool = False) -> Path:
    """Stage into RUN_DIR/hub_dry_run/: next to its final place, then swapped in, so an interrupted dry run
    leaves the previous one intact."""
    target = run_path / DRY_RUN_DIR
    staging = run_path / f".{DRY_RUN_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    merged = (
        staging.parent / f".{staging.name}.merged"
    )  # where merge_adapters saves (hard-linked into staging)
    try:
        stage_upload(run_path, staging, repo_id=repo_id, token=token, merge_adapters=merge_adapters)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(merged, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


@contextlib.contextmanager
def _staging_dir(run_path: Path) -> Iterator[str]:
    """A temp dir next to the run (same filesystem: model files are hard-linked, not copied into a possibly
    small /tmp), outside it (the run dir is never modified); the system temp dir if the parent is read-only."""
    try:
        context = tempfile.TemporaryDirectory(prefix=f".{run_path.name}.hftoolkit-push-", dir=run_path.parent)
    except OSError:
        context = tempfile.TemporaryDirectory(prefix="hftoolkit-push-")
    with context as tmp:
        yield tmp


def _push_once(api, staged, repo_id, private, revision, commit_message, run_name) -> str:
    # Every step is idempotent, so a retry after a half-done attempt is safe: the repo and branch may exist,
    # and re-uploading identical files is a no-op commit on the Hub.
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    full_id = repo_url.repo_id  # "name" alone resolves to "your-user/name"
    if revision and revision != constants.DEFAULT_REVISION:
        api.create_branch(full_id, branch=revision, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=staged,
        repo_id=full_id,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"Upload run {run_name} with hftoolkit",
    )
    return str(info.commit_url)


@contextlib.contextmanager
def _request_timeout(timeout_s: float | None) -> Iterator[None]:
    """Give huggingface_hub's shared HTTP client a timeout for the duration of the push.

    huggingface_hub 2.x builds its httpx2 client with `timeout=None` and the API calls (create_repo, preupload,
    commit) pass none, so a stalled server hangs forever; HF_HUB_ETAG_TIMEOUT/HF_HUB_DOWNLOAD_TIMEOUT only cover
    downloads. We wrap whatever client factory is installed (keeping a user's proxy settings) and restore it.
    """
    if timeout_s is None:
        yield
        return
    from huggingface_hub.utils import _http

    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def factory() -> httpx2.Client:
        client = previous()
        client.timeout = httpx2.Timeout(timeout_s)
        return client

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(previous)


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None) if isinstance(err, HfHubHTTPError) else None
    return getattr(response, "status_code", None)


def _short_reason(err: Exception, timeout_s: float | None) -> str:
    status = _status(err)
    if status is not None:
        detail = getattr(err, "server_message", None) or ""
        detail = detail.strip().splitlines()[0][:200] if detail.strip() else ""
        return f"HTTP {status}" + (f": {detail}" if detail else "")
    if isinstance(err, httpx2.TimeoutException):
        return f"{type(err).__name__}: no answer within {timeout_s}s"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text
