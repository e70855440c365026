from django.contrib import admin
from django.urls import include, path

from project import health

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("project.monitoring.api.urls")),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", health.metrics, name="metrics"),
]
