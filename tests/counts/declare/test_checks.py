"""Every declaration the engine accepts is kept exact, or refused at check time saying what to do.

Refused declarations are built on throwaway models (``isolate_apps``: nothing reaches the
project's app registry, graph or migrations) and checked the way ``manage.py check`` checks
them: each refusal is a system check error with a ``counts.E0xx`` id, naming the model and
field, what was given, why, and what to write instead; graph building leaves them out instead
of failing, and :func:`counts.declare.refusals.refuse_unsupported` stops trigger migrations
while any is refused. The last tests are about instances in memory, on the real domain models:
``refresh_counts()`` and an ORM insert (a clone) that starts from 0.
"""

from __future__ import annotations

import uuid

import pytest
from django.apps import apps
from django.contrib.contenttypes.fields import GenericForeignKey, GenericRelation
from django.contrib.contenttypes.models import ContentType
from django.core import checks
from django.core.management import call_command
from django.db import models
from django.db.models import Exists, F, OuterRef, Q
from django.test.utils import isolate_apps

from counts.base.errors import DeclarationError
from counts.declare.checks import CHECKS, declaration_errors
from counts.declare.field import CachedCountField, cached_count_fields
from counts.declare.refusals import RefusedDeclarations, refuse_unsupported, refused
from counts.declare.resolve import resolve, resolve_all
from project.monitoring.models import Deployment, SourceImageCollection
from tests.paths import ROOT
from tests.truth import assert_all_counts_exact, cached, drain_all, truth

#: The engine's test app: throwaway models take its label inside an isolated registry.
APP = "tests.engine_app"
LABEL = "counts_testapp"


class Throwaway(models.Model):
    """Base of the models declared inside ``isolate_apps``: the engine test app's label."""

    class Meta:
        abstract = True
        app_label = LABEL

    def __str__(self) -> str:
        return f"{type(self).__name__} #{self.pk}"


def errors_of(model) -> list[checks.Error]:
    """What ``manage.py check`` says about ``model``'s counts."""
    return [e for e in model.check() if e.id and e.id.startswith("counts.")]


def only_error(model) -> checks.Error:
    found = errors_of(model)
    assert len(found) == 1, [f"{e.id} {e.msg}" for e in found]
    error = found[0]
    assert isinstance(error, checks.Error) and error.hint
    return error


def shelf_and_books(shelf_count=None, **book_fields):
    """``Shelf ─< Book``: the smallest world a count needs (call inside ``isolate_apps``)."""

    class Shelf(Throwaway):
        name = models.CharField(max_length=20)
        n = shelf_count or CachedCountField("books")

    book = {
        "__module__": __name__,
        "shelf": models.ForeignKey(Shelf, models.CASCADE, related_name="books"),
        "pages": models.IntegerField(default=0),
        **book_fields,
    }
    return Shelf, type("Book", (Throwaway,), book)


# -- the project itself -----------------------------------------------------------------


def test_the_project_declares_nothing_refused():
    assert refused() == []
    refuse_unsupported()  # does not raise
    issues = checks.run_checks(tags=[checks.Tags.models])
    assert [e for e in issues if (e.id or "").startswith("counts.")] == []


def test_every_check_id_is_documented_in_the_field_and_the_readme():

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Adding a count", 1)[1].split("\n## ", 1)[0]
    for check_id in CHECKS:
        assert check_id in CachedCountField.__doc__, check_id
        assert check_id in section, check_id


# -- one refusal at a time --------------------------------------------------------------


@isolate_apps(APP)
def test_e001_a_count_needs_a_path():
    shelf, _ = shelf_and_books(CachedCountField())
    error = only_error(shelf)
    assert error.id == "counts.E001"
    assert error.obj is shelf._meta.get_field("n")
    assert "needs a path to the rows it counts" in error.msg and "got nothing" in error.msg
    assert "relations of counts_testapp.Shelf: books" in error.hint


@isolate_apps(APP)
def test_e002_a_dict_filter_names_the_field_and_the_q_to_write():
    shelf, _ = shelf_and_books(CachedCountField("books", filter={"books__pages__gte": 300}))
    error = only_error(shelf)
    assert error.id == "counts.E002"
    assert str(error.obj) == "counts_testapp.Shelf.n"
    assert error.msg == "filter= takes a Q object; got dict {'books__pages__gte': 300}."
    assert error.hint == "Write filter=Q(books__pages__gte=300)."
    # Nothing raised at import: the field kept what it was given.
    assert shelf._meta.get_field("n").count_filter == {"books__pages__gte": 300}


