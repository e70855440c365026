from django.contrib import admin
from django.urls import include, path
from rest_framework.authtoken.views import ObtainAuthToken

from project import health

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("project.monitoring.api.urls")),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics, name="metrics"),
    # Sign-in pages for the browsable API, and POST username + password -> {"token": key}.
    path("api/auth/", include("rest_framework.urls")),
    path("api/auth/token/", ObtainAuthToken.as_view(schema=None), name="api-token"),
]
