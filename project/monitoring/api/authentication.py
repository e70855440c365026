"""Token authentication that never mistakes a credential it cannot read for no credential.

DRF's ``TokenAuthentication`` reads ``Authorization: Token <key>`` and passes over any other
scheme, so a client sending ``Authorization: Bearer <key>`` (what most HTTP clients and OAuth
habits produce) was served as anonymous: a 200 with public rows only, which looks like a
permissions bug. Here ``Bearer`` is accepted as a synonym of ``Token`` (the key is the same),
and any other scheme is a 401 that names the one to use.
"""

from __future__ import annotations

from rest_framework import authentication, exceptions

#: Schemes read as a token, lower-cased.
TOKEN_SCHEMES = (b"token", b"bearer")


class TokenAuthentication(authentication.TokenAuthentication):
    def authenticate(self, request):
        parts = authentication.get_authorization_header(request).split()
        if not parts:
            return None
        if parts[0].lower() not in TOKEN_SCHEMES:
            scheme = parts[0].decode(errors="replace")
            raise exceptions.AuthenticationFailed(
                f"Unsupported authorization scheme {scheme!r}: send 'Authorization: Token <key>'"
                " (or 'Bearer <key>'); a key comes from POST /api/auth/token/."
            )
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "Invalid token header: send 'Authorization: Token <key>', one key, no spaces."
            )
        try:
            key = parts[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed("Invalid token header.") from None
        return self.authenticate_credentials(key)
