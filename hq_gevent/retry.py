"""The retry policy of a job (SPEC §10.2-10.3): its validation at push, and the wait before the next attempt."""
import random

from hq_gevent.invalid import Invalid

MAX_ATTEMPTS = 1000
MAX_BACKOFF = 86400.0
MAX_RETRY_AFTER = 86400.0
KEYS = ("maxAttempts", "minBackoff", "maxBackoff", "maxRetryDuration")


# A policy is a tuple (max_attempts, min_backoff, max_backoff, max_retry_duration). Most jobs
# share a handful of policies: one tuple object each keeps a million stored jobs small.
_shared = {}


def shared(policy):
    return _shared.setdefault(policy, policy)


def from_config(config):
    return shared((config.retry_max_attempts, float(config.retry_min_backoff),
                   float(config.retry_max_backoff), float(config.retry_max_duration)))


def _number(value, key):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(400, f"'retry.{key}' must be a number")
    return float(value)


def from_request(value, default):
    """The effective policy of a pushed `retry` object (absent keys take `default`)."""
    if value is None:
        return default
    if not isinstance(value, dict):
        raise Invalid(400, "'retry' must be an object")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise Invalid(400, f"'retry' has an unknown key '{unknown[0]}'")
    attempts, min_backoff, max_backoff, max_duration = default
    if "maxAttempts" in value:
        attempts = value["maxAttempts"]
        if isinstance(attempts, bool) or not isinstance(attempts, int):
            raise Invalid(400, "'retry.maxAttempts' must be an integer")
        if not 1 <= attempts <= MAX_ATTEMPTS:
            raise Invalid(422, f"'retry.maxAttempts' must be from 1 to {MAX_ATTEMPTS}")
    if "minBackoff" in value:
        min_backoff = _number(value["minBackoff"], "minBackoff")
        if not 0 < min_backoff <= MAX_BACKOFF:
            raise Invalid(422, f"'retry.minBackoff' must be > 0 and <= {MAX_BACKOFF:.0f}")
    if "maxBackoff" in value:
        max_backoff = _number(value["maxBackoff"], "maxBackoff")
        if not 0 < max_backoff <= MAX_BACKOFF:
            raise Invalid(422, f"'retry.maxBackoff' must be > 0 and <= {MAX_BACKOFF:.0f}")
    if max_backoff < min_backoff:
        raise Invalid(422, "'retry.maxBackoff' must be >= 'retry.minBackoff'")
    if "maxRetryDuration" in value:
        max_duration = _number(value["maxRetryDuration"], "maxRetryDuration")
        if max_duration < 0:
            raise Invalid(422, "'retry.maxRetryDuration' must be >= 0")
    return shared((attempts, min_backoff, max_backoff, max_duration))


_rendered = {}


def to_dict(policy):
    """The policy as the API shows it; one dict per distinct policy, shared (renderers only read it)."""
    rendered = _rendered.get(policy)
    if rendered is None:
        rendered = _rendered[policy] = dict(zip(KEYS, policy))
    return rendered


def next_wait(policy, attempts, status_code=None, retry_after=None, no_retry=False, first_started_ms=0, now_ms=0):
    """Seconds to wait before the attempt after `attempts` failed ones, or None when none follows."""
    max_attempts, min_backoff, max_backoff, max_duration = policy
    if no_retry or attempts >= max_attempts:
        return None
    ceiling = min(max_backoff, min_backoff * 2 ** min(attempts - 1, 64))
    wait = random.uniform(ceiling / 2, ceiling)  # "equal jitter": spreads a herd, keeps half the backoff
    if status_code in (429, 503) and retry_after is not None:
        wait = max(wait, min(retry_after, MAX_RETRY_AFTER))
    if max_duration and (now_ms + wait * 1000 - first_started_ms) > max_duration * 1000:
        return None
    return wait
