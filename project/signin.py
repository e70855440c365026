"""Sign-in views that stop password guessing: the token endpoint and the login forms.

/api/auth/token/, /api/auth/login/ (the browsable API's form) and /admin/login/ all check a
password; each attempt counts as a failure in ``project.throttling`` until it succeeds, and a
client that failed too often for one username is refused (429, ``Retry-After``) until the
window has passed, even with the right password. Kept apart from ``project.throttling``, which
DRF imports while it builds ``APIView`` (``DEFAULT_THROTTLE_CLASSES``) and so cannot import
views itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import wraps

from django.http import HttpRequest, HttpResponse
from django.utils.cache import add_never_cache_headers
from django.utils.html import format_html
from rest_framework import exceptions
from rest_framework.authtoken import views as authtoken_views

from project.throttling import (
    AnonRateThrottle,
    UserRateThrottle,
    begin_attempt,
    lockout_message,
)


class ObtainAuthToken(authtoken_views.ObtainAuthToken):
    """POST username + password -> ``{"token": key}``, refused (429) after too many failures."""

    throttle_classes = (AnonRateThrottle, UserRateThrottle)

    def post(self, request, *args, **kwargs):
        data = request.data if isinstance(request.data, Mapping) else {}
        attempt = begin_attempt(request, data.get("username"))
        if attempt.refused:
            # DRF adds "Expected available in N seconds." and the Retry-After header.
            raise exceptions.Throttled(wait=attempt.wait, detail=lockout_message())
        response = super().post(request, *args, **kwargs)  # wrong credentials raise a 400
        attempt.succeeded()
        return response


def limit_failed_logins(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A login form view (Django's ``LoginView``, the admin's) that refuses (429) a client and
    username after too many failures, right password or not, until the window has passed.

    The form redirects on success and shows itself again on failure.
    """

    @wraps(view)
    def limited(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if request.method != "POST":
            return view(request, *args, **kwargs)
        attempt = begin_attempt(request, request.POST.get("username"))
        if attempt.refused:
            return _locked_out(request, attempt.wait)
        response = view(request, *args, **kwargs)
        if response.status_code in (301, 302, 303) and request.user.is_authenticated:
            attempt.succeeded()
        return response

    return limited


def _locked_out(request: HttpRequest, wait: float) -> HttpResponse:
    body = format_html(
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Sign-in paused'
        '</title></head><body><h1>Sign-in paused</h1><p class="errornote">{}</p>'
        '<p><a href="{}">Back to the sign-in page</a></p></body></html>',
        lockout_message(wait),
        request.get_full_path(),
    )
    response = HttpResponse(body, status=429)
    response["Retry-After"] = str(math.ceil(wait))
    add_never_cache_headers(response)
    return response
