"""Checkpoints pushed to the Hub while training goes on (hub.strategy: checkpoint | every_save).

The loop hands each saved checkpoint to `CheckpointUploads.submit`, which hard-links it into a staging folder
(rotation may delete the original before the upload runs) and queues it; one worker thread uploads, so the step loop
never waits on the network. A failed upload is retried with backoff, then reported (log line and results.json
"hub_uploads"), and never stops training. `close` waits for the queue before the final push of the published model.

    checkpoint   the repo's last-checkpoint/ holds the newest checkpoint (replaced at each save)
    every_save   every checkpoint under checkpoints/step-NNNNNNN/
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

from hftoolkit import __version__
from hftoolkit.hub import _TRANSIENT_ERRORS, _link_or_copy, _request_timeout, _scrub, _short_reason

logger = logging.getLogger(__name__)


# Retries of one upload (after the first attempt), the first wait (doubled each time) and the per-request timeout.
MAX_RETRIES, BACKOFF_S, TIMEOUT_S = 4, 1.0, 60.0


class CheckpointUploads:
    def __init__(self, hub_cfg, run_dir: Path):
        from huggingface_hub import HfApi
        from huggingface_hub.utils import get_token

        self.cfg, self.max_retries, self.backoff_s, self.timeout_s = (
            hub_cfg,
            MAX_RETRIES,
            BACKOFF_S,
            TIMEOUT_S,
        )
        self.api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, library_name="hftoolkit",
                         library_version=__version__)  # fmt: skip
        self.secret = get_token()
        self.staging = Path(
            tempfile.mkdtemp(prefix=f".{run_dir.name}.hftoolkit-uploads-", dir=run_dir.parent)
        )
        self.uploaded: list[str] = []
        self.failed: list[dict] = []
        self.queue: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._work, name="hftoolkit-uploads", daemon=True)
        self.worker.start()

    def submit(self, checkpoint: Path) -> None:
        staged = self.staging / checkpoint.name
        for src in checkpoint.rglob("*"):
            if src.is_file():
                _link_or_copy(src, staged / src.relative_to(checkpoint))
        self.queue.put(staged)

    def close(self) -> dict:
        """Wait for the queued uploads; {"uploaded": [...], "failed": [{"checkpoint", "reason"}]}."""
        self.queue.put(None)
        self.worker.join()
        shutil.rmtree(self.staging, ignore_errors=True)
        return {"strategy": self.cfg.strategy, "uploaded": self.uploaded, "failed": self.failed}

    def _work(self) -> None:
        while (staged := self.queue.get()) is not None:
            try:
                self._upload(staged)
            except Exception as err:  # never let a surprise end the worker: later checkpoints still upload
                self.failed.append(
                    {"checkpoint": staged.name, "reason": f"{type(err).__name__}: {err}"[:300]}
                )
                logger.warning(
                    "upload of %s failed (%s); training goes on", staged.name, self.failed[-1]["reason"]
                )
            finally:
                shutil.rmtree(staged, ignore_errors=True)

    def _upload(self, staged: Path) -> None:
        from huggingface_hub.errors import HfHubHTTPError

        last = self.cfg.strategy == "checkpoint"
        path_in_repo = "last-checkpoint" if last else f"checkpoints/{staged.name}"
        for attempt in range(1, self.max_retries + 2):
            try:
                with _request_timeout(self.timeout_s):
                    repo = self.api.create_repo(self.cfg.repo_id, private=self.cfg.private, exist_ok=True)
                    self.api.upload_folder(
                        folder_path=staged,
                        repo_id=repo.repo_id,
                        path_in_repo=path_in_repo,
                        revision=self.cfg.revision,
                        # last-checkpoint/: every checkpoint has the same file names, so each upload replaces all.
                        commit_message=f"Training checkpoint {staged.name} (hftoolkit)",
                    )
                self.uploaded.append(staged.name)
                return
            except (HfHubHTTPError, *_TRANSIENT_ERRORS) as err:
                reason = _scrub(_short_reason(err, self.timeout_s), self.secret)
                if attempt > self.max_retries:
                    logger.warning("upload of %s to %s failed (%s); training goes on", staged.name,
                                   self.cfg.repo_id, reason)  # fmt: skip
                    self.failed.append({"checkpoint": staged.name, "reason": reason})
                    return
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
