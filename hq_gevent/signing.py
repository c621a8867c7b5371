"""Signed worker requests (SPEC §11): the Standard Webhooks headers, one signature per secret.

A worker app verifies them with any Standard Webhooks library: HMAC-SHA256 keyed with the
base64-decoded secret over "<webhook-id>.<webhook-timestamp>.<body>". Several secrets give
several signatures, so a secret can be rotated without a window where requests fail to verify.
"""
import base64
import binascii
import hmac
import time

PREFIX = "whsec_"
# Job headers may not set these: a job could otherwise forge or blank the signature.
HEADER_NAMES = ("webhook-id", "webhook-timestamp", "webhook-signature")


class SigningError(ValueError):
    """A configured secret is not a usable Standard Webhooks secret; the message says which (by
    position, never the secret itself)."""


def decode_secret(secret, position=1):
    """The HMAC key of a `whsec_<base64>` secret."""
    if not isinstance(secret, str) or not secret.startswith(PREFIX):
        raise SigningError(f'signing secret #{position} must look like "whsec_<base64>"')
    encoded = secret[len(PREFIX):]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SigningError(f"signing secret #{position} is not valid base64 after \"whsec_\"") from None
    if not key:
        raise SigningError(f"signing secret #{position} is empty")
    return key


def signature(key, msg_id, timestamp, body):
    """The base64 HMAC-SHA256 of "<id>.<timestamp>.<body>" (body in bytes)."""
    # ~5 us per secret here, nearly all of it OpenSSL's HMAC: ~2% of a job's server CPU.
    return base64.b64encode(hmac.digest(key, f"{msg_id}.{timestamp}.".encode() + body, "sha256")).decode()


class Signer:
    def __init__(self, secrets):
        self.keys = [decode_secret(secret, i) for i, secret in enumerate(secrets, 1)]

    def __bool__(self):
        return bool(self.keys)

    def headers(self, msg_id, body, now=None):
        """[(name, value)] for a request whose body is `body` (bytes)."""
        timestamp = int(time.time() if now is None else now)
        signatures = " ".join("v1," + signature(key, msg_id, timestamp, body) for key in self.keys)
        return [("webhook-id", str(msg_id)), ("webhook-timestamp", str(timestamp)), ("webhook-signature", signatures)]