@isolate_apps(APP)
def test_e003_exclude_is_refused_with_the_negated_filter_to_write():
    shelf, _ = shelf_and_books(
        CachedCountField("books", filter=Q(books__pages__gt=0), exclude=Q(books__pages__gte=300))
    )
    error = only_error(shelf)
    assert error.id == "counts.E003"
    assert "takes no exclude=" in error.msg and "Q(books__pages__gte=300)" in error.msg
    assert error.hint == (
        "Negate the condition in filter=: filter=Q(books__pages__gt=0) & ~Q(books__pages__gte=300)."
    )


@isolate_apps(APP)
def test_e003_exclude_alone_becomes_a_negated_filter():
    shelf, _ = shelf_and_books(CachedCountField("books", exclude=Q(books__pages__gte=300)))
    assert (
        only_error(shelf).hint
        == "Negate the condition in filter=: filter=~Q(books__pages__gte=300)."
    )


@isolate_apps(APP)
def test_e004_an_accessor_name_lists_the_relation_names_to_use():
    class Author(Throwaway):
        n = CachedCountField("post_set")

    class Post(Throwaway):
        author = models.ForeignKey(Author, models.CASCADE)  # no related_name: query name "post"

    error = only_error(Author)
    assert error.id == "counts.E004"
    assert "'post_set' is not a field of counts_testapp.Author" in error.msg
    assert "lookups and paths name the relation 'post'" in error.msg
    assert error.hint.endswith("relations of counts_testapp.Author: post.")


@isolate_apps(APP)
def test_e004_a_name_deeper_in_the_path_names_the_model_it_was_looked_up_on():
    shelf, _ = shelf_and_books(CachedCountField("books__isnull"))
    error = only_error(shelf)
    assert error.id == "counts.E004"
    assert "'isnull' is not a field of counts_testapp.Book" in error.msg
    assert "filter=Q(...)" in error.hint and "relations of counts_testapp.Book: shelf" in error.hint


@isolate_apps(APP)
def test_e005_a_path_ending_at_a_column_says_sums_are_not_supported():
    class Parent(Throwaway):
        total = CachedCountField("children__value")

    class Child(Throwaway):
        parent = models.ForeignKey(Parent, models.CASCADE, related_name="children")
        value = models.IntegerField()

    error = only_error(Parent)
    assert error.id == "counts.E005"
    assert error.msg.startswith(
        "path 'children__value' must end at a relation, not at the column"
        " counts_testapp.Child.value"
    )
    assert "sums, averages and other aggregates of a column are not supported" in error.msg
    assert "CachedCountField('children', filter=Q(children__value__gt=0))" in error.hint


@isolate_apps(APP)
def test_e006_a_path_of_forward_keys_only_has_nothing_to_count():
    _, book = shelf_and_books(n=CachedCountField("shelf"))
    error = only_error(book)
    assert error.id == "counts.E006"
    assert "must cross at least one to-many relation" in error.msg
    assert "counts_testapp.Book.shelf is a ForeignKey" in error.msg


@isolate_apps(APP)
def test_e007_a_generic_relation_cannot_be_followed():
    class Item(Throwaway):
        # related_name "+": nothing is added to ContentType, which lives in the real registry.
        content_type = models.ForeignKey(ContentType, models.CASCADE, related_name="+")
        object_id = models.PositiveBigIntegerField()
        target = GenericForeignKey("content_type", "object_id")

    class Shelf(Throwaway):
        items = GenericRelation(Item)
        n = CachedCountField("items")

    error = only_error(Shelf)
    assert error.id == "counts.E007"
    assert error.msg.startswith(
        "'items' crosses counts_testapp.Shelf.items, which is a generic relation (GenericRelation)"
    )


@isolate_apps(APP)
def test_e008_a_forward_key_with_to_field_is_refused():
    class Author(Throwaway):
        code = models.CharField(max_length=10, unique=True)

    shelf, _ = shelf_and_books(
        CachedCountField("books__author", distinct=True),
        author=models.ForeignKey(Author, models.CASCADE, to_field="code", related_name="books"),
    )
    error = only_error(shelf)
    assert error.id == "counts.E008"
    assert error.msg.startswith(
        "counts_testapp.Book.author points at counts_testapp.Author.code (to_field='code'),"
        " not at its primary key counts_testapp.Author.id"
    )
    assert "Remove to_field= from counts_testapp.Book.author" in error.hint


@isolate_apps(APP)
def test_e008_a_reverse_key_with_to_field_is_refused_where_it_was_silently_wrong():
    class Shelf(Throwaway):
        code = models.CharField(max_length=10, unique=True)
        n = CachedCountField("books")

    class Book(Throwaway):
        shelf = models.ForeignKey(Shelf, models.CASCADE, to_field="code", related_name="books")

    error = only_error(Shelf)
    assert error.id == "counts.E008"
    assert "counts_testapp.Book.shelf points at counts_testapp.Shelf.code" in error.msg


