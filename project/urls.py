from django.contrib import admin
from django.urls import include, path
from rest_framework.authtoken.views import ObtainAuthToken

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("project.monitoring.api.urls")),
    # Sign-in pages for the browsable API, and POST username + password -> {"token": key}.
    path("api/auth/", include("rest_framework.urls")),
    path("api/auth/token/", ObtainAuthToken.as_view(schema=None), name="api-token"),
]
