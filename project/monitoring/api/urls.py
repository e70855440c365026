"""Routes of the public API and its OpenAPI schema (mounted under ``/api/``)."""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from project.monitoring.api.views import CollectionList, DeploymentList, EventList

urlpatterns = [
    path("v2/captures/collections/", CollectionList.as_view(), name="api-collection-list"),
    path("v2/deployments/", DeploymentList.as_view(), name="api-deployment-list"),
    path("v2/events/", EventList.as_view(), name="api-event-list"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]