@isolate_apps(APP)
def test_e008_a_through_model_key_with_to_field_is_refused():
    class Tag(Throwaway):
        code = models.CharField(max_length=10, unique=True)
        n = CachedCountField("books")

    class Book(Throwaway):
        pass

    class Tagging(Throwaway):
        tag = models.ForeignKey(Tag, models.CASCADE, to_field="code")
        book = models.ForeignKey(Book, models.CASCADE)

    Tag.add_to_class("books", models.ManyToManyField(Book, through=Tagging, related_name="tags"))
    error = only_error(Tag)
    assert error.id == "counts.E008"
    assert "counts_testapp.Tagging.tag points at counts_testapp.Tag.code" in error.msg


@isolate_apps(APP)
def test_e009_a_uuid_key_on_the_model_holding_the_count():
    class Shelf(Throwaway):
        id = models.UUIDField(primary_key=True, default=uuid.uuid4)
        n = CachedCountField("books")

    class Book(Throwaway):
        shelf = models.ForeignKey(Shelf, models.CASCADE, related_name="books")

    error = only_error(Shelf)
    assert error.id == "counts.E009"
    assert error.msg.startswith(
        "counts_testapp.Shelf holds the count and its primary key counts_testapp.Shelf.id is a"
        " UUIDField"
    )
    assert "not supported" in error.msg
    assert error.hint.startswith("Give counts_testapp.Shelf an integer primary key")


@isolate_apps(APP)
def test_e009_a_string_key_on_the_counted_model():
    class Shelf(Throwaway):
        n = CachedCountField("books")

    class Book(Throwaway):
        isbn = models.CharField(max_length=13, primary_key=True)
        shelf = models.ForeignKey(Shelf, models.CASCADE, related_name="books")

    error = only_error(Shelf)
    assert error.id == "counts.E009"
    assert "counts_testapp.Book is the model counted" in error.msg
    assert "counts_testapp.Book.isbn is a CharField" in error.msg


@isolate_apps(APP)
def test_e009_a_uuid_key_anywhere_the_count_reads():
    class Library(Throwaway):
        id = models.UUIDField(primary_key=True, default=uuid.uuid4)
        long_pages = models.IntegerField(default=300)

    class Shelf(Throwaway):
        library = models.ForeignKey(Library, models.CASCADE, related_name="shelves")

    class Book(Throwaway):
        shelf = models.ForeignKey(Shelf, models.CASCADE, related_name="books")
        pages = models.IntegerField()

    class Owner(Throwaway):
        libraries = models.ManyToManyField(Library, related_name="owners")
        # The path crosses the UUID-keyed library ...
        books = CachedCountField("libraries__shelves__books")

    class Genre(Throwaway):
        # ... and here only the filter reaches it, by F().
        long_books = CachedCountField(
            "books", filter=Q(books__pages__gte=F("books__shelf__library__long_pages"))
        )

    Book.add_to_class("genre", models.ForeignKey(Genre, models.CASCADE, related_name="books"))
    on_path = [e for e in errors_of(Owner) if e.id == "counts.E009"]
    assert len(on_path) == 1 and "counts_testapp.Library is on the count's path" in on_path[0].msg
    by_filter = [e for e in errors_of(Genre) if e.id == "counts.E009"]
    assert len(by_filter) == 1
    assert "counts_testapp.Library is read by the count's filter" in by_filter[0].msg


@isolate_apps(APP)
def test_e009_a_uuid_key_on_a_through_model():
    class Tag(Throwaway):
        n = CachedCountField("books")

    class Book(Throwaway):
        pass

    class Tagging(Throwaway):
        id = models.UUIDField(primary_key=True, default=uuid.uuid4)
        tag = models.ForeignKey(Tag, models.CASCADE)
        book = models.ForeignKey(Book, models.CASCADE)

    Tag.add_to_class("books", models.ManyToManyField(Book, through=Tagging, related_name="tags"))
    error = only_error(Tag)
    assert error.id == "counts.E009"
    assert "counts_testapp.Tagging is the through model of a relation on the path" in error.msg


@isolate_apps(APP)
def test_e010_a_filter_that_does_not_resolve():
    shelf, _ = shelf_and_books(CachedCountField("books", filter=Q(books__colour="red")))
    error = only_error(shelf)
    assert error.id == "counts.E010"
    assert error.msg.startswith(
        "filter=Q(books__colour='red') does not resolve on counts_testapp.Shelf: "
    )
    assert "colour" in error.msg


