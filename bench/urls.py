"""URLconf the bench installs while it measures: production routes plus two bench-only lists.

Every path is requested through ``django.test.Client``, so all three go through the same
middleware, URL resolution, view, pagination and rendering; the cached path is the production
route itself (``/api/v2/captures/collections/``), resolved from ``project.urls`` unchanged.
"""

from django.urls import path

from bench.views import CountDistinctCollectionList, StoredCollectionList, SubqueryCollectionList
from project.urls import urlpatterns as production

#: Approach name -> path of its list endpoint.
PATHS = {
    "cached": "/api/v2/captures/collections/",
    "subquery": "/bench/collections/subqueries/",
    "count_distinct": "/bench/collections/count-distinct/",
}
#: The production list reading stored columns and flags only (before exact reads).
STORED = "/bench/collections/stored/"

urlpatterns = [
    path("bench/collections/subqueries/", SubqueryCollectionList.as_view()),
    path("bench/collections/count-distinct/", CountDistinctCollectionList.as_view()),
    path("bench/collections/stored/", StoredCollectionList.as_view()),
    *production,
]
