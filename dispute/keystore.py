"""Where the operator CLI gets its key: an encrypted keystore file or an environment variable.

Never a command-line argument: arguments end up in shell history and in ``ps`` output for
every user of the machine.  Two sources, in this order:

1. ``--keystore FILE``: eth-account's encrypted JSON keystore (the format geth, clef and
   MetaMask export).  The password comes from ``OPTICHANNEL_KEYSTORE_PASSWORD`` or, when
   stdin is a terminal, from an interactive prompt that does not echo.
2. ``OPTICHANNEL_PRIVATE_KEY``: the 32-byte key in hex (``0x`` optional) — for automation
   that already keeps secrets in its environment (a systemd credential, a CI secret).

Every failure is a :class:`KeySourceError` whose message names what to fix and never
contains the key or the password.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from eth_account import Account

from channel.errors import ChannelError
from channel.keys import Signer

PRIVATE_KEY_ENV = "OPTICHANNEL_PRIVATE_KEY"
PASSWORD_ENV = "OPTICHANNEL_KEYSTORE_PASSWORD"

Prompt = Callable[[str], str]


class KeySourceError(ChannelError):
    """No usable key: base of the errors below."""


class NoKey(KeySourceError):
    """Neither a keystore file nor the environment variable was given."""


class NoPassword(KeySourceError):
    """A keystore needs a password and there is no variable and no terminal to ask."""


class BadKeystore(KeySourceError):
    """The keystore file is missing, unreadable, not JSON, or not a keystore."""


class WrongPassword(KeySourceError):
    """The password does not decrypt the keystore (its MAC does not match)."""


class BadPrivateKey(KeySourceError):
    """``OPTICHANNEL_PRIVATE_KEY`` is not 32 bytes of hex, or not a valid secp256k1 key."""


def _interactive() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdin
        return False


def password_from(
    env: Mapping[str, str],
    *,
    what: str,
    prompt: Prompt | None = None,
    confirm: bool = False,
) -> str:
    """The keystore password: ``OPTICHANNEL_KEYSTORE_PASSWORD``, else a prompt when stdin
    is a terminal (``prompt`` replaces ``getpass.getpass``; ``confirm`` asks twice).

    Raises ``NoPassword`` when neither is available or the two entries differ.
    """
    if PASSWORD_ENV in env:
        return env[PASSWORD_ENV]
    if prompt is None:
        if not _interactive():
            raise NoPassword(f"{what} needs a password: set {PASSWORD_ENV} or run from a terminal")
        prompt = getpass.getpass
    first = prompt(f"Password for {what}: ")
    if confirm and prompt(f"Repeat the password for {what}: ") != first:
        raise NoPassword("the two passwords differ")
    return first


def _parse_hex_key(text: str) -> bytes:
    digits = text.strip()
    if digits[:2] in ("0x", "0X"):
        digits = digits[2:]
    try:
        secret = bytes.fromhex(digits)
    except ValueError:
        raise BadPrivateKey(f"{PRIVATE_KEY_ENV} is not hex") from None
    if len(secret) != 32:
        raise BadPrivateKey(f"{PRIVATE_KEY_ENV} must be 32 bytes (64 hex digits)")
    return secret


def _check_secret(secret: bytes, where: str) -> bytes:
    try:
        Signer.from_bytes(secret)
    except Exception:  # coincurve raises ValueError or its own errors for an invalid scalar
        raise BadPrivateKey(f"{where} is not a valid secp256k1 private key") from None
    return secret


def read_keystore(path: str | Path) -> dict[str, Any]:
    """The parsed keystore JSON; raises ``BadKeystore`` if it cannot be read or is not one."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadKeystore(f"cannot read keystore {p}: {exc.strerror or exc}") from None
    try:
        obj = json.loads(text)
    except ValueError:
        raise BadKeystore(f"keystore {p} is not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("crypto", obj.get("Crypto")), dict):
        raise BadKeystore(f"{p} is not an encrypted keystore (no 'crypto' section)")
    return obj


def load_key(
    keystore_path: str | Path | None,
    env: Mapping[str, str],
    *,
    prompt: Prompt | None = None,
) -> bytes:
    """The operator's 32-byte private key, from ``keystore_path`` or the environment.

    Raises ``NoKey``, ``BadKeystore``, ``NoPassword``, ``WrongPassword`` or
    ``BadPrivateKey`` (all ``KeySourceError``).
    """
    if keystore_path is not None:
        keystore = read_keystore(keystore_path)
        password = password_from(env, what=f"keystore {keystore_path}", prompt=prompt)
        try:
            secret = bytes(Account.decrypt(keystore, password))
        except ValueError as exc:  # eth-keyfile: "MAC mismatch"; unsupported kdf/cipher
            if "mac" in str(exc).lower():
                raise WrongPassword(f"wrong password for keystore {keystore_path}") from None
            raise BadKeystore(f"cannot decrypt keystore {keystore_path}: {exc}") from None
        except (KeyError, TypeError):
            raise BadKeystore(f"keystore {keystore_path} is malformed") from None
        return _check_secret(secret, f"the key in {keystore_path}")
    if env.get(PRIVATE_KEY_ENV):
        return _check_secret(_parse_hex_key(env[PRIVATE_KEY_ENV]), PRIVATE_KEY_ENV)
    raise NoKey(
        f"no key: pass --keystore FILE (password in {PASSWORD_ENV} or at the prompt) "
        f"or set {PRIVATE_KEY_ENV}"
    )


def create_keystore(
    secret: bytes,
    password: str,
    path: str | Path,
    *,
    kdf: Literal["scrypt", "pbkdf2"] = "scrypt",
    iterations: int | None = None,
) -> bytes:
    """Encrypt ``secret`` with ``password`` into a new keystore file at ``path`` (mode
    0600; an existing file is never overwritten) and return the key's 20-byte address.

    ``kdf``/``iterations`` are eth-account's (scrypt with its default cost unless told:
    tests lower it).  Raises ``BadPrivateKey`` for an invalid key and ``OSError`` when
    the file exists or cannot be written.
    """
    _check_secret(secret, "the key")
    encrypted = Account.encrypt(secret, password, kdf=kdf, iterations=iterations)
    data = json.dumps(encrypted).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask said
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return Signer.from_bytes(secret).address