@isolate_apps(APP)
def test_e011_an_expression_in_the_filter():
    class Shelf(Throwaway):
        pass

    class Book(Throwaway):
        shelf = models.ForeignKey(Shelf, models.CASCADE, related_name="books")

    class Review(Throwaway):
        book = models.ForeignKey(Book, models.CASCADE, related_name="reviews")

    reviewed = Exists(Review.objects.filter(book=OuterRef("books")))
    Shelf.add_to_class("n", CachedCountField("books", filter=Q(reviewed)))
    error = only_error(Shelf)
    assert error.id == "counts.E011"
    assert error.msg.startswith(
        "filter= holds an Exists expression (over counts_testapp.Review), not a lookup"
    )
    assert "Q(books__<child>__isnull=False)" in error.hint


@isolate_apps(APP)
def test_e012_a_freshness_column_of_the_models_own():
    class Shelf(Throwaway):
        counts_updated_at = models.IntegerField(default=0)
        n = CachedCountField("books")

    class Book(Throwaway):
        shelf = models.ForeignKey(Shelf, models.CASCADE, related_name="books")

    error = only_error(Shelf)
    assert error.id == "counts.E012"
    assert "counts_testapp.Shelf.counts_updated_at is declared by the model as an IntegerField" in (
        error.msg
    )


# -- all at once, and out of the engine -------------------------------------------------


@isolate_apps(APP)
def test_every_refusal_is_reported_at_once_and_left_out_of_the_graph():
    class Shelf(Throwaway):
        name = models.CharField(max_length=20)
        books_count = CachedCountField("books")  # fine: kept
        by_dict = CachedCountField("books", filter={"books__pages__gte": 300})
        by_exclude = CachedCountField("books", exclude=Q(books__pages=0))
        by_accessor = CachedCountField("book_set")
        by_sum = CachedCountField("books__pages")

    class Book(Throwaway):
        shelf = models.ForeignKey(Shelf, models.CASCADE, related_name="books")
        pages = models.IntegerField()

    found = {str(e.obj).rsplit(".", 1)[1]: e.id for e in errors_of(Shelf)}
    assert found == {
        "by_dict": "counts.E002",
        "by_exclude": "counts.E003",
        "by_accessor": "counts.E004",
        "by_sum": "counts.E005",
    }
    specs = resolve_all([Shelf, Book])  # no exception: refused declarations are skipped
    assert [s.key for s in specs] == ["counts_testapp.shelf.books_count"]
    with pytest.raises(DeclarationError, match=r"\(counts.E005\) path 'books__pages'"):
        resolve(Shelf, Shelf._meta.get_field("by_sum"))

    # What stops trigger migrations under --skip-checks (makemigrations and migrate).
    with pytest.raises(RefusedDeclarations) as refusal:
        refuse_unsupported([Shelf, Book])
    text = str(refusal.value)
    assert text.startswith("counts: 4 cached count declaration problem(s)")
    assert "counts_testapp.Shelf.by_dict: (counts.E002) filter= takes a Q object" in text
    assert "HINT: Write filter=Q(books__pages__gte=300)." in text
    assert len(refusal.value.errors) == 4


@isolate_apps(APP)
def test_accepted_shapes_raise_nothing():
    class Library(Throwaway):
        long_pages = models.IntegerField(default=300)
        reviews = CachedCountField("shelves__books__reviews")

    class Author(Throwaway):
        pass

    class Shelf(Throwaway):
        library = models.ForeignKey(Library, models.CASCADE, related_name="shelves")
        books_count = CachedCountField("books")
        long_books = CachedCountField("books", filter=Q(books__pages__gte=F("library__long_pages")))
        authors = CachedCountField("books__author", distinct=True)
        unrated = CachedCountField("books", filter=~Q(books__reviews__stars__isnull=False))

    class Book(Throwaway):
        shelf = models.ForeignKey(Shelf, models.CASCADE, related_name="books")
        author = models.ForeignKey(Author, models.SET_NULL, null=True, related_name="books")
        pages = models.IntegerField(null=True)

    class Review(Throwaway):
        book = models.ForeignKey(Book, models.CASCADE, related_name="reviews")
        stars = models.IntegerField(null=True)

    class Tag(Throwaway):
        books = models.ManyToManyField(Book, related_name="tags")
        books_count = CachedCountField("books")

    models_ = [Library, Author, Shelf, Book, Review, Tag]
    assert [e for m in models_ for e in errors_of(m)] == []
    assert len(resolve_all(models_)) == 6


