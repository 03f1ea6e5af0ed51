"""Model names: `[host[:port]/][namespace/]model[:tag]`.

The first component is a host when it has a dot or a colon or is `localhost` (Docker's rule),
so `127.0.0.1:5055/tiny` and `example.com/team/tiny:v1` both parse. Namespace and model follow
the OCI distribution path-component grammar, the tag the OCI tag grammar, so a name can never
hold `..`, a slash in the wrong place or anything that would escape the store root.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from .errors import InvalidName

DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
# Ollama's default registry, so short names map to the same manifest paths in both tools.
FALLBACK_HOST = "registry.ollama.ai"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]{1,5})?")


# Component folders, tensor names and file names become path segments (`component/tensor`,
# export's files): letters, digits, '_', '.', '-', not starting with '.', no '..'.
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def is_path_segment(text: str) -> bool:
    return bool(_SEGMENT.fullmatch(text)) and ".." not in text


def default_host() -> str:
    return os.environ.get("ZREG_DEFAULT_HOST") or FALLBACK_HOST


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @property
    def repository(self) -> str:
        """The OCI repository path on the registry (`namespace/model`)."""
        return f"{self.namespace}/{self.model}"

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def short(self) -> str:
        """The name as a user would type it: default host and namespace left out."""
        prefix = ""
        if self.host != default_host():
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        return f"{prefix}{self.model}:{self.tag}"

    def with_tag(self, tag: str) -> "ModelName":
        _check(_TAG, tag, "tag", tag)
        return ModelName(self.host, self.namespace, self.model, tag)


def _check(pattern: re.Pattern, value: str, what: str, name: str) -> None:
    if not pattern.fullmatch(value):
        raise InvalidName(f"invalid model name {name!r}: {what} {value!r} is not allowed "
                          f"({_RULES[what]})")


_RULES = {
    "host": "letters, digits, dots and dashes, optional :port",
    "namespace": "lowercase letters and digits, separated by '.', '_', '__' or '-'",
    "model": "lowercase letters and digits, separated by '.', '_', '__' or '-'",
    "tag": "up to 128 of letters, digits, '_', '.', '-', not starting with '.' or '-'",
}


def parse_name(text: str) -> ModelName:
    """Parse and validate a model name, filling in the defaults."""
    if not text or text != text.strip():
        raise InvalidName(f"invalid model name {text!r}: empty or surrounded by spaces")
    if "@" in text:
        raise InvalidName(f"invalid model name {text!r}: digest references are not local names")
    parts = text.split("/")
    host = default_host()
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        host = parts.pop(0)
        _check(_HOST, host, "host", text)
    if len(parts) > 2:
        raise InvalidName(f"invalid model name {text!r}: expected [host/][namespace/]model[:tag], "
                          f"got {len(parts)} path components after the host")
    last = parts[-1]
    tag = DEFAULT_TAG
    if ":" in last:
        last, tag = last.rsplit(":", 1)
    namespace = parts[0] if len(parts) == 2 else DEFAULT_NAMESPACE
    _check(_COMPONENT, namespace, "namespace", text)
    _check(_COMPONENT, last, "model", text)
    _check(_TAG, tag, "tag", text)
    return ModelName(host, namespace, last, tag)


def name_from_folder(folder_name: str) -> str:
    """A valid default model name from a folder name (`Z-Image-Turbo` -> `z-image-turbo`)."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", folder_name.lower()).strip("-")
    return cleaned or "model"


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1, with or without a :port."""
    hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    hostname = hostname.strip("[]")
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False
