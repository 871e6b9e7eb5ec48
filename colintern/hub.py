"""Hugging Face Hub reachability: fail in a second, not after half a minute of retries.

On a machine without a route to the Hub, transformers and datasets retry each request with back-off (about 25 s)
before raising. `prefer_offline_when_unreachable()` checks the endpoint once with a short timeout and, when it is
unreachable, switches the process to offline mode: cached files and local folders still load, anything else fails at
once with colintern's explanation.
"""

from __future__ import annotations

import logging
import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    """True when a TCP connection to the Hub endpoint ($HF_ENDPOINT), or to the HTTPS proxy that requests would go
    through, opens within `timeout` seconds."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)),
                 None)
    if proxy and not _bypasses_proxy(endpoint.hostname or ""):
        endpoint = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _bypasses_proxy(host: str) -> bool:
    no_proxy = os.environ.get("NO_PROXY", os.environ.get("no_proxy", ""))
    return any(host == entry.strip().lstrip(".") or host.endswith("." + entry.strip().lstrip("."))
               for entry in no_proxy.split(",") if entry.strip())


def set_offline_mode() -> None:
    """Offline mode for this process, also for libraries that already read the environment.

    huggingface_hub (2.4) reads HF_HUB_OFFLINE once, at import, into `constants.HF_HUB_OFFLINE` (what its
    `is_offline_mode()` returns) and offers no setter; datasets copies it into its own config. Hence the patches."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - a dependency of transformers
        pass
    try:
        import datasets.config as datasets_config

        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass


def prefer_offline_when_unreachable() -> bool:
    """Switch to offline mode when the Hub cannot be reached; returns True when working offline."""
    if offline_requested():
        set_offline_mode()
        return True
    if hub_reachable():
        return False
    logger.info("The Hugging Face Hub is unreachable from this machine: working offline (local and cached files).")
    set_offline_mode()
    return True
