from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from project import health
from project.signin import ObtainAuthToken, limit_failed_logins

urlpatterns = [
    # The admin's login form, refusing a client and username after too many failed attempts
    # (``project.throttling``); listed before the admin's own URLs so that it answers first.
    path("admin/login/", limit_failed_logins(admin.site.login), name="admin-login"),
    path("admin/", admin.site.urls),
    path("api/", include("project.monitoring.api.urls")),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics, name="metrics"),
    # Sign-in pages for the browsable API (login limited like the admin's), and POST username +
    # password -> {"token": key}, refused with a 429 after too many failed attempts.
    path(
        "api/auth/login/",
        limit_failed_logins(
            auth_views.LoginView.as_view(template_name="rest_framework/login.html")
        ),
        name="api-login",
    ),
    path("api/auth/", include("rest_framework.urls")),
    path("api/auth/token/", ObtainAuthToken.as_view(schema=None), name="api-token"),
]
