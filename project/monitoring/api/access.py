"""Who may read which rows: project membership, public projects, superusers.

The rule, for every list endpoint:

- a **superuser** reads every project;
- a **signed-in user** reads the projects they are a member of (``Project.members``) and the
  public ones (``Project.is_public``);
- an **anonymous** client reads the public projects only.

A list without a project filter is silently narrowed to what the caller may read (an
anonymous client gets the public rows, never a 401: a public project needs no account). A
client that names a project or station it may not read is told so instead of getting an empty
page it could mistake for "no data": 401 (with ``WWW-Authenticate: Token``) when anonymous,
because signing in may help; 403 when signed in, because it will not. An id that does not exist
is answered the same way as one that is private, so ids cannot be probed.

A detail (``/…/<id>/``) the caller may not read is answered as a missing one (:func:`refuse_row`):
404 when signed in — a 403 would confirm the row exists — and 401 when anonymous, as above.

Scoping is a subquery inside the list's own query, so it adds no query to a page.
"""

from __future__ import annotations

from django.db.models import Q, QuerySet
from rest_framework.exceptions import NotAuthenticated, NotFound, PermissionDenied

from project.monitoring.models import Deployment, Project


def readable_projects(user) -> QuerySet[Project] | None:
    """Projects ``user`` may read, as a lazy queryset; None means "every project"."""
    if user.is_superuser:
        return None
    if not user.is_authenticated:
        return Project.objects.filter(is_public=True)
    return Project.objects.filter(Q(is_public=True) | Q(pk__in=user.projects.values("pk")))


def scope(queryset: QuerySet, user, project_path: str) -> QuerySet:
    """``queryset`` narrowed to rows whose ``project_path`` (e.g. ``deployment__project``) is a
    project ``user`` may read."""
    projects = readable_projects(user)
    if projects is None:
        return queryset
    return queryset.filter(**{f"{project_path}__in": projects.values("pk")})


def refuse(user, what: str) -> None:
    """Raise the answer for a named row the caller may not read (see the module docstring)."""
    if not user.is_authenticated:
        raise NotAuthenticated(f"{what} is not public: authenticate to read it.")
    raise PermissionDenied(f"You are not a member of the project of {what}.")


def refuse_row(user, what: str) -> None:
    """Raise the answer for a detail the caller may not read or that does not exist: the same
    for both, so a private row's existence does not leak (see the module docstring)."""
    if not user.is_authenticated:
        raise NotAuthenticated(f"No public {what}: authenticate to read a private one.")
    raise NotFound(f"No {what} among the projects you may read.")


def require_project(user, project_id: int) -> None:
    """Refuse unless ``user`` may read project ``project_id`` (one query; none for superusers)."""
    projects = readable_projects(user)
    if projects is not None and not projects.filter(pk=project_id).exists():
        refuse(user, f"project {project_id}")


def require_deployment(user, deployment_id: int) -> None:
    """Refuse unless ``user`` may read station ``deployment_id``'s project."""
    projects = readable_projects(user)
    if projects is None:
        return
    readable = Deployment.objects.filter(pk=deployment_id, project__in=projects.values("pk"))
    if not readable.exists():
        refuse(user, f"deployment {deployment_id}")
