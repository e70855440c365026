"""Routes of the public API and its documentation (mounted under ``/api/``).

Explicit paths rather than a ``DefaultRouter`` of viewsets: the list views are plain DRF
generic views that the bench subclasses (``bench.views``), so they stay ``as_view()``-able.
The router's pieces are kept — its ``APIRootView`` at ``/api/v2/`` and its URL names
(``api-<model>-list`` / ``api-<model>-detail``) — so the API reads as a router's would.
"""

from django.urls import path
from drf_spectacular.views import (
    SpectacularAPIView,
    SpectacularRedocView,
    SpectacularSwaggerView,
)

from project.monitoring.api.base import APIRootView
from project.monitoring.api.views import (
    CollectionDetail,
    CollectionList,
    DeploymentDetail,
    DeploymentList,
    EventDetail,
    EventList,
    ProjectDetail,
    ProjectList,
    TaxonList,
)

#: Root name -> URL name, as a router would list them at /api/v2/.
V2_ROOT = {
    "captures/collections": "api-collection-list",
    "deployments": "api-deployment-list",
    "events": "api-event-list",
    "projects": "api-project-list",
    "taxa": "api-taxon-list",
}
#: What /api/ links to: the v2 root, the schema and the two renderings of it, the token form.
API_INDEX = {
    "v2": "api-root",
    "schema": "api-schema",
    "docs": "api-docs",
    "redoc": "api-redoc",
    "token": "api-token",
}

urlpatterns = [
    path("", APIRootView.as_view(api_root_dict=API_INDEX), name="api-index"),
    path("v2/", APIRootView.as_view(api_root_dict=V2_ROOT), name="api-root"),
    path("v2/captures/collections/", CollectionList.as_view(), name="api-collection-list"),
    path(
        "v2/captures/collections/<str:id>/",
        CollectionDetail.as_view(),
        name="api-collection-detail",
    ),
    path("v2/deployments/", DeploymentList.as_view(), name="api-deployment-list"),
    path("v2/deployments/<str:id>/", DeploymentDetail.as_view(), name="api-deployment-detail"),
    path("v2/events/", EventList.as_view(), name="api-event-list"),
    path("v2/events/<str:id>/", EventDetail.as_view(), name="api-event-detail"),
    path("v2/projects/", ProjectList.as_view(), name="api-project-list"),
    path("v2/projects/<str:id>/", ProjectDetail.as_view(), name="api-project-detail"),
    path("v2/taxa/", TaxonList.as_view(), name="api-taxon-list"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="api-schema"), name="api-redoc"),
]
