"""The environment for a job log, with secrets masked: `python -I distrain/tools/env_mask.py`.

slurm/common.sh prints it at the start of every job. Values are masked by the variable's name
(KEY, TOKEN, SECRET, PASSWORD, CREDENTIAL, AUTH, PRIVATE, ...) and, whatever the name, by
their shape, on every line of a multi-line value: a PEM block hides the whole value; URL
passwords (postgres://user:***@host), `password=...`-style pairs, `Bearer ...` and long
random-looking tokens are replaced by ***. Standard library only, so the job's Python runs it
with -I (no script folder on sys.path, nothing of distrain or torch imported).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Iterator, Mapping

MASK = "***"
# Variable names that hold secrets (matched anywhere in the upper-cased name)
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASS|PWD|CRED|AUTH|PRIVATE|COOKIE|SESSION|SALT|SIGNATURE|DSN|CONN_STR")
# Names that match the words above but are well-known and hold no secret
NOT_SECRET = {"PWD", "OLDPWD", "TOKENIZERS_PARALLELISM", "SSH_AUTH_SOCK"}
_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*-----")
# scheme://userinfo@ : the userinfo runs to the last @ of the word (a password may hold a raw @ or /)
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(\S*)@")
# password=..., "token": "...", ?X-Amz-Signature=..., Password=...; (the value up to a separator)
_PAIR = re.compile(
    r"(?i)([\w.-]*(?:key|token|secret|pass|pwd|credential|signature|auth|private|\bsig\b)[\w.-]*"
    r"[\"']?\s*(?:=|:\s|:(?=[\"']))\s*[\"']?)(?!(?:bearer|basic|token)\s)([^\s&;,\"']+)"
)
_SCHEME_AUTH = re.compile(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]{8,}")
_LONG = re.compile(r"[A-Za-z0-9+/_-]{32,}={0,2}")
# Tokens with a known issuer's prefix, of any length: Hugging Face, GitHub, GitLab, OpenAI-style, Slack, AWS, JWT
_KNOWN = re.compile(r"(?<![A-Za-z0-9])(?:hf_|gh[pousr]_|github_pat_|glpat-|sk-|xox[abprs]-|AKIA|ASIA|eyJ)[\w.-]{16,}")
_ID = re.compile(r"(?:[A-Za-z]+-)*[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}(?:/\d+)*")  # GPU/MIG UUIDs


def secret_name(name: str) -> bool:
    return name not in NOT_SECRET and bool(SECRET_NAME.search(name.upper()))


def _entropy(token: str) -> float:
    return -sum(n / len(token) * math.log2(n / len(token)) for n in (token.count(c) for c in set(token)))


def _random_looking(token: str) -> bool:
    """A long token that reads like a key (hex, or base64 mixing cases and digits), not a path or words."""
    if token.startswith("/") or _ID.fullmatch(token):
        return False
    if re.fullmatch(r"[0-9a-fA-F]+", token):
        return _entropy(token) >= 3.0
    mixed = re.search(r"[a-z]", token) and re.search(r"[A-Z]", token) and re.search(r"\d", token)
    return bool(mixed) and _entropy(token) >= 3.5


def _userinfo(match: re.Match) -> str:
    scheme, info = match.group(1), match.group(2)
    user, colon, _ = info.partition(":")
    return f"{scheme}{user}:{MASK}@" if colon and "/" not in user and "@" not in user else f"{scheme}{MASK}@"


def mask_line(line: str) -> str:
    """One line of a value with every secret-shaped part replaced by ***."""
    line = _URL_USERINFO.sub(_userinfo, line)
    line = _SCHEME_AUTH.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", line)
    line = _PAIR.sub(lambda m: m.group(1) + MASK, line)
    line = _KNOWN.sub(MASK, line)
    return _LONG.sub(lambda m: MASK if _random_looking(m.group(0)) else m.group(0), line)


def mask_value(name: str, value: str) -> str:
    """The value as a log may show it: *** for a secret name or a PEM block, else every line masked."""
    if secret_name(name) or _PEM.search(value):
        lines = value.count("\n") + 1
        return MASK + (f" ({lines} lines)" if lines > 1 else "")
    return "\n".join(mask_line(line) for line in value.split("\n"))


def masked_environment(env: Mapping[str, str]) -> Iterator[str]:
    """`NAME=value` lines, sorted by name, as printenv would print them but masked.

    Carriage returns and other control characters are escaped so that a value cannot rewrite
    earlier lines of the log on a terminal.
    """
    for name in sorted(env):
        value = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\x{ord(m.group(0)):02x}", mask_value(name, env[name]))
        yield f"{name}={value}"


def main() -> int:
    for line in masked_environment(os.environ):
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
