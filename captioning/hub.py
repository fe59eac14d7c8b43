"""Is the Hugging Face Hub reachable? Asked once per process, answered within seconds.

Without this, a download on a machine with no network spends minutes in `huggingface_hub`'s
retries (five per file) before failing. Every command that may fetch from the Hub asks
`hub_offline()` first and, when the Hub is out of reach, loads with `local_files_only=True`:
cached files still work without any network call, and anything missing fails at once with
`offline_error`'s one line naming what to pass instead. No torch here (captioning's rule).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import urllib.error
import urllib.request

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "yes", "true"}


class HubUnreachableError(OSError):
    """The Hub cannot be reached and the file is not cached; the message says what to pass."""


def endpoint() -> str:
    """The Hub address `huggingface_hub` uses (`HF_ENDPOINT` overrides it)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline_by_setting() -> bool:
    """`HF_HUB_OFFLINE=1` (or the older `TRANSFORMERS_OFFLINE=1`): never touch the network."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _head(url: str, timeout: float, answer: list[bool]) -> None:
    request = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            answer.append(True)
    except urllib.error.HTTPError:
        answer.append(True)  # it answered, even if with an error status
    except (urllib.error.URLError, OSError, ValueError):
        answer.append(False)


def _answers(url: str, timeout: float) -> bool:
    """True if `url` answers HTTP at all within `timeout` seconds (any status counts).

    Asked in a daemon thread: urllib's timeout does not cover the DNS look-up, which on a
    machine without network can block for many seconds on its own.
    """
    answer: list[bool] = []
    thread = threading.Thread(target=_head, args=(url, timeout, answer), daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


@functools.lru_cache(maxsize=4)
def _reachable(url: str) -> bool:
    """Probed once per process and address; says so once when it fails."""
    if _answers(url, PROBE_TIMEOUT_S):
        return True
    logger.warning("the Hugging Face Hub (%s) cannot be reached: using cached files only", url)
    return False


def hub_offline() -> bool:
    """True when downloads must not be tried: offline by setting, or the Hub did not answer one
    short probe (made once per process and endpoint). Logs once when the probe fails."""
    return offline_by_setting() or not _reachable(endpoint())


def offline_error(what: str, instead: str) -> HubUnreachableError:
    """The one-line error for a Hub file that is neither cached nor reachable."""
    why = "HF_HUB_OFFLINE is set" if offline_by_setting() else f"the Hub ({endpoint()}) cannot be reached"
    return HubUnreachableError(
        f"{what} is not in the Hugging Face cache and {why}; pass {instead}, or connect once to "
        "download it (later runs use the cache; HF_HUB_OFFLINE=1 skips the network check)"
    )


def hf_download(repo_id: str, filename: str, what: str, instead: str, **kwargs) -> str:
    """`hf_hub_download` from the cache when possible, from the Hub only when it is reachable.

    Raises HubUnreachableError (one line, naming `instead`) when neither works offline.
    """
    from huggingface_hub import hf_hub_download

    # Exception types for missing cache entries differ across huggingface_hub versions.
    try:
        return hf_hub_download(repo_id, filename, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001, S110 - not cached: download below
        pass
    if hub_offline():
        raise offline_error(what, instead)
    logger.info("downloading %s (%s/%s) into the Hugging Face cache (first use)", what, repo_id, filename)
    return hf_hub_download(repo_id, filename, **kwargs)
