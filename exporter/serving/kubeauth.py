"""--web.kubernetes-auth: who may read /metrics, decided by the API server, the way
kube-rbac-proxy does it for node_exporter. A request must carry a bearer token; a TokenReview
says whose it is, a SubjectAccessReview whether that user may `get` the non-resource URL of the
telemetry path. Both answers are cached for `web.kubernetes_auth_cache` per token, so a scrape
every 15 s costs no API call most of the time.

401 without a token or with one the API server does not know, 403 when the user may not read
the path, 503 when the API server cannot answer (fail closed: logged once per outage, counted,
never cached)."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .. import logs

log = logs.get("auth")

# tokens remembered at once: a few scrapers, a few tokens each as they are rotated
CACHE_SIZE = 1024
# an answer the API server has not given in this long is an outage (connect, read)
API_TIMEOUT = (3.0, 5.0)

ALLOWED, UNAUTHENTICATED, FORBIDDEN, UNAVAILABLE = "allowed", "unauthenticated", "forbidden", \
    "unavailable"
STATUS = {ALLOWED: "200 OK", UNAUTHENTICATED: "401 Unauthorized", FORBIDDEN: "403 Forbidden",
          UNAVAILABLE: "503 Service Unavailable"}


@dataclass(frozen=True)
class Verdict:
    outcome: str            # ALLOWED, UNAUTHENTICATED, FORBIDDEN or UNAVAILABLE
    reason: str             # for the response body and the debug log; never the token

    @property
    def status(self) -> str:
        return STATUS[self.outcome]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KubernetesAuth(Collector):
    """Decides requests for `path` from their Authorization header. Thread-safe: the web
    server's connection threads call allows() at once."""

    def __init__(self, api: Any, path: str, cache_seconds: float) -> None:
        from kubernetes import client  # only with Kubernetes auth on (see k8s/connection)

        self._client = client
        self._authn = client.AuthenticationV1Api(api)
        self._authz = client.AuthorizationV1Api(api)
        self.path = path
        self._cache: TTLCache[bytes, Verdict] = TTLCache(CACHE_SIZE, cache_seconds)
        self._lock = threading.Lock()
        self._reviews: Counter[str] = Counter()     # API calls made, by outcome
        self._answers: Counter[str] = Counter()     # requests decided, by outcome
        self._outage = False

    def decide(self, authorization: str | None) -> Verdict:
        token = bearer_token(authorization)
        if token is None:
            return self._answered(Verdict(UNAUTHENTICATED, "a bearer token is required"))
        # the cache key is a digest: the exporter keeps no token it was shown
        key = hashlib.sha256(token.encode()).digest()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return self._answered(cached)
        verdict = self._review(token)
        if verdict.outcome != UNAVAILABLE:
            with self._lock:
                self._cache[key] = verdict
        return self._answered(verdict)

    def _answered(self, verdict: Verdict) -> Verdict:
        with self._lock:
            self._answers[verdict.outcome] += 1
        return verdict

    def _review(self, token: str) -> Verdict:
        client = self._client
        try:
            review = self._authn.create_token_review(
                client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token)),
                _request_timeout=API_TIMEOUT)
            status = review.status
            if not status or not status.authenticated or not status.user:
                return self._reviewed(Verdict(UNAUTHENTICATED, "the token is not valid"))
            user = status.user
            access = self._authz.create_subject_access_review(
                client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
                    user=user.username, uid=user.uid, groups=user.groups, extra=user.extra,
                    non_resource_attributes=client.V1NonResourceAttributes(
                        path=self.path, verb="get"))),
                _request_timeout=API_TIMEOUT)
        except Exception as e:      # unreachable, timed out, 5xx, our own RBAC missing
            with self._lock:
                self._reviews[UNAVAILABLE] += 1
                first = not self._outage
                self._outage = True
            if first:
                log.error("cannot check scrape credentials with the API server: /metrics "
                          "answers 503 until it can", extra={"error": _short(e)})
            return Verdict(UNAVAILABLE, "the API server cannot check credentials now")
        if not access.status or not access.status.allowed:
            return self._reviewed(Verdict(
                FORBIDDEN, f'user "{user.username}" may not get {self.path}'))
        return self._reviewed(Verdict(ALLOWED, f'user "{user.username}"'))

    def _reviewed(self, verdict: Verdict) -> Verdict:
        with self._lock:
            self._reviews[verdict.outcome] += 1
            recovered, self._outage = self._outage, False
        if recovered:
            log.info("the API server checks scrape credentials again")
        return verdict

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            answers, reviews = dict(self._answers), dict(self._reviews)
        decided = CounterMetricFamily(
            "ebpf_net_exporter_auth_requests",
            "Requests for the metrics decided by Kubernetes authentication, by outcome "
            "(allowed, unauthenticated, forbidden, unavailable: the API server could not "
            "answer, and the request got 503).", labels=["outcome"])
        reviewed = CounterMetricFamily(
            "ebpf_net_exporter_auth_reviews",
            "Token and access reviews asked of the API server (a cached answer asks none), "
            "by outcome; unavailable counts the ones it could not answer.", labels=["outcome"])
        for outcome in STATUS:
            decided.add_metric([outcome], answers.get(outcome, 0))
            reviewed.add_metric([outcome], reviews.get(outcome, 0))
        yield decided
        yield reviewed


def _short(error: BaseException) -> str:
    """An API error in one line: its status and reason, not the response body and headers."""
    status, reason = getattr(error, "status", None), getattr(error, "reason", None)
    if status:
        return f"{status} {reason or ''}".strip()
    return " ".join(str(error).split())[:200]