def test_without_refusals_the_graph_is_what_resolving_every_declaration_gave(monkeypatch):
    """The checks change nothing for a project with no refused declaration: the graph (and so
    every trigger) equals the one built by resolving every declaration with no check at all."""
    from counts.apps import graph
    from counts.compile.triggers import compile_triggers
    from counts.declare import resolve as counts_resolve
    from counts.declare.classify import fold_into_items
    from counts.declare.graph import Graph

    monkeypatch.setattr(counts_resolve, "declaration_errors", lambda model, field: [])
    models_ = sorted(apps.get_models(), key=lambda m: m._meta.label_lower)
    unchecked = Graph.build(
        fold_into_items([resolve(m, f) for m in models_ for f in cached_count_fields(m)])
    )
    assert unchecked == graph()
    assert compile_triggers(unchecked) == compile_triggers(graph())


@pytest.mark.django_db
@isolate_apps(APP)
def test_makemigrations_with_skip_checks_writes_no_trigger_for_a_refused_declaration(
    monkeypatch,
):
    from counts.declare import refusals
    from counts.management.migrations_writer import pending_migrations

    shelf, book = shelf_and_books(CachedCountField("books", filter={"books__pages": 1}))
    registry = type("Registry", (), {"get_models": staticmethod(lambda: [shelf, book])})
    monkeypatch.setattr(refusals, "apps", registry)
    with pytest.raises(RefusedDeclarations, match=r"counts_testapp\.Shelf\.n: \(counts\.E002\)"):
        pending_migrations()
    with pytest.raises(RefusedDeclarations):
        call_command("makemigrations", "--dry-run", skip_checks=True, verbosity=0)


def test_the_domain_declarations_pass_one_by_one():
    for model in (Deployment, SourceImageCollection):
        for f in cached_count_fields(model):
            assert declaration_errors(model, f) == []


# -- instances in memory ----------------------------------------------------------------


@isolate_apps(APP)
def test_refresh_counts_is_added_once_and_never_over_the_models_own():
    class Shelf(Throwaway):
        a = CachedCountField("books")
        b = CachedCountField("books")

        def refresh_counts(self):
            return "mine"

    class Plain(Throwaway):
        a = CachedCountField("plains")

    class Nothing(Throwaway):
        pass

    assert Shelf(pk=1).refresh_counts() == "mine"
    assert callable(Plain.refresh_counts)
    assert not hasattr(Nothing, "refresh_counts")


@pytest.mark.django_db
def test_refresh_counts_reads_every_count_and_freshness_in_one_query(
    world, django_assert_num_queries
):
    from project.monitoring.models import Event

    d1 = Deployment.objects.get(pk=world.d1.pk)
    Event.objects.create(deployment=d1, start=world.e1.start)
    drain_all()
    assert d1.events_count == 2  # what it loaded
    d1.name = "renamed, not saved"
    with django_assert_num_queries(1):
        d1.refresh_counts()
    stored = cached("monitoring_deployment")[d1.pk]
    assert {k: getattr(d1, k) for k in stored} == stored
    assert d1.events_count == 3 and d1.counts_updated_at is not None
    assert d1.name == "renamed, not saved"  # only the counts were read


@pytest.mark.django_db
def test_a_clone_inserts_from_zero_and_a_drain_leaves_its_counts_true(world, marks):
    source = Deployment.objects.get(pk=world.d1.pk)
    assert source.events_count == 2 and source.counts_updated_at is not None
    clone = source
    clone.pk = None
    clone._state.adding = True
    clone.name = "Station A (copy)"
    clone.save()
    assert marks.rows() == []  # nothing to recount: the row was inserted as any new one is
    # The insert starts from 0 (no made-up counts kept until a recount), and so does the
    # instance in memory.
    assert cached("monitoring_deployment")[clone.pk] == truth("monitoring_deployment")[clone.pk]
    assert clone.events_count == 0 and clone.counts_updated_at is None
    drain_all()
    assert cached("monitoring_deployment")[clone.pk] == truth("monitoring_deployment")[clone.pk]
    clone.refresh_counts()
    assert clone.events_count == 0 and clone.captures_count == 0
    assert_all_counts_exact()


@pytest.mark.django_db
def test_a_clone_of_a_capture_set_counts_its_own_images(world, marks):
    clone = SourceImageCollection.objects.get(pk=world.c1.pk)
    assert clone.source_images_count == 3
    clone.pk = None
    clone._state.adding = True
    clone.save()
    clone.images.set([world.i4])
    drain_all()
    clone.refresh_counts()
    assert clone.source_images_count == 1
    assert_all_counts_exact()
